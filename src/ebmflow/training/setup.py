"""What the Trainer builds before its first step: the device, the optimiser, the schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._optim import default_adam
from ..energy.base import EnergyModel
from .distributed import DistInfo

__all__ = ["resolve_device", "build_optimizer", "build_scheduler"]


def resolve_device(energy: EnergyModel, device: Any, dist: DistInfo) -> torch.device:
    """``device`` (default: the energy's own), with the local GPU of this rank under data
    parallelism; makes a CUDA device current."""
    if device is None:
        ref = energy.reference_tensor()
        dev = ref.device if ref is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is available; use device='cpu'")
        if dist.enabled:
            dev = torch.device("cuda", dist.local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def build_optimizer(optimizer: Any, params: list[nn.Parameter], lr: float, fast: bool,
                    device: torch.device) -> torch.optim.Optimizer:
    """A user optimiser (checked to update the energy), a factory ``params -> Optimizer``, or
    the default: fused Adam, or capturable Adam with a tensor learning rate in fast mode."""
    if isinstance(optimizer, torch.optim.Optimizer):
        mine = {id(p) for p in params}
        theirs = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not mine & theirs:
            raise ValueError(
                "optimizer does not update any parameter of the energy; build it from "
                "energy.parameters()"
            )
        return optimizer
    if callable(optimizer):
        return optimizer(params)
    if optimizer is not None:
        raise ValueError(
            f"optimizer must be a torch Optimizer, a function params -> Optimizer, or None; "
            f"got {type(optimizer).__name__}"
        )
    if fast:
        # capturable Adam keeps its step counters on the GPU so the step can be graph-captured
        return torch.optim.Adam(params, lr=torch.tensor(lr, device=device), capturable=True)
    return default_adam(params, lr)


def build_scheduler(spec: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """None, "constant", "cosine" (to ``total_steps``), an ``LRScheduler`` or a factory
    ``optimizer -> LRScheduler``."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
        if spec == "constant":
            return None
        raise ValueError(
            f"unknown scheduler {spec!r}; use 'cosine', 'constant', an LRScheduler or a function")
    if isinstance(spec, torch.optim.lr_scheduler.LRScheduler):
        return spec
    if callable(spec):
        return spec(optimizer)
    raise ValueError(
        f"scheduler must be None, a name, an LRScheduler or a function, got {spec!r}")
