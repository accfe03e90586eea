"""model.load by-layer: the model built on the meta device, its decoder layers read from the
safetensors checkpoint one at a time, the compressed model written a layer at a time; the same
statistics and factors as the whole model in memory (svdcore.checkpoint)."""
import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ARCHITECTURES, ROOT, stats_dir, tiny_causal_lm, tiny_tokenizer
from stages.pipeline import stage_modules
from svdcore import checkpoint as ckpt
from svdcore.checkpoint import ByLayer, ShardWriter, load_by_layer
from svdcore.compress import collect_grams, compress_model
from svdcore.covariances import linear_shapes, load_layer, save_layer
from svdcore.errors import UserError
from svdcore.lowrank import load_compressed, save_compressed
from svdcore.methods import recipe
from svdcore.model import decoder_layers, load_model
from svdcore.ranks import uniform_ranks

CPU = torch.device("cpu")
F32 = torch.float32


def sharded(arch, path, vocab=320):
    """A tiny model of `arch` saved in several safetensors shards (an index, as big checkpoints are),
    with generation settings of its own (which the compressed model must keep)."""
    model = tiny_causal_lm(arch, vocab)
    model.generation_config.max_length, model.generation_config.eos_token_id = 77, [0, 1]
    model.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def windows(vocab=320):
    return torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(0))


def materialized_layers(model) -> int:
    return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in decoder_layers(model))


def compress_by_layer(source, ranks, rec, stats, out, **kwargs):
    model, checkpoint = load_by_layer(str(source), F32)
    out.mkdir()
    writer = ShardWriter(out, torch.bfloat16)
    report = compress_model(model, ranks, rec, stats, CPU, windows(), 4, **kwargs,
                            by_layer=ByLayer(model, checkpoint, CPU, F32, writer.write_layer))
    save_compressed(model, None, out, dtype=torch.bfloat16, shards=writer)
    return model, report


def saved_names(directory) -> set[str]:
    from safetensors import safe_open

    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names |= set(f.keys())
    return names


def same_saved_model(whole_dir, layer_dir):
    """The same tensors under the same names in the files (none extra), the same config and
    generation settings."""
    assert saved_names(whole_dir) == saved_names(layer_dir)
    whole, by_layer = load_compressed(whole_dir).state_dict(), load_compressed(layer_dir).state_dict()
    assert whole.keys() == by_layer.keys()
    assert [name for name in whole if not torch.equal(whole[name], by_layer[name])] == []
    for name in ("config.json", "generation_config.json"):
        assert json.loads((whole_dir / name).read_text()) == json.loads((layer_dir / name).read_text()), name
    assert json.loads((layer_dir / "generation_config.json").read_text())["max_length"] == 77


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_by_layer_gives_the_statistics_and_factors_of_the_whole_model(arch, tmp_path):
    source = sharded(arch, tmp_path / "source")
    whole = load_model(str(source))
    (tmp_path / "whole").mkdir()
    whole_stats = stats_dir(whole, windows(), tmp_path / "whole")

    model, checkpoint = load_by_layer(str(source), F32)
    assert materialized_layers(model) == 0
    outside = {n: p for n, p in model.named_parameters() if p.device.type != "meta"}
    assert outside and all(torch.equal(p, whole.get_parameter(n)) for n, p in outside.items())
    tied = whole.get_output_embeddings().weight is whole.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    layer_stats = tmp_path / "by-layer"
    layer_stats.mkdir()
    collect_grams(model, windows(), 4, CPU, lambda i, st: save_layer(layer_stats, i, st),
                  by_layer=ByLayer(model, checkpoint, CPU, F32))
    assert materialized_layers(model) == 0  # every layer dropped once the pass is done with it
    for index in range(len(decoder_layers(whole))):
        a, b = load_layer(whole_stats, index), load_layer(layer_stats, index)
        assert a.shares == b.shares and a.tokens == b.tokens
        assert all(torch.equal(a.grams[g], b.grams[g]) and torch.equal(a.abs_means[g], b.abs_means[g]) for g in a.grams)

    # SVD-LLM from the statistics on disk (no forward pass), saved in bfloat16 as the pipeline does
    rec = recipe("svd-llm")
    ranks = uniform_ranks(linear_shapes(whole), 0.3)
    compress_model(whole, ranks, rec, whole_stats, CPU)
    save_compressed(whole, None, tmp_path / "whole-model", dtype=torch.bfloat16)
    compress_by_layer(source, ranks, rec, whole_stats, tmp_path / "layer-model")
    same_saved_model(tmp_path / "whole-model", tmp_path / "layer-model")


def test_by_layer_holds_one_layer_at_a_time_and_gives_the_same_refined_model(tmp_path, monkeypatch):
    """Both streams, the anchored closed form and refinement: layer i is read only when the loop
    reaches it, after layer i - 1 was written and dropped; the factors are bit-equal to the
    in-memory run's."""
    source = sharded("llama", tmp_path / "source")
    whole = load_model(str(source))
    (tmp_path / "stats").mkdir()
    stats = stats_dir(whole, windows(), tmp_path / "stats")
    rec = recipe("aa-svd", refine_steps=3)
    ranks = uniform_ranks(linear_shapes(whole), 0.3)
    compress_model(whole, ranks, rec, stats, CPU, windows(), 4)
    save_compressed(whole, None, tmp_path / "whole-model", dtype=torch.bfloat16)

    seen = []
    fill = ckpt.fill

    def watched(root, root_name, *args, **kwargs):
        if root_name:  # a decoder layer
            seen.append(("read", root_name, materialized_layers(model)))
        return fill(root, root_name, *args, **kwargs)

    monkeypatch.setattr(ckpt, "fill", watched)
    model, checkpoint = load_by_layer(str(source), F32)
    (tmp_path / "layer-model").mkdir()
    writer = ShardWriter(tmp_path / "layer-model", torch.bfloat16)

    def write(name, layer):
        seen.append(("write", name, materialized_layers(model)))
        writer.write_layer(name, layer)

    report = compress_model(model, ranks, rec, stats, CPU, windows(), 4,
                            by_layer=ByLayer(model, checkpoint, CPU, F32, write))
    save_compressed(model, None, tmp_path / "layer-model", dtype=torch.bfloat16, shards=writer)
    assert seen == [("read", "model.layers.0", 0), ("write", "model.layers.0", 1),
                    ("read", "model.layers.1", 0), ("write", "model.layers.1", 1)]
    assert materialized_layers(model) == 0
    assert report["refine"] and len(report["stream_gap"]) == 2
    same_saved_model(tmp_path / "whole-model", tmp_path / "layer-model")
    index = json.loads((tmp_path / "layer-model/model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_the_stages_by_layer_write_what_they_write_whole(tmp_path, monkeypatch):
    """Every stage with model.load by-layer (and a streamed perplexity, nothing else to score, so
    that the evaluations read by layer too), against whole: the same statistics and spectra, byte
    for byte, the same compressed model, the same perplexities."""
    tokenizer = tiny_tokenizer()
    source = sharded("qwen2", tmp_path / "source", len(tokenizer))
    tokenizer.save_pretrained(source)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(device="cpu")
    params["model"]["name"] = str(source)
    params["calibration"].update(samples=8, seqlen=32)
    params["compress"].update(ratio=0.3, method="best", allocation="uniform",
                              refine={**params["compress"]["refine"], "steps": 2})
    params["evaluate"].update(seqlen=32, max_windows=4, stream_layers=True)
    params["zeroshot"]["tasks"], params["generate"]["prompts"] = [], []
    monkeypatch.setenv("SVDCORE_DATA", str(ROOT / "data"))
    monkeypatch.delenv("DVC_ROOT", raising=False)
    from stages.common import run

    streamed = []
    monkeypatch.setattr(ckpt.ByLayer, "__init__", lambda self, *a, _init=ckpt.ByLayer.__init__, **k:
                        streamed.append(1) or _init(self, *a, **k))
    for load in ("whole", "by-layer"):
        work = tmp_path / load
        work.mkdir()
        monkeypatch.chdir(work)
        params["model"]["load"] = load
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        for name, module in stage_modules():
            run(name, importlib.import_module(f"stages.{module}").work)
        if load == "whole":
            assert not streamed
    assert len(streamed) == 5  # covariances, spectra, truncate-and-update and both evaluations
    whole, by_layer = tmp_path / "whole", tmp_path / "by-layer"
    files = sorted(p.relative_to(whole) for p in (whole / "artifacts/stats").rglob("*") if p.is_file())
    files += [Path("artifacts/spectra.safetensors"), Path("artifacts/linears.json")]
    assert len(files) > 2 and all((whole / f).read_bytes() == (by_layer / f).read_bytes() for f in files)
    same_saved_model(whole / "models/compressed", by_layer / "models/compressed")
    assert len(list((by_layer / "models/compressed").glob("model-*-of-*.safetensors"))) == 3
    assert json.loads((by_layer / "metrics/compress.json").read_text())["refine"]
    metrics = [json.loads((w / "metrics/evaluate.json").read_text()) for w in (whole, by_layer)]
    for model in ("dense", "compressed"):
        assert metrics[0][model]["ppl"] == metrics[1][model]["ppl"] and metrics[0][model]["ppl"]["wikitext2"] > 1

    # a failure halfway through leaves the model of the last run as it was, and nothing half-written
    before = {p.name: p.read_bytes() for p in (by_layer / "models/compressed").iterdir()}
    write = ckpt.ShardWriter.write

    def full_disk(self, tensors):
        if self.files:
            raise OSError(28, "No space left on device")
        write(self, tensors)

    monkeypatch.setattr(ckpt.ShardWriter, "write", full_disk)
    monkeypatch.chdir(by_layer)
    with pytest.raises(OSError, match="No space left on device"):
        run("truncate-and-update", importlib.import_module("stages.truncate_and_update").work)
    assert {p.name: p.read_bytes() for p in (by_layer / "models/compressed").iterdir()} == before
    assert not list((by_layer / "models").glob(".compressed.*"))  # no temporary folder left


def test_by_layer_reads_in_the_compute_dtype(tmp_path):
    """A float32 checkpoint read in bfloat16 holds what load_model(bfloat16) holds, layer by layer."""
    source = sharded("mistral", tmp_path / "source")
    whole = load_model(str(source), torch.bfloat16).state_dict()
    model, checkpoint = load_by_layer(str(source), torch.bfloat16)
    mover = ByLayer(model, checkpoint, CPU, torch.bfloat16)
    read = {}
    for layer in decoder_layers(model):
        home = mover.move(layer)()
        read.update({name: t.clone() for name, t in model.state_dict().items() if t.device.type != "meta"})
        mover.send_home(layer, home)
    assert read.keys() == whole.keys() and all(t.dtype == torch.bfloat16 for t in read.values() if t.is_floating_point())
    assert [name for name in whole if not torch.equal(whole[name], read[name])] == []


def test_by_layer_needs_safetensors_and_every_tensor(tmp_path):
    source = sharded("llama", tmp_path / "source")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights/config.json").write_text((source / "config.json").read_text())
    with pytest.raises(UserError, match=r"^model.load: by-layer reads safetensors, and .*no-weights has neither "
                                        r"model.safetensors nor model.safetensors.index.json \(use model.load whole\)$"):
        load_by_layer(str(tmp_path / "no-weights"), F32)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"^model: the checkpoint in .* has no tensor model.norm.weight$"):
        load_by_layer(str(source), F32)


def test_by_layer_refuses_a_family_whose_checkpoints_transformers_converts(tmp_path):
    import transformers as tf

    config = tf.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=100, num_local_experts=2)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    with pytest.raises(UserError, match=r"^model.load: by-layer reads a checkpoint under the model's own tensor "
                                        r"names, and transformers converts the checkpoints of MixtralForCausalLM"):
        load_by_layer(str(tmp_path / "moe"), F32)
