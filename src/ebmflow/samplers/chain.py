"""Chain state and the bookkeeping every chain executor shares.

``ChainState`` is what a transition maps to a new one; ``_Carry`` is what the chain loop carries
between steps (state, running sums of the step info, the first non-finite step per chain, the
count of undone moves, the step counter). The helpers fold per-step values into these without
host synchronisation, and raise the errors that name bad chains after a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["ChainState", "NonFiniteError", "StepInfo"]

StepInfo = dict[str, Tensor]
_NEVER = 2**62  # "no non-finite step yet" in the per-chain first-bad-step record


class NonFiniteError(FloatingPointError):
    """A chain produced NaN or inf; the message names the step and the chains."""


@dataclass
class ChainState:
    """State of a batch of chains.

    Attributes:
        x: states ``(B, *event)``.
        energy: cached E(x) ``(B,)`` or None.
        grad: cached dE/dx (same shape as x, or one-hot shape for categorical) or None.
        extra: sampler-specific tensors (e.g. step sizes: 0-d for a global value, ``(B,)`` per
            chain).
    """

    x: Tensor
    energy: Tensor | None = None
    grad: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def replace(self, **changes: Any) -> ChainState:
        """A copy with the given fields replaced (tensors are not cloned)."""
        return replace(self, **changes)


def _reduce_info(acc: dict[str, Tensor], info: StepInfo) -> None:
    for k, v in info.items():
        v = v.detach().float()
        acc[k] = acc[k] + v if k in acc else v


def _accumulate(acc: dict[str, Tensor], info: StepInfo) -> None:
    """``acc[k] += info[k]`` in place (float32 running sums; the first value is copied)."""
    for k, v in info.items():
        a = acc.get(k)
        if a is None:
            acc[k] = v.detach().to(torch.float32, copy=True)
        elif a.shape == v.shape or v.dim() == 0:
            a.add_(v)
        else:  # a 0-d sum meeting per-chain values: broadcast out of place
            acc[k] = a + v.detach().float()


def _fold_bad(first_bad: Tensor | None, rows: Tensor, start: int) -> Tensor | None:
    """Record in ``first_bad`` ``(B,)`` the first step (``start + j``) at which ``rows[j]``
    (``rows`` is ``(steps, B)``) is non-finite, for chains without an earlier record.

    ``first_bad`` None means "no record yet" and is returned as None while everything is
    finite on CPU (one host read of a sum per block, which costs nothing there); otherwise a
    few branch-free ops, no host synchronisation.
    """
    if first_bad is None:
        if rows.device.type == "cpu" and math.isfinite(float(rows.sum())):
            return None  # all finite (an overflow to inf only costs the exact pass below)
        first_bad = torch.full(rows.shape[1:], _NEVER, dtype=torch.long, device=rows.device)
    steps = torch.arange(start, start + rows.shape[0], device=rows.device)[:, None]
    first = torch.where(torch.isfinite(rows), _NEVER, steps).amin(0)
    return torch.minimum(first_bad, first)


class _NoBar:
    """Stands in for a disabled tqdm bar (no per-step call overhead)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


_NO_BAR = _NoBar()


@dataclass
class _Carry:
    """Everything the chain loop carries from one step to the next (all tensors)."""

    state: ChainState
    acc: dict[str, Tensor]  # running sums of step info
    first_bad: Tensor  # (B,) long: first step where a chain went non-finite, _NEVER if never
    n_reset: Tensor  # 0-d: undone non-finite moves
    t: Tensor | int  # steps done in this run (0-d long tensor inside CUDA graphs)


def _row_sums(state: ChainState) -> Tensor:
    """Per chain, sum of x, the cached energy and the cached gradient ``(B,)``: finite iff all
    of them are finite (a NaN/inf anywhere makes the sum non-finite). Few ops per step."""
    x = state.x
    batch = x.shape[0]
    rows = _flat_sum(x) if x.is_floating_point() else None
    if state.energy is not None:
        rows = state.energy if rows is None else rows + state.energy
    if state.grad is not None:
        g = _flat_sum(state.grad)
        rows = g if rows is None else rows + g
    if rows is None:
        rows = torch.zeros(batch, device=x.device)
    return rows


def _energy_grad_rows(state: ChainState) -> Tensor:
    """Per chain, cached energy plus the sum of the cached gradient ``(B,)`` (for discrete
    samplers, whose states are always valid values)."""
    assert state.energy is not None
    if state.grad is None:
        return state.energy
    return _flat_sum(state.grad).add_(state.energy)


def _flat_sum(t: Tensor) -> Tensor:
    """Sum over all but the batch dimension ``(B,)``."""
    return t.sum(1) if t.dim() == 2 else t.reshape(t.shape[0], -1).sum(1)


def _where_state(bad: Tensor, old: ChainState, new: ChainState) -> ChainState:
    """Per chain, keep ``old`` where ``bad`` is True, else take ``new``.

    Entries without a leading batch dimension (0-d step sizes) are taken from ``new``.
    """
    batch = bad.shape[0]

    def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        if a is None or b is None or b.dim() == 0 or b.shape[0] != batch or a.shape != b.shape:
            return b
        mask = bad.reshape((-1,) + (1,) * (b.dim() - 1))
        return torch.where(mask, a, b)

    extra = {k: pick(old.extra.get(k), v) for k, v in new.extra.items()}
    return ChainState(pick(old.x, new.x), pick(old.energy, new.energy), pick(old.grad, new.grad), extra)  # type: ignore[arg-type]


def _check_finite_start(x0: Tensor, chains: Tensor | None) -> None:
    """ValueError naming ``x0`` when initial states (of ``chains``, or all) hold NaN/inf."""
    rows = x0 if chains is None else x0[chains]
    bad = ~torch.isfinite(rows.reshape(rows.shape[0], -1)).all(1)
    if not bool(bad.any()):
        return
    idx = torch.nonzero(bad).flatten()
    if chains is not None:
        idx = chains[idx]
    shown = idx[:8].tolist()
    raise ValueError(
        f"x0 holds NaN/inf values in {idx.numel()} chain(s) ({shown}"
        f"{'...' if idx.numel() > 8 else ''}): initial states must be finite; check how x0 "
        "was made (e.g. data with missing values), or start from the space's noise "
        "(sampler.sample(energy, n))"
    )


def _raise_if_bad(first_bad: Tensor, name: str, x0: Tensor | None = None) -> None:
    bad = first_bad < _NEVER
    if not bool(bad.any()):
        return
    bad_chains = torch.nonzero(bad).flatten()
    step = int(first_bad[bad_chains].min())
    if step == 0 and x0 is not None and x0.is_floating_point():
        _check_finite_start(x0, bad_chains)  # bad input, not a sampler failure
    shown = bad_chains[:8].tolist()
    raise NonFiniteError(
        f"{name}: {bad_chains.numel()} chain(s) became NaN/inf, first at step {step} "
        f"(chains {shown}{'...' if bad_chains.numel() > 8 else ''}). Lower the step size, "
        f"check the energy for NaN/inf, or pass on_nonfinite='reset' to undo such moves"
    )
