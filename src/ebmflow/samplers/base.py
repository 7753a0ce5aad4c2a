"""Sampler bases: ``Sampler`` (anything that draws states) and ``MCMCSampler`` (a Markov kernel).

Energies are arguments, not members: ``sampler.sample(energy, n)`` works with any
``EnergyModel`` of a matching space, including EMA copies and tilted energies.

Subclassing ``MCMCSampler`` takes one method::

    class RandomWalkMH(MCMCSampler):
        def __init__(self, step_size=0.5, **kw):
            super().__init__(**kw)
            self.step_size = step_size

        def step(self, energy, x, generator=None):
            prop = x + self.step_size * torch.randn(x.shape, generator=generator, device=x.device)
            log_alpha = energy(x) - energy(prop)           # f(x') - f(x), f = -E
            u = torch.rand(x.shape[0], generator=generator, device=x.device)
            accept = u.log() < log_alpha
            x = torch.where(accept[:, None], prop, x)
            return x, {"accept_rate": accept.float()}      # per-chain info is averaged by run()

``run`` then gives the loop, the averaged diagnostics (``sampler.stats``), non-finite
detection and a progress bar. Samplers that cache the energy and gradient of the current
state between steps (MALA, HMC) override ``init_state`` and ``transition`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..energy.base import EnergyModel

__all__ = ["Sampler", "MCMCSampler", "ChainState", "NonFiniteError", "StepInfo"]

StepInfo = dict[str, Tensor]


class NonFiniteError(FloatingPointError):
    """A chain produced NaN or inf; the message names the step and the chains."""


@dataclass
class ChainState:
    """State of a batch of chains.

    Attributes:
        x: states ``(B, *event)``.
        energy: cached E(x) ``(B,)`` or None.
        grad: cached dE/dx (same shape as x, or one-hot shape for categorical) or None.
        extra: sampler-specific tensors (e.g. per-chain step sizes).
    """

    x: Tensor
    energy: Tensor | None = None
    grad: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def replace(self, **changes: Any) -> ChainState:
        return replace(self, **changes)


class Sampler(nn.Module):
    """Anything that draws states for an energy.

    ``sample(energy, n, x0=None, generator=None) -> (n, *event)`` draws states;
    ``update(energy, data=None) -> dict`` lets a learned sampler (a flow, a discrete flow,
    a replay buffer) adapt once per training step; plain MCMC returns ``{}``.
    After each call, ``self.stats`` holds that call's diagnostics as 0-d tensors
    (no host synchronisation: convert with ``float()`` only when logging).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, Tensor] = {}

    def sample(
        self,
        energy: EnergyModel,
        n: int | None = None,
        *,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement sample()")

    def update(self, energy: EnergyModel, data: Tensor | None = None) -> dict[str, Tensor]:
        """Adapt a learned sampler; returns stats. Default: nothing to learn, ``{}``."""
        return {}

    def supports(self, energy: EnergyModel) -> bool:
        """Whether this sampler can draw states of ``energy.space`` (override to restrict)."""
        return True

    def _initial_states(
        self,
        energy: EnergyModel,
        n: int | None,
        x0: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """x0 if given (validated against the energy's space), else ``n`` draws of its noise."""
        if not isinstance(energy, EnergyModel):
            raise ValueError(
                f"energy must be an ebmflow EnergyModel, got {type(energy).__name__}; "
                "subclass ebmflow.energy.EnergyModel and implement energy()"
            )
        if not self.supports(energy):
            raise ValueError(
                f"{type(self).__name__} cannot sample {energy.space!r}; pick a sampler for "
                f"this space"
            )
        ref = energy._reference_tensor()
        device = ref.device if ref is not None else None
        if x0 is not None:
            if n is not None and x0.shape[0] != n:
                raise ValueError(f"n={n} but x0 has {x0.shape[0]} states; pass one of them")
            return energy.space.validate(x0, "x0", device=device)
        if n is None:
            raise ValueError("pass n (number of states) or x0 (initial states)")
        if generator is not None and device is not None and generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the energy is on {device}; create it "
                f"with torch.Generator(device='{device}')"
            )
        return energy.space.noise(n, generator=generator, device=device)


def _reduce_info(acc: dict[str, Tensor], info: StepInfo) -> None:
    for k, v in info.items():
        v = v.detach().float()
        acc[k] = acc[k] + v if k in acc else v


class MCMCSampler(Sampler):
    """A Markov kernel that keeps the target p ∝ exp(-E) invariant (or approximately, for ULA).

    Subclasses implement ``step(energy, x, generator) -> x'`` or ``-> (x', info)``, where
    ``info`` maps names to 0-d or per-chain ``(B,)`` tensors (e.g. ``accept_rate``); or, to
    cache the energy and gradient between steps, ``init_state`` and ``transition``.

    Args:
        n_steps: default number of steps of ``sample``/``run``.
        on_nonfinite: "raise" (default): ``run`` raises ``NonFiniteError`` naming the first
            step and the chains where a state became NaN/inf; "reset": such a move is undone
            (the chain keeps its previous state) and counted in ``stats["nonfinite"]``.
        progress: show a tqdm progress bar in ``run``.
    """

    def __init__(self, n_steps: int = 10, on_nonfinite: str = "raise", progress: bool = False):
        super().__init__()
        if not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        if on_nonfinite not in ("raise", "reset"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'reset', got {on_nonfinite!r}")
        self.n_steps = n_steps
        self.on_nonfinite = on_nonfinite
        self.progress = progress

    # -- subclass surface --------------------------------------------------------------
    def step(
        self, energy: EnergyModel, x: Tensor, generator: torch.Generator | None = None
    ) -> Tensor | tuple[Tensor, StepInfo]:
        """One transition x -> x'. Return x' or (x', info)."""
        if type(self).transition is MCMCSampler.transition:
            raise NotImplementedError(
                f"{type(self).__name__} must implement step() (or init_state/transition)"
            )
        state, info = self.transition(energy, self.init_state(energy, x), generator)
        return state.x, info

    def init_state(self, energy: EnergyModel, x: Tensor) -> ChainState:
        """Build the chain state for ``x`` (default: just x; MALA/HMC add E and grad)."""
        return ChainState(x)

    def transition(
        self, energy: EnergyModel, state: ChainState, generator: torch.Generator | None = None
    ) -> tuple[ChainState, StepInfo]:
        """One transition on a ``ChainState``; default wraps ``step``."""
        out = self.step(energy, state.x, generator)
        x, info = out if isinstance(out, tuple) else (out, {})
        return ChainState(x), info

    # -- provided ----------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        energy: EnergyModel,
        x0: Tensor,
        n_steps: int | None = None,
        *,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
    ) -> Tensor:
        """Run ``n_steps`` transitions from ``x0``; returns the final states (detached).

        Diagnostics (means over steps of what each step reported, plus ``nonfinite``, the
        number of undone non-finite moves) are left in ``self.stats`` as 0-d tensors, and
        per-chain means in ``self.chain_stats`` as ``(B,)`` tensors.
        """
        n_steps = self.n_steps if n_steps is None else n_steps
        if not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        state = self.init_state(energy, x0.detach())
        acc: dict[str, Tensor] = {}
        batch = x0.shape[0]
        first_bad = torch.full((batch,), -1, dtype=torch.long, device=x0.device)
        n_reset = torch.zeros((), device=x0.device)
        show = self.progress if progress is None else progress
        steps = tqdm(range(n_steps), desc=type(self).__name__, disable=not show, leave=False)
        for t in steps:
            new_state, info = self.transition(energy, state, generator)
            bad = ~torch.isfinite(new_state.x.reshape(batch, -1).float()).all(1)
            if new_state.energy is not None:
                bad = bad | ~torch.isfinite(new_state.energy)
            if self.on_nonfinite == "reset":
                new_state = _where_state(bad, state, new_state)
                n_reset = n_reset + bad.sum()
            else:
                first_bad = torch.where((first_bad < 0) & bad, t, first_bad)
            state = new_state
            _reduce_info(acc, info)
        if self.on_nonfinite == "raise" and n_steps > 0:
            _raise_if_bad(first_bad, type(self).__name__)
        denom = max(n_steps, 1)
        self.chain_stats = {k: v / denom for k, v in acc.items() if v.dim() > 0}
        self.stats = {k: (v / denom).mean() for k, v in acc.items()}
        self.stats["nonfinite"] = n_reset
        self.last_state = state
        return state.x

    def sample(
        self,
        energy: EnergyModel,
        n: int | None = None,
        *,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        n_steps: int | None = None,
    ) -> Tensor:
        """Run ``n_steps`` (default ``self.n_steps``) from ``x0`` or from the space's noise."""
        x = self._initial_states(energy, n, x0, generator)
        return self.run(energy, x, n_steps, generator=generator)


def _where_state(bad: Tensor, old: ChainState, new: ChainState) -> ChainState:
    """Per chain, keep ``old`` where ``bad`` is True, else take ``new``."""

    def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        if a is None or b is None:
            return b
        mask = bad.reshape((-1,) + (1,) * (b.dim() - 1))
        return torch.where(mask, a, b)

    extra = {k: pick(old.extra.get(k), v) for k, v in new.extra.items()}
    return ChainState(pick(old.x, new.x), pick(old.energy, new.energy), pick(old.grad, new.grad), extra)  # type: ignore[arg-type]


def _raise_if_bad(first_bad: Tensor, name: str) -> None:
    bad_chains = torch.nonzero(first_bad >= 0).flatten()
    if bad_chains.numel() > 0:
        step = int(first_bad[bad_chains].min())
        shown = bad_chains[:8].tolist()
        raise NonFiniteError(
            f"{name}: {bad_chains.numel()} chain(s) became NaN/inf, first at step {step} "
            f"(chains {shown}{'...' if bad_chains.numel() > 8 else ''}). Lower the step size, "
            f"check the energy for NaN/inf, or pass on_nonfinite='reset' to undo such moves"
        )
