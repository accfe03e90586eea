"""Rank allocation strategies: V2's heterogeneous ratios, last-k layers, the whitened spectra."""
import pytest
import torch

from conftest import tiny_llama
from svdcore.compress import collect_grams
from svdcore.covariances import linear_shapes, load_layer, save_layer
from svdcore.decompose import truncate_whitened, whitening
from svdcore.errors import UserError
from svdcore.ranks import (V2_MAX_RATIO, allocate, keeps_dense, last_k_ranks, layer_index, matrix_type,
                           parameter_count, rank_for_ratio, truncation_loss, uniform_ranks, v2_ranks)
from svdcore.spectra import load_spectra, save_spectra, whitened_spectra, whitened_spectrum

CPU = torch.device("cpu")
LAYERS = 6
SHAPES = {f"model.layers.{i}.{local}": shape for i in range(LAYERS)
          for local, shape in (("self_attn.q_proj", [64, 64]), ("self_attn.k_proj", [32, 64]),
                               ("mlp.up_proj", [160, 64]), ("mlp.down_proj", [64, 160]))}


def spectra_for(shapes, seed=0):
    """Decaying spectra, each matrix its own decay rate: some lose much more than others."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n) in shapes.items():
        rate = 0.02 + 0.3 * torch.rand((), generator=gen, dtype=torch.float64)
        out[name] = 10 * torch.exp(-rate * torch.arange(min(m, n), dtype=torch.float64))
    return out


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.6])
def test_v2_spends_the_budget_exactly_and_never_reaches_break_even(ratio):
    spectra = spectra_for(SHAPES)
    ranks = v2_ranks(SHAPES, spectra, ratio)
    dense = parameter_count(SHAPES, {n: None for n in SHAPES})
    target = round((1 - ratio) * dense)
    kept = parameter_count(SHAPES, ranks)
    smallest_step = min(m + n for m, n in SHAPES.values())
    assert target - smallest_step < kept <= target
    for name, rank in ranks.items():
        m, n = SHAPES[name]
        assert rank is None or (1 <= rank and not keeps_dense(m, n, rank))
    assert ranks != uniform_ranks(SHAPES, ratio)  # heterogeneous
    assert v2_ranks(SHAPES, spectra, ratio) == ranks  # deterministic


def test_v2_compresses_more_the_matrices_that_lose_less():
    spectra = spectra_for(SHAPES, seed=3)
    ranks = v2_ranks(SHAPES, spectra, 0.3)
    for kind in ("self_attn.q_proj", "mlp.down_proj"):
        names = [n for n in SHAPES if matrix_type(n) == kind]
        loss = {n: truncation_loss(spectra[n], rank_for_ratio(*SHAPES[n], 0.3)) for n in names}
        least, most = min(names, key=loss.get), max(names, key=loss.get)
        assert ranks[least] < ranks[most]
    assert v2_ranks(SHAPES, spectra, 0.0) == {n: None for n in SHAPES}


def test_v2_clamps_a_type_and_redistributes_its_budget():
    """One matrix whose loss is zero at the uniform rank would get a ratio far past V2_MAX_RATIO;
    it is clamped, and the other matrices pay for the clamp so the budget still holds."""
    spectra = spectra_for(SHAPES)
    flat = "model.layers.0.self_attn.q_proj"
    spectra[flat] = torch.cat([torch.ones(4, dtype=torch.float64), torch.zeros(60, dtype=torch.float64)])
    ranks = v2_ranks(SHAPES, spectra, 0.4)
    m, n = SHAPES[flat]
    assert ranks[flat] >= rank_for_ratio(m, n, V2_MAX_RATIO)
    target = round(0.6 * parameter_count(SHAPES, {k: None for k in SHAPES}))
    assert target - min(a + b for a, b in SHAPES.values()) < parameter_count(SHAPES, ranks) <= target


def test_last_k_compresses_only_the_last_layers_at_the_scaled_ratio():
    ranks = last_k_ranks(SHAPES, 0.2, 3)
    assert {layer_index(n) for n, r in ranks.items() if r is not None} == {3, 4, 5}
    assert all(ranks[n] == rank_for_ratio(*SHAPES[n], 0.4) for n in SHAPES if layer_index(n) >= 3)
    dense = parameter_count(SHAPES, {n: None for n in SHAPES})
    assert 1 - parameter_count(SHAPES, ranks) / dense == pytest.approx(0.2, abs=0.02)
    with pytest.raises(UserError, match="compress.last_layers: 1 layers would each lose 120%"):
        last_k_ranks(SHAPES, 0.2, 1)
    with pytest.raises(UserError, match=r"compress.last_layers: expected 1 to 6"):
        last_k_ranks(SHAPES, 0.2, 7)
    ranks, decided = allocate(SHAPES, 0.2, "last-k")
    assert decided == {"last_layers": 5}  # the rule: the last three quarters of 6, rounded up
    with pytest.raises(UserError, match="the v2 allocation needs the whitened spectra"):
        allocate(SHAPES, 0.2, "v2")


def test_whitened_spectrum_prices_every_truncation(tmp_path):
    """The spectrum's tail is SVD-LLM's loss at any rank, on both sides (m <= n and m > n)."""
    model = tiny_llama()
    windows = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    collect_grams(model, windows, 4, CPU, lambda i, st: save_layer(tmp_path, i, st))
    spectra = whitened_spectra(model, tmp_path, CPU)
    assert set(spectra) == set(linear_shapes(model))
    stats = load_layer(tmp_path, 1)
    for local in ("self_attn.q_proj", "mlp.gate_proj"):  # 64 x 64 and 160 x 64
        weight = model.get_submodule(f"model.layers.1.{local}").weight.detach().double()
        gram = stats.grams[stats.shares[local]] / stats.tokens
        spectrum = spectra[f"model.layers.1.{local}"]
        torch.testing.assert_close(spectrum, whitened_spectrum(weight, gram))
        for rank in (3, 20):
            a, b = truncate_whitened(weight, whitening(gram), rank)
            d = weight - a @ b
            assert truncation_loss(spectrum, rank) ** 2 == pytest.approx(float(((d @ gram) * d).sum()), rel=1e-7)
    save_spectra(tmp_path / "s.safetensors", spectra)
    assert all(torch.equal(v, spectra[k]) for k, v in load_spectra(tmp_path / "s.safetensors").items())
    with pytest.raises(UserError, match="spectra: .* is unreadable"):
        load_spectra(tmp_path / "missing.safetensors")
