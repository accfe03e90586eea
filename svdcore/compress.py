"""Truncate every allocated linear to its rank, one decoder layer at a time; optionally refit A
on the inputs that reach it through the already compressed layers (SVD-LLM's update)."""
from collections import Counter

import torch

from .covariances import LayerStats, gram_hooks, load_layer
from .decompose import IDENTITY, choose_route, diagonal_whitening, eigen_whitening, truncate, whitening
from .errors import UserError
from .lowrank import replace_linear
from .methods import Recipe, recipe as preset
from .model import decoder_layers, layer_linears, layer_prefix, weight_matrix
from .progress import progress as tqdm
from .streaming import run_layers
from .timing import section

RIDGE = 1e-6  # closed-form update: ridge relative to mean(diag(Z Z^T)), for rank-deficient inputs


def _factorize(weight, rank: int, recipe: Recipe, stats: LayerStats | None, group: str | None, cache: dict,
               route: str):
    """(A, B, route taken) for one matrix; `cache` keeps one device Gram and one whitening per
    shared input."""
    route = choose_route(route, *weight.shape)
    if recipe.metric == "plain":
        return (*truncate(weight, rank, IDENTITY, route), route)
    if recipe.metric == "activation":
        scales = stats.abs_means[group].to(weight.device) ** recipe.alpha
        return (*truncate(weight, rank, diagonal_whitening(scales), route), f"{route}/activation")
    if ("gram", group) not in cache:
        cache["gram", group] = stats.grams[group].to(weight.device, torch.float64)
    gram = cache["gram", group]
    if route == "eigh-out":  # W G W^T needs no factor of G: exact for both whitening metrics
        return (*truncate(weight, rank, None, route, gram=gram), route)
    if group not in cache:
        cache[group] = whitening(gram) if recipe.metric == "whitening" else eigen_whitening(gram)
    white = cache[group]
    return (*truncate(weight, rank, white, route), f"{route}/{white.route}")


def _compress_layer(model, name_of, index, layer, todo, recipe, route, stats, device, routes, gram_routes, bar):
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
            a, b, routes[name] = _factorize(weight, todo[name], recipe, stats, group, cache, route)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise UserError(f"layer {index}, {name}: the factorization produced non-finite values "
                            f"(route {routes[name]})")
        with section("install factors"):
            replace_linear(model, name, a, b)
        originals[local] = weight
        bar.update()
    gram_routes.update({name_of(key): white.route for key, white in cache.items() if isinstance(key, str)})
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
                   offload: bool = False) -> dict:
    """Replace linears in place. `method` is a preset name or a Recipe; `route` picks the
    decomposition (decompose.ROUTES). The statistics come from `stats_dir` (compute-covariances'
    output); with `stats_dir` None and calibration `windows` given, they are gathered in the same
    streamed pass instead, each layer truncated on the device as soon as its Grams are complete
    (one pass, nothing written: what a one-off compression on a GPU wants). The update always
    needs `windows`. Returns a report: the route of every matrix (decomposition/whitening), how
    many distinct Grams needed each whitening route, and what the update gained."""
    recipe = method if isinstance(method, Recipe) else preset(method)
    if recipe.update and windows is None:
        raise UserError("compress.update: the closed-form update needs the calibration windows")
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
            return _compress_layer(model, name_of, index, layer, todo, recipe, route, stats or load, device,
                                   routes, gram_routes, bar)

        if fused:
            def visit(index, layer):
                # deferred: on a GPU the decompositions overlap the next layer's forward pass
                return gram_hooks(index, layer, layer_linears(layer),
                                  lambda i, stats: lambda: compress_layer(i, layer, stats))

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
