"""Everything the evaluate stages measure about one model."""
from pathlib import Path

from torch import nn

from .data import eval_windows, load_text, tokenize
from .lowrank import LowRankLinear
from .model import check_seqlen, count_parameters, decoder_layers, layer_linears
from .perplexity import perplexity


def linear_parameters(model: nn.Module) -> int:
    """Weights held by the decoder linears, dense or low-rank (biases excluded)."""
    total = 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, LowRankLinear):
                total += module.A.numel() + module.B.numel()
        total += sum(m.weight.numel() for m in layer_linears(layer).values())
    return total


def directory_bytes(path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def evaluate_model(model, tokenizer, datasets: list[str], seqlen: int, max_windows: int,
                   batch_size: int, device, label: str) -> tuple[dict, dict]:
    """(deterministic metrics, runtime figures) for one model."""
    check_seqlen(model.config, seqlen, "evaluate.seqlen")
    metrics = {"params_total": count_parameters(model), "params_linears": linear_parameters(model), "ppl": {}}
    runtime = {"tokens_per_s": {}}
    for name in datasets:
        windows = eval_windows(tokenize(tokenizer, load_text(name)), seqlen, max_windows)
        result = perplexity(model, windows, batch_size, device, desc=f"{label} {name}")
        metrics["ppl"][name] = result["ppl"]
        metrics.setdefault("windows", {})[name] = result["windows"]
        runtime["tokens_per_s"][name] = round(result["tokens_per_s"], 1)
    return metrics, runtime
