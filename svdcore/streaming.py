"""Run a model one decoder layer at a time, GPTQ style, for any architecture.

The inputs of layer 0 are captured once (the model runs up to layer 0 and stops); then each
layer in turn moves to the device, runs on the current activations and hands its outputs on.
Peak device memory is one layer plus the calibration activations (or, with `offload`, one
batch of them: the rest wait in pinned CPU memory, for cards smaller than the activations).
"""
from collections.abc import Callable

import torch
from torch import nn
from .progress import progress as tqdm

from .errors import UserError
from .model import decoder_layers, move_outside_layers
from .timing import section


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int,
                         device: torch.device, offload: bool = False) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states entering decoder layer 0 for each batch (on `device`, or in pinned CPU
    memory with `offload`), and the keyword arguments the model passes to its layers (attention
    mask, position embeddings, ...) for that batch."""
    layers = decoder_layers(model)
    move_outside_layers(model, layers, device)
    hidden, kwargs_per_batch = [], []

    def catch(module, args, kwargs):
        states = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(_park(states, offload))
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


def _park(h: torch.Tensor, offload: bool) -> torch.Tensor:
    """Keep an activation where the stream keeps them: as is, or in pinned CPU memory."""
    if not offload or h.device.type == "cpu":
        return h
    parked = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
    return parked.copy_(h, non_blocking=True)


def _to_device(layer: nn.Module, device: torch.device) -> dict:
    """Put the layer's tensors on `device`; return the originals, by (module, name)."""
    home = {}
    for module in layer.modules():
        for group in (module._parameters, module._buffers):
            for name, t in group.items():
                if t is not None and t.device != device:
                    home[module, name] = t.data
                    moved = t.data.to(device, non_blocking=True)
                    if isinstance(t, nn.Parameter):
                        t.data = moved
                    else:
                        group[name] = moved
    return home


def _to_home(layer: nn.Module, home: dict, device: torch.device) -> None:
    """Tensors that were there before the visit get their original storage back, so an
    unchanged layer costs no device-to-host copy; new ones (low-rank factors made on the
    device) are copied to `device`."""
    for module in layer.modules():
        for group in (module._parameters, module._buffers):
            for name, t in group.items():
                if t is None:
                    continue
                back = home.get((module, name))
                if back is None:
                    back = t.data.to(device)
                if isinstance(t, nn.Parameter):
                    t.data = back
                else:
                    group[name] = back


OVERLAP = True  # on a GPU, overlap layer moves and deferred work with the forward pass (bench: --serial)


class _Serial:
    """Layer moves and each layer's deferred work done in turn (CPU: there is nothing to overlap)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def move(self, layer: nn.Module):
        with section("layer moves"):
            home = _to_device(layer, self.device)
        return lambda: home

    def wrap_up(self, layer: nn.Module, later, home: dict, home_device: torch.device) -> None:
        if later is not None:
            later()
        with section("layer moves"):
            _to_home(layer, home, home_device)


class _Overlapped(_Serial):
    """On a GPU: the next layer is copied in by one thread while this one runs, and a layer's
    deferred work (its decompositions, its statistics' write) and its trip home run in another,
    each on its own CUDA stream, while the main thread already runs the next layer.

    Allocator safety: a tensor made on one stream and used on another could be handed out again
    while still in use; so a worker waits for the whole device before it lets go of a layer's
    tensors, and at most one layer's work is in flight.
    """

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.movers, self.workers = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        self.move_stream, self.work_stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        self.pending = []
        return self

    def __exit__(self, *exc):
        try:
            for job in self.pending:  # the first failure, if any, surfaces here
                job.result()
        finally:
            self.movers.shutdown(wait=True)
            self.workers.shutdown(wait=True)
        return False

    def move(self, layer: nn.Module):
        def copy_in():
            with torch.cuda.stream(self.move_stream), section("layer moves"):
                home = _to_device(layer, self.device)
                self.move_stream.synchronize()  # complete before the main stream reads it
            return home

        return self.movers.submit(copy_in).result

    def wrap_up(self, layer: nn.Module, later, home: dict, home_device: torch.device) -> None:
        ready = torch.cuda.Event()
        ready.record()  # everything the main stream did with this layer so far

        def job():
            with torch.cuda.stream(self.work_stream):
                self.work_stream.wait_event(ready)
                if later is not None:
                    later()
                torch.cuda.synchronize(self.device)
                with section("layer moves"):
                    _to_home(layer, home, home_device)
                torch.cuda.synchronize(self.device)

        while self.pending:  # at most one layer's work in flight
            self.pending.pop(0).result()
        self.pending.append(self.workers.submit(job))


@torch.no_grad()
def run_layers(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
               visit: Callable[[int, nn.Module], Callable[[], None]], desc: str = "layers",
               recompute_outputs: bool = False, offload: bool = False) -> None:
    """Stream `windows` through the decoder layers one layer at a time.

    `visit(index, layer)` is called with the layer already on `device`, before it runs; it may
    install hooks and replace submodules (never change a tensor of the layer in place: those
    get their original storage back) and returns a function called after the layer has seen
    every batch (to remove hooks and keep what was gathered). That function may return more
    work for the layer, a callable that runs while the next layer does (on a GPU) before the
    layer goes back to its original device. With `recompute_outputs` the layer runs again after
    that function, because it changed the layer and the next layer must see the change.
    """
    layers = decoder_layers(model)
    hidden, kwargs_per_batch = capture_layer_inputs(model, windows, batch_size, device, offload)

    def run(layer):
        return [_park(_output(layer(h.to(device, non_blocking=True), **kw)), offload)
                for h, kw in zip(hidden, kwargs_per_batch)]

    homes = [next(layer.parameters()).device for layer in layers]
    with (_Overlapped if device.type == "cuda" and OVERLAP else _Serial)(device) as steps:
        moved = steps.move(layers[0])
        for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer")):
            home = moved()
            if index + 1 < len(layers):
                moved = steps.move(layers[index + 1])
            finish = visit(index, layer)
            with section("forward+grams"):
                outputs = run(layer)
            later = finish()  # before the check below: it can name the matrix whose statistics went bad
            if recompute_outputs:
                with section("forward"):
                    outputs = run(layer)
            hidden = outputs
            finite = torch.stack([torch.isfinite(h).all() for h in hidden])  # one sync, not one per batch
            if not finite.all():
                batch = int((~finite).nonzero()[0])
                raise UserError(f"layer {index} ({type(layer).__name__}): non-finite output activations in "
                                f"calibration batch {batch}; try model.dtype float32")
            steps.wrap_up(layer, later if callable(later) else None, home, homes[index])
