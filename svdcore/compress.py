"""Truncate every decoder linear to its allocated rank, one layer at a time."""
from collections import Counter

import torch
from .progress import progress as tqdm

from .covariances import load_layer
from .decompose import truncate_svd, truncate_whitened, whitening
from .errors import UserError
from .lowrank import replace_linear
from .model import decoder_layers, layer_linears, layer_prefix, weight_matrix

NEEDS_STATS = {"svd": False, "svd-llm": True}


def compress_model(model, ranks: dict[str, int | None], method: str, stats_dir, device: torch.device) -> dict:
    """Replace linears in place; return a report of the whitening route each matrix took, and
    how many distinct Gram matrices (shared inputs) needed each route."""
    if method not in NEEDS_STATS:
        raise UserError(f"compress.method: expected one of {', '.join(NEEDS_STATS)}, got {method!r}")
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    todo = {n: r for n, r in ranks.items() if r is not None}
    routes: dict[str, str] = {}
    gram_routes: dict[str, str] = {}
    with tqdm(total=len(todo), desc=f"compress ({method})", unit="matrix") as bar:
        for index, layer in enumerate(layers):
            linears = {f"{prefix}.{index}.{n}": m for n, m in layer_linears(layer).items()}
            chosen = [n for n in linears if n in todo]
            if not chosen:
                continue
            if NEEDS_STATS[method]:
                grams, shares, _ = load_layer(stats_dir, index)
                whitenings = {}  # one factorization per shared input (q/k/v, gate/up)
            for name in chosen:
                weight = weight_matrix(linears[name]).detach().to(device, torch.float64)
                if not torch.isfinite(weight).all():
                    raise UserError(f"layer {index}, {name}: the weight has non-finite values")
                if NEEDS_STATS[method]:
                    local = name[len(f"{prefix}.{index}."):]
                    group = shares.get(local)
                    if group is None or group not in grams:
                        raise UserError(f"statistics: no Gram for {name}; the statistics do not match "
                                        f"this model, rerun compute-covariances")
                    if grams[group].shape != (weight.shape[1], weight.shape[1]):
                        raise UserError(f"statistics: the Gram for {name} is {tuple(grams[group].shape)}, but the "
                                        f"matrix has {weight.shape[1]} inputs; rerun compute-covariances")
                    if group not in whitenings:
                        whitenings[group] = whitening(grams[group].to(device))
                        gram_routes[f"{prefix}.{index}.{group}"] = whitenings[group].route
                    white = whitenings[group]
                    a, b = truncate_whitened(weight, white, todo[name])
                    routes[name] = white.route
                else:
                    a, b = truncate_svd(weight, todo[name])
                    routes[name] = "none"
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise UserError(f"layer {index}, {name}: the factorization produced non-finite values "
                                    f"(route {routes[name]})")
                replace_linear(model, name, a.cpu(), b.cpu())
                bar.update()
    return {"method": method, "routes": dict(sorted(routes.items())),
            "route_counts": dict(sorted(Counter(routes.values()).items())),
            "gram_route_counts": dict(sorted(Counter(gram_routes.values()).items()))}
