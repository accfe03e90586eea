"""Data parallelism under torchrun: each process streams its share of the calibration windows
through the same layer loop, and a layer's statistics are summed over the processes (an
all-reduce in float64) before anything reads them. torchrun launches the processes and describes
them in the environment (RANK, WORLD_SIZE, LOCAL_RANK, the rendezvous); torch.distributed does the
communication: NCCL between GPUs, gloo on CPUs. Without torchrun, or with one process, nothing here
does anything.
"""
import os

import torch

from .covariances import LayerStats
from .errors import UserError


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


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of the calibration windows (sizes differ by one at most)."""
    world = env_world_size()
    if world == 1:
        return windows
    if len(windows) < world:
        raise UserError(f"distributed: {len(windows)} calibration windows for {world} processes; "
                        f"expected at least one window a process (calibration.samples >= the process count)")
    return torch.tensor_split(windows, world)[env_rank()]


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
