"""Low-rank linears for models compressed by svdcore.

This file is copied next to every compressed model and registered in its config.json
(`auto_map`), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works
without svdcore installed. It must import nothing but torch and transformers.
"""
import torch
import transformers
from torch import nn

BASE_ARCHITECTURE = "LlamaForCausalLM"  # rewritten when a model is saved


FACTORS = "linear"  # config.svdcore["factors"]: the factors are two nn.Linear modules (reduce, expand)


def _linear(in_features, out_features, bias, dtype, device):
    """An nn.Linear whose weights are left uninitialized (they are copied in or loaded): built on the
    meta device, then given storage where asked, or where the caller's default device says."""
    device = torch.get_default_device() if device is None else device
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device="meta").to_empty(device=device)


class LowRankLinear(nn.Module):
    """y = expand(reduce(x)): `reduce` (in -> rank, no bias) then `expand` (rank -> out, with the
    bias), two plain nn.Linear modules, so that tools written for nn.Linear (PEFT's LoRA, torchao and
    the transformers quantizers) work on the factors unchanged. In the papers' notation W ~ A B,
    with A = expand.weight (out x rank) and B = reduce.weight (rank x in)."""

    def __init__(self, in_features, out_features, rank, bias=False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.reduce = _linear(in_features, rank, False, dtype, device)
        self.expand = _linear(rank, out_features, bias, dtype, device)

    @property
    def A(self):
        return self.expand.weight

    @property
    def B(self):
        return self.reduce.weight

    def forward(self, x):
        return self.expand(self.reduce(x))

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
    """A subclass of the original architecture whose constructor installs the low-rank linears. It
    keeps the base class's name, which is what pipelines check a model against ("LlamaForCausalLM"
    supports text-generation); the module's SVDCoreForCausalLM attribute is what auto_map names."""
    base = getattr(transformers, base_name)

    def __init__(self, config):
        base.__init__(self, config)
        install_low_rank(self, config.svdcore["ranks"])

    return type(base_name, (base,), {"__init__": __init__, "__module__": __name__})


SVDCoreForCausalLM = low_rank_class(BASE_ARCHITECTURE)
# save_pretrained of a loaded model names its class in auto_map by __name__, so that name must resolve too
globals()[BASE_ARCHITECTURE] = SVDCoreForCausalLM
