"""The statistics pass: one Gram matrix per distinct linear input, layer by layer.

Linears that read the same tensor (q/k/v, gate/up) share one Gram; sharing is found from the
forward pass itself (same input tensor object), so no architecture table is needed.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .gram import GramAccumulator
from .model import decoder_layers, layer_linears, layer_prefix, linear_shape
from .streaming import run_layers


def layer_file(stats_dir, index: int) -> Path:
    return Path(stats_dir) / f"layer_{index:03d}.safetensors"


def collect_grams(model, windows: torch.Tensor, batch_size: int, device: torch.device, on_layer) -> None:
    """Stream the model and call `on_layer(index, grams, shares, tokens)` for every layer.

    grams: input group name -> float64 Gram (on CPU); shares: linear name -> its group name.
    """

    def visit(index, layer):
        linears = layer_linears(layer)
        if not linears:
            raise UserError(f"model: decoder layer {index} ({type(layer).__name__}) has no nn.Linear or "
                            f"Conv1D to compress")
        accumulators: dict[str, GramAccumulator] = {}
        shares: dict[str, str] = {}
        seen: dict[int, str] = {}  # id(input tensor) -> group, within one batch
        alive: list[torch.Tensor] = []  # keep inputs referenced so their ids are not reused

        def hook_for(name):
            def hook(module, args):
                x = args[0]
                group = seen.get(id(x))
                if group is None:
                    if not torch.isfinite(x).all():
                        raise UserError(f"layer {index}, {name}: non-finite input activations (NaN or inf)")
                    group = seen[id(x)] = name
                    alive.append(x)
                    if name not in accumulators:
                        accumulators[name] = GramAccumulator(x.shape[-1], x.device)
                    accumulators[name].add(x)
                if shares.setdefault(name, group) != group:
                    raise RuntimeError(f"layer {index}: input sharing of {name} changed between batches")
            return hook

        def new_batch(module, args):
            seen.clear()
            alive.clear()

        handles = [layer.register_forward_pre_hook(new_batch)]
        handles += [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]

        def finish():
            for h in handles:
                h.remove()
            seen.clear()
            alive.clear()
            missing = sorted(set(linears) - set(shares))
            if missing:
                raise RuntimeError(f"layer {index}: linears never called in the forward pass: {missing}")
            grams = {}
            for group, acc in accumulators.items():
                if not torch.isfinite(acc.gram).all():
                    raise UserError(f"layer {index}, {group}: the Gram matrix has non-finite values "
                                    f"(activations overflowed; try model.dtype float32)")
                grams[group] = acc.gram.cpu()
            on_layer(index, grams, dict(shares), next(iter(accumulators.values())).tokens)

        return finish

    run_layers(model, windows, batch_size, device, visit, desc="covariances")


def save_layer(stats_dir, index: int, grams: dict, shares: dict, tokens: int) -> None:
    # One metadata key: safetensors writes the metadata map in no fixed order, so two keys
    # would make identical statistics differ byte-wise from run to run.
    meta = {"svdcore": json.dumps({"shares": shares, "tokens": tokens}, sort_keys=True)}
    save_file({g: t.contiguous() for g, t in sorted(grams.items())}, str(layer_file(stats_dir, index)), metadata=meta)


def load_layer(stats_dir, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """Grams of one layer as (group -> Gram, linear -> group, token count)."""
    from safetensors import safe_open

    path = layer_file(stats_dir, index)
    if not path.is_file():
        raise UserError(f"statistics: {path} is missing; rerun compute-covariances")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["svdcore"])
        grams = load_file(str(path))
        return grams, meta["shares"], meta["tokens"]
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise UserError(f"statistics: {path} is unreadable ({type(e).__name__}: {e}); rerun compute-covariances") from None


def linear_shapes(model) -> dict[str, list[int]]:
    """Every decoder linear by its full module name -> [out_features, in_features]."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    return {f"{prefix}.{i}.{name}": list(linear_shape(m))
            for i, layer in enumerate(layers) for name, m in layer_linears(layer).items()}
