"""Truncate every allocated linear to its rank, one decoder layer at a time; optionally refit A
on the inputs that reach it through the already compressed layers (SVD-LLM's update)."""
from collections import Counter

import torch

from .covariances import LayerStats, gram_hooks, load_layer
from .decompose import IDENTITY, choose_route, diagonal_whitening, eigen_whitening, truncate, whitening
from .errors import UserError
from .lowrank import replace_linear
from .methods import Recipe, recipe as preset, split_rank
from .model import decoder_layers, layer_linears, layer_prefix, weight_matrix
from .progress import progress as tqdm
from .streaming import run_layers
from .timing import section

RIDGE = 1e-6  # closed-form update: ridge relative to mean(diag(Z Z^T)), for rank-deficient inputs


def _metric(metric: str, weight, name: str, group: str | None, stats: LayerStats | None, fisher: dict | None,
            recipe: Recipe, cache: dict, route: str):
    """(S or None, G or None, route label) for `truncate` under one metric; `cache` keeps one
    device Gram and one whitening per shared input."""
    if metric == "plain":
        return IDENTITY, None, route
    if metric == "activation":
        return diagonal_whitening(stats.abs_means[group].to(weight.device) ** recipe.alpha), None, f"{route}/activation"
    if metric == "fisher":
        return diagonal_whitening(fisher[name].to(weight.device)), None, f"{route}/fisher"
    if ("gram", group) not in cache:
        cache["gram", group] = stats.grams[group].to(weight.device, torch.float64)
    gram = cache["gram", group]
    if route == "eigh-out":  # W G W^T needs no factor of G: exact for both whitening metrics
        return None, gram, route
    if (metric, group) not in cache:
        cache[metric, group] = whitening(gram) if metric == "whitening" else eigen_whitening(gram)
    white = cache[metric, group]
    return white, None, f"{route}/{white.route}"


def _factorize(weight, rank: int, recipe: Recipe, name: str, group: str | None, stats: LayerStats | None,
               fisher: dict | None, cache: dict, route: str):
    """(A, B, route taken) for one matrix. With a residual stage (ResSVD) the first stage keeps
    part of the rank under its own metric and the residual W - A1 B1 gets the rest; the factors
    are stacked, [A1 A2] [B1; B2], at the cost of one rank-r pair."""
    route = choose_route(route, *weight.shape)
    first_rank, second_rank = split_rank(rank, recipe.residual_fraction)
    if not second_rank:
        white, gram, label = _metric(recipe.metric, weight, name, group, stats, fisher, recipe, cache, route)
        return (*truncate(weight, rank, white, route, gram=gram), label)
    white, gram, first_label = _metric(recipe.residual_metric, weight, name, group, stats, fisher, recipe, cache, route)
    a1, b1 = truncate(weight, first_rank, white, route, gram=gram)
    white, gram, label = _metric(recipe.metric, weight, name, group, stats, fisher, recipe, cache, route)
    a2, b2 = truncate(weight - a1 @ b1, second_rank, white, route, gram=gram)
    return torch.cat([a1, a2], 1), torch.cat([b1, b2], 0), f"{first_label}+{label}"


def _compress_layer(model, name_of, index, layer, todo, recipe, route, stats, fisher, device, routes, gram_routes, bar):
    """Factorize the allocated linears of one layer in place; return their original weights.
    `stats` is the layer's LayerStats, or a function that loads them (called only if needed)."""
    chosen = {local: m for local, m in layer_linears(layer).items() if name_of(local) in todo}
    if not chosen:
        return {}
    if callable(stats):
        stats = stats() if recipe.needs_stats else None
    cache, originals = {}, {}
    for local, module in chosen.items():
        name = name_of(local)
        weight = weight_matrix(module).detach().to(device).double()  # widened on the device, not before the copy
        if not torch.isfinite(weight).all():
            raise UserError(f"layer {index}, {name}: the weight has non-finite values")
        group = None
        if stats is not None:
            group = stats.shares.get(local)
            if group is None or group not in stats.grams:
                raise UserError(f"statistics: no Gram for {name}; the statistics do not match "
                                f"this model, rerun compute-covariances")
            if stats.grams[group].shape != (weight.shape[1], weight.shape[1]):
                raise UserError(f"statistics: the Gram for {name} is {tuple(stats.grams[group].shape)}, but the "
                                f"matrix has {weight.shape[1]} inputs; rerun compute-covariances")
        with section("decompose"):
            a, b, routes[name] = _factorize(weight, todo[name], recipe, name, group, stats, fisher, cache, route)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise UserError(f"layer {index}, {name}: the factorization produced non-finite values "
                            f"(route {routes[name]})")
        with section("install factors"):
            replace_linear(model, name, a, b)
        originals[local] = weight
        bar.update()
    gram_routes.update({f"{name_of(key[1])}:{key[0]}": white.route for key, white in cache.items() if key[0] != "gram"})
    return originals


def refit_a(low, weight: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """Closed-form update: with B fixed, A = argmin ||(W - A B) X||_F = W G B^T (B G B^T)^-1,
    G = X^T X of the inputs the compressed model feeds this linear. Solved in float64 with a
    small ridge; kept only if it lowers the error (the ridge could, in theory, make it worse).
    Returns the output error before and after."""
    gram = gram.to(weight.device, torch.float64)
    a, b = low.A.detach().double(), low.B.detach().double()
    bg = b @ gram
    zz = bg @ b.T
    yz = weight @ bg.T
    ridge = RIDGE * zz.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(zz.shape[0], dtype=zz.dtype, device=zz.device)
    refit = torch.linalg.solve(zz + ridge * eye, yz.T).T

    def error(a_):
        d = weight - a_ @ b
        return float(((d @ gram) * d).sum())

    before, after = error(a), error(refit)
    if torch.isfinite(refit).all() and after < before:
        low.A.data.copy_(refit)
        return before, after
    return before, before


def compress_model(model, ranks: dict[str, int | None], method: str | Recipe, stats_dir, device: torch.device,
                   windows: torch.Tensor | None = None, batch_size: int = 4, route: str = "auto",
                   offload: bool = False, fisher: dict | None = None) -> dict:
    """Replace linears in place. `method` is a preset name or a Recipe; `route` picks the
    decomposition (decompose.ROUTES). The statistics come from `stats_dir` (compute-covariances'
    output); with `stats_dir` None and calibration `windows` given, they are gathered in the same
    streamed pass instead, each layer truncated on the device as soon as its Grams are complete
    (one pass, nothing written: what a one-off compression on a GPU wants). The update always
    needs `windows`; the fisher metric needs `fisher` (svdcore.fisher). Returns a report: the
    route of every matrix (decomposition/whitening), how many distinct Grams needed each
    whitening route, and what the update gained."""
    recipe = method if isinstance(method, Recipe) else preset(method)
    if recipe.update and windows is None:
        raise UserError("compress.update: the closed-form update needs the calibration windows")
    if recipe.needs_fisher and fisher is None:
        raise UserError("compress: the fisher metric needs the Fisher scales (compute-fisher)")
    fused = recipe.needs_stats and stats_dir is None
    if fused and (windows is None or recipe.update):
        raise UserError(f"compress: the {recipe.metric} metric needs the statistics directory"
                        + ("" if windows is None else " when compress.update is on"))
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    todo = {n: r for n, r in ranks.items() if r is not None}
    routes: dict[str, str] = {}
    gram_routes: dict[str, str] = {}
    errors = {"before": 0.0, "after": 0.0}

    with tqdm(total=len(todo), desc=f"compress ({recipe.metric})", unit="matrix") as bar:
        def compress_layer(index, layer, stats=None):
            def load():
                with section("load stats"):
                    return load_layer(stats_dir, index)

            name_of = lambda local: f"{prefix}.{index}.{local}"  # noqa: E731
            return _compress_layer(model, name_of, index, layer, todo, recipe, route, stats or load, fisher,
                                   device, routes, gram_routes, bar)

        if fused:
            def visit(index, layer):
                # Not deferred to run_layers' worker: on an H100 the float64 eigh and the next
                # layer's bf16 GEMMs took the sum of their times side by side (1.21 s against
                # 0.21 + 1.01 s alone: bench/results/h100-kernels.json), so overlapping them buys
                # nothing and would hold a second layer's memory.
                return gram_hooks(index, layer, layer_linears(layer), lambda i, stats: compress_layer(i, layer, stats))

            run_layers(model, windows, batch_size, device, visit, desc="statistics+compress", offload=offload)
        elif not recipe.update:
            for index, layer in enumerate(layers):
                compress_layer(index, layer)
        else:
            def visit(index, layer):
                originals = compress_layer(index, layer)
                lows = {local: layer.get_submodule(local) for local in originals}

                def refit_all(_, stats: LayerStats):
                    for local, low in lows.items():
                        before, after = refit_a(low, originals[local], stats.grams[stats.shares[local]])
                        errors["before"] += before
                        errors["after"] += after

                return gram_hooks(index, layer, lows, refit_all) if lows else (lambda: None)

            run_layers(model, windows, batch_size, device, visit, desc="update", recompute_outputs=True,
                       offload=offload)

    report = {"recipe": recipe.describe(), "routes": dict(sorted(routes.items())),
              "route_counts": dict(sorted(Counter(routes.values()).items())),
              "gram_route_counts": dict(sorted(Counter(gram_routes.values()).items()))}
    if recipe.update:
        # output error of the compressed linears on their compressed-prefix inputs, after / before
        report["update_error_ratio"] = errors["after"] / errors["before"] if errors["before"] else 1.0
    return report
