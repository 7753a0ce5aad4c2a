r"""Data parallelism across processes (``torchrun``): setup, gradient all-reduce, averaging.

Each process (rank) holds a full copy of the energy, runs its own chains on its own shard of
the data, and after ``backward`` the gradients are averaged over the $R$ ranks before the
optimiser step:

$$
g \leftarrow \frac{1}{R} \sum_r g_r .
$$

With equal per-rank batches this is exactly the gradient of the loss averaged over the global
batch, the same update as one process with an $R$-times larger batch (for losses that are
means over the batch).

The all-reduce is explicit (one flat bucket per dtype) rather than through the
``DistributedDataParallel`` wrapper, because losses and samplers call the energy's other
methods (``energy_and_grad``, ``score``) and call it several times per step, which the
wrapper's forward hooks do not see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistInfo", "setup_distributed", "all_reduce_gradients", "broadcast_module",
           "average_module", "all_reduce_mean"]


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and whether a process group is in use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(mode: str | bool = "auto", device: torch.device | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes through environment variables.

    ``mode``: "auto" (default) joins when ``WORLD_SIZE`` > 1 is set; ``False``/"off" never
    joins; ``True``/"on" requires it. The backend is NCCL for CUDA devices, gloo otherwise.
    An already initialised group is reused.
    """
    if mode in (False, "off", "none"):
        return DistInfo()
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if mode in (True, "on"):
            raise RuntimeError(
                "distributed=True but WORLD_SIZE is not set; launch with "
                "`torchrun --nproc_per_node=N your_script.py`"
            )
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _grouped(tensors: list[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def _all_reduce_mean_(tensors: list[Tensor], world_size: int) -> None:
    for group in _grouped(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


@torch.no_grad()
def all_reduce_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average ``.grad`` over ranks (parameters without a gradient get a zero one first, so
    every rank reduces the same tensors)."""
    if world_size <= 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if grads:
        _all_reduce_mean_(grads, world_size)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0, buffers: bool = True) -> None:
    """Copy ``module``'s parameters (and buffers, unless ``buffers=False``) from rank ``src``
    to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for t in list(module.parameters()) + (list(module.buffers()) if buffers else []):
        dist.broadcast(t.data, src)


@torch.no_grad()
def average_module(module: nn.Module, world_size: int) -> None:
    """Average floating parameters of ``module`` over ranks (keeps learned samplers, which
    train with their own optimisers inside ``update``, identical on every rank)."""
    if world_size <= 1:
        return
    params = [p.data for p in module.parameters() if p.is_floating_point()]
    if params:
        _all_reduce_mean_(params, world_size)


def all_reduce_mean(values: Tensor, world_size: int) -> Tensor:
    """Mean of a tensor over ranks (returns a new tensor)."""
    if world_size <= 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size
