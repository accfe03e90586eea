"""How many singular values each matrix keeps for a target compression ratio."""
import heapq
import math
from collections import defaultdict

import torch

from .errors import UserError

V2_MAX_RATIO = 0.9  # no matrix loses more than this share of its parameters under V2


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank r whose factors A (m x r) and B (r x n) store a (1 - ratio) share of m n numbers."""
    return max(1, math.floor(m * n * (1 - ratio) / (m + n)))


def keeps_dense(m: int, n: int, rank: int) -> bool:
    """At or above the break-even rank m n / (m + n) the factors cost as much as W itself."""
    return rank * (m + n) >= m * n


def uniform_ranks(shapes: dict[str, list[int]], ratio: float) -> dict[str, int | None]:
    """The same ratio for every matrix; None means the matrix stays dense."""
    ranks = {}
    for name, (m, n) in shapes.items():
        r = rank_for_ratio(m, n, ratio)
        ranks[name] = None if ratio == 0 or keeps_dense(m, n, r) else r
    return ranks


def layer_index(name: str) -> int:
    """The decoder layer of a linear named prefix.<layer>.<local> (linear_shapes' names)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise UserError(f"ranks: cannot tell the layer of {name!r}")


def matrix_type(name: str) -> str:
    """What a linear is across layers (self_attn.q_proj, mlp.down_proj, ...)."""
    return name.split(f".{layer_index(name)}.", 1)[1]


def last_k_ranks(shapes: dict[str, list[int]], ratio: float, k: int) -> dict[str, int | None]:
    """ResSVD's partial-layer compression: the last k layers at ratio R L / k, the others dense,
    so the whole model loses the share R of its decoder-linear parameters."""
    layers = 1 + max(layer_index(n) for n in shapes)
    if not 1 <= k <= layers:
        raise UserError(f"compress.last_layers: expected 1 to {layers} (the model's layers), got {k}")
    layer_ratio = ratio * layers / k
    if layer_ratio >= 1:
        raise UserError(f"compress.last_layers: {k} layers would each lose {layer_ratio:.0%} of their parameters "
                        f"for an overall ratio of {ratio}; compress at least {math.floor(ratio * layers) + 1} layers")
    last = {n: m for n, m in shapes.items() if layer_index(n) >= layers - k}
    return {**{n: None for n in shapes}, **uniform_ranks(last, layer_ratio)}


def truncation_loss(spectrum: torch.Tensor, rank: int) -> float:
    """sqrt(sum of the dropped squared whitened singular values): SVD-LLM's loss at `rank`."""
    return float(spectrum[rank:].sum().clamp_min(0).sqrt())


def v2_ranks(shapes: dict[str, list[int]], spectra: dict[str, torch.Tensor], ratio: float) -> dict[str, int | None]:
    """SVD-LLM V2's heterogeneous ratios. Within each matrix type, a matrix whose truncation at
    the uniform ratio loses less (L_i) is compressed more: R_i = |type| R s_i / sum s_j with
    s_i = 1 / log L_i, log L shifted to start at 1 (it can be <= 0, where 1/log breaks down),
    clamped to [0, V2_MAX_RATIO]. The clamped budget is then redistributed (fit_budget), so the
    whole allocation spends (1 - R) of the dense parameters, short of it by less than one rank step.
    `spectra`: squared whitened singular values, descending (svdcore.spectra)."""
    if ratio == 0:
        return {n: None for n in shapes}
    by_type = defaultdict(list)
    for name in shapes:
        by_type[matrix_type(name)].append(name)
    ratios = {}
    for names in by_type.values():
        logs = torch.tensor([math.log(max(truncation_loss(spectra[n], rank_for_ratio(*shapes[n], ratio)), 1e-300))
                             for n in names], dtype=torch.float64)
        scores = 1 / (logs - logs.min() + 1)
        share = len(names) * ratio * scores / scores.sum()
        ratios.update({n: float(r) for n, r in zip(names, share.clamp(0, V2_MAX_RATIO))})
    ranks = {}
    for name, (m, n) in shapes.items():
        r = rank_for_ratio(m, n, ratios[name])
        ranks[name] = None if ratios[name] == 0 or keeps_dense(m, n, r) else r
    target = round((1 - ratio) * parameter_count(shapes, {n: None for n in shapes}))
    return fit_budget(shapes, ranks, spectra, target)


def fit_budget(shapes: dict[str, list[int]], ranks: dict[str, int | None], spectra: dict[str, torch.Tensor],
               target: int) -> dict[str, int | None]:
    """Ranks moved one at a time until the compressed matrices store at most `target` weights and
    no further rank fits: a rank is taken from the matrix whose last kept direction carries the
    least whitened energy per parameter, and given to the one whose next direction carries the
    most. Dense matrices stay dense; no rank reaches 0 or the break-even rank."""
    ranks = dict(ranks)
    kept = parameter_count(shapes, ranks)
    compressed = sorted(n for n, r in ranks.items() if r is not None)

    def energy(name, index):  # squared singular value `index` (0-based) per parameter of one rank
        spectrum = spectra[name]
        return float(spectrum[index]) / sum(shapes[name]) if index < len(spectrum) else 0.0

    cheapest = [(energy(n, ranks[n] - 1), n) for n in compressed if ranks[n] > 1]
    heapq.heapify(cheapest)
    while kept > target:
        if not cheapest:
            raise UserError(f"ranks: cannot fit {target} weights with every compressed matrix at rank 1")
        _, name = heapq.heappop(cheapest)
        ranks[name] -= 1
        kept -= sum(shapes[name])
        if ranks[name] > 1:
            heapq.heappush(cheapest, (energy(name, ranks[name] - 1), name))
    best = [(-energy(n, ranks[n]), n) for n in compressed]
    heapq.heapify(best)
    while best:
        _, name = heapq.heappop(best)
        m, n = shapes[name]
        if kept + m + n <= target and not keeps_dense(m, n, ranks[name] + 1):
            ranks[name] += 1
            kept += m + n
            heapq.heappush(best, (-energy(name, ranks[name]), name))
    return ranks


def candidate_ranks(m: int, n: int, multiple: int) -> list[int]:
    """The ranks a matrix may take under `rank_multiple`, below break-even (dense is the other choice)."""
    ranks = [r for r in range(multiple, m * n // (m + n) + 1, multiple) if not keeps_dense(m, n, r)]
    return ranks or [r for r in range(1, multiple) if not keeps_dense(m, n, r)][-1:]


def sensitivity_ranks(shapes: dict[str, list[int]], costs: dict[str, torch.Tensor], ratio: float,
                      multiple: int = 1) -> tuple[dict[str, int | None], dict]:
    """The ranks that minimize the predicted end-to-end loss, sum over matrices of the costs of
    their dropped components (svdcore.sensitivity), with at most (1 - ratio) of the dense
    parameters kept: an exact integer program (one choice per matrix among its candidate ranks
    and dense), solved by HiGHS through scipy.optimize.milp. Returns the ranks and what the solve
    reports (predicted loss, optimality gap, seconds)."""
    import time

    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    if ratio == 0:
        return {n: None for n in shapes}, {}
    missing = sorted(set(shapes) - set(costs))
    if missing:
        raise UserError(f"ranks: the sensitivity allocation has no costs for {missing[:3]}")
    names, options, rows, price, loss = sorted(shapes), [], [], [], []
    for row, name in enumerate(names):
        m, n = shapes[name]
        tail = torch.cat([costs[name].double().flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        for rank in candidate_ranks(m, n, multiple) + [None]:
            options.append((name, rank))
            rows.append(row)
            price.append(m * n if rank is None else rank * (m + n))
            loss.append(0.0 if rank is None else float(tail[min(rank, len(tail) - 1)]))
    price, loss = np.array(price, dtype=float), np.array(loss)
    budget = (1 - ratio) * parameter_count(shapes, {n: None for n in shapes})
    one_each = coo_matrix((np.ones(len(options)), (rows, np.arange(len(options)))), shape=(len(names), len(options)))
    scale = loss.max() if loss.max() > 0 else 1.0  # HiGHS' tolerances are absolute: work near 1
    start = time.perf_counter()
    result = milp(loss / scale, constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(price[None, :], 0, budget)],
                  integrality=np.ones(len(options)), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0, "time_limit": 600})
    if result.x is None:  # infeasible (a time limit still leaves the best allocation found, with its gap)
        raise UserError(f"ranks: no allocation keeps {1 - ratio:.0%} of the parameters with every matrix at its "
                        f"smallest rank ({result.message})")
    chosen = {options[i][0]: options[i][1] for i in np.flatnonzero(result.x > 0.5)}
    return chosen, {"predicted_kl": float(loss @ (result.x > 0.5)), "mip_gap": float(getattr(result, "mip_gap", 0.0)),
                    "solve_s": round(time.perf_counter() - start, 2), "candidates": len(options)}


def allocate(shapes: dict[str, list[int]], ratio: float, allocation: str, spectra: dict | None = None,
             last_layers: int | None = None, multiple: int = 1,
             costs: dict | None = None) -> tuple[dict[str, int | None], dict]:
    """Ranks for `ratio` under an allocation strategy (svdcore.methods.ALLOCATIONS), rounded to
    `multiple` (the sensitivity solve takes only multiples to begin with); and what the strategy
    decided (the k of last-k, the solve's figures)."""
    from .methods import last_layers_rule

    decided = {}
    if allocation == "uniform":
        ranks = uniform_ranks(shapes, ratio)
    elif allocation == "v2":
        if spectra is None or set(spectra) != set(shapes):
            raise UserError("ranks: the v2 allocation needs the whitened spectra of every linear")
        ranks = v2_ranks(shapes, spectra, ratio)
    elif allocation == "last-k":
        layers = 1 + max(layer_index(n) for n in shapes)
        k = decided["last_layers"] = last_layers or last_layers_rule(layers, ratio)
        ranks = last_k_ranks(shapes, ratio, k) if ratio else {n: None for n in shapes}
    elif allocation == "sensitivity":
        if costs is None:
            raise UserError("ranks: the sensitivity allocation needs the component costs")
        ranks, solve = sensitivity_ranks(shapes, costs, ratio, multiple)
        return ranks, {"solve": solve} if solve else {}
    else:
        raise ValueError(f"allocation {allocation!r} is none of methods.ALLOCATIONS")  # params.yaml's types check it
    return round_to_multiple(shapes, ranks, multiple), decided


def round_to_multiple(shapes: dict[str, list[int]], ranks: dict[str, int | None],
                      multiple: int) -> dict[str, int | None]:
    """Ranks rounded down to a multiple of `multiple` (GPU matmuls on such shapes run at full
    speed; a rank like 1638 can make the pair slower than the dense matrix), with the freed
    parameters given back in steps of `multiple`, so the allocation spends the same budget as
    before, short of it by less than one step.

    Steps go first to the matrix that rounding cut the most, relative to its rank; a matrix
    whose rank is below `multiple` keeps it; no rank reaches the break-even rank.
    """
    if multiple == 1:
        return dict(ranks)
    budget = parameter_count(shapes, ranks)
    rounded = {n: None if r is None else (r // multiple * multiple or r) for n, r in ranks.items()}
    left = budget - parameter_count(shapes, rounded)
    # max-heap on the relative cut (raw - rounded) / raw; names break ties, so the result is fixed
    heap = [(-(r - rounded[n]) / r, n) for n, r in ranks.items() if r is not None]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        m, n = shapes[name]
        grown = rounded[name] + multiple
        if multiple * (m + n) <= left and not keeps_dense(m, n, grown):
            rounded[name] = grown
            left -= multiple * (m + n)
            heapq.heappush(heap, (-(ranks[name] - grown) / ranks[name], name))
    return rounded


def parameter_count(shapes: dict[str, list[int]], ranks: dict[str, int | None]) -> int:
    """Weights stored by the decoder linears after compression (biases excluded)."""
    return sum(m * n if ranks[name] is None else ranks[name] * (m + n) for name, (m, n) in shapes.items())


def check_ranks(ranks: dict, shapes: dict[str, list[int]], source: str) -> None:
    """A rank file must name exactly the model's linears, each dense (None) or 1 <= r < break-even."""
    if not isinstance(ranks, dict) or set(ranks) != set(shapes):
        names = set(ranks) if isinstance(ranks, dict) else set()
        odd = sorted(names ^ set(shapes))[:3]
        raise UserError(f"ranks: {source} does not list this model's linears (e.g. {odd})", artifact=source)
    for name, rank in ranks.items():
        m, n = shapes[name]
        if rank is None:
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or keeps_dense(m, n, rank):
            raise UserError(f"ranks: {source} gives {name} ({m} x {n}) rank {rank!r}; expected null (dense) "
                            f"or an integer in [1, {math.ceil(m * n / (m + n)) - 1}]", artifact=source)
