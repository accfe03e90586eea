"""Data parallelism under torchrun: each process streams its part of every calibration batch
through the same layer loop, and

- a layer's statistics (Grams, the cross terms of the anchored closed form) are summed over the
  processes, an all-reduce in float64, before anything reads them;
- a group's matrices are factorized round-robin, each by one process, and the factors broadcast
  from it, so every process installs the same;
- block refinement averages the gradients of every step over the processes (what
  DistributedDataParallel does, done on the flat list of the block's trainable tensors: a wrapper
  per block would buy nothing, and it cannot take a mixture-of-experts block whose unrouted experts
  get no gradient).

Because a process takes the same share of every batch, a step sees the windows one process would
see in that step: the loop computes what it computes with one process, to float rounding (sums
taken in another order, per-batch products over fewer windows).
torchrun launches the processes and describes them in the environment (RANK, WORLD_SIZE,
LOCAL_RANK, the rendezvous); torch.distributed does the communication: NCCL between GPUs, gloo on
CPUs. Without torchrun, or with one process, nothing here does anything.
"""
import os

import torch

from .covariances import LayerStats


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (it sets TORCHELASTIC_RUN_ID; a RANK or WORLD_SIZE
    left in the environment by something else does not count)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def env_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun): rank 0 alone writes outputs."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def join(device: torch.device) -> torch.device:
    """Join the process group torchrun set up when it started more than one process, and return
    the device this process computes on: on CUDA, the GPU of its LOCAL_RANK (one GPU a process);
    else `device` unchanged."""
    if env_world_size() == 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """(this process's windows, its batch size): its equal part of every batch of `batch_size`
    windows, in order, so that its k-th batch is its part of the k-th batch one process would run.
    Both counts must be multiples of the process count (stages.common checks it before launching)."""
    world = env_world_size()
    if world == 1:
        return windows, batch_size
    if len(windows) % world or batch_size % world:
        raise ValueError(f"distributed: {len(windows)} windows in batches of {batch_size} for {world} processes; "
                         f"expected both multiples of the process count")
    rank = env_rank()
    parts = [batch[rank * len(batch) // world:(rank + 1) * len(batch) // world] for batch in windows.split(batch_size)]
    return torch.cat(parts), batch_size // world


def owner(position: int) -> int:
    """The process that factorizes a layer's `position`-th matrix (round-robin)."""
    return position % env_world_size()


def broadcast_factors(low, source: int, meta, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(A, B, meta) of one low-rank linear, from the process `source` that computed them (`low`, its
    LowRankLinear, and `meta`, what the report records of it) to every process (`low` None there)."""
    import torch.distributed as dist

    box = [(tuple(low.A.shape), tuple(low.B.shape), low.A.dtype, meta) if low is not None else None]
    dist.broadcast_object_list(box, src=source)
    a_shape, b_shape, dtype, meta = box[0]
    # on `device` everywhere: the owner's factors lie where the layer does (the CPU, when the
    # statistics come from disk and the model was loaded whole), and NCCL sends GPU tensors only
    a = low.A.detach().to(device).contiguous() if low is not None else torch.empty(a_shape, dtype=dtype, device=device)
    b = low.B.detach().to(device).contiguous() if low is not None else torch.empty(b_shape, dtype=dtype, device=device)
    dist.broadcast(a, src=source)
    dist.broadcast(b, src=source)
    return a, b, meta


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The float64 sum of `tensor` over the processes (itself with one process), where it was."""
    if env_world_size() == 1:
        return tensor
    import torch.distributed as dist

    total = tensor.double().clone()
    if dist.get_backend() == "nccl" and not total.is_cuda:  # NCCL reduces GPU tensors only
        total = total.cuda()
    dist.all_reduce(total)
    return total.to(tensor.device)


def union(entries: dict) -> dict:
    """Every process's `entries` in one dict (what each process recorded of the matrices it
    factorized)."""
    if env_world_size() == 1:
        return entries
    import torch.distributed as dist

    gathered = [None] * env_world_size()
    dist.all_gather_object(gathered, entries)
    return {key: value for part in gathered for key, value in part.items()}


def all_reduce_mean(value: float, device: torch.device) -> float:
    """The mean over the processes of a number each holds (a loss on its part of a batch)."""
    if env_world_size() == 1:
        return value
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=device))) / env_world_size()


def average_gradients(params: list[torch.Tensor]) -> None:
    """Replace every gradient by its mean over the processes, in one all-reduce of the flattened
    gradients and one flag a tensor: a tensor that got no gradient in one process counts as zeros
    there, and one that got none in any keeps None (AdamW then leaves it alone, as it would with
    one process)."""
    if env_world_size() == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
    dist.all_reduce(flat)
    flat[:-len(params)] /= env_world_size()
    pieces = flat[:-len(params)].split([g.numel() for g in grads])
    for p, piece, flag in zip(params, pieces, flat[-len(params):].tolist()):
        p.grad = piece.view_as(p).clone() if flag else None


def broadcast_tensors(tensors: list[torch.Tensor], source: int = 0) -> None:
    """`source`'s values of `tensors` in every process (as DistributedDataParallel starts: the
    processes agree whatever happened before)."""
    if env_world_size() == 1:
        return
    import torch.distributed as dist

    for tensor in tensors:
        dist.broadcast(tensor.data, src=source)


def all_reduce_stats(stats: LayerStats) -> LayerStats:
    """One layer's statistics over every process's windows: Grams and token counts summed, the
    per-channel mean |x| weighted by each process's tokens. The sums run in float64 in a fixed
    order of keys, so every process gets the same result."""
    if env_world_size() == 1:
        return stats
    import torch.distributed as dist

    tokens = torch.tensor([float(stats.tokens)], dtype=torch.float64, device=_device(stats))
    dist.all_reduce(tokens)
    total = int(tokens.item())
    grams, abs_means = {}, {}
    for group in sorted(stats.grams):
        gram = stats.grams[group].double()
        dist.all_reduce(gram)
        grams[group] = gram
    for group in sorted(stats.abs_means):
        weighted = stats.abs_means[group].double() * stats.tokens
        dist.all_reduce(weighted)
        abs_means[group] = weighted / total
    return LayerStats(grams, abs_means, stats.shares, total, stats.source)


def _device(stats: LayerStats) -> torch.device:
    return next(iter(stats.grams.values())).device if stats.grams else torch.device("cpu")
