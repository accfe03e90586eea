"""Gram matrices G = X^T X of the inputs reaching each linear, accumulated batch by batch."""
import torch


class GramAccumulator:
    """Sums X^T X over batches in float64, and sum |x| per input channel (ASVD's statistic).

    Each batch's product is taken in float32 (bf16/fp16 activations are widened first: their
    products are exact in fp32) and added into a float64 total, so the error is that of one
    batch's accumulation order, not of the whole calibration set.
    """

    def __init__(self, features: int, device: torch.device):
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.dtype != torch.float64:
            x = x.float()
        self.gram += (x.T @ x).double()
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)
