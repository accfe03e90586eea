"""The method family: each method's defining identity, presets and knobs, the closed-form update."""
import pytest
import torch

from conftest import tiny_llama
from svdcore.compress import compress_model, refit_a
from svdcore.covariances import collect_grams, linear_shapes, save_layer
from svdcore.decompose import eigen_whitening, truncate_scaled, truncate_svd, truncate_whitened, whitening
from svdcore.errors import UserError
from svdcore.lowrank import LowRankLinear
from svdcore.methods import METRICS, PRESETS, Recipe, recipe
from svdcore.ranks import uniform_ranks
from test_linalg import SHAPES, output_error, random_problem

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


def stats_dir(model, windows, tmp_path):
    path = tmp_path / "stats"
    path.mkdir(exist_ok=True)
    collect_grams(model, windows, 4, CPU, lambda i, st: save_layer(path, i, st))
    return path


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
    assert report["recipe"] == {"metric": "whitening", "alpha": 0.5, "update": True}
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
    ("auto", "whitening"): {"eigh-out", "eigh-in/cholesky"},
    ("auto", "eigen-whitening"): {"eigh-out", "eigh-in/eigen"},
    ("svd", "plain"): {"svd"},
    ("svd", "activation"): {"svd/activation"},
    ("svd", "whitening"): {"svd/cholesky"},
    ("svd", "eigen-whitening"): {"svd/eigen"},
}


@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_compresses_the_tiny_model_alike_on_every_route(metric, tmp_path):
    windows = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    stats = stats_dir(tiny_llama(), windows, tmp_path)
    ranks = uniform_ranks(linear_shapes(tiny_llama()), 0.3)
    products = {}
    for route in ("auto", "svd"):
        model = tiny_llama()
        report = compress_model(model, ranks, Recipe(metric), stats, CPU, route=route)
        assert set(report["route_counts"]) == ROUTES_TAKEN[route, metric]
        assert sum(report["route_counts"].values()) == 14
        assert final_hidden_error(model, tiny_llama(), windows) > 0
        products[route] = {n: m.A @ m.B for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    for name, product in products["svd"].items():  # the same truncation, reached another way
        torch.testing.assert_close(products["auto"][name], product, rtol=1e-4, atol=1e-5)


def test_presets_and_knobs():
    assert {name: recipe(name).metric for name in PRESETS} == {"svd": "plain", "asvd": "activation",
                                                               "svd-llm": "whitening"}
    assert recipe("svd-llm", "eigen-whitening", 0.5, True) == Recipe("eigen-whitening", 0.5, True)
    with pytest.raises(UserError, match="compress.method: expected one of svd, asvd, svd-llm, got 'svdd'"):
        recipe("svdd")
    with pytest.raises(UserError, match="compress.metric: expected one of plain, activation, whitening"):
        recipe("svd", "fisher-ish")


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
