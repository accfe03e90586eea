"""The method family: each method's defining identity, presets and knobs, the closed-form update."""
import copy

import pytest
import torch

from conftest import DEFAULTS, SHAPES, output_error, random_problem, stats_dir, tiny_llama
from svdcore.compress import compress_model, refit_a
from svdcore.covariances import linear_shapes
from svdcore.decompose import eigen_whitening, truncate_scaled, truncate_svd, truncate_whitened, whitening
from svdcore.errors import UserError
from svdcore.lowrank import LowRankLinear
from svdcore.fisher import fisher_scales
from svdcore.methods import METRICS, PRESETS, Recipe, last_layers_rule, recipe, split_rank
from svdcore.ranks import uniform_ranks
from svdcore import params as params_module

CPU = torch.device("cpu")


@pytest.mark.parametrize("m,n", SHAPES)
def test_asvd_with_unit_scales_is_plain_svd(m, n):
    weight, _ = random_problem(m, n, 10)
    a, b = truncate_scaled(weight, torch.ones(n, dtype=torch.float64), 6)
    a0, b0 = truncate_svd(weight, 6)
    torch.testing.assert_close(a @ b, a0 @ b0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m,n", SHAPES)
def test_asvd_error_is_the_dropped_scaled_singular_values(m, n):
    weight, x = random_problem(m, n, 200)
    scales = x.abs().mean(0) ** 0.5
    a, b = truncate_scaled(weight, scales, 6)
    dropped = (torch.linalg.svdvals(weight * scales)[6:] ** 2).sum()
    assert float(torch.linalg.matrix_norm((weight - a @ b) * scales) ** 2) == pytest.approx(float(dropped), rel=1e-9)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("tokens", [200, 12])  # full-rank Gram, and a singular one (12 tokens < n)
def test_eigen_whitening_and_cholesky_whitening_lose_the_same(m, n, tokens):
    weight, x = random_problem(m, n, tokens, seed=3)
    gram = x.T @ x
    rank = 5
    eigen = eigen_whitening(gram)
    best = float((torch.linalg.svdvals(weight @ x.T)[rank:] ** 2).sum())
    assert float(output_error(weight, *truncate_whitened(weight, eigen, rank), x)) == pytest.approx(best, rel=1e-9)
    if tokens >= n:
        chol = whitening(gram)
        assert chol.route == "cholesky"
        assert float(output_error(weight, *truncate_whitened(weight, chol, rank), x)) == pytest.approx(best, rel=1e-9)


def test_refit_reaches_the_least_squares_optimum_and_never_loses():
    gen = torch.Generator().manual_seed(4)
    m, n, r, tokens = 20, 30, 6, 500
    weight = torch.randn(m, n, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ torch.randn(n, n, generator=gen, dtype=torch.float64)
    low = LowRankLinear(n, m, r, dtype=torch.float64)
    a0, b = truncate_svd(weight, r)  # plain SVD: far from optimal for these inputs
    low.A.data.copy_(a0)
    low.B.data.copy_(b)
    before, after = refit_a(low, weight, x.T @ x)
    # independent reference: min_A ||W X^T - A (B X^T)||_F by least squares on the tokens
    z = b @ x.T
    a_ls = torch.linalg.lstsq(z.T, (weight @ x.T).T).solution.T
    best = float(output_error(weight, a_ls, b, x))
    assert before == pytest.approx(float(output_error(weight, a0, b, x)), rel=1e-9)
    assert after == pytest.approx(best, rel=1e-6) and after < before
    torch.testing.assert_close(low.A.detach(), a_ls, rtol=1e-4, atol=1e-5)  # up to the 1e-6 ridge
    # at the optimum already: a second refit changes nothing and reports no loss
    again_before, again_after = refit_a(low, weight, x.T @ x)
    assert again_after <= again_before == pytest.approx(after, rel=1e-9)


def final_hidden_error(model, dense, windows):
    with torch.no_grad():
        got = model(windows, output_hidden_states=True).hidden_states[-1]
        want = dense(windows, output_hidden_states=True).hidden_states[-1]
    return float((got - want).square().sum())


def test_update_refits_a_and_lowers_the_linears_calibration_error(tmp_path):
    dense = tiny_llama()
    windows = torch.randint(0, 320, (12, 32), generator=torch.Generator().manual_seed(1))
    stats = stats_dir(dense, windows, tmp_path)
    ranks = uniform_ranks(linear_shapes(dense), 0.4)
    plain, updated = tiny_llama(), tiny_llama()
    compress_model(plain, ranks, "svd-llm", stats, CPU)
    report = compress_model(updated, ranks, Recipe("whitening", update=True), stats, CPU, windows, 4)
    assert report["recipe"] == {"metric": "whitening", "alpha": 0.5, "update": True, "allocation": "uniform",
                                "residual_fraction": 0.0, "residual_metric": None, "last_layers": None,
                                "anchor": None, "anchor_ridge": 0.0, "refine_steps": 0, "refine_lr": 2e-4,
                                "refine_holdout": 0.0}
    # summed over all linears, ||(W - A B) X~||^2 on the compressed prefix's inputs went down
    assert 0 < report["update_error_ratio"] < 1
    lows = [(n, m) for n, m in updated.named_modules() if isinstance(m, LowRankLinear)]
    assert len(lows) == 14
    for name, low in lows:  # only A is refitted; B is the truncation's
        torch.testing.assert_close(low.B, plain.get_submodule(name).B, rtol=0, atol=0)
    assert any(not torch.equal(low.A, plain.get_submodule(name).A) for name, low in lows)
    with pytest.raises(UserError, match="compress.update: the closed-form update needs the calibration windows"):
        compress_model(tiny_llama(), ranks, Recipe("whitening", update=True), stats, CPU)


ROUTES_TAKEN = {  # tiny Llama: gate/up are the only matrices with more outputs than inputs
    ("auto", "plain"): {"eigh-out", "eigh-in"},
    ("auto", "activation"): {"eigh-out/activation", "eigh-in/activation"},
    ("auto", "fisher"): {"eigh-out/fisher", "eigh-in/fisher"},
    ("auto", "whitening"): {"eigh-out", "eigh-in/cholesky"},
    ("auto", "eigen-whitening"): {"eigh-out", "eigh-in/eigen"},
    ("svd", "plain"): {"svd"},
    ("svd", "activation"): {"svd/activation"},
    ("svd", "fisher"): {"svd/fisher"},
    ("svd", "whitening"): {"svd/cholesky"},
    ("svd", "eigen-whitening"): {"svd/eigen"},
}


@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_compresses_the_tiny_model_alike_on_every_route(metric, tmp_path):
    windows = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    stats = stats_dir(tiny_llama(), windows, tmp_path)
    ranks = uniform_ranks(linear_shapes(tiny_llama()), 0.3)
    fisher = fisher_scales(tiny_llama(), windows, 4, CPU) if metric == "fisher" else None
    products = {}
    for route in ("auto", "svd"):
        model = tiny_llama()
        report = compress_model(model, ranks, Recipe(metric), stats, CPU, route=route, fisher=fisher)
        assert set(report["route_counts"]) == ROUTES_TAKEN[route, metric]
        assert sum(report["route_counts"].values()) == 14
        assert final_hidden_error(model, tiny_llama(), windows) > 0
        products[route] = {n: m.A @ m.B for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    for name, product in products["svd"].items():  # the same truncation, reached another way
        torch.testing.assert_close(products["auto"][name], product, rtol=1e-4, atol=1e-5)


def test_presets_and_knobs():
    assert {name: recipe(name).metric for name in PRESETS} == {
        "svd": "plain", "fwsvd": "fisher", "asvd": "activation", "svd-llm": "whitening",
        "svd-llm-v2": "eigen-whitening", "ressvd": "whitening", "aa-svd": "whitening", "best": "whitening"}
    assert recipe("svd-llm-v2").allocation == "v2" and recipe("ressvd").allocation == "last-k"
    assert recipe("ressvd").residual_fraction == 0  # measured: every split tried lost (bench/ressvd.py)
    assert recipe("ressvd", residual_fraction=0.25).residual_metric == "plain"
    assert recipe("svd-llm", "eigen-whitening", 0.5, True) == Recipe("eigen-whitening", 0.5, True)
    # knobs combine: V2 allocation + a residual stage + the update on plain SVD-LLM
    mixed = recipe("svd-llm", None, 0.5, True, "v2", 0.5, "activation")
    assert (mixed.allocation, mixed.residual_metric, mixed.update, mixed.needs_stats) == ("v2", "activation", True, True)
    assert recipe("svd", residual_fraction=0.5, residual_metric="fisher").needs_fisher
    assert not recipe("ressvd", residual_fraction=0).residual_metric  # 0 turns the stage off
    # knobs that do not fit together stop in recipe(), and so already when params.yaml is read, with
    # the knob's key first (each value alone is params.yaml's types' to check: test_params_and_errors)
    for knobs, message in [
        ({"residual_fraction": 0.5}, r"^compress.residual_fraction: a residual stage \(residual_fraction > 0\) "
                                     r"needs the metric of its first stage, compress.residual_metric"),
        ({"residual_fraction": 0.5, "residual_metric": "whitening"},
         "^compress.residual_metric: both stages use whitening, which is exactly a single"),
        ({"allocation": "v2", "last_layers": 4}, "^compress.last_layers: applies to allocation last-k only"),
        ({"anchor": 0.5, "update": True}, "^compress.update: the anchored closed form already fits A and B jointly"),
        ({"anchor_ridge": 0.01}, r"^compress.anchor_ridge: 0.01 damps the anchored closed form, which is off"),
    ]:
        with pytest.raises(UserError, match=message):
            recipe("svd-llm", **knobs)
        params = copy.deepcopy(DEFAULTS)
        params["compress"].update(method="svd-llm", **knobs)
        with pytest.raises(UserError, match=message):
            params_module.validate(params)
    with pytest.raises(UserError, match="the fisher metric needs the Fisher scales"):
        compress_model(tiny_llama(), {}, "fwsvd", None, CPU)


def test_split_rank_and_the_last_layers_rule():
    assert split_rank(10, 0.25) == (2, 8) and split_rank(10, 0) == (10, 0) and split_rank(1, 0.5) == (1, 0)
    assert split_rank(2, 0.99) == (1, 1) and split_rank(3, 0.01) == (1, 2)  # each stage keeps a direction
    assert last_layers_rule(30, 0.2) == 23 and last_layers_rule(30, 0.8) == 27 and last_layers_rule(4, 0.95) == 4


@pytest.mark.parametrize("m,n", SHAPES)
def test_residual_stage_with_the_same_metric_is_one_truncation(m, n):
    """Eckart-Young in the whitened norm: truncating W at r1 and its residual at r - r1 under the
    same metric keeps the same top-r subspace as one rank-r truncation."""
    weight, x = random_problem(m, n, 200, seed=5)
    white = whitening(x.T @ x)
    one_a, one_b = truncate_whitened(weight, white, 7)
    a1, b1 = truncate_whitened(weight, white, 3)
    a2, b2 = truncate_whitened(weight - a1 @ b1, white, 4)
    torch.testing.assert_close(a1 @ b1 + a2 @ b2, one_a @ one_b, rtol=1e-9, atol=1e-10)


def test_residual_recipe_stacks_both_stages_at_the_cost_of_one_rank(tmp_path):
    windows = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    stats = stats_dir(tiny_llama(), windows, tmp_path)
    ranks = uniform_ranks(linear_shapes(tiny_llama()), 0.3)
    single, same, mixed = tiny_llama(), tiny_llama(), tiny_llama()
    compress_model(single, ranks, "svd-llm", stats, CPU)
    # the library takes a same-metric residual (recipe() refuses it as pointless): it must equal one truncation
    compress_model(same, ranks, Recipe("whitening", residual_fraction=0.4, residual_metric="whitening"), stats, CPU)
    report = compress_model(mixed, ranks, Recipe("whitening", residual_fraction=0.4, residual_metric="plain"), stats, CPU)
    assert set(report["route_counts"]) == {"eigh-out+eigh-out", "eigh-in+eigh-in/cholesky"}
    for name, rank in ranks.items():
        if rank is None:
            continue
        s, t, u = (model.get_submodule(name) for model in (single, same, mixed))
        assert s.A.shape == t.A.shape == u.A.shape == (s.A.shape[0], rank)
        torch.testing.assert_close(t.A @ t.B, s.A @ s.B, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(u.A @ u.B, s.A @ s.B, atol=1e-4)  # plain first stage: another truncation
    # the whitened truncation is optimal on the calibration data: the mixed one can only do worse there
    assert output_loss(mixed, stats) >= output_loss(single, stats) * (1 - 1e-9)


def output_loss(model, stats):
    """Sum over compressed linears of ||(W - A B) X||^2 on the calibration Grams."""
    from svdcore.covariances import load_layer

    dense, total = tiny_llama(), 0.0
    for name, low in model.named_modules():
        if isinstance(low, LowRankLinear):
            index = int(name.split(".")[2])
            layer_stats = load_layer(stats, index)
            local = name.split(".", 3)[3]
            gram = layer_stats.grams[layer_stats.shares[local]]
            d = dense.get_submodule(name).weight.detach().double() - (low.A @ low.B).detach().double()
            total += float(((d @ gram) * d).sum())
    return total


def test_fisher_scales_weigh_each_input_feature_by_the_loss_gradient():
    model, windows = tiny_llama(), torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(2))
    scales = fisher_scales(model, windows, 3, CPU)
    assert set(scales) == set(linear_shapes(model))
    assert all(s.shape == (linear_shapes(model)[n][1],) and s.dtype == torch.float64 and (s >= 0).all()
               for n, s in scales.items())
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    # the definition, by hand for one matrix: mean over batches of the squared gradient, summed over rows
    name = "model.layers.1.mlp.down_proj"
    module, total = model.get_submodule(name), 0
    for batch in windows.split(3):
        model.zero_grad()
        model(batch, labels=batch).loss.backward()
        total = total + module.weight.grad.double().square().sum(0)
    torch.testing.assert_close(scales[name], (total / 2).sqrt(), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(fisher_scales(tiny_llama(), windows, 3, CPU)[name], scales[name], rtol=0, atol=0)


@pytest.mark.parametrize("offload", [False, True])
def test_one_pass_compression_equals_statistics_then_truncation(tmp_path, offload):
    """stats_dir None: Grams gathered and each layer truncated in the same streamed pass; the
    result is the two-stage pipeline's (Grams to disk in float32, then truncation)."""
    windows = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    stats = stats_dir(tiny_llama(), windows, tmp_path)
    ranks = uniform_ranks(linear_shapes(tiny_llama()), 0.3)
    two_stage, one_pass = tiny_llama(), tiny_llama()
    compress_model(two_stage, ranks, "svd-llm", stats, CPU)
    report = compress_model(one_pass, ranks, "svd-llm", None, CPU, windows, batch_size=3, offload=offload)
    assert sum(report["route_counts"].values()) == 14
    lows = {n: m for n, m in one_pass.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lows) == 14
    for name, low in lows.items():
        torch.testing.assert_close(low.A @ low.B, two_stage.get_submodule(name).A @ two_stage.get_submodule(name).B,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="compress: the whitening metric needs the statistics directory"):
        compress_model(tiny_llama(), ranks, "svd-llm", None, CPU)
