"""Whether a CUDA graph is being recorded: while it is, no tensor value may be read on the host.

Every value check of the library that reads a tensor on the host (NaN checks of inputs,
validity of discrete states) asks ``capturing(x)`` first and skips the read while a graph is
recorded (the check then happens on eager steps, or on the first run). The function is looked
up on this module at each call, so the CPU stand-in of graph capture in the test suite can
answer for CPU tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["capturing"]


def capturing(x: Tensor) -> bool:
    """True while the current CUDA stream records a graph and ``x`` is a CUDA tensor."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()
