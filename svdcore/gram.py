"""Gram matrices G = X^T X of the inputs reaching each linear, accumulated batch by batch."""
import torch

HALF = (torch.bfloat16, torch.float16)


def batch_gram(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """X^T X (or the cross product X^T Y) of one batch (rows x features) in float32 or wider.

    bf16/fp16 products are exact in fp32, so on a GPU the half-precision inputs go straight to
    the tensor cores with fp32 accumulation (about 5x faster than widening X to fp32 first, with
    the same error: that of the accumulation order). CPUs have no such kernel: X is widened.
    """
    same = y is None or y is x
    if x.dtype in HALF and x.is_cuda:
        return torch.mm(x.T, x if same else y, out_dtype=torch.float32)
    if x.dtype in HALF:
        x, y = x.float(), None if same else y.float()
    return x.T @ (x if same else y)


class GramAccumulator:
    """Sums X^T X over batches in float64, and sum |x| per input channel (ASVD's statistic).

    Each batch's product is taken in float32 (see batch_gram) and added into a float64 total,
    so the error is that of one batch's accumulation order, not of the whole calibration set.
    """

    def __init__(self, features: int, device: torch.device):
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.gram.add_(batch_gram(x))
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


class CrossAccumulator:
    """Sums the cross term X~^T X over batches in float64: the shifted inputs of a linear against
    the dense model's inputs for the same tokens (the anchored closed form's statistic)."""

    def __init__(self, features: int, device: torch.device):
        self.cross = torch.zeros(features, features, dtype=torch.float64, device=device)

    def add(self, shifted: torch.Tensor, dense: torch.Tensor) -> None:
        self.cross.add_(batch_gram(shifted.reshape(-1, shifted.shape[-1]), dense.reshape(-1, dense.shape[-1])))
