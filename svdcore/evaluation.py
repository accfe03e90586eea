"""Everything the evaluate stages measure about one model: `measure` is the one path from
params.yaml's evaluate / zeroshot / generate sections to metrics, for the pipeline and the sweep."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from .counts import parameter_counts
from .data import eval_windows, leading_tokens, load_text
from .generation import generate_samples
from .model import check_seqlen
from .perplexity import perplexity
from .zeroshot import evaluate_zeroshot

if TYPE_CHECKING:  # pydantic only where params.yaml is read: this module runs without it
    from .params import Params


def directory_bytes(path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def evaluate_model(model, tokenizer, datasets: list[str], seqlen: int, max_windows: int,
                   batch_size: int, device, label: str, stream_layers: bool = False, by_layer=None) -> tuple[dict, dict]:
    """(deterministic metrics, runtime figures) for one model; `stream_layers`: its decoder layers
    pass through `device` one at a time (svdcore.perplexity), for models bigger than the device;
    `by_layer`: read from the checkpoint as they are reached (svdcore.checkpoint)."""
    check_seqlen(model.config, seqlen, "evaluate.seqlen")
    metrics = {**parameter_counts(model), "ppl": {}}
    runtime = {"tokens_per_s": {}}
    for name in datasets:
        windows = eval_windows(leading_tokens(tokenizer, load_text(name), seqlen * max_windows), seqlen, max_windows)
        result = perplexity(model, windows, batch_size, device, desc=f"{label} {name}", stream_layers=stream_layers,
                            by_layer=by_layer)
        metrics["ppl"][name] = result["ppl"]
        metrics.setdefault("windows", {})[name] = result["windows"]
        runtime["tokens_per_s"][name] = round(result["tokens_per_s"], 1)
    return metrics, runtime


MEASURES = ("perplexity", "zeroshot", "samples")


def park_on_cpu(model) -> None:
    """Move what of `model` lies on a GPU to the CPU: the whole model after its perplexity, or the
    tensors outside the layers of one read by layer (its layers are on the meta device)."""
    import torch

    from .model import decoder_layers, move_outside_layers

    if any(p.is_meta for p in model.parameters()):
        move_outside_layers(model, decoder_layers(model), torch.device("cpu"))
    else:
        model.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def streams_by_layer(params: Params) -> bool:
    """Whether an evaluation can read the model a layer at a time (model.load by-layer): its
    streamed perplexity can; zero-shot scoring and generation need the whole model, unless they
    load their own over a device map (evaluate.device_map auto)."""
    return (params.model.load == "by-layer" and params.evaluate.stream_layers
            and (params.evaluate.device_map == "auto" or not (params.zeroshot.tasks or params.generate.prompts)))


def measure(model, tokenizer, params: Params, device, label: str, what=MEASURES, by_layer=None,
            spread=None) -> tuple[dict, dict]:
    """(deterministic metrics, runtime figures) of one model, as params.yaml asks: the perplexity of
    `evaluate` (with the parameter counts), the zero-shot scores of `zeroshot`, the greedy
    continuations of `generate` (metrics["samples"]), whichever of them `what` names. `by_layer`:
    the model's layers are read from its checkpoint as the streamed perplexity reaches them.
    `spread`: with evaluate.device_map auto, what loads the same model over the device map
    (svdcore.spread.spread_model, without its arguments) for zero-shot scoring and generation."""
    unknown = set(what) - set(MEASURES)
    if unknown:
        raise ValueError(f"measure: unknown {sorted(unknown)}; expected some of {MEASURES}")
    ev = params.evaluate
    metrics, runtime = evaluate_model(model, tokenizer, ev.datasets, ev.seqlen, ev.max_windows,
                                      ev.batch_size, device, label, ev.stream_layers, by_layer) \
        if "perplexity" in what else (parameter_counts(model), {})  # evaluate_model counts them too
    zs, gen = params.zeroshot, params.generate
    whole = ("zeroshot" in what and zs.tasks) or ("samples" in what and gen.prompts)
    spreading = spread is not None and ev.device_map == "auto" and whole
    if spreading:  # the perplexity's copy leaves the device to the spread one
        park_on_cpu(model)
    with spread() if spreading else contextlib.nullcontext(model) as scored:
        if "zeroshot" in what:
            metrics["zeroshot"], zeroshot_runtime = evaluate_zeroshot(scored, tokenizer, zs.tasks, zs.limit,
                                                                      zs.batch_size, device)
            runtime.update(zeroshot_runtime)
        if "samples" in what:
            metrics["samples"] = generate_samples(scored, tokenizer, gen.prompts, gen.max_new_tokens, device)
    return metrics, runtime
