"""Truncated factorizations W ≈ A B, plain and truncation-aware (SVD-LLM whitening).

All math runs in float64; callers cast the factors to the model's dtype.
"""
from dataclasses import dataclass

import torch

JITTERS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # relative to mean(diag G)
EIGEN_FLOOR = 1e-10  # eigen route: directions with λ <= EIGEN_FLOOR * λ_max carry no energy


def _split_sqrt(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    """A = U_r sqrt(Σ_r), B = sqrt(Σ_r) V_r^T: the balanced split keeps both factors well scaled."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncate_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain SVD truncation (the data-free baseline)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return _split_sqrt(u, s, vh, rank)


@dataclass
class Whitening:
    """A factor S of the Gram (G ≈ S S^T), n x k, with the way back from whitened space.

    route says how S was obtained: "cholesky", "jitter-<eps>" (Cholesky of G + eps mean(diag G) I) or "eigen".
    """

    route: str
    factor: torch.Tensor  # lower-triangular n x n (cholesky routes) or U_k Λ_k^(1/2) (eigen)
    eigvals: torch.Tensor | None = None
    eigvecs: torch.Tensor | None = None

    def unwhiten(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (r x k) -> rows S^+ (r x n), so that (rows S^+) S = rows."""
        if self.eigvecs is None:  # X S^-1 by a triangular solve, never an explicit inverse
            return torch.linalg.solve_triangular(self.factor, rows, upper=False, left=False)
        return (rows / self.eigvals.sqrt()) @ self.eigvecs.T


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


def truncate_whitened(weight: torch.Tensor, white: Whitening, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM: truncate the SVD of W S and map B back, B = sqrt(Σ_r) V_r^T S^-1.

    Dropping the smallest singular values of W S is optimal for ||(W - A B) X||_F because
    ||M X||_F = ||M S||_F when S S^T = X^T X.
    """
    u, s, vh = torch.linalg.svd(weight.double() @ white.factor, full_matrices=False)
    a, b_white = _split_sqrt(u, s, vh, rank)
    return a, white.unwhiten(b_white)


def truncate_scaled(weight: torch.Tensor, scales: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD / FWSVD: truncate the SVD of W diag(s), then B = sqrt(Σ_r) V_r^T diag(s)^-1.

    Input channels that never fire (s = 0) would make diag(s) singular; they are floored at a
    tiny fraction of the largest scale, so they are simply the first to be dropped.
    """
    scales = scales.double().clamp_min(torch.finfo(torch.float64).eps * scales.max().clamp_min(1e-300))
    u, s, vh = torch.linalg.svd(weight.double() * scales, full_matrices=False)
    a, b_scaled = _split_sqrt(u, s, vh, rank)
    return a, b_scaled / scales
