"""Block refinement (AA-SVD, Algorithm 2): once a decoder layer's linears are truncated, train its
low-rank factors and norm weights so that the compressed block, fed the shifted inputs X~ (what
the compressed prefix hands it), reproduces the dense block's outputs on the dense inputs X.

AdamW, linear warm-up then cosine decay, gradient clipping. With a held-out share above 0 (the
default is 0: every window trains, every step runs), that share of the calibration windows is
scored before training and after every epoch, the best state is kept and training stops once an
epoch fails to improve it. Everything runs in float32 whatever the model's dtype,
batches are drawn by a seeded generator, so two runs on a CPU are bit-identical. Under torchrun
each process holds its part of every batch: the gradients and the losses are averaged over the
processes (svdcore.distributed), so a step is the step one process would take on the whole batch.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import UserError
from .modeling_svdcore import LowRankLinear
from .streaming import output_of

WEIGHT_DECAY = 0.01
WARMUP = 0.1  # share of the steps over which the learning rate rises linearly
FINAL_LR = 0.1  # the cosine ends at this share of the learning rate
CLIP = 1.0  # gradient norm
PATIENCE = 1  # epochs without a better held-out loss before training stops


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and the RMSNorm classes of every family (LlamaRMSNorm, Qwen2RMSNorm, ...)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def trainable(layer: nn.Module) -> dict[str, nn.Parameter]:
    """What refinement trains, by name inside the layer: both factors of every low-rank linear
    (expand.weight = A, reduce.weight = B) and the weight of every norm. Everything else (dense
    linears, biases) stays as it is."""
    params = {}
    for name, module in layer.named_modules():
        if isinstance(module, LowRankLinear):
            params[f"{name}.expand.weight"], params[f"{name}.reduce.weight"] = module.A, module.B
        elif is_norm(module) and isinstance(getattr(module, "weight", None), nn.Parameter):
            params[f"{name}.weight"] = module.weight
    return params


def heldout_batches(batches: int, holdout: float) -> int:
    """How many of the calibration batches (the last ones) refinement holds out: ceil(holdout x
    batches), leaving at least one to train on. The layer loop keeps them out of the statistics on
    the shifted inputs too (anchor, update), so that the held-out loss judges that closed form and
    the steps alike."""
    return min(batches - 1, math.ceil(holdout * batches)) if holdout > 0 else 0


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first WARMUP of the steps, then cosine decay to FINAL_LR x peak."""
    warm = max(1, round(WARMUP * steps))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


def _float32(value):
    """The layer's keyword arguments (attention mask, position embeddings) in float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def refine_block(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs_per_batch: list[dict],
                 steps: int, lr: float, holdout: float, index: int, device: torch.device, seed: int = 0) -> dict:
    """Train `trainable(layer)` in place for at most `steps` optimizer steps, one calibration batch
    a step: loss MSE(layer(inputs[b]), targets[b]). The last ceil(holdout x batches) batches are
    held out (the windows are drawn at random, so they are as good a sample as any) and never
    trained on. Returns the held-out loss before and after, the steps and epochs run."""
    batches = len(inputs)
    held = heldout_batches(batches, holdout)
    train, watch = list(range(batches - held)), list(range(batches - held, batches))
    params = trainable(layer)
    dtype = next(iter(params.values())).dtype
    flags = {p: p.requires_grad for p in layer.parameters()}
    layer.float()
    for p in params.values():  # new storage: the layer's trip home (streaming) then copies the trained values
        p.data = p.data.to(torch.float32, copy=True)
    kwargs = [_float32(kw) for kw in kwargs_per_batch]

    def loss_of(b):
        out = output_of(layer(inputs[b].to(device).float(), **kwargs[b]))
        return F.mse_loss(out, targets[b].to(device).float())

    def heldout():
        with torch.no_grad():
            return distributed.all_reduce_mean(sum(float(loss_of(b)) for b in watch) / len(watch), device)

    try:
        for p in layer.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=WEIGHT_DECAY)
        generator = torch.Generator().manual_seed(seed + index)
        before = best = heldout() if watch else None
        best_state, best_epoch = {n: p.detach().clone() for n, p in params.items()}, 0
        step = epoch = stale = 0
        first = last = None
        while step < steps and train:
            for b in torch.randperm(len(train), generator=generator).tolist():
                if step == steps:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, steps, lr)
                with torch.enable_grad():
                    loss = loss_of(train[b])
                    value = distributed.all_reduce_mean(loss.detach().item(), device)  # every process stops together
                    if not math.isfinite(value):
                        raise UserError(f"layer {index}: the block refinement loss became {value} at step {step + 1}; "
                                        f"lower compress.refine.lr or turn refinement off (compress.refine.steps 0)")
                    loss.backward()
                distributed.average_gradients(list(params.values()))
                torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                first = value if first is None else first
                last, step = value, step + 1
            epoch += 1
            if watch:
                now = heldout()
                if now < best:
                    best, best_epoch, stale = now, epoch, 0
                    best_state = {n: p.detach().clone() for n, p in params.items()}
                else:
                    stale += 1
                    if stale >= PATIENCE:
                        break
        if watch:
            for name, p in params.items():
                p.data.copy_(best_state[name])
        distributed.broadcast_tensors(list(params.values()))  # under torchrun: every process keeps rank 0's
        if not all(torch.isfinite(p).all() for p in params.values()):
            raise UserError(f"layer {index}: the block refinement produced non-finite factors; lower compress.refine.lr")
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        layer.to(dtype)
    return {"steps": step, "epochs": epoch, "best_epoch": best_epoch, "heldout_batches": len(watch),
            "heldout_before": before, "heldout_after": best, "train_first": first, "train_last": last}
