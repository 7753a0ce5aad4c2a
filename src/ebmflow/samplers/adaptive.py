"""``AdaptiveStepSize``: the base of the continuous samplers with one global step size
adapted during warm-up (``MALA``, ``HMC``), and two small helpers of their transitions.

The adaptation itself (Robbins-Monro on the log step size) is in ``_adapt``.
"""

from __future__ import annotations

from torch import Tensor

from ..energy.base import EnergyModel
from ..spaces import Continuous
from ._adapt import (
    check_count,
    check_positive,
    check_probability,
    finish_adaptation,
    initial_extra,
    rm_update,
)
from ._fast import energy_and_grad
from .base import ChainState, MCMCSampler

__all__ = ["AdaptiveStepSize", "event_sum", "chain_mask"]


def event_sum(t: Tensor) -> Tensor:
    """Sum over the event dimensions: ``(B, *event) -> (B,)``."""
    return t.sum(1) if t.dim() == 2 else t.reshape(t.shape[0], -1).sum(1)


def chain_mask(accept: Tensor, like: Tensor) -> Tensor:
    """Per-chain flags ``(B,)`` shaped to broadcast against ``like`` ``(B, *event)``."""
    return accept.reshape((-1,) + (1,) * (like.dim() - 1))


class AdaptiveStepSize(MCMCSampler):
    """An MCMC sampler with one global step size adapted during warm-up (see ``_adapt``).

    Subclasses read ``state.extra["log_step_size"]`` in ``transition`` and call
    ``self._adapt(extra, prob)`` with the per-chain acceptance probabilities.
    """

    def __init__(self, step_size: float, n_steps: int, target_accept: float, n_warmup: int,
                 adapt_rate: float, **kw):
        super().__init__(n_steps, **kw)
        self.step_size = step_size
        self.target_accept = check_probability("target_accept", target_accept)
        self.n_warmup = check_count("n_warmup", n_warmup)
        self.adapt_rate = check_positive("adapt_rate", adapt_rate)
        self._adapted = 0

    # a run that adapts reads the step size from the chain state; a run that does not reads
    # this Python value, so a recorded CUDA graph depends on it
    _graph_baked = ("_step_size",)

    # the step size lives in the chain state during a run (so recorded graphs do not bake it
    # in); this Python value is where a run starts and where adaptation stores its result
    @property
    def step_size(self) -> float:
        return self._step_size

    @step_size.setter
    def step_size(self, value: float) -> None:
        self._step_size = check_positive("step_size", value)

    @property
    def adapting(self) -> bool:
        """True while warm-up adaptation steps remain."""
        return self._adapted < self.n_warmup

    def reset_adaptation(self, step_size: float | None = None) -> None:
        """Start warm-up adaptation again (optionally from a new step size)."""
        self._adapted = 0
        if step_size is not None:
            self.step_size = step_size

    def supports(self, energy: EnergyModel) -> bool:
        return isinstance(energy.space, Continuous)

    def init_state(self, energy: EnergyModel, x: Tensor) -> ChainState:
        e, g = energy_and_grad(energy, x)
        return ChainState(x, e, g, initial_extra(self._step_size, self._adapted, self.n_warmup, x))

    def _adapt(self, extra: dict[str, Tensor], prob: Tensor) -> dict[str, Tensor]:
        return rm_update(extra, prob, self.target_accept, self.n_warmup, self.adapt_rate)

    def end_run(self, energy: EnergyModel, state: ChainState) -> None:
        done = finish_adaptation(state.extra)
        if done is not None:
            self._step_size, self._adapted = done
        self.stats["step_size"] = state.extra["log_step_size"].exp()

    def get_extra_state(self) -> dict[str, float]:
        """Saved in ``state_dict``: the (adapted) step size and the adaptation progress."""
        return {"step_size": self._step_size, "adapted": self._adapted}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.step_size = state["step_size"]
        self._adapted = int(state["adapted"])

    def extra_repr(self) -> str:
        return (f"step_size={self._step_size:.4g}, n_steps={self.n_steps}, "
                f"target_accept={self.target_accept}, n_warmup={self.n_warmup}")
