"""Warnings that point at the user's line, however deep inside ebmflow they are raised."""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["user_stacklevel"]

_INSIDE = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the caller of this function: the first
    frame outside ebmflow and torch (decorators such as ``torch.no_grad`` add frames, so a
    fixed number would point into the library on some call paths)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level
