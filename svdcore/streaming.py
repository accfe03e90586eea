"""Run a model one decoder layer at a time, GPTQ style, for any architecture.

The inputs of layer 0 are captured once (the model runs up to layer 0 and stops); then each
layer in turn moves to the device, runs on the current activations and hands its outputs on.
Peak memory is one layer plus the calibration activations.
"""
from collections.abc import Callable

import torch
from torch import nn
from .progress import progress as tqdm

from .errors import UserError
from .model import decoder_layers, move_outside_layers


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int,
                         device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states entering decoder layer 0 for each batch, and the keyword arguments the
    model passes to its layers (attention mask, position embeddings, ...) for that batch."""
    layers = decoder_layers(model)
    move_outside_layers(model, layers, device)
    hidden, kwargs_per_batch = [], []

    def catch(module, args, kwargs):
        states = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(states)
        kwargs_per_batch.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_per_batch


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layers(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
               visit: Callable[[int, nn.Module], Callable[[], None]], desc: str = "layers",
               recompute_outputs: bool = False) -> None:
    """Stream `windows` through the decoder layers one layer at a time.

    `visit(index, layer)` is called with the layer already on `device`, before it runs; it may
    install hooks and returns a function called after the layer has seen every batch (to
    remove hooks and store what was gathered). With `recompute_outputs` the layer runs again
    after that function, because it changed the layer and the next layer must see the change.
    The layer goes back to its original device after.
    """
    layers = decoder_layers(model)
    hidden, kwargs_per_batch = capture_layer_inputs(model, windows, batch_size, device)
    for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer")):
        home = next(layer.parameters()).device
        layer.to(device)
        finish = visit(index, layer)
        outputs = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs_per_batch)]
        finish()  # before the check below: it can name the matrix whose statistics went bad
        if recompute_outputs:
            outputs = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs_per_batch)]
        hidden = outputs
        for batch, h in enumerate(hidden):
            if not torch.isfinite(h).all():
                raise UserError(f"layer {index} ({type(layer).__name__}): non-finite output activations in "
                                f"calibration batch {batch}; try model.dtype float32")
        layer.to(home)
