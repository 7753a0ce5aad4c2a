"""Schedules kappa(t) of the mixture path: how much of the data is revealed at time t.

A schedule is a monotone map kappa: [0, 1] -> [0, 1] with kappa(0) = 0 and kappa(1) = 1. The
mixture path keeps each coordinate at the data value x1 with probability kappa(t) and at the
source value x0 otherwise; its generating velocity scales with

    rate(t) = kappa'(t) / (1 - kappa(t)),

which blows up at t = 1 (every remaining source token must jump before the end).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Schedule", "LinearSchedule", "PolynomialSchedule"]


class Schedule:
    """Base class: implement ``kappa(t)`` and ``d_kappa(t)`` (elementwise on a float tensor)."""

    def kappa(self, t: Tensor) -> Tensor:
        """kappa(t), same shape as ``t``."""
        raise NotImplementedError

    def d_kappa(self, t: Tensor) -> Tensor:
        """kappa'(t) = d kappa / dt, same shape as ``t``."""
        raise NotImplementedError

    def rate(self, t: Tensor, eps: float = 1e-6) -> Tensor:
        """kappa'(t) / (1 - kappa(t)), with 1 - kappa clamped to >= ``eps`` (finite at t = 1)."""
        return self.d_kappa(t) / (1.0 - self.kappa(t)).clamp_min(eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(Schedule):
    """kappa(t) = t, kappa'(t) = 1, so rate(t) = 1 / (1 - t)."""

    def kappa(self, t: Tensor) -> Tensor:
        return t

    def d_kappa(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class PolynomialSchedule(Schedule):
    """kappa(t) = t^n, kappa'(t) = n t^(n-1) (n >= 1; n = 1 is ``LinearSchedule``).

    n > 1 reveals data late (few jumps early). n < 1 is refused: kappa'(0) would be infinite,
    so the velocity kappa'/(1 - kappa) and the first Euler step from t = 0 would be undefined.
    """

    def __init__(self, exponent: float = 2.0):
        if not (float(exponent) >= 1 and float(exponent) < float("inf")):
            raise ValueError(
                f"exponent must be a finite number >= 1, got {exponent!r}: for n < 1 the rate "
                "kappa'(t) = n t^(n-1) is infinite at t = 0"
            )
        self.exponent = float(exponent)

    def kappa(self, t: Tensor) -> Tensor:
        return t.pow(self.exponent)

    def d_kappa(self, t: Tensor) -> Tensor:
        n = self.exponent
        if n == 1.0:
            return torch.ones_like(t)
        return n * t.pow(n - 1.0)

    def __repr__(self) -> str:
        return f"PolynomialSchedule(exponent={self.exponent:g})"
