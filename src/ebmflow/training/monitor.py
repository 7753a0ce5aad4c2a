"""Step statistics of the Trainer: running sums and non-finite monitoring on the device.

Each step's stats (0-d tensors: loss, energies, gradient norm, sampler diagnostics) are
stacked into one vector whose layout is fixed by the first step, added to running sums, and
checked for NaN/inf without a host read; the sums are read only when the Trainer logs.
Capturable: no host synchronisation in ``pack(..., exact=True)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["StepStats", "TrainingDiverged", "is_monitored"]


class TrainingDiverged(FloatingPointError):
    """A monitored quantity (loss, energies, gradient norm) became NaN or inf; the message
    names the step and the quantity. The last good checkpoint is kept."""


def is_monitored(key: str) -> bool:
    """Whether a NaN/inf in the stat ``key`` means the training diverged."""
    return key in ("loss", "grad_norm") or "energy" in key or key.endswith("loss")


class StepStats:
    """Running sums of step statistics and the first step at which a monitored one was
    non-finite.

    Attributes:
        layout: the stat names, in vector order (None before the first step).
        sums: ``(len(layout),)`` running sums since the last ``take_means``.
        count: steps summed since then.
        step_t: 0-d long tensor, the step counter (steps packed so far).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.layout: list[str] | None = None
        self.sums: Tensor | None = None
        self.count = 0
        self.first_bad: Tensor | None = None
        self.monitored: Tensor | None = None
        self.clean = True  # no entry of first_bad set since the layout was fixed
        self.step_t = torch.zeros((), dtype=torch.long, device=device)

    def pack(self, stats: dict[str, Tensor], exact: bool = True,
             on_new_layout: object = None) -> Tensor:
        """Stack ``stats`` into one float vector, add it to the sums and record the first
        step at which a monitored entry is non-finite; returns the vector.

        ``exact=False`` (eager CPU steps, where reading a value costs no synchronisation):
        skip the per-entry bookkeeping when the vector's sum is finite (one host read);
        otherwise, or with ``exact=True`` (capturable), do it branch-free.
        ``on_new_layout`` is called before the layout changes (the Trainer checks the old
        one for divergence there).
        """
        keys = list(stats)
        if self.layout != keys:
            if self.layout is not None and callable(on_new_layout):
                on_new_layout()
            self._new_layout(keys)
        vec = torch.stack([stats[k].float() for k in keys])
        self.sums.add_(vec)  # type: ignore[union-attr]
        self.step_t.add_(1)
        if not exact and math.isfinite(float(vec.sum())):
            return vec
        self.clean = False
        bad = ~torch.isfinite(vec) & self.monitored  # type: ignore[operator]
        torch.where((self.first_bad < 0) & bad, self.step_t, self.first_bad,  # type: ignore[operator]
                    out=self.first_bad)
        return vec

    def _new_layout(self, keys: list[str]) -> None:
        self.layout = keys
        self.sums = torch.zeros(len(keys), device=self.device)
        self.count = 0
        self.monitored = torch.tensor([is_monitored(k) for k in keys], device=self.device)
        self.first_bad = torch.full((len(keys),), -1, dtype=torch.long, device=self.device)
        self.clean = True

    def first_divergence(self, reduce_min: object = None) -> tuple[str, int] | None:
        """``(stat name, step)`` of the earliest non-finite monitored stat, or None (one host
        read; ``reduce_min`` takes the minimum over processes under data parallelism)."""
        if self.first_bad is None or (self.clean and reduce_min is None):
            return None
        first_bad = self.first_bad
        if callable(reduce_min):
            never = torch.iinfo(torch.long).max
            first_bad = torch.where(first_bad < 0, never, first_bad)
            first_bad = reduce_min(first_bad)
            first_bad = torch.where(first_bad == never, -1, first_bad)
        bad = first_bad.cpu()
        if not bool((bad >= 0).any()):
            return None
        steps = torch.where(bad >= 0, bad, torch.iinfo(torch.long).max)
        i = int(steps.argmin())
        return self.layout[i], int(bad[i])  # type: ignore[index]

    def take_means(self) -> Tensor:
        """Means since the last call (the sums are reset)."""
        means = self.sums / max(self.count, 1)  # type: ignore[operator]
        self.sums.zero_()  # type: ignore[union-attr]
        self.count = 0
        return means
