"""The streamed statistics pass, compression and the saved model, on a tiny GQA Llama."""

import pytest
import torch
from torch import nn

from conftest import logits_in_fresh_process, tiny_llama
from svdcore.compress import compress_model
from svdcore.covariances import collect_grams, linear_shapes, load_layer, save_layer
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
    torch.testing.assert_close(logits_in_fresh_process(out, ids, tmp_path), expected, rtol=0, atol=0)


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
