"""The statistics of the linears' inputs on disk: one Gram matrix per distinct linear input, a
file per decoder layer (the statistics pass that makes them is svdcore.compress.collect_grams).

Linears that read the same tensor (q/k/v, gate/up) share one Gram; sharing is found from the
forward pass itself (same input tensor object), so no architecture table is needed.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .model import named_linears
from .timing import section


ABS_MEAN = "abs_mean/"  # safetensors key prefix of the mean |x| vectors, beside the Grams


@dataclass
class LayerStats:
    """The statistics of one decoder layer's linear inputs (float64, on the device that made them).

    grams / abs_means: input group -> X^T X / mean |x| per channel; shares: linear -> its group
    (linears reading the same tensor share one group); tokens: rows of X.
    """

    grams: dict[str, torch.Tensor]
    abs_means: dict[str, torch.Tensor]
    shares: dict[str, str]
    tokens: int
    source: str | None = None  # the file they were read from (load_layer), named by errors about them


def layer_file(stats_dir, index: int) -> Path:
    return Path(stats_dir) / f"layer_{index:03d}.safetensors"


def save_layer(stats_dir, index: int, stats: LayerStats) -> None:
    """Grams are stored in float32: half the disk of float64, and the rounding (6e-8 relative)
    is far below the error of accumulating them (about 1e-5 relative, batch order).
    """
    # One metadata key: safetensors writes the metadata map in no fixed order, so two keys
    # would make identical statistics differ byte-wise from run to run.
    meta = {"svdcore": json.dumps({"shares": stats.shares, "tokens": stats.tokens}, sort_keys=True)}
    tensors = {**stats.grams, **{ABS_MEAN + g: v for g, v in stats.abs_means.items()}}
    with section("save stats"):
        save_file({k: t.float().contiguous().cpu() for k, t in sorted(tensors.items())}, str(layer_file(stats_dir, index)),
                  metadata=meta)


def load_layer(stats_dir, index: int) -> LayerStats:
    from safetensors import safe_open

    path = layer_file(stats_dir, index)
    if not path.is_file():
        raise UserError(f"statistics: {path} is missing", artifact=path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["svdcore"])
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise UserError(f"statistics: {path} is unreadable ({type(e).__name__}: {e})", artifact=path) from None
    grams = {k: v.double() for k, v in tensors.items() if not k.startswith(ABS_MEAN)}
    abs_means = {k[len(ABS_MEAN):]: v.double() for k, v in tensors.items() if k.startswith(ABS_MEAN)}
    if set(abs_means) != set(grams):
        raise UserError(f"statistics: {path} lacks the mean |x| of some inputs (made by an older svdcore?)",
                        artifact=path)
    return LayerStats(grams, abs_means, meta["shares"], meta["tokens"], str(path))


def linear_shapes(model) -> dict[str, list[int]]:
    """Every decoder linear by its full module name -> [out_features, in_features]."""
    from .modeling_svdcore import linear_shape  # here: importing it builds transformers' model classes (2 s)

    return {name: list(linear_shape(m)) for name, m in named_linears(model).items()}
