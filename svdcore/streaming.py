"""Move a model's decoder layers through a device one at a time, GPTQ style, for any architecture.

The inputs of layer 0 are captured once (the model runs up to layer 0 and stops); the layer loop
(svdcore.compress) then moves each layer to the device, runs it on the activations it holds and
hands the outputs on. Peak device memory is one layer plus the calibration activations (or, with
`offload`, one batch of them: the rest wait in pinned CPU memory, for cards smaller than them).
This module holds the pieces of that loop that are about where tensors live, and what reaches
each linear of a layer.
"""
import torch
from torch import nn

from .errors import UserError
from .model import decoder_layers, move_outside_layers
from .timing import section


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has seen what it was waiting for."""


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
        hidden.append(park(states, offload))
        kwargs_per_batch.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_per_batch


def output_of(out):
    """The hidden states a decoder layer returns (some return a tuple, some a tensor)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def park(h: torch.Tensor, offload: bool) -> torch.Tensor:
    """Keep an activation where the stream keeps them: as is, or in pinned CPU memory."""
    if not offload or h.device.type == "cpu":
        return h
    parked = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
    return parked.copy_(h, non_blocking=True)


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs_per_batch: list[dict], device: torch.device,
              offload: bool = False) -> list[torch.Tensor]:
    """The layer's outputs for every batch of a stream, kept where the stream keeps them."""
    return [park(output_of(layer(h.to(device, non_blocking=True), **kw)), offload)
            for h, kw in zip(hidden, kwargs_per_batch)]


def check_finite(hidden: list[torch.Tensor], index: int, layer: nn.Module, stream: str) -> None:
    finite = torch.stack([torch.isfinite(h).all() for h in hidden])  # one sync, not one per batch
    if not finite.all():
        batch = int((~finite).nonzero()[0])
        raise UserError(f"layer {index} ({type(layer).__name__}): non-finite output activations in "
                        f"calibration batch {batch} of the {stream} stream; try model.dtype float32")


def linear_inputs(layer: nn.Module, linears: dict[str, nn.Module], x: torch.Tensor, kwargs: dict,
                  stop_at: str | None = None) -> tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]]]:
    """Run `layer` on one batch and record what each of `linears` (name -> module inside the
    layer) reads, in call order: (layer output, [(name, input), ...]). With `stop_at` the pass
    ends as soon as that linear has read its input (output None): the rest of the layer is not
    computed. Only pre-hooks are used, so the layer is free to call its linears in any order."""
    calls = []

    def hook_for(name):
        def hook(module, args):
            calls.append((name, args[0]))
            if name == stop_at:
                raise _Stop
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in linears.items()]
    try:
        out = output_of(layer(x, **kwargs))
    except _Stop:
        out = None
    finally:
        for h in handles:
            h.remove()
    return out, calls


def input_groups(calls: list[tuple[str, torch.Tensor]]) -> dict[str, list[str]]:
    """Linears that read the same tensor (q/k/v, gate/up) form one group, named after the first
    of them to be called: {group: [its linears]}, groups in the order the layer reads them. The
    tensors are still referenced by `calls`, so their ids cannot have been reused."""
    groups, by_tensor = {}, {}
    for name, x in calls:
        group = by_tensor.setdefault(id(x), name)
        groups.setdefault(group, []).append(name)
    return groups


def _to_device(layer: nn.Module, device: torch.device) -> dict:
    """Put the layer's tensors on `device`; return the originals and their device copies, by
    (module, name)."""
    home = {}
    for module in layer.modules():
        for group in (module._parameters, module._buffers):
            for name, t in group.items():
                if t is not None and t.device != device:
                    moved = t.data.to(device, non_blocking=True)
                    home[module, name] = (t.data, moved.data_ptr())
                    if isinstance(t, nn.Parameter):
                        t.data = moved
                    else:
                        group[name] = moved
    return home


def _to_home(layer: nn.Module, home: dict, device: torch.device) -> None:
    """Tensors still held in the storage they were copied into get their original storage back,
    so an unchanged layer costs no device-to-host copy; tensors that were replaced on the device
    (low-rank factors, and everything a refinement retrained) are copied to `device`. Code that
    changes a layer's tensor must give it new storage, never write into the copy."""
    for module in layer.modules():
        for group in (module._parameters, module._buffers):
            for name, t in group.items():
                if t is None:
                    continue
                original, moved_ptr = home.get((module, name), (None, None))
                back = original if original is not None and t.data.data_ptr() == moved_ptr else t.data.to(device)
                if isinstance(t, nn.Parameter):
                    t.data = back
                else:
                    group[name] = back


OVERLAP = True  # on a GPU, overlap layer moves with the forward pass (bench: --serial)


class Serial:
    """Layer moves done in turn (CPU: there is nothing to overlap)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def move(self, layer: nn.Module):
        """Start moving `layer` to the device; returns the function that waits for the move and
        returns what `send_home` needs."""
        with section("layer moves"):
            home = _to_device(layer, self.device)
        return lambda: home

    def send_home(self, layer: nn.Module, home: dict, home_device: torch.device) -> None:
        with section("layer moves"):
            _to_home(layer, home, home_device)


class Overlapped(Serial):
    """On a GPU: the next layer is copied in by one thread while this one runs, and a finished
    layer's trip home runs in another, each on its own CUDA stream.

    Allocator safety: a tensor made on one stream and used on another could be handed out again
    while still in use; so the worker waits for the whole device before it lets go of a layer's
    tensors, and at most one layer's trip home is in flight.
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

    def send_home(self, layer: nn.Module, home: dict, home_device: torch.device) -> None:
        ready = torch.cuda.Event()
        ready.record()  # everything the main stream did with this layer so far

        def job():
            with torch.cuda.stream(self.work_stream):
                self.work_stream.wait_event(ready)
                torch.cuda.synchronize(self.device)
                with section("layer moves"):
                    _to_home(layer, home, home_device)
                torch.cuda.synchronize(self.device)

        while self.pending:  # at most one layer's trip home in flight
            self.pending.pop(0).result()
        self.pending.append(self.workers.submit(job))


def layer_mover(device: torch.device) -> Serial:
    return Overlapped(device) if device.type == "cuda" and OVERLAP else Serial(device)
