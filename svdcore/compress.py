"""Compress a model one decoder layer at a time, in one loop that reads top to bottom.

Two activation streams travel through the decoder side by side: the dense stream X (the
calibration windows through the original layers) and the shifted stream X~ (through the layers
as compressed so far). For each layer the loop

  1. runs the untouched layer on X: the dense targets (the next layer's X and the refinement's
     targets) and, when the statistics come from the stream rather than from disk, the Grams;
  2. truncates the layer's linears group by group in forward order (the linears that read one
     tensor form a group: q/k/v, then o, then gate/up, then down), each group's statistics on X~
     taken through the layer as compressed so far, so that shift inside a block counts too; the
     closed-form update refits each A right after its truncation; the windows the refinement
     holds out feed none of these statistics on X~ (the dense statistics keep every window);
  3. refines the block, if asked: AdamW on its factors and norms, the compressed block on X~
     against the dense block on X (svdcore.refine);
  4. advances both streams.

A stream that no step needs is never computed: SVD-LLM from the statistics on disk runs no layer
at all, and the statistics pass (compute-covariances) is this loop with nothing to compress.
"""
import copy
from collections import Counter
from dataclasses import dataclass

import torch

from . import distributed
from .checkpoint import layer_read
from .covariances import LayerStats, load_layer
from .decompose import (IDENTITY, Whitening, anchored_weight, choose_route, diagonal_whitening, eigen_whitening,
                        truncate, whitening)
from .errors import UserError
from .gram import CrossAccumulator, GramAccumulator
from .lowrank import replace_linear
from .methods import Recipe, recipe as preset, split_rank
from .model import decoder_layers, layer_linears, layer_prefix, weight_matrix
from .progress import progress as tqdm
from .refine import heldout_batches, refine_block
from .streaming import capture_layer_inputs, check_finite, input_groups, layer_mover, linear_inputs, park, run_layer
from .timing import section

RIDGE = 1e-6  # closed-form update: ridge relative to mean(diag(Z Z^T)), for rank-deficient inputs


@dataclass(frozen=True)
class Streams:
    """Which activation streams a compression needs."""

    dense: bool  # X: the Grams when they come from the stream, the cross term, the refinement's targets
    shifted: bool  # X~: statistics of the compressed prefix (anchor, update), the refinement's inputs

    @classmethod
    def of(cls, recipe: Recipe, from_disk: bool, collect: bool) -> "Streams":
        dense_grams = collect or (recipe.needs_stats and recipe.anchor is None and not from_disk)
        return cls(dense=dense_grams or bool(recipe.anchor) or recipe.refine_steps > 0,
                   shifted=recipe.needs_windows)


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
    gram = _gram(stats, group, weight.device, cache, recipe.anchor_ridge)
    if route == "eigh-out":  # W G W^T needs no factor of G: exact for both whitening metrics
        return None, gram, route
    if (metric, group) not in cache:
        cache[metric, group] = whitening(gram) if metric == "whitening" else eigen_whitening(gram)
    white = cache[metric, group]
    return white, None, f"{route}/{white.route}"


def _gram(stats: LayerStats, group: str, device, cache: dict, ridge: float = 0.0) -> torch.Tensor:
    """The Gram of one shared input on `device`; with the anchored fit's ridge, G~ + λ I (its
    metric too: the ridge's rows are inputs like the others), λ kept in cache["λ", group]."""
    if ("gram", group) not in cache:
        gram = stats.grams[group].to(device, torch.float64)
        cache["λ", group] = ridge * gram.diagonal().mean()
        if ridge:
            gram = gram + cache["λ", group] * torch.eye(gram.shape[0], dtype=gram.dtype, device=device)
        cache["gram", group] = gram
    return cache["gram", group]


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


class _Report:
    """What the loop records: the route of every matrix, the whitening route of every distinct
    Gram, the update's gain, each block's refinement and how far the two streams drifted apart."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.routes, self.gram_routes = {}, {}
        self.errors = {"before": 0.0, "after": 0.0}
        self.refine, self.stream_gap = {}, {}

    def whitenings(self, name_of, cache: dict) -> None:
        self.gram_routes.update(distributed.union({f"{name_of(key[1])}:{key[0]}": white.route
                                                   for key, white in cache.items() if isinstance(white, Whitening)}))

    def done(self) -> dict:
        report = {"recipe": self.recipe.describe(), "routes": dict(sorted(self.routes.items())),
                  "route_counts": dict(sorted(Counter(self.routes.values()).items())),
                  "gram_route_counts": dict(sorted(Counter(self.gram_routes.values()).items()))}
        if self.recipe.update:
            # output error of the compressed linears on their compressed-prefix inputs, after / before
            before = self.errors["before"]
            report["update_error_ratio"] = self.errors["after"] / before if before else 1.0
        if self.refine:
            report["refine"] = self.refine
        if self.stream_gap:
            report["stream_gap"] = self.stream_gap
        return report


def _check_stats(stats: LayerStats, local: str, name: str, inputs: int) -> str:
    """The group of the linear `local` in `stats`, checked against the matrix."""
    group = stats.shares.get(local)
    if group is None or group not in stats.grams:
        raise UserError(f"statistics: no Gram for {name}; the statistics do not match this model",
                        artifact=stats.source)
    if stats.grams[group].shape != (inputs, inputs):
        raise UserError(f"statistics: the Gram for {name} is {tuple(stats.grams[group].shape)}, but the "
                        f"matrix has {inputs} inputs", artifact=stats.source)
    return group


def _dense_pass(index, layer, linears, hidden, kwargs_per_batch, device, offload, grams: bool):
    """The untouched layer on the dense stream: its outputs and, with `grams`, one Gram per
    distinct input (the statistics pass)."""
    if not grams:
        with section("forward"):
            return run_layer(layer, hidden, kwargs_per_batch, device, offload), None
    accumulators, shares, finite, outputs = {}, {}, {}, []
    with section("forward+grams"):
        for h, kw in zip(hidden, kwargs_per_batch):
            out, calls = linear_inputs(layer, linears, h.to(device, non_blocking=True), kw)
            read = dict(calls)
            for group, members in input_groups(calls).items():
                for name in members:
                    if shares.setdefault(name, group) != group:
                        raise RuntimeError(f"layer {index}: input sharing of {name} changed between batches")
                x = read[group]
                # a flag kept on the device: checking here would wait for the GPU on every batch
                finite[group] = finite.get(group, True) & torch.isfinite(x).all()
                accumulators.setdefault(group, GramAccumulator(x.shape[-1], x.device)).add(x)
            outputs.append(park(out, offload))
    _check_all_called(index, linears, shares)
    for group, acc in accumulators.items():
        if not bool(finite[group]):
            raise UserError(f"layer {index}, {group}: non-finite input activations (NaN or inf)")
        if not torch.isfinite(acc.gram).all():
            raise UserError(f"layer {index}, {group}: the Gram matrix has non-finite values "
                            f"(activations overflowed; try model.dtype float32)")
    stats = LayerStats({g: a.gram for g, a in accumulators.items()}, {g: a.abs_mean for g, a in accumulators.items()},
                       shares, next(iter(accumulators.values())).tokens)
    return outputs, distributed.all_reduce_stats(stats)


def _check_all_called(index, linears, called) -> None:
    missing = sorted(set(linears) - set(called))
    if missing:
        raise RuntimeError(f"layer {index}: linears never called in the forward pass: {missing}")


def _forward_order(index, layer, linears, hidden, kwargs, device) -> dict[str, list[str]]:
    """The layer's input groups in the order it reads them, from one batch."""
    with section("statistics"):
        _, calls = linear_inputs(layer, linears, hidden.to(device), kwargs)
    groups = input_groups(calls)
    _check_all_called(index, linears, {n for members in groups.values() for n in members})
    return groups


def _shifted_statistics(index, group, members, layer, frozen, shifted, dense, kwargs_per_batch, device):
    """The Gram (and mean |x|) of what the compressed prefix feeds `group` of `layer`, as
    compressed so far; with `frozen` (the dense layer) also the cross term X~^T X against the
    dense model's inputs for the same tokens. Each pass stops once the group has read its input."""
    module = layer.get_submodule(group)
    shifted_acc, cross_acc = None, None
    with section("statistics"):
        for b, kw in enumerate(kwargs_per_batch):
            _, calls = linear_inputs(layer, {group: module}, shifted[b].to(device, non_blocking=True), kw, stop_at=group)
            x_shifted = calls[0][1]
            if shifted_acc is None:
                shifted_acc = GramAccumulator(x_shifted.shape[-1], x_shifted.device)
            shifted_acc.add(x_shifted)
            if frozen is not None:
                _, calls = linear_inputs(frozen, {group: frozen.get_submodule(group)},
                                         dense[b].to(device, non_blocking=True), kw, stop_at=group)
                if cross_acc is None:
                    cross_acc = CrossAccumulator(x_shifted.shape[-1], x_shifted.device)
                cross_acc.add(x_shifted, calls[0][1])
        # summed over the processes first, so that a non-finite sum stops every one of them
        stats = distributed.all_reduce_stats(LayerStats({group: shifted_acc.gram}, {group: shifted_acc.abs_mean},
                                                        {m: group for m in members}, shifted_acc.tokens))
        cross = None if cross_acc is None else distributed.all_reduce_sum(cross_acc.cross)
    if not torch.isfinite(stats.grams[group]).all() or (cross is not None and not torch.isfinite(cross).all()):
        raise UserError(f"layer {index}, {group}: non-finite statistics of the shifted inputs "
                        f"(activations overflowed; try model.dtype float32)")
    return stats, cross


def _truncate_linear(model, name, local, module, rank, recipe, stats, fisher, cache, route, report, index, device,
                     cross=None):
    """Truncate one linear on `device` and install its factors; returns (the LowRankLinear, the
    matrix its factors approximate: W, or the anchored W*)."""
    weight = weight_matrix(module).detach().to(device).double()  # widened on the device, not before the copy
    if not torch.isfinite(weight).all():
        raise UserError(f"layer {index}, {name}: the weight has non-finite values")
    group = None if stats is None else _check_stats(stats, local, name, weight.shape[1])
    with section("decompose"):
        if recipe.anchor:  # W* needs G~^-1: the whitening chain's factor, shared with the whitening metric
            if ("whitening", group) not in cache:
                cache["whitening", group] = whitening(_gram(stats, group, weight.device, cache, recipe.anchor_ridge))
            cross = cross.to(weight.device, torch.float64)
            if recipe.anchor_ridge:  # the ridge's rows sqrt(λ) e_j feed both streams: C + λ I
                cross = cross + cache["λ", group] * torch.eye(cross.shape[0], dtype=cross.dtype, device=cross.device)
            weight = anchored_weight(weight, cache["whitening", group], cross, recipe.anchor)
        a, b, report.routes[name] = _factorize(weight, rank, recipe, name, group, stats, fisher, cache, route)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise UserError(f"layer {index}, {name}: the factorization produced non-finite values "
                        f"(route {report.routes[name]})")
    with section("install factors"):
        replace_linear(model, name, a, b)
    return model.get_submodule(name), weight


def _truncate_group(model, names: list[str], name_of, chosen: dict, todo: dict, recipe: Recipe, stats, fisher,
                    route, report: _Report, index: int, device, bar, cross=None, update_gram=None,
                    first: int = 0) -> int:
    """Truncate the linears `names` of layer `index` that read one input (one Gram, so one
    whitening in `cache`) and install their factors; with `update_gram`, refit each A on it (the
    closed-form update). Under torchrun each matrix is factorized by one process, round-robin over
    the layer's matrices (`first`: how many of them came before these), and its factors are
    broadcast to the others: every process ends with the same layer. Returns `first` + len(names)."""
    cache, done = {}, {}
    for position, local in enumerate(names, first):
        if distributed.owner(position) == distributed.env_rank():
            name = name_of(local)
            low, weight = _truncate_linear(model, name, local, chosen[local], todo[name], recipe, stats, fisher,
                                           cache, route, report, index, device, cross)
            errors = None
            if update_gram is not None:
                with section("update"):
                    errors = refit_a(low, weight, update_gram)
            done[local] = low, errors
    for position, local in enumerate(names, first):
        name = name_of(local)
        low, errors = done.get(local, (None, None))
        if distributed.env_world_size() > 1:
            with section("broadcast factors"):
                a, b, (report.routes[name], errors) = distributed.broadcast_factors(
                    low, distributed.owner(position), (report.routes.get(name), errors), device)
            if low is None:
                replace_linear(model, name, a, b)
        if errors is not None:
            report.errors["before"] += errors[0]
            report.errors["after"] += errors[1]
        bar.update()
    report.whitenings(name_of, cache)
    return first + len(names)


@torch.no_grad()
def compress_model(model, ranks: dict[str, int | None], method: str | Recipe, stats_dir, device: torch.device,
                   windows: torch.Tensor | None = None, batch_size: int = 4, route: str = "auto",
                   offload: bool = False, fisher: dict | None = None, on_stats=None, by_layer=None) -> dict:
    """Replace linears in place, one decoder layer at a time (the module docstring walks through
    the loop). `method` is a preset name or a Recipe; `route` picks the decomposition
    (decompose.ROUTES). The dense model's statistics come from `stats_dir` (compute-covariances'
    output) or, with `stats_dir` None and the calibration `windows` given, from the dense stream
    as it passes. The anchor, the update and the refinement need `windows`; the fisher metric
    needs `fisher` (svdcore.fisher). `on_stats(index, LayerStats)` receives every layer's dense
    statistics (with no ranks: the statistics pass). `by_layer` (svdcore.checkpoint.ByLayer), for a
    model whose layers wait on the meta device, reads each layer in as the loop reaches it and
    hands it on (written, dropped) when the loop is done with it. Returns a report: the route of every matrix
    (decomposition/whitening), how many distinct Grams needed each whitening route, what the
    update gained, each block's refinement, the drift between the streams."""
    recipe = method if isinstance(method, Recipe) else preset(method)
    if recipe.update and windows is None:
        raise UserError("compress.update: the closed-form update needs the calibration windows")
    if recipe.needs_fisher and fisher is None:
        raise UserError("compress: the fisher metric needs the Fisher scales (compute-fisher)")
    streams = Streams.of(recipe, stats_dir is not None, on_stats is not None)
    if windows is None and (streams.dense or streams.shifted):
        what = "anchored closed form" if recipe.anchor is not None else "block refinement"
        if not recipe.needs_windows:
            raise UserError(f"compress: the {recipe.metric} metric needs the statistics directory")
        raise UserError(f"compress: the {what} needs the calibration windows")
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    todo = {n: r for n, r in ranks.items() if r is not None}
    report = _Report(recipe)
    bar = tqdm(total=len(todo), desc=f"compress ({recipe.metric})", unit="matrix", disable=not todo)

    def disk_stats(index):
        with section("load stats"):
            return load_layer(stats_dir, index) if recipe.needs_stats else None

    if not (streams.dense or streams.shifted):  # statistics from disk, no step that needs a forward pass
        with bar:
            for index, layer in enumerate(layers):
                with layer_read(by_layer, layer):
                    name_of = lambda local: f"{prefix}.{index}.{local}"  # noqa: E731
                    chosen = {local: m for local, m in layer_linears(layer).items() if name_of(local) in todo}
                    if chosen:
                        _truncate_group(model, list(chosen), name_of, chosen, todo, recipe, disk_stats(index), fisher,
                                        route, report, index, device, bar)
        return report.done()

    dense, kwargs = capture_layer_inputs(model, windows, batch_size, device, offload)
    shifted = dense if streams.shifted else None  # the same tensors until something upstream is compressed
    dense = dense if streams.dense else None
    homes = [next(layer.parameters()).device for layer in layers]
    with bar, (by_layer or layer_mover(device)) as mover:
        arriving = mover.move(layers[0])
        for index, layer in enumerate(tqdm(layers, desc="layers", unit="layer")):
            home = arriving()
            if index + 1 < len(layers):
                arriving = mover.move(layers[index + 1])
            name_of = lambda local: f"{prefix}.{index}.{local}"  # noqa: E731
            linears = layer_linears(layer)
            if not linears:
                raise UserError(f"model: decoder layer {index} ({type(layer).__name__}) has no nn.Linear or "
                                f"Conv1D to compress")
            chosen = {local: m for local, m in linears.items() if name_of(local) in todo}

            # 1. the untouched layer on the dense stream: targets, next inputs, and the Grams when they come from it
            dense_out = dense_stats = None
            if streams.dense:
                dense_out, dense_stats = _dense_pass(index, layer, linears, dense, kwargs, device, offload,
                                                     grams=on_stats is not None or (
                                                         bool(chosen) and recipe.needs_stats and stats_dir is None))
                if on_stats is not None:
                    on_stats(index, dense_stats)

            # 2. truncation, group by group in forward order, each group's statistics on the layer as compressed so far
            if chosen:
                per_group = recipe.anchor is not None or recipe.update  # statistics of the compressed prefix
                stats = None if recipe.anchor is not None else dense_stats or disk_stats(index)
                frozen = copy.deepcopy(layer) if recipe.anchor else None  # the dense layer, for the cross term
                # the windows refinement watches never feed the statistics on X~ (anchor, update): fitted
                # to them, the closed form would look better on them than it is, and refinement would
                # stop too early
                fitted = len(kwargs) - (heldout_batches(len(kwargs), recipe.refine_holdout)
                                        if recipe.refine_steps else 0)
                groups = (_forward_order(index, layer, linears, shifted[0], kwargs[0], device) if per_group
                          else {None: list(chosen)})
                done = 0  # matrices of this layer truncated so far: where the round-robin goes on
                for group, members in groups.items():
                    names = [local for local in members if local in chosen]
                    if not names:
                        continue
                    cross = update_gram = None
                    if per_group:
                        shifted_stats, cross = _shifted_statistics(index, group, members, layer, frozen, shifted,
                                                                   dense, kwargs[:fitted], device)
                        if recipe.anchor is not None:
                            stats = shifted_stats
                        if recipe.update:
                            update_gram = shifted_stats.grams[group]
                    done = _truncate_group(model, names, name_of, chosen, todo, recipe, stats, fisher, route, report,
                                           index, device, bar, cross, update_gram, done)
                del frozen

                # 3. block refinement: the compressed block on X~ against the dense block's outputs on X
                if recipe.refine_steps:
                    with section("refine"):
                        report.refine[index] = refine_block(layer, shifted, dense_out, kwargs, recipe.refine_steps,
                                                            recipe.refine_lr, recipe.refine_holdout, index, device)

            # 4. both streams advance
            if streams.shifted:
                if shifted is dense and not chosen and dense_out is not None:
                    shifted = dense_out  # nothing compressed so far: the streams are the same tensors
                else:
                    with section("forward"):
                        shifted = run_layer(layer, shifted, kwargs, device, offload)
                    check_finite(shifted, index, layer, "shifted")
            if streams.dense:
                check_finite(dense_out, index, layer, "dense")
                if streams.shifted:
                    report.stream_gap[index] = _gap(shifted, dense_out)
                dense = dense_out
            mover.send_home(layer, home, homes[index])
    return report.done()


def _gap(shifted: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    """||X~ - X|| / ||X|| over every batch: how far the compressed model has drifted so far."""
    if shifted is dense:
        return 0.0
    num = sum(float((s.double() - d.double()).square().sum()) for s, d in zip(shifted, dense))
    den = sum(float(d.double().square().sum()) for d in dense)
    if distributed.env_world_size() > 1:  # over every process's windows
        num, den = distributed.all_reduce_sum(torch.tensor([num, den], dtype=torch.float64)).tolist()
    return (num / den) ** 0.5 if den else 0.0


def collect_grams(model, windows: torch.Tensor, batch_size: int, device: torch.device, on_layer,
                  offload: bool = False, by_layer=None) -> None:
    """The statistics pass: stream the model and call `on_layer(index, LayerStats)` for every
    layer (`offload`: keep the activations in pinned CPU memory between layers; `by_layer`: see
    compress_model). It is the layer loop of svdcore.compress with nothing to compress."""
    compress_model(model, {}, "svd-llm", None, device, windows, batch_size, offload=offload, on_stats=on_layer,
                   by_layer=by_layer)
