"""Unadjusted Langevin algorithm (ULA) for continuous states."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..energy.base import EnergyModel
from ..spaces import Continuous
from . import rng
from ._adapt import check_positive
from ._fast import energy_and_grad
from .base import ChainState, MCMCSampler, StepInfo

__all__ = ["Langevin"]


class Langevin(MCMCSampler):
    r"""Unadjusted Langevin algorithm (ULA), vectorised over chains.

    $$x' = x - \eta\, \operatorname{clip}(\nabla E(x)) + \sigma \xi, \qquad \xi \sim \mathcal{N}(0, I),$$

    with $\sigma = \sqrt{2 \eta T}$ (default), or $\sigma$ = ``noise_scale`` when given.

    With the defaults (no clipping, $\sigma = \sqrt{2 \eta T}$) this is ULA for
    $p \propto \exp(-E / T)$. ULA has no accept/reject step, so its stationary law is biased by
    $O(\eta)$: on $\mathcal{N}(0, s^2)$ it is $\mathcal{N}(0, v)$ with
    $v = 2 \eta T / (1 - (1 - \eta / s^2)^2)$ ($> T s^2$), which tends to $T s^2$ as
    $\eta \to 0$. Use ``MALA`` for an exact kernel.

    Two common EBM-training deviations (Du & Mordatch 2019; Nijkamp et al. 2019) are options,
    and both make the kernel target something other than $\exp(-E / T)$:

    * ``noise_scale``: a noise standard deviation decoupled from the step size (e.g.
      $\eta = 10$, $\sigma = 0.005$ for image EBMs);
    * ``grad_clip``: each gradient coordinate is clamped to $[-c, c]$ before the step.

    Args:
        step_size: $\eta > 0$ (default 0.01).
        n_steps: default number of steps of ``sample``/``run`` (default 10).
        temperature: $T > 0$ (default 1); ignored when ``noise_scale`` is given.
        noise_scale: $\sigma \ge 0$ or None (default None: $\sqrt{2 \eta T}$).
        grad_clip: $c > 0$ or None (default None: no clipping).
        on_nonfinite: "raise" (default) or "reset"; see ``MCMCSampler``.
        progress: show a progress bar in ``run`` (default False).
        cuda_graph: record K steps as one CUDA graph for CUDA states (default False); see ``MCMCSampler``.
        graph_steps: K, steps per CUDA graph or compiled block (default None: 32 / about 8 gradient evaluations).
        compile: the compiled executor: "auto" (default: CPU chains compile after 2000 steps), True or False; see ``MCMCSampler``.

    Cost: one energy-and-gradient evaluation per step. Reports no step info (no acceptance).
    A non-finite $E(x)$ or $\nabla E(x)$ makes the moved state NaN, which ``run`` reports (or undoes).
    """

    def __init__(
        self,
        step_size: float = 0.01,
        n_steps: int = 10,
        *,
        temperature: float = 1.0,
        noise_scale: float | None = None,
        grad_clip: float | None = None,
        on_nonfinite: str = "raise",
        progress: bool = False,
        cuda_graph: bool = False,
        graph_steps: int | None = None,
        compile: bool | str = "auto",
    ):
        super().__init__(n_steps, on_nonfinite, progress, cuda_graph=cuda_graph,
                         graph_steps=graph_steps, compile=compile)
        self.step_size = check_positive("step_size", step_size)
        self.temperature = check_positive("temperature", temperature)
        self.noise_scale = (None if noise_scale is None
                            else check_positive("noise_scale", noise_scale, allow_zero=True))
        self.grad_clip = None if grad_clip is None else check_positive("grad_clip", grad_clip)

    def supports(self, energy: EnergyModel) -> bool:
        return isinstance(energy.space, Continuous)

    @property
    def sigma(self) -> float:
        """Noise standard deviation per step."""
        if self.noise_scale is not None:
            return self.noise_scale
        return math.sqrt(2.0 * self.step_size * self.temperature)

    def transition(
        self, energy: EnergyModel, state: ChainState, generator: torch.Generator | None = None
    ) -> tuple[ChainState, StepInfo]:
        """``step`` on a ``ChainState`` (no cached energy; no step info)."""
        return ChainState(self.step(energy, state.x, generator)), {}

    def step(self, energy: EnergyModel, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        e, grad = energy_and_grad(energy, x)
        if self.grad_clip is not None:
            grad = grad.clamp_(-self.grad_clip, self.grad_clip)
        # a NaN/inf energy with a finite gradient must not pass silently: 0 * E is 0 or NaN,
        # and a NaN state is caught (raise / reset) by run()
        e0 = e - e  # 0, or NaN where E is NaN/inf
        grad = grad.add_(e0[:, None] if x.dim() == 2 else e0.reshape((-1,) + (1,) * (x.dim() - 1)))
        noise = rng.randn(x.shape, generator, x.device, x.dtype)
        # two fused passes: x - eta * g, then + sigma * xi in place
        return torch.add(x, grad, alpha=-self.step_size).add_(noise, alpha=self.sigma)
