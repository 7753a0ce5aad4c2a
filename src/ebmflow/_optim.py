"""The library's default optimiser (one place, so every component builds it the same way)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["default_adam"]


def default_adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam(lr) with PyTorch's fused kernel when every parameter is a CPU or CUDA float tensor.

    The fused kernel is the same update as the default implementation up to float rounding
    (one kernel per parameter tensor instead of about ten ops each). Parameters on other
    devices or of other dtypes get the default implementation.
    """
    params = list(params)
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.Adam(params, lr=lr, fused=fused or None)
