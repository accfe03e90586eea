"""Parameter counts of a model, dense or compressed, and the fraction a compression removed."""
from torch import nn

from .lowrank import LowRankLinear
from .model import count_parameters, decoder_layers, layer_linears


def linear_parameters(model: nn.Module) -> int:
    """Weights held by the decoder linears, dense or low-rank (biases excluded)."""
    total = 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, LowRankLinear):
                total += module.A.numel() + module.B.numel()
        total += sum(m.weight.numel() for m in layer_linears(layer).values())
    return total


def parameter_counts(model: nn.Module) -> dict:
    return {"params_total": count_parameters(model), "params_linears": linear_parameters(model)}


def ratio_achieved(dense: dict, compressed: dict) -> dict:
    """The fraction of parameters removed, of the decoder linears and of the whole model, from two
    parameter_counts (or metrics that hold them)."""
    return {"linears": 1 - compressed["params_linears"] / dense["params_linears"],
            "model": 1 - compressed["params_total"] / dense["params_total"]}
