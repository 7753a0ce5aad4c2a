"""Velocity models u_theta(t, x_t): networks mapping a token state and a time to ``(B, D, S)``.

A ``VelocityModel`` takes tokens x_t, long ``(B, D)`` with values in 0..S (S = MASK), and times
t, float ``(B,)``, and returns ``(B, D, S)``: the generating velocity u_theta(j | x_t) over the
S data tokens (trained by ``velocity_regression_loss``), or posterior logits of x1 (trained by
``posterior_loss``; the velocity is then formed by ``MixturePath.posterior_to_velocity``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from ..energy.networks import make_activation
from .schedules import Schedule

__all__ = ["VelocityModel", "MLPVelocity", "time_features"]


def time_features(t: Tensor, num_frequencies: int) -> Tensor:
    """Sinusoidal features of t in [0, 1]: [sin(pi 2^k t), cos(pi 2^k t)] for k < n, plus t.

    Shapes: ``(B,)`` -> ``(B, 2 n + 1)``.
    """
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, device=t.device, dtype=t.dtype)
    angles = t[:, None] * freqs[None, :]
    return torch.cat([t[:, None], angles.sin(), angles.cos()], dim=-1)


class VelocityModel(nn.Module):
    """Base class: ``forward(x_t, t) -> (B, D, S)``.

    Attributes:
        dim: D, number of coordinates.
        num_classes: S, number of data tokens (inputs may also hold MASK = S).
    """

    dim: int
    num_classes: int

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.dim = dim
        self.num_classes = num_classes

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x_t, t)")


class MLPVelocity(VelocityModel):
    """MLP on embedded tokens and time features.

    h = MLP([embed(x_t^1), ..., embed(x_t^D), time_features(t)]) reshaped to ``(B, D, S)``;
    the last layer starts at zero (u = 0: nothing moves until trained).

    Args:
        dim: D. num_classes: S (token S is MASK; the embedding has S + 1 rows).
        hidden: hidden widths (default three of 256; the report uses 3 x 1024).
        embed_dim: per-token embedding width (default 8).
        time_frequencies: number of sinusoidal frequencies of t (default 4).
        activation: default "silu".
        schedule: if given, the output is the velocity u = kappa'(t)/(1 - kappa(t)) * h, so the
            network learns a bounded h (for the exact velocity h = p(x1 = j | x_t) - delta(j = x_t))
            although u grows like 1/(1 - t) near t = 1. Leave None for posterior logits or a
            raw velocity.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int = 2,
        hidden: Sequence[int] = (256, 256, 256),
        embed_dim: int = 8,
        time_frequencies: int = 4,
        activation: str = "silu",
        schedule: Schedule | None = None,
    ):
        super().__init__(dim, num_classes)
        hidden = tuple(int(h) for h in hidden)
        if len(hidden) == 0 or any(h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive widths, got {hidden}")
        self.embed = nn.Embedding(num_classes + 1, embed_dim)
        self.time_frequencies = time_frequencies
        self.schedule = schedule
        width = dim * embed_dim + 2 * time_frequencies + 1
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation)]
            width = h
        head = nn.Linear(width, dim * num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        layers.append(head)
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t long ``(B, D)`` in 0..S, t float ``(B,)`` -> ``(B, D, S)``."""
        emb = rearrange(self.embed(x_t), "b d e -> b (d e)")
        h = self.net(torch.cat([emb, time_features(t.to(emb.dtype), self.time_frequencies)], -1))
        h = rearrange(h, "b (d s) -> b d s", d=self.dim)
        if self.schedule is not None:
            h = h * self.schedule.rate(t)[:, None, None].to(h.dtype)
        return h
