"""Hamiltonian Monte Carlo with leapfrog integration and warm-up step-size adaptation."""

from __future__ import annotations

import math

import torch

from ..energy.base import EnergyModel
from . import rng
from ._adapt import accept_prob, check_count
from ._fast import energy_and_grad
from .adaptive import AdaptiveStepSize, chain_mask, event_sum
from .base import ChainState, StepInfo

__all__ = ["HMC"]


class HMC(AdaptiveStepSize):
    r"""Hamiltonian Monte Carlo (identity mass), vectorised over chains with per-chain accept.

    With $H(x, p) = E(x) + \lVert p \rVert^2 / 2$ and $p \sim \mathcal{N}(0, I)$, $L$ leapfrog
    steps of size $\epsilon$:

    $$p \leftarrow p - \tfrac{\epsilon}{2} \nabla E(x), \quad \text{then } L \text{ times: }
    x \leftarrow x + \epsilon p,\; p \leftarrow p - \epsilon \nabla E(x)
    \;(\text{the last with } \tfrac{\epsilon}{2}),$$

    and $(x', p')$ is accepted with probability $\min\big(1, \exp(H(x, p) - H(x', p'))\big)$
    (where $\log u < H(x, p) - H(x', p')$; $p$ and $\log u$ come from one draw of normals
    per step, ``rng.randn_and_log_uniform``).

    $E$ and $\nabla E$ of the current state are cached, so a step costs $L$ energy-and-gradient
    evaluations. Trajectories that reach NaN/inf are rejected and counted (``nonfinite_rate``).
    Warm-up adaptation of the global $\epsilon$ toward ``target_accept`` (default 0.65) works as in
    ``MALA`` (Robbins-Monro on $\log \epsilon$ during the first ``n_warmup`` steps).

    Args:
        step_size: initial eps > 0 (default 0.1).
        n_leapfrog: $L \ge 1$ (default 10).
        n_steps: default number of HMC steps (default 10).
        target_accept: default 0.65. n_warmup: default 0. adapt_rate: default 1.0.
        on_nonfinite: "raise" (default) or "reset"; see ``MCMCSampler``.
        progress: show a progress bar in ``run`` (default False).
        cuda_graph: record K steps as one CUDA graph for CUDA states (default False); see ``MCMCSampler``.
        graph_steps: K, steps per CUDA graph or compiled block (default None: 32 / about 8 gradient evaluations).
        compile: the compiled executor: "auto" (default: CPU chains compile after 2000 steps), True or False; see ``MCMCSampler``.

    Step info: ``accept_rate``, ``nonfinite_rate`` (per chain); ``stats["step_size"]``.
    """

    _keeps_finite = True  # non-finite trajectories are rejected: a finite chain stays finite

    def __init__(
        self,
        step_size: float = 0.1,
        n_leapfrog: int = 10,
        n_steps: int = 10,
        *,
        target_accept: float = 0.65,
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
        self.n_leapfrog = check_count("n_leapfrog", n_leapfrog, minimum=1)

    def transition(
        self, energy: EnergyModel, state: ChainState, generator: torch.Generator | None = None
    ) -> tuple[ChainState, StepInfo]:
        x, e, g = state.x, state.energy, state.grad
        assert e is not None and g is not None, "HMC needs the state from init_state"
        extra = state.extra
        # compiled blocks read eps from the state too: a Python float would be baked in
        adapting = "adapt_t" in extra or torch.compiler.is_compiling()
        last = self.n_leapfrog - 1
        p, log_u = rng.randn_and_log_uniform(x.shape, generator, x.device, x.dtype)
        h0 = torch.add(e, event_sum(p.square()), alpha=0.5)
        xn, en, gn = x, e, g
        if adapting:  # eps is a 0-d tensor of the chain state, changing every step
            eps = extra["log_step_size"].exp()
            pn = p - 0.5 * eps * g
            for i in range(self.n_leapfrog):
                xn = xn + eps * pn
                en, gn = energy_and_grad(energy, xn)
                pn = pn - (0.5 if i == last else 1.0) * eps * gn
        else:  # eps is fixed during the run (= exp(log_step_size)): fused scalar ops
            eps = self._step_size
            pn = torch.add(p, g, alpha=-0.5 * eps)
            for i in range(self.n_leapfrog):
                xn = torch.add(xn, pn, alpha=eps)
                en, gn = energy_and_grad(energy, xn)
                pn = pn.add_(gn, alpha=-(0.5 if i == last else 1.0) * eps)
        # log_alpha = H(x, p) - H(x', p'); a NaN/inf in E, grad E (through p') or x' rejects
        log_alpha = h0.sub_(en).sub_(event_sum(pn.square()), alpha=0.5)
        nonfinite = (log_alpha + event_sum(xn)).mul_(0).ne_(0)  # 1.0 where non-finite
        log_alpha = log_alpha.nan_to_num_(nan=-math.inf, posinf=-math.inf)
        accept = log_u < log_alpha
        mask = chain_mask(accept, x)
        new = ChainState(
            torch.where(mask, xn, x),
            torch.where(accept, en, e),
            torch.where(mask, gn, g),
            self._adapt(extra, accept_prob(log_alpha)) if adapting else extra,
        )
        info = {"accept_rate": accept.to(x.dtype), "nonfinite_rate": nonfinite}
        return new, info

    def _compile_block_steps(self) -> int:
        return max(1, 8 // self.n_leapfrog)  # ~8 gradient evaluations per compiled block

    def extra_repr(self) -> str:
        return super().extra_repr() + f", n_leapfrog={self.n_leapfrog}"
