"""Gibbs-with-Gradients (Grathwohl et al. 2021): gradient-informed single-coordinate MH moves."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from ..energy.base import EnergyModel
from ..spaces import Categorical
from . import rng
from ._discrete import (
    GradientDiscreteSampler,
    flip_gain,
    half_flip_gain,
    mh_select,
    relax,
    relaxed_energy_and_grad,
)
from .base import ChainState, StepInfo

__all__ = ["GibbsWithGradients"]


class GibbsWithGradients(GradientDiscreteSampler):
    r"""Gibbs-with-Gradients: propose one coordinate change from a gradient estimate, then MH.

    With $f = -E$ and $d(x)$ the first-order estimate of $f(x') - f(x)$ for each
    single-coordinate move (``flip_gain``):

    * Binary: $d(x)_i = (1 - 2 x_i)\, \nabla f(x)_i$, candidates $i = 1, \dots, D$ (flip bit $i$).
    * Categorical: $d(x)_{i,k} = \nabla f_{i,k} - \langle x_i, \nabla f_i \rangle$ on the one-hot
      relaxation, candidates $(i, k)$ with $k \ne x_i$, $D (K - 1)$ of them, chosen jointly.

    The move $m$ is drawn from $q(m \mid x) = \operatorname{softmax}(d(x) / 2)$ over the
    candidates and accepted with probability

    $$\min\Big(1,\; e^{f(x') - f(x)}\, \frac{q(m' \mid x')}{q(m \mid x)}\Big),$$

    where $m'$ is the move from $x'$ back to $x$. $E$ and $\partial E / \partial x$ of the
    current state are cached in the chain state, so a step costs one energy-and-gradient
    evaluation (at $x'$).

    Args:
        n_steps: default number of steps of ``sample``/``run`` (default 10).
        check_gradient: at the start of each run, reject energies whose gradient is zero at
            every state while their values differ (useless for this sampler; use ``Gibbs``).
        on_nonfinite: "raise" (default) or "reset"; see ``MCMCSampler``.
        progress: show a progress bar in ``run`` (default False).
        cuda_graph: record K steps as one CUDA graph for CUDA states (default False); see ``MCMCSampler``.
        graph_steps: K, steps per CUDA graph or compiled block (default None: 32 / about 8 gradient evaluations).
        compile: the compiled executor: "auto" (default: CPU chains compile after 2000 steps), True or False; see ``MCMCSampler``.

    Step info (per chain ``(B,)``): ``accept_rate`` (1 if the move was accepted),
    ``flips`` (coordinates changed, 0 or 1) and ``nonfinite_rate`` (1 if the proposal's energy
    or gradient was NaN/inf; such proposals are always rejected).
    """

    def __init__(self, n_steps: int = 10, check_gradient: bool = True,
                 on_nonfinite: str = "raise", progress: bool = False, *,
                 cuda_graph: bool = False, graph_steps: int | None = None, compile: bool | str = "auto"):
        super().__init__(n_steps=n_steps, on_nonfinite=on_nonfinite, progress=progress,
                         cuda_graph=cuda_graph, graph_steps=graph_steps, compile=compile)
        self.check_gradient = bool(check_gradient)

    # -- proposal ------------------------------------------------------------------------
    @staticmethod
    def _move_logits(energy: EnergyModel, x: Tensor, grad: Tensor) -> Tensor:
        r"""Unnormalised $\log q(m \mid x) = d(x)_m / 2$ over all moves, flattened to ``(B, M)``.

        Binary: $M = D$. Categorical: $M = D K$ with the current value of each coordinate
        masked to $-\infty$ (so effectively $D (K - 1)$ moves).
        """
        space = energy.space
        if isinstance(space, Categorical):
            xr = relax(space, x, grad.dtype)
            logits = flip_gain(space, xr, grad) / 2
            logits = logits.masked_fill(xr > 0.5, float("-inf"))
            return rearrange(logits, "b d k -> b (d k)")
        return half_flip_gain(x, grad)

    @staticmethod
    def _apply_move(energy: EnergyModel, x: Tensor, move: Tensor) -> tuple[Tensor, Tensor]:
        """$x'$ = $x$ with move ``move`` ``(B,)`` applied; also returns the reverse move index."""
        space = energy.space
        if isinstance(space, Categorical):
            k = space.num_classes
            coord, value = move // k, move % k
            old = x.gather(1, coord[:, None]).squeeze(1)
            x_new = x.scatter(1, coord[:, None], value[:, None])
            return x_new, coord * k + old
        x_new = x.scatter(1, move[:, None], 1.0 - x.gather(1, move[:, None]))
        return x_new, move

    def log_proposal(self, energy: EnergyModel, x: Tensor, y: Tensor) -> Tensor:
        r"""Exact $\log q(y \mid x)$ ``(B,)`` for pairs of states ($-\infty$ unless $y$ is one
        move from $x$).

        For tests and diagnostics; the step uses the same ``_move_logits``.
        """
        _, grad = relaxed_energy_and_grad(type(self).__name__, energy, x)
        log_q = torch.log_softmax(self._move_logits(energy, x, grad), dim=1)
        diff = x != y
        one_move = diff.sum(1) == 1
        coord = diff.float().argmax(1)
        if isinstance(energy.space, Categorical):
            move = coord * energy.space.num_classes + y.gather(1, coord[:, None]).squeeze(1)
        else:
            move = coord
        out = log_q.gather(1, move[:, None]).squeeze(1)
        return torch.where(one_move, out, torch.full_like(out, float("-inf")))

    # -- transition ----------------------------------------------------------------------
    def _propose_and_accept(
        self, energy: EnergyModel, x: Tensor, e: Tensor, g: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[ChainState, StepInfo]:
        name = type(self).__name__
        log_q_fwd_all = torch.log_softmax(self._move_logits(energy, x, g), dim=1)
        move = rng.categorical_sample(log_q_fwd_all, generator)
        x_new, back = self._apply_move(energy, x, move)
        e_new, g_new = relaxed_energy_and_grad(name, energy, x_new)
        log_q_rev_all = torch.log_softmax(self._move_logits(energy, x_new, g_new), dim=1)
        log_q_fwd = log_q_fwd_all.gather(1, move[:, None])[:, 0]
        log_q_rev = log_q_rev_all.gather(1, back[:, None])[:, 0]
        x, e, g, acc, nonfinite = mh_select(x, e, g, x_new, e_new, g_new, log_q_fwd, log_q_rev,
                                            generator)
        info = {"accept_rate": acc, "flips": acc, "nonfinite_rate": nonfinite}
        return ChainState(x, energy=e, grad=g), info

