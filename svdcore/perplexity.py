"""Perplexity over consecutive windows (the GPTQ / SVD-LLM protocol): the whole model on the
device, or streamed through it one decoder layer at a time, for models bigger than the device."""
import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .model import decoder_layers
from .progress import progress as tqdm
from .streaming import capture_layer_inputs, layer_mover, output_of, park, run_layer


class _Precomputed(nn.Module):
    """Stands in for a decoder layer during the streamed pass's last forward: the first returns the
    last layer's output for the current batch, the others hand their input on unchanged, and each
    in the form the real layer returned (a tensor, or a tuple whose first item is the states)."""

    def __init__(self, outputs: list[torch.Tensor] | None, as_tuple: bool):
        super().__init__()
        self.outputs, self.as_tuple, self.batch = outputs, as_tuple, 0

    def forward(self, hidden_states, *args, **kwargs):
        if self.outputs is not None:
            hidden_states = self.outputs[self.batch].to(hidden_states.device)
            self.batch += 1
        return (hidden_states,) if self.as_tuple else hidden_states


@torch.no_grad()
def streamed_logits(model, windows: torch.Tensor, batch_size: int, device: torch.device, offload: bool = False,
                    by_layer=None):
    """The logits of every batch of `windows`, with the decoder layers moved through `device` one
    at a time (every batch through layer i, then layer i + 1: svdcore.streaming), the way the
    compression loop runs: device memory holds one layer, the activations of all the windows (or,
    with `offload`, of one batch) and the tensors outside the layers. `by_layer`
    (svdcore.checkpoint.ByLayer): the layers are read from the checkpoint as they are reached, and
    dropped after. Yields (batch, logits)."""
    layers = decoder_layers(model)
    home = next(layers[0].parameters()).device
    hidden, kwargs = capture_layer_inputs(model, windows, batch_size, device, offload)
    as_tuple = False
    with by_layer or layer_mover(device) as mover:
        arriving = mover.move(layers[0])
        for index, layer in enumerate(tqdm(layers, desc="layers", unit="layer")):
            placed = arriving()
            if index + 1 < len(layers):
                arriving = mover.move(layers[index + 1])
            first = layer(hidden[0].to(device), **kwargs[0])
            as_tuple = isinstance(first, (tuple, list))
            hidden = [park(output_of(first), offload), *run_layer(layer, hidden[1:], kwargs[1:], device, offload)]
            mover.send_home(layer, placed, home)
    # the model's own forward for what follows the layers (final norm, head, any projection),
    # with stand-ins that return what the real layers computed
    originals = list(layers)
    for index in range(len(layers)):
        layers[index] = _Precomputed(hidden if index == 0 else None, as_tuple)
    try:
        for batch in windows.split(batch_size):
            yield batch, model(batch.to(device), use_cache=False).logits
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int, device: torch.device, desc: str = "perplexity",
               stream_layers: bool = False, by_layer=None) -> dict:
    """exp(mean token NLL) over all windows; stops on non-finite logits naming the window. With
    `stream_layers` the decoder layers stay where they are and pass through `device` one at a time
    (streamed_logits; the embeddings, final norm and head move to it): the same number, for models
    bigger than the device; `by_layer`: see streamed_logits."""
    if by_layer is not None and not stream_layers:
        raise ValueError("perplexity: a model read by layer has its layers on the meta device; stream them")
    if stream_layers:  # closed below whatever happens, which puts the real layers back
        logits_of = streamed_logits(model, windows, batch_size, device, by_layer=by_layer)
    else:
        model.to(device)
        logits_of = ((batch, model(batch.to(device), use_cache=False).logits) for batch in windows.split(batch_size))
    nll_sum, tokens = 0.0, 0
    start = time.perf_counter()
    with tqdm(total=len(windows), desc=desc, unit="window") as bar, contextlib.closing(logits_of):
        for first, (batch, logits) in zip(range(0, len(windows), batch_size), logits_of):
            batch, logits = batch.to(device), logits.float()
            if not torch.isfinite(logits).all():
                bad = first + int((~torch.isfinite(logits)).flatten(1).any(1).nonzero()[0])
                raise UserError(f"{desc}: non-finite logits in window {bad}; the model is numerically broken")
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            nll_sum += nll.item()
            tokens += batch[:, 1:].numel()
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    mean = nll_sum / tokens
    return {"ppl": float(torch.tensor(mean).exp()), "nll": mean, "windows": len(windows),
            "tokens": tokens, "seconds": seconds, "tokens_per_s": windows.numel() / seconds}
