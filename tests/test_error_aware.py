"""Error-aware compression: the anchored closed form, the two-stream layer loop, block refinement."""
import pytest
import torch
from torch import nn

from conftest import SHAPES, random_problem, stats_dir, tiny_llama
from svdcore.compress import compress_model
from svdcore.decompose import EIGEN_FLOOR, anchored_weight, eigen_whitening, truncate, whitening
from svdcore.errors import UserError
from svdcore.lowrank import LowRankLinear
from svdcore.methods import RIDGE, Recipe, recipe
from svdcore.covariances import linear_shapes
from svdcore.ranks import uniform_ranks
from svdcore.refine import refine_block, trainable

CPU = torch.device("cpu")


def shifted_problem(m, n, tokens, seed=0, noise=0.3):
    """W, dense inputs X and shifted inputs X~ = X + correlated noise (what a compressed prefix does)."""
    weight, x = random_problem(m, n, tokens, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    x_shifted = x + noise * torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ torch.randn(
        n, n, generator=gen, dtype=torch.float64) * x.std()
    return weight, x, x_shifted


def anchored_optimum(weight, x, x_shifted, beta, rank, floor=1e-10):
    """The best ||X_b W^T - X~ W'^T||^2 over rank-r W', independently: X~ W'^T ranges over the
    matrices of rank <= r in the column space of X~, so the optimum is the residual of projecting
    Y = X_b W^T on that space plus the energy of P Y beyond its top r singular values. Directions
    of X~ below `floor` x its largest singular value count as outside that space (rounding noise
    of a float32 model would otherwise be fitted with huge weights)."""
    target = ((1 - beta) * x_shifted + beta * x) @ weight.T
    u, s, _ = torch.linalg.svd(x_shifted, full_matrices=False)
    basis = u[:, s > s.max() * floor]
    projected = basis @ (basis.T @ target)
    tail = (torch.linalg.svdvals(projected)[rank:] ** 2).sum()
    return float((target - projected).square().sum() + tail)


def anchored_loss(weight, a, b, x, x_shifted, beta):
    target = ((1 - beta) * x_shifted + beta * x) @ weight.T
    return float((target - x_shifted @ (a @ b).T).square().sum())


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("route", ["auto", "svd", "eigh-out", "eigh-in"])
def test_anchored_closed_form_reaches_the_optimum_of_its_objective(m, n, beta, route):
    weight, x, x_shifted = shifted_problem(m, n, tokens=4 * n)
    gram, cross = x_shifted.T @ x_shifted, x_shifted.T @ x
    white = whitening(gram)
    assert white.route == "cholesky"
    target = anchored_weight(weight, white, cross, beta)
    rank = 7
    a, b = truncate(target, rank, white, route, gram=gram if route == "eigh-out" else None)
    loss = anchored_loss(weight, a, b, x, x_shifted, beta)
    assert loss == pytest.approx(anchored_optimum(weight, x, x_shifted, beta, rank), rel=1e-9)
    if beta == 0:  # no anchoring: plain whitening on the shifted inputs, the same matrix and factors
        assert torch.equal(target, weight)
        a0, b0 = truncate(weight, rank, whitening(gram), route, gram=gram if route == "eigh-out" else None)
        torch.testing.assert_close(a @ b, a0 @ b0, rtol=0, atol=0)
    else:  # anchoring fits the dense outputs better than whitening on the shifted inputs does
        a0, b0 = truncate(weight, rank, white, route, gram=gram if route == "eigh-out" else None)
        assert loss < anchored_loss(weight, a0, b0, x, x_shifted, beta)


@pytest.mark.parametrize("m,n", SHAPES)
def test_anchored_closed_form_on_a_singular_shifted_gram(m, n):
    """Fewer tokens than inputs: G~ is singular. The jittered Cholesky of the fallback chain is
    near-optimal; the eigen route (pseudo-inverse) reaches the optimum exactly."""
    weight, x, x_shifted = shifted_problem(m, n, tokens=n // 2, seed=4)
    gram, cross = x_shifted.T @ x_shifted, x_shifted.T @ x
    rank = 5
    best = anchored_optimum(weight, x, x_shifted, 1.0, rank)
    chain = whitening(gram)
    assert chain.route != "cholesky"
    a, b = truncate(anchored_weight(weight, chain, cross, 1.0), rank, chain, "auto", gram=gram)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert anchored_loss(weight, a, b, x, x_shifted, 1.0) == pytest.approx(best, rel=1e-3)
    eigen = eigen_whitening(gram)
    a, b = truncate(anchored_weight(weight, eigen, cross, 1.0), rank, eigen, "auto", gram=gram)
    assert anchored_loss(weight, a, b, x, x_shifted, 1.0) == pytest.approx(best, rel=1e-8)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_anchored_ridge_reaches_the_optimum_of_its_objective(m, n, beta):
    """||X_b W^T - X~ W'^T||^2 + λ ||W' - W||^2 is the plain objective on n more rows sqrt(λ) I in
    both streams: the closed form given G~ + λ I and C + λ I (what compress.anchor_ridge passes)
    reaches the optimum computed independently on the stacked rows, even with fewer tokens than
    inputs (a singular G~ needs no fallback under a ridge), and stays closer to W than without."""
    weight, x, x_shifted = shifted_problem(m, n, tokens=n // 2, seed=7)
    gram, cross = x_shifted.T @ x_shifted, x_shifted.T @ x
    lam = 0.05 * gram.diagonal().mean()
    eye = torch.eye(n, dtype=gram.dtype)
    rows = lam.sqrt() * eye
    x_rows, x_shifted_rows = torch.cat([x, rows]), torch.cat([x_shifted, rows])
    ridge_white = whitening(gram + lam * eye)
    assert ridge_white.route == "cholesky"
    target = anchored_weight(weight, ridge_white, cross + lam * eye, beta)
    rank = 5
    a, b = truncate(target, rank, ridge_white, "auto", gram=gram + lam * eye)
    loss = anchored_loss(weight, a, b, x_rows, x_shifted_rows, beta)
    assert loss == pytest.approx(anchored_optimum(weight, x_rows, x_shifted_rows, beta, rank), rel=1e-9)
    if beta:  # the unconstrained fit: shrunk toward W, by a norm the plain fit on so few tokens far exceeds
        plain = anchored_weight(weight, eigen_whitening(gram), cross, beta)
        assert torch.dist(target, weight) < torch.dist(plain, weight)


# ---- the two-stream layer loop ----

WINDOWS = torch.randint(0, 320, (12, 32), generator=torch.Generator().manual_seed(1))


def linear_inputs_of(model, windows):
    """Every decoder linear's inputs in one ordinary forward pass of `model` (name -> tokens x in)."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if ".layers." in name and isinstance(module, (nn.Linear, LowRankLinear)):
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).double())))
    with torch.no_grad():
        model(windows, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_with_nothing_compressed_the_streams_stay_identical_and_the_model_unchanged():
    model, dense = tiny_llama(), tiny_llama()
    none = {name: None for name in linear_shapes(model)}
    report = compress_model(model, none, Recipe("whitening", anchor=1.0, refine_steps=4), None, CPU, WINDOWS, 4)
    assert report["stream_gap"] == {0: 0.0, 1: 0.0} and "refine" not in report
    for (name, p), q in zip(model.state_dict().items(), dense.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_lossless_compression_keeps_the_streams_together():
    """Weights that are exactly of the allocated rank: every step reproduces them, and the two
    streams, computed separately (something was compressed), agree to float32 precision (a real
    compression at this ratio puts them about 0.2 apart)."""
    model = tiny_llama()
    ranks = uniform_ranks(linear_shapes(model), 0.3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, rank in ranks.items():
            weight = model.get_submodule(name).weight
            weight.copy_(torch.randn(weight.shape[0], rank, generator=gen) @ torch.randn(rank, weight.shape[1],
                                                                                        generator=gen) / rank)
    dense = tiny_llama()
    dense.load_state_dict(model.state_dict())
    report = compress_model(model, ranks, Recipe("whitening", anchor=1.0), None, CPU, WINDOWS, 4)
    assert all(0 < gap < 1e-3 for gap in report["stream_gap"].values()), report["stream_gap"]
    with torch.no_grad():
        torch.testing.assert_close(model(WINDOWS).logits, dense(WINDOWS).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("knobs", [{"anchor": 0.0}, {"update": True}])
def test_each_group_is_fitted_on_the_inputs_of_the_model_compressed_before_it(knobs, tmp_path):
    """In forward order, what reaches a linear depends only on what came before it, all of it
    final when the linear was compressed: so its shifted inputs are its inputs in the finished
    model. Whitening on them (anchor 0) and the update's refit (B kept, A by least squares) must
    be optimal there, q/k/v's and o's alike; a loop that took o's statistics before q/k/v were
    compressed, or layer 1's before layer 0 was finished, would not be. Compared on the outputs:
    o's inputs span fewer directions than it has (v is compressed), so its factors are not unique."""

    stats = stats_dir(tiny_llama(), WINDOWS, tmp_path)
    model, dense = tiny_llama(), tiny_llama()
    ranks = uniform_ranks(linear_shapes(model), 0.4)
    compress_model(model, ranks, Recipe("whitening", **knobs), stats, CPU, WINDOWS, 4)
    inputs = linear_inputs_of(model, WINDOWS)
    for name, rank in ranks.items():
        low, x = model.get_submodule(name), inputs[name]
        weight = dense.get_submodule(name).weight.detach().double()
        a, b = low.A.detach().double(), low.B.detach().double()
        gram = x.T @ x
        if "anchor" in knobs:
            a0, b0 = truncate(weight, rank, whitening(gram), "auto", gram=gram)
        else:
            b0 = b
            a0 = torch.linalg.lstsq(x @ b.T, x @ weight.T).solution.T
        got, best = x @ (a @ b).T, x @ (a0 @ b0).T
        assert float((got - best).norm() / (x @ weight.T).norm()) < 1e-3, name


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_anchored_groups_use_the_cross_term_with_the_dense_inputs(ridge):
    """Each linear reaches the optimum of its objective on its own inputs in both streams; with
    compress.anchor_ridge, on those inputs plus the ridge's rows sqrt(λ) I."""
    model, dense = tiny_llama(), tiny_llama()
    ranks = uniform_ranks(linear_shapes(model), 0.4)
    compress_model(model, ranks, Recipe("whitening", anchor=1.0, anchor_ridge=ridge), None, CPU, WINDOWS, 4)
    shifted, original = linear_inputs_of(model, WINDOWS), linear_inputs_of(dense, WINDOWS)
    for name, rank in ranks.items():
        x, x_shifted = original[name], shifted[name]
        if ridge:
            rows = (ridge * x_shifted.square().sum(0).mean()).sqrt() * torch.eye(x.shape[1], dtype=x.dtype)
            x, x_shifted = torch.cat([x, rows]), torch.cat([x_shifted, rows])
        weight = dense.get_submodule(name).weight.detach().double()
        low = model.get_submodule(name)
        loss = anchored_loss(weight, low.A.detach().double(), low.B.detach().double(), x, x_shifted, 1.0)
        best = anchored_optimum(weight, x, x_shifted, 1.0, rank, floor=EIGEN_FLOOR ** 0.5)
        assert loss == pytest.approx(best, rel=3e-3), name


def test_recipe_knobs_for_the_error_aware_steps():
    aa = recipe("aa-svd")
    assert (aa.anchor, aa.allocation) == (1.0, "uniform") and aa.refine_steps > 0 and aa.needs_windows
    assert recipe("aa-svd", anchor=False).anchor is None and recipe("svd-llm", anchor=0).anchor == 0.0
    assert recipe("aa-svd", refine_steps=0).refine_steps == 0 and not recipe("svd-llm").needs_windows
    best = recipe("best")  # the measured combination (README, "Choosing the error-aware defaults")
    assert (best.allocation, best.anchor, best.refine_steps, best.update) == ("sensitivity", 0.25, 32, False)
    assert aa.anchor_ridge == RIDGE > 0 == best.anchor_ridge and recipe("aa-svd", anchor_ridge=0).anchor_ridge == 0
    assert recipe("aa-svd", anchor=False).anchor_ridge == 0 and recipe("svd-llm", anchor=1).anchor_ridge == 0
    with pytest.raises(UserError, match=r"^compress.anchor_ridge: 0.1 damps the anchored closed form, which is off"):
        recipe("svd-llm", anchor_ridge=0.1)
    with pytest.raises(ValueError, match="anchor_ridge 0.1 without the anchored closed form"):
        Recipe("whitening", anchor_ridge=0.1)  # as the benches build them
    with pytest.raises(UserError, match=r"^compress.method: expected one of svd, fwsvd, .*, got 'aasvd'"):
        recipe("aasvd")
    with pytest.raises(UserError, match="compress.update: the anchored closed form already fits A and B jointly"):
        recipe("aa-svd", update=True)
    with pytest.raises(UserError, match="compress: the anchored closed form needs the calibration windows"):
        compress_model(tiny_llama(), {}, recipe("aa-svd"), None, CPU)
    with pytest.raises(UserError, match="compress: the block refinement needs the calibration windows"):
        compress_model(tiny_llama(), {}, recipe("svd-llm", refine_steps=3), "unused", CPU)


# ---- block refinement ----

def refinement_case(steps=24, lr=1e-3, holdout=0.25, seed=0):
    """Layer 0 of a tiny Llama compressed at 0.5, with its dense inputs and targets."""
    from svdcore.streaming import capture_layer_inputs, run_layer

    model, dense = tiny_llama(), tiny_llama()
    ranks = {n: r for n, r in uniform_ranks(linear_shapes(model), 0.5).items() if ".layers.0." in n}
    compress_model(model, {**{n: None for n in linear_shapes(model)}, **ranks}, "svd", None, CPU)
    inputs, kwargs = capture_layer_inputs(dense, WINDOWS, 2, CPU)
    with torch.no_grad():
        targets = run_layer(dense.model.layers[0], inputs, kwargs, CPU)
    layer = model.model.layers[0]
    return layer, inputs, targets, kwargs, dict(steps=steps, lr=lr, holdout=holdout, index=0, device=CPU, seed=seed)


def heldout_mse(layer, inputs, targets, kwargs, batches):
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(layer(inputs[b], **kwargs[b]), targets[b])) for b in batches) / len(batches)


def test_refinement_lowers_the_heldout_error_and_trains_only_factors_and_norms():
    layer, inputs, targets, kwargs, settings = refinement_case()
    watch = [4, 5]  # 6 batches, a quarter held out, rounded up
    before_state = {n: p.detach().clone() for n, p in layer.named_parameters()}
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    before = heldout_mse(layer, inputs, targets, kwargs, watch)
    figures = refine_block(layer, inputs, targets, kwargs, **settings)
    after = heldout_mse(layer, inputs, targets, kwargs, watch)
    assert figures["heldout_batches"] == 2 and figures["heldout_before"] == pytest.approx(before, rel=1e-6)
    assert after == pytest.approx(figures["heldout_after"], rel=1e-6) and after < 0.9 * before
    names = set(trainable(layer))
    factors = ("expand.weight", "reduce.weight")
    assert names == {f"self_attn.{p}_proj.{f}" for p in "qkvo" for f in factors} | {
        f"mlp.{p}_proj.{f}" for p in ("gate", "up", "down") for f in factors} | {
        "input_layernorm.weight", "post_attention_layernorm.weight"}
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and p.requires_grad == flags[name] and p.grad is None
        assert torch.equal(p, before_state[name]) == (name not in names), name


def test_refinement_is_bit_identical_on_rerun_and_stops_at_the_best_epoch():
    first, second = refinement_case(), refinement_case()
    a, b = refine_block(*first[:4], **first[4]), refine_block(*second[:4], **second[4])
    assert a == b
    for (name, p), q in zip(first[0].named_parameters(), second[0].parameters()):
        assert torch.equal(p, q), name
    # a learning rate far too high: the held-out error gets worse, the closed form's state is kept
    layer, inputs, targets, kwargs, settings = refinement_case(lr=0.5)
    state = {n: p.detach().clone() for n, p in layer.named_parameters()}
    figures = refine_block(layer, inputs, targets, kwargs, **settings)
    assert figures["best_epoch"] == 0 and figures["epochs"] == 1 and figures["steps"] == 4
    assert all(torch.equal(p, state[n]) for n, p in layer.named_parameters())


def test_a_refinement_whose_loss_turns_non_finite_names_the_layer():
    layer, inputs, targets, kwargs, settings = refinement_case()
    targets = [t.clone() for t in targets]
    targets[1][0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"layer 0: the block refinement loss became nan at step \d+; lower "
                                        r"compress.refine.lr"):
        refine_block(layer, inputs, targets, kwargs, **settings)
    assert all(not p.requires_grad or p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("holdout", [0.0, 0.25])  # the default (every window trained on), and a held-out share
def test_refined_compression_is_bit_identical_on_rerun_and_reports_every_block(holdout):
    ranks = uniform_ranks(linear_shapes(tiny_llama()), 0.4)
    models = [tiny_llama(), tiny_llama()]
    reports = [compress_model(m, ranks, recipe("aa-svd", refine_steps=6, refine_holdout=holdout), None, CPU, WINDOWS, 2)
               for m in models]
    assert reports[0] == reports[1] and sorted(reports[0]["refine"]) == [0, 1]
    if holdout:
        assert all(r["heldout_after"] <= r["heldout_before"] for r in reports[0]["refine"].values())
    for (name, p), q in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(p, q), name


def test_the_windows_refinement_watches_never_feed_the_closed_form(monkeypatch):
    """The anchored closed form is fitted on the windows refinement trains on: changing only the
    held-out batch leaves every factor as it was before refinement (here refinement is stubbed
    out), so the held-out loss judges the closed form on windows it never saw."""
    import svdcore.compress

    monkeypatch.setattr(svdcore.compress, "refine_block", lambda *args, **kwargs: {})
    ranks = uniform_ranks(linear_shapes(tiny_llama()), 0.4)
    windows = [WINDOWS.clone(), WINDOWS.clone()]
    windows[1][-4:] = torch.flip(windows[1][-4:], [1])  # 6 batches of 2: the last 2 are the held-out quarter, rounded up
    models = [tiny_llama(), tiny_llama()]
    for model, w in zip(models, windows):
        compress_model(model, ranks, recipe("aa-svd", refine_steps=6, refine_holdout=0.25), None, CPU, w, 2)
    for (name, p), q in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(p, q), name
    # with no refinement, the same change reaches the factors: the test can tell
    models = [tiny_llama(), tiny_llama()]
    for model, w in zip(models, windows):
        compress_model(model, ranks, recipe("aa-svd", refine_steps=0), None, CPU, w, 2)
    assert not all(torch.equal(p, q) for p, q in zip(models[0].state_dict().values(), models[1].state_dict().values()))
