"""How many singular values each matrix keeps for a target compression ratio."""
import heapq
import math

from .errors import UserError


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
        raise UserError(f"ranks: {source} does not list this model's linears (e.g. {odd}); rerun allocate-ranks")
    for name, rank in ranks.items():
        m, n = shapes[name]
        if rank is None:
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or keeps_dense(m, n, rank):
            raise UserError(f"ranks: {source} gives {name} ({m} x {n}) rank {rank!r}; expected null (dense) "
                            f"or an integer in [1, {math.ceil(m * n / (m + n)) - 1}]; rerun allocate-ranks")
