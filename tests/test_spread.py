"""Zero-shot scoring and generation over a device map (evaluate.device_map auto): a model spread by
accelerate, here over CPU memory and a disk offload folder, scores and writes what it scores and
writes whole, dense or compressed."""
import pytest
import torch

from conftest import DEFAULTS, tiny_tokenizer, with_value
from svdcore import params as params_module
from svdcore.compress import compress_model
from svdcore.covariances import linear_shapes
from svdcore.evaluation import measure
from svdcore.generation import generate_samples
from svdcore.lowrank import load_compressed, save_compressed
from svdcore.model import decoder_layers, load_model
from svdcore.ranks import uniform_ranks
from svdcore.spread import accelerate_memory, spread_model
from svdcore.zeroshot import evaluate_zeroshot

CPU = torch.device("cpu")


def room_for_one_layer(model) -> dict[str, str]:
    """A CPU budget that holds what lies outside the layers and about one layer: the rest goes to disk."""
    layer = sum(p.numel() * p.element_size() for p in decoder_layers(model)[0].parameters())
    outside = sum(p.numel() * p.element_size() for p in model.parameters()) - \
        layer * len(decoder_layers(model))
    return {"cpu": f"{(outside + 1.5 * layer) / 1000:.0f}KB"}


@pytest.fixture(scope="module")
def compressed_dir(tiny_model_dir, tmp_path_factory):
    model = load_model(str(tiny_model_dir), torch.float32)
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    compress_model(model, uniform_ranks(linear_shapes(model), 0.3), "svd-llm", None, CPU, windows)
    path = tmp_path_factory.mktemp("compressed")
    save_compressed(model, tiny_tokenizer(), path)
    return path


@pytest.mark.parametrize("which", ["dense", "compressed"])
def test_a_spread_model_scores_and_writes_as_the_whole_one(which, tiny_model_dir, compressed_dir):
    tokenizer = tiny_tokenizer()
    path = str(tiny_model_dir) if which == "dense" else str(compressed_dir)
    whole = load_model(path, torch.float32) if which == "dense" else load_compressed(path, torch.float32)
    prompts = ["The history of", "In 1998 the"]
    scores, _ = evaluate_zeroshot(whole, tokenizer, ["piqa", "winogrande"], 4, 4, CPU)
    with spread_model(path, torch.float32, room_for_one_layer(whole), compressed=which == "compressed") as spread:
        placed = set(spread.hf_device_map.values())
        assert placed == {"cpu", "disk"}, spread.hf_device_map  # some layers offloaded, as a big model's would be
        spread_scores, _ = evaluate_zeroshot(spread, tokenizer, ["piqa", "winogrande"], 4, 4, CPU)
        assert spread_scores["tasks"] == scores["tasks"]
        assert generate_samples(spread, tokenizer, prompts, 8, CPU) == generate_samples(whole, tokenizer, prompts, 8, CPU)
        ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(spread(ids).logits, whole(ids).logits)


def test_measure_scores_the_spread_copy_only_when_asked(tiny_model_dir):
    tokenizer = tiny_tokenizer()
    model = load_model(str(tiny_model_dir), torch.float32)
    loads = []

    def spread():
        loads.append(1)
        return spread_model(str(tiny_model_dir), torch.float32, room_for_one_layer(model))

    base = with_value("zeroshot.tasks", ["piqa"])
    base.update(device="cpu")
    base["zeroshot"]["limit"] = 3
    base["generate"].update(prompts=["Once upon"], max_new_tokens=4)
    base["evaluate"].update(datasets=["wikitext2"], seqlen=32, max_windows=2)
    results = []
    for device_map in ("none", "auto"):
        base["evaluate"]["device_map"] = device_map
        results.append(measure(model, tokenizer, params_module.validate(base), CPU, "tiny", spread=spread)[0])
    assert len(loads) == 1  # device_map none never loads the spread copy
    assert results[0]["zeroshot"]["tasks"] == results[1]["zeroshot"]["tasks"] and results[0]["samples"] == results[1]["samples"]
    assert results[0]["ppl"] == results[1]["ppl"]
    base["zeroshot"]["tasks"], base["generate"]["prompts"] = [], []
    measure(model, tokenizer, params_module.validate(base), CPU, "tiny", spread=spread)
    assert len(loads) == 1  # nothing to score whole: no spread copy either


def test_max_memory_is_given_to_accelerate_with_gpu_indices():
    assert accelerate_memory({}) is None
    assert accelerate_memory({"cuda:1": "70GiB", "cpu": "100GiB"}) == {1: "70GiB", "cpu": "100GiB"}
    assert DEFAULTS["evaluate"]["device_map"] == "none"
