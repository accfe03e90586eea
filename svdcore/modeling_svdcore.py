"""Low-rank linears for models compressed by svdcore.

This file is copied next to every compressed model and registered in its config.json
(`auto_map`), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works
without svdcore installed. It must import nothing but torch and transformers.
"""
import torch
import torch.nn.functional as F
import transformers
from torch import nn

BASE_ARCHITECTURE = "LlamaForCausalLM"  # rewritten when a model is saved


class LowRankLinear(nn.Module):
    """y = A (B x) + bias, with B (rank x in) applied first and A (out x rank) second."""

    def __init__(self, in_features, out_features, rank, bias=False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.A = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x):
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def linear_shape(module):
    """(out_features, in_features) of an nn.Linear, or of GPT-2's Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.nf, module.nx


def install_low_rank(model, ranks):
    """Replace each named linear (nn.Linear, or GPT-2's Conv1D whose weight is stored in x out)
    by an uninitialized LowRankLinear of the given rank computing the same map."""
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, child)
        out_features, in_features = linear_shape(dense)
        ref = dense.weight
        setattr(parent, child, LowRankLinear(in_features, out_features, rank, bias=dense.bias is not None,
                                             dtype=ref.dtype, device=ref.device))
    return model


def low_rank_class(base_name):
    """A subclass of the original architecture whose constructor installs the low-rank linears."""
    base = getattr(transformers, base_name)

    def __init__(self, config):
        base.__init__(self, config)
        install_low_rank(self, config.svdcore["ranks"])

    return type("SVDCoreForCausalLM", (base,), {"__init__": __init__, "__module__": __name__})


SVDCoreForCausalLM = low_rank_class(BASE_ARCHITECTURE)
