"""Metropolis-adjusted Langevin algorithm (MALA) with warm-up step-size adaptation."""

from __future__ import annotations

import math

import torch

from ..energy.base import EnergyModel
from . import rng
from ._adapt import accept_prob
from ._fast import energy_and_grad
from .adaptive import AdaptiveStepSize, chain_mask, event_sum
from .base import ChainState, StepInfo

# AdaptiveStepSize lives in samplers/adaptive.py; re-exported here for code that imported it
# from mala
__all__ = ["MALA", "AdaptiveStepSize"]


class MALA(AdaptiveStepSize):
    r"""Metropolis-adjusted Langevin algorithm, vectorised over chains with per-chain accept.

    Proposal (a ULA step) and acceptance, with $f = -E$:

    $$x' = x - \eta \nabla E(x) + \sqrt{2 \eta}\, \xi, \qquad \xi \sim \mathcal{N}(0, I),$$

    $$q(x' \mid x) = \mathcal{N}\big(x';\, x - \eta \nabla E(x),\, 2 \eta I\big),$$

    accepted with probability
    $\min\big(1, \exp(f(x') - f(x) + \log q(x \mid x') - \log q(x' \mid x))\big)$: where
    $\log u < \log \alpha$, with $\xi$ and $\log u$ from one draw of normals per step
    (``rng.randn_and_log_uniform``: $\log u = -(\zeta_1^2 + \zeta_2^2) / 2$).

    $E$ and $\nabla E$ of the current state are cached in the chain state, so a step costs one
    energy-and-gradient evaluation (at $x'$). A proposal whose energy or gradient is NaN/inf is
    rejected and counted in the step info ``nonfinite_rate``.

    Warm-up: during the first ``n_warmup`` steps of the sampler's life (counted across runs;
    ``reset_adaptation()`` restarts) the global step size follows Robbins-Monro on $\log \eta$
    toward ``target_accept`` (see ``ebmflow.samplers._adapt``); afterwards it is fixed and the
    kernel is exactly invariant. States produced while adapting are not exact samples.

    Args:
        step_size: initial $\eta > 0$ (default 0.01).
        n_steps: default number of steps (default 10).
        target_accept: acceptance targeted by the adaptation (default 0.574).
        n_warmup: adaptation steps (default 0: no adaptation).
        adapt_rate: Robbins-Monro gain factor (default 1.0).
        on_nonfinite: "raise" (default) or "reset"; see ``MCMCSampler``.
        progress: show a progress bar in ``run`` (default False).
        cuda_graph: record K steps as one CUDA graph for CUDA states (default False); see ``MCMCSampler``.
        graph_steps: K, steps per CUDA graph or compiled block (default None: 32 / about 8 gradient evaluations).
        compile: the compiled executor: "auto" (default: CPU chains compile after 2000 steps), True or False; see ``MCMCSampler``.

    Step info: ``accept_rate`` (per chain, 1 if accepted), ``nonfinite_rate`` (per chain);
    ``stats["step_size"]`` is the step size at the end of the run.
    """

    _keeps_finite = True  # non-finite proposals are rejected: a finite chain stays finite

    def __init__(
        self,
        step_size: float = 0.01,
        n_steps: int = 10,
        *,
        target_accept: float = 0.574,
        n_warmup: int = 0,
        adapt_rate: float = 1.0,
        on_nonfinite: str = "raise",
        progress: bool = False,
        cuda_graph: bool = False,
        graph_steps: int | None = None,
        compile: bool | str = "auto",
    ):
        super().__init__(step_size, n_steps, target_accept, n_warmup, adapt_rate,
                         on_nonfinite=on_nonfinite, progress=progress, cuda_graph=cuda_graph,
                         graph_steps=graph_steps, compile=compile)

    def transition(
        self, energy: EnergyModel, state: ChainState, generator: torch.Generator | None = None
    ) -> tuple[ChainState, StepInfo]:
        x, e, g = state.x, state.energy, state.grad
        assert e is not None and g is not None, "MALA needs the state from init_state"
        extra = state.extra
        # compiled blocks read eta from the state too: a Python float would be baked in
        adapting = "adapt_t" in extra or torch.compiler.is_compiling()
        noise, log_u = rng.randn_and_log_uniform(x.shape, generator, x.device, x.dtype)
        # log q(x'|x) = -|sqrt(2 eta) xi|^2 / (4 eta) = -|xi|^2 / 2 (constants cancel);
        # log q(x|x') = -|x - x' + eta grad E(x')|^2 / (4 eta)
        if adapting:  # eta is a 0-d tensor of the chain state, changing every step
            eta = extra["log_step_size"].exp()
            prop = x - eta * g + (2 * eta).sqrt() * noise
            e_prop, g_prop = energy_and_grad(energy, prop)
            back = event_sum((x - prop + eta * g_prop).square()) / (4 * eta)
            log_alpha = e - e_prop + 0.5 * event_sum(noise.square()) - back
        else:  # eta is fixed during the run (= exp(log_step_size)): fused scalar ops
            eta = self._step_size
            prop = torch.add(x, g, alpha=-eta).add_(noise, alpha=math.sqrt(2.0 * eta))
            e_prop, g_prop = energy_and_grad(energy, prop)
            back = torch.sub(x, prop).add_(g_prop, alpha=eta)
            log_alpha = torch.sub(e, e_prop).add_(event_sum(noise.square()), alpha=0.5)
            log_alpha = log_alpha.sub_(event_sum(back.square()), alpha=0.25 / eta)
        # a NaN/inf in E(x'), grad E(x') or x' makes log_alpha non-finite: reject the move
        nonfinite = torch.sub(log_alpha, log_alpha).ne_(0)  # 1.0 where NaN/inf
        log_alpha = log_alpha.nan_to_num_(nan=-math.inf, posinf=-math.inf)
        accept = log_u < log_alpha
        mask = chain_mask(accept, x)
        new = ChainState(
            torch.where(mask, prop, x),
            torch.where(accept, e_prop, e),
            torch.where(mask, g_prop, g),
            self._adapt(extra, accept_prob(log_alpha)) if adapting else extra,
        )
        info = {"accept_rate": accept.to(x.dtype), "nonfinite_rate": nonfinite}
        return new, info
