"""Truncated factorizations W ≈ A B, plain and truncation-aware (SVD-LLM whitening).

Every method minimizes ||(W - A B) S||_F for some factor S of its Gram (S S^T = G): S = I for
plain SVD, diag(mean|x|^α) for ASVD, a Cholesky or eigen factor of X^T X for SVD-LLM. The
optimum keeps the top-r singular triplets of M = W S, and three routes reach it:

  svd       SVD of M (m x n): the reference, and the slowest by far on a GPU
  eigh-out  eigh of M M^T = W G W^T (m x m); A B = U_r U_r^T W, no S^-1 needed (m <= n)
  eigh-in   eigh of M^T M (n x n), then B through S^-1 (m > n)

`auto` takes the eigh route on the smaller side: 10-15x faster than the SVD on a GPU and
several times faster on a CPU, with the same loss (tests/test_linalg.py). All math runs in
float64; callers cast the factors to the model's dtype.
"""
from dataclasses import dataclass

import torch


JITTERS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # relative to mean(diag G)
EIGEN_FLOOR = 1e-10  # eigen route: directions with λ <= EIGEN_FLOOR * λ_max carry no energy
ROUTES = ("auto", "svd", "eigh-out", "eigh-in")


@dataclass
class Whitening:
    """A factor S of the Gram (G ≈ S S^T), n x k, with the way back from whitened space.

    route says how S was obtained: "cholesky", "jitter-<eps>" (Cholesky of G + eps mean(diag G) I),
    "eigen" (S = U_k Λ_k^(1/2)), "diagonal" (S = diag(scales)) or "identity".
    """

    route: str
    factor: torch.Tensor | None = None  # lower-triangular n x n (cholesky routes) or U_k Λ_k^(1/2)
    eigvals: torch.Tensor | None = None
    eigvecs: torch.Tensor | None = None
    scales: torch.Tensor | None = None  # diagonal S

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W S."""
        if self.route == "identity":
            return weight
        if self.scales is not None:
            return weight * self.scales
        return weight @ self.factor

    def unwhiten(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (r x k) -> rows S^+ (r x n), so that (rows S^+) S = rows."""
        if self.route == "identity":
            return rows
        if self.scales is not None:
            return rows / self.scales
        if self.eigvecs is None:  # X S^-1 by a triangular solve, never an explicit inverse
            return torch.linalg.solve_triangular(self.factor, rows, upper=False, left=False)
        return (rows / self.eigvals.sqrt()) @ self.eigvecs.T

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """G^-1 rhs through the factor (G + jitter for the jitter routes; the pseudo-inverse on the
        kept directions for the eigen route, the minimum-norm solution when G is singular)."""
        if self.eigvecs is not None:
            return self.eigvecs @ ((self.eigvecs.T @ rhs) / self.eigvals[:, None])
        if self.factor is None:
            raise ValueError(f"a {self.route} whitening has no Gram to solve with")
        return torch.cholesky_solve(rhs, self.factor)


IDENTITY = Whitening("identity")


def diagonal_whitening(scales: torch.Tensor) -> Whitening:
    """S = diag(s). Channels that never fire (s = 0) would make S singular; they are floored at
    a tiny fraction of the largest scale, so they are simply the first to be dropped."""
    scales = scales.double().clamp_min(torch.finfo(torch.float64).eps * scales.max().clamp_min(1e-300))
    return Whitening("diagonal", scales=scales)


def eigen_whitening(gram: torch.Tensor) -> Whitening:
    """S = U_k Λ_k^(1/2) from the eigendecomposition of G: needs no positive definiteness."""
    vals, vecs = torch.linalg.eigh(gram)
    keep = vals > EIGEN_FLOOR * vals.max().clamp_min(torch.finfo(vals.dtype).tiny)
    vals, vecs = vals[keep], vecs[:, keep]
    return Whitening("eigen", vecs * vals.sqrt(), vals, vecs)


def whitening(gram: torch.Tensor) -> Whitening:
    """Cholesky of G; if G is not positive definite, escalating jitter; then the eigen route."""
    gram = gram.double()
    gram = (gram + gram.T) / 2
    factor, info = torch.linalg.cholesky_ex(gram)
    if info == 0:
        return Whitening("cholesky", factor)
    scale = gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for eps in JITTERS:
        factor, info = torch.linalg.cholesky_ex(gram + eps * scale * eye)
        if info == 0:
            return Whitening(f"jitter-{eps:g}", factor)
    return eigen_whitening(gram)


def anchored_weight(weight: torch.Tensor, shifted: Whitening, cross: torch.Tensor, beta: float) -> torch.Tensor:
    """The matrix whose truncation in the shifted inputs' metric is the anchored closed form.

    min over rank-r W' of ||X_b W^T - X~ W'^T||_F, with X~ the inputs the compressed prefix feeds
    the linear, X the dense model's and X_b = (1 - b) X~ + b X, splits (least squares is an
    orthogonal projection) into ||X_b W^T - X~ W*^T||^2, which W' cannot change, plus
    ||X~ (W* - W')^T||^2, the whitened truncation loss of W* under G~ = X~^T X~. The unconstrained
    fit is W* = (1 - b) W + b W C^T G~^-1 with the cross term C = X~^T X; so the rank-r optimum is W*
    truncated by any route of `truncate` with G~. b = 0 is whitening on the shifted inputs (W* = W).
    `shifted` is a whitening of G~ (its fallback chain handles a singular G~). A ridge toward W,
    + λ ||W' - W||^2, is the same problem with n more rows sqrt(λ) I in both X~ and X: pass
    G~ + λ I and C + λ I (svdcore.compress does, for compress.anchor_ridge)."""
    weight = weight.double()
    if beta == 0:
        return weight
    fitted = shifted.solve(cross.double() @ weight.T).T  # W C^T G~^-1, G~ symmetric
    return (1 - beta) * weight + beta * fitted


def choose_route(route: str, m: int, n: int) -> str:
    """auto: the eigh route on the smaller side of an m x n matrix."""
    if route == "auto":
        return "eigh-out" if m <= n else "eigh-in"
    if route not in ROUTES:
        raise ValueError(f"route {route!r} is none of {ROUTES}")  # params.yaml's types check compress.route
    return route


def _top_eigh(sym: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` largest eigenvalues (as singular values σ = sqrt λ, descending) and vectors."""
    vals, vecs = torch.linalg.eigh((sym + sym.T) / 2)
    vals, vecs = vals.flip(0)[:rank], vecs.flip(1)[:, :rank]
    return vals.clamp_min(0).sqrt(), vecs


def _root(sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(σ) for the balanced split, floored so a direction with no energy cannot divide by 0
    (A B is unchanged by the floor: the same number scales A's column and divides B's row)."""
    floor = sigma.max().clamp_min(torch.finfo(sigma.dtype).tiny) * 1e-12
    return sigma.clamp_min(floor).sqrt()


def truncate(weight: torch.Tensor, rank: int, white: Whitening = IDENTITY, route: str = "auto",
             gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m x r), B (r x n) minimizing ||(W - A B) S||_F, split as A = U_r Σ_r^½, B = Σ_r^½ V_r^T S^-1
    (the balanced split keeps both factors well scaled for low-precision storage).

    With `gram` given, the eigh-out route uses W G W^T directly (exact even for a singular G,
    and no factor S is needed at all: `white` may then be None)."""
    weight = weight.double()
    m, n = weight.shape
    route = choose_route(route, m, n)
    if route == "eigh-out":
        if gram is not None:
            gram = gram.double()
            sym = (weight @ gram) @ weight.T
        else:
            ws = white.apply(weight)
            sym = ws @ ws.T
        sigma, u = _top_eigh(sym, rank)
        root = _root(sigma)
        return u * root, (u.T @ weight) / root[:, None]
    ws = white.apply(weight)
    if route == "svd":
        u, s, vh = torch.linalg.svd(ws, full_matrices=False)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, white.unwhiten(root[:, None] * vh[:rank])
    sigma, v = _top_eigh(ws.T @ ws, rank)  # eigh-in
    root = _root(sigma)
    return (ws @ v) / root, white.unwhiten(root[:, None] * v.T)


def truncate_svd(weight: torch.Tensor, rank: int, route: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
    """Plain SVD truncation (the data-free baseline)."""
    return truncate(weight, rank, IDENTITY, route)


def truncate_whitened(weight: torch.Tensor, white: Whitening, rank: int,
                      route: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM: truncate the SVD of W S and map B back, B = sqrt(Σ_r) V_r^T S^-1.

    Dropping the smallest singular values of W S is optimal for ||(W - A B) X^T||_F because
    ||M X^T||_F = ||M S||_F when S S^T = X^T X.
    """
    return truncate(weight, rank, white, route)


def truncate_scaled(weight: torch.Tensor, scales: torch.Tensor, rank: int,
                    route: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD / FWSVD: truncate the SVD of W diag(s), then B = sqrt(Σ_r) V_r^T diag(s)^-1."""
    return truncate(weight, rank, diagonal_whitening(scales), route)
