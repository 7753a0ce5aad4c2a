"""Persistent chains: a replay buffer of past sampler states and the ``PersistentSampler``.

Persistent contrastive divergence (Tieleman 2008) with the replay buffer of Du & Mordatch
(2019): chains are not restarted from noise at every training step but continue from states
stored in a buffer, a small fraction of them re-initialised from noise each time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..energy.base import EnergyModel
from ..spaces import Space
from ._adapt import check_count, check_positive
from .base import MCMCSampler, Sampler

__all__ = ["ReplayBuffer", "PersistentSampler"]

NoiseFn = Callable[[int, "torch.Generator | None", "torch.device | None"], Tensor]


class ReplayBuffer(nn.Module):
    r"""A fixed-size store of $N$ chain states of a space (continuous, binary or categorical).

    ``draw(n)`` takes n distinct stored states, uniformly at random (without replacement),
    and replaces each one, independently with probability $\rho$ (``reinit_prob``), by a fresh
    draw of the noise; it returns the states and their slots. After the sampler has moved
    them, ``push(x, slots)`` writes them back. The buffer is filled with noise lazily, on the
    first draw, on the device that draw asks for.

    Args:
        space: the state space (``ebmflow.spaces``); stored states have its dtype.
        capacity: $N \ge 1$ (default 10000).
        reinit_prob: $\rho \in [0, 1]$ (default 0.05).
        noise: ``noise(n, generator, device) -> (n, *event)`` for the initial fill and the
            re-initialisations (default: ``space.noise``, e.g. $\mathcal{N}(0, I)$ for continuous states).

    The states are a registered buffer: they follow ``.to()`` and are saved in
    ``state_dict()`` (key ``states``) for checkpoints. ``stats`` after a draw:
    ``reinit_rate`` (fraction re-initialised, 0-d).
    """

    def __init__(self, space: Space, capacity: int = 10000, reinit_prob: float = 0.05,
                 noise: NoiseFn | None = None):
        super().__init__()
        if not isinstance(space, Space):
            raise ValueError(f"space must be an ebmflow.spaces.Space, got {type(space).__name__}")
        self.space = space
        self.capacity = check_count("capacity", capacity, minimum=1)
        self.reinit_prob = check_positive("reinit_prob", reinit_prob, allow_zero=True)
        if self.reinit_prob > 1:
            raise ValueError(f"reinit_prob must lie in [0, 1], got {reinit_prob!r}")
        self.noise = noise
        self.register_buffer("states", torch.empty((0, *space.shape), dtype=space.dtype))
        self.stats: dict[str, Tensor] = {}

    @property
    def initialised(self) -> bool:
        return self.states.shape[0] == self.capacity

    def _noise(self, n: int, generator: torch.Generator | None, device: Any) -> Tensor:
        if self.noise is not None:
            return self.noise(n, generator, device)
        return self.space.noise(n, generator=generator, device=device)

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None, device: Any = None) -> None:
        """Fill all N slots with fresh noise (on ``device``, default the buffer's device)."""
        device = self.states.device if device is None else device
        fresh = self._noise(self.capacity, generator, device)
        self._check_states(fresh, "noise()")
        self.states = fresh.to(self.space.dtype)

    @torch.no_grad()
    def draw(self, n: int, *, generator: torch.Generator | None = None,
             device: Any = None) -> tuple[Tensor, Tensor]:
        """``n`` distinct states ``(n, *event)`` and their slots ``(n,)`` long."""
        n = check_count("n", n, minimum=1)
        if n > self.capacity:
            raise ValueError(
                f"cannot draw n={n} distinct states from a buffer of capacity {self.capacity}; "
                f"use ReplayBuffer(capacity >= {n})"
            )
        if not self.initialised:
            self.reset(generator, device)
        elif device is not None and torch.device(device).type != self.states.device.type:
            raise ValueError(
                f"the replay buffer is on {self.states.device} but states are asked for on "
                f"{device}; move the buffer (or the sampler holding it) with .to('{device}')"
            )
        dev = self.states.device
        slots = torch.randperm(self.capacity, generator=generator, device=dev)[:n]
        x = self.states[slots]
        if self.reinit_prob > 0:
            fresh = self._noise(n, generator, dev).to(x.dtype)
            u = torch.rand(n, generator=generator, device=dev)
            renew = u < self.reinit_prob
            x = torch.where(renew.reshape((-1,) + (1,) * (x.dim() - 1)), fresh, x)
            self.stats = {"reinit_rate": renew.float().mean()}
        else:
            self.stats = {"reinit_rate": torch.zeros((), device=dev)}
        return x, slots

    @torch.no_grad()
    def push(self, x: Tensor, slots: Tensor) -> None:
        """Write states ``x`` ``(n, *event)`` back into ``slots`` ``(n,)``."""
        if not self.initialised:
            raise ValueError("push() before any draw(): the buffer is empty; call draw() first")
        self._check_states(x, "x")
        if slots.shape != (x.shape[0],):
            raise ValueError(f"slots must have shape ({x.shape[0]},), got {tuple(slots.shape)}")
        self.states.index_copy_(0, slots, x.detach().to(self.states.dtype))

    def _check_states(self, x: Tensor, name: str) -> None:
        if tuple(x.shape[1:]) != tuple(self.space.shape):
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but the buffer stores states of "
                f"{self.space!r}, shape (n, {', '.join(map(str, self.space.shape))})"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        incoming = state_dict.get(prefix + "states")
        if incoming is not None:
            ok = incoming.shape[0] in (0, self.capacity) and tuple(incoming.shape[1:]) == tuple(
                self.space.shape)
            if not ok:
                raise ValueError(
                    f"saved replay buffer has shape {tuple(incoming.shape)}, expected "
                    f"({self.capacity}, {', '.join(map(str, self.space.shape))})"
                )
            # resize the (possibly still empty) buffer so the copy in load_state_dict fits
            self.states = torch.empty(incoming.shape, dtype=self.space.dtype,
                                      device=self.states.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.space!r}, capacity={self.capacity}, reinit_prob={self.reinit_prob}"


class PersistentSampler(Sampler):
    """Persistent chains: draw from a ``ReplayBuffer``, run an MCMC kernel, write back.

    ``sample(energy, n)``: x, slots = buffer.draw(n); x = mcmc.run(energy, x, n_steps);
    buffer.push(x, slots); return x. So persistent contrastive divergence is
    ``ContrastiveDivergence`` with ``sampler=PersistentSampler(Langevin(...), ReplayBuffer(...))``.
    Works for any ``MCMCSampler`` whose space matches the buffer's (continuous or discrete).

    When ``x0`` is given the chains start from it instead and the buffer is left untouched.

    Args:
        mcmc: the kernel.
        buffer: the replay buffer.
        n_steps: kernel steps per draw (default None: ``mcmc.n_steps``).

    ``stats``: the kernel's (``accept_rate``...) plus the buffer's (``reinit_rate``) and
    ``buffer_capacity``. ``state_dict()`` holds the buffer contents (``buffer.states``).
    """

    def __init__(self, mcmc: MCMCSampler, buffer: ReplayBuffer, n_steps: int | None = None):
        super().__init__()
        if not isinstance(mcmc, MCMCSampler):
            raise ValueError(f"mcmc must be an MCMCSampler, got {type(mcmc).__name__}")
        if not isinstance(buffer, ReplayBuffer):
            raise ValueError(f"buffer must be a ReplayBuffer, got {type(buffer).__name__}")
        self.mcmc = mcmc
        self.buffer = buffer
        self.n_steps = None if n_steps is None else check_count("n_steps", n_steps)

    def supports(self, energy: EnergyModel) -> bool:
        return energy.space == self.buffer.space and self.mcmc.supports(energy)

    def sample(
        self,
        energy: EnergyModel,
        n: int | None = None,
        *,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        n_steps: int | None = None,
    ) -> Tensor:
        """Persistent states ``(n, *event)`` after ``n_steps`` kernel steps."""
        if isinstance(energy, EnergyModel) and energy.space != self.buffer.space:
            raise ValueError(
                f"the energy's space {energy.space!r} does not match the replay buffer's "
                f"{self.buffer.space!r}; build ReplayBuffer(energy.space, ...)"
            )
        steps = n_steps if n_steps is not None else self.n_steps
        if x0 is not None:
            x = self.mcmc.sample(energy, n, x0=x0, generator=generator, n_steps=steps)
            self.stats = dict(self.mcmc.stats)
            return x
        self._check_energy(energy)
        if n is None:
            raise ValueError("pass n (number of states) or x0 (initial states)")
        ref = energy.reference_tensor()
        device = ref.device if ref is not None else (
            generator.device if generator is not None else None)
        x, slots = self.buffer.draw(n, generator=generator, device=device)
        x = self.mcmc.run(energy, x, steps, generator=generator)
        self.buffer.push(x, slots)
        self.stats = {
            **self.mcmc.stats,
            **self.buffer.stats,
            "buffer_capacity": torch.full((), float(self.buffer.capacity), device=x.device),
        }
        return x

    def update(self, energy: EnergyModel, data: Tensor | None = None) -> dict[str, Tensor]:
        return self.mcmc.update(energy, data)
