"""How many singular values each matrix keeps for a target compression ratio."""
import math


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


def parameter_count(shapes: dict[str, list[int]], ranks: dict[str, int | None]) -> int:
    """Weights stored by the decoder linears after compression (biases excluded)."""
    return sum(m * n if ranks[name] is None else ranks[name] * (m + n) for name, (m, n) in shapes.items())
