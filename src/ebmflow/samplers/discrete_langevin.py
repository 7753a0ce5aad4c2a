"""Discrete Langevin (Zhang et al. 2022): DULA, and DMALA with a Metropolis-Hastings correction."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

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
    stored_mask,
)
from .base import ChainState, StepInfo

__all__ = ["DiscreteLangevin"]

_CHUNK = 64  # coordinates per product in DiscreteLangevin._log_q_binary (2^64 < float32's max)


def _neg_abs_exp(logits: Tensor) -> Tensor:
    r"""$e^{-|l|}$, in $(0, 1]$."""
    return logits.abs().neg_().exp_()


def _log_prod_one_plus(e: Tensor) -> Tensor:
    r"""$\sum_i \log(1 + e_i)$ over the last axis of ``e`` ``(B, D)`` with $e_i \in [0, 1]$,
    as the sum over chunks of ``_CHUNK`` coordinates of the log of their product."""
    f = e + 1.0
    d = f.shape[1]
    if d <= _CHUNK:
        return f.prod(1).log()
    f = F.pad(f, (0, (-d) % _CHUNK), value=1.0)
    return f.reshape(f.shape[0], -1, _CHUNK).prod(2).log().sum(1)


class DiscreteLangevin(GradientDiscreteSampler):
    r"""Discrete Langevin proposal: every coordinate moves independently in one step.

    With $f = -E$, step size $\alpha$ and $d(x)$ = ``flip_gain`` (first-order gain of each move),
    the proposal factorises over coordinates, $q(x' \mid x) = \prod_i q_i(x'_i \mid x)$, with

    * Binary: bit $i$ flips with probability
      $\sigma\big(d(x)_i / 2 - 1 / (2 \alpha)\big)$, $d(x)_i = (1 - 2 x_i)\, \nabla f(x)_i$.
    * Categorical, on the one-hot relaxation (so a move costs $\lVert e_k - x_i \rVert^2 = 2$
      there):

    $$q_i(x'_i = k \mid x) = \operatorname{softmax}_k\Big(\frac{\nabla f_i \cdot (e_k - x_i)}{2}
      - \frac{\lVert e_k - x_i \rVert^2}{2 \alpha}\Big)
      = \operatorname{softmax}_k\Big(\frac{d(x)_{i,k}}{2} - \frac{[k \ne x_i]}{\alpha}\Big).$$

    ``metropolis=False`` (DULA) accepts every proposal: fast but biased by $O(\alpha)$.
    ``metropolis=True`` (DMALA) accepts with probability
    $\min\big(1, e^{f(x') - f(x)}\, q(x \mid x') / q(x' \mid x)\big)$, the reverse proposal
    computed from the gradient at $x'$; the chain is then exact. On binary states no
    log-sigmoid is taken per coordinate: with the logit $l$ and $e = e^{-|l|}$ a bit flips
    where $u (1 + e) < 1$ ($l \ge 0$) or $< e$ ($l < 0$), and $\log q$ is
    $\sum_i \min(s_i, 0) - \log \prod_i (1 + e_i)$ (``_log_q_binary``).

    Args:
        step_size: $\alpha > 0$ (default 0.1), the $\alpha$ of Zhang et al. (2022): the MCMC
            step size of the discrete Langevin proposal; larger moves more coordinates per step.
        metropolis: add the MH correction (DMALA). Default False (DULA).
        n_steps: default number of steps of ``sample``/``run`` (default 10).
        check_gradient: at the start of each run, reject energies whose gradient is zero at
            every state while their values differ (use ``Gibbs`` for those).
        on_nonfinite: "raise" (default) or "reset"; see ``MCMCSampler``.
        progress: show a progress bar in ``run`` (default False).
        cuda_graph: record K steps as one CUDA graph for CUDA states (default False); see ``MCMCSampler``.
        graph_steps: K, steps per CUDA graph or compiled block (default None: 32 / about 8 gradient evaluations).
        compile: the compiled executor: "auto" (default: CPU chains compile after 2000 steps), True or False; see ``MCMCSampler``.

    Step info (per chain ``(B,)``): ``accept_rate`` (always 1 for DULA), ``flips`` (number
    of coordinates changed by the step, 0 for a rejected DMALA proposal) and, for DMALA,
    ``nonfinite_rate`` (1 if the proposal's energy or gradient was NaN/inf; always rejected).
    """

    def __init__(self, step_size: float = 0.1, metropolis: bool = False, n_steps: int = 10,
                 check_gradient: bool = True, on_nonfinite: str = "raise",
                 progress: bool = False, *, cuda_graph: bool = False, graph_steps: int | None = None,
                 compile: bool | str = "auto"):
        super().__init__(n_steps=n_steps, on_nonfinite=on_nonfinite, progress=progress,
                         cuda_graph=cuda_graph, graph_steps=graph_steps, compile=compile)
        if not isinstance(step_size, (int, float)) or not 0 < step_size < math.inf:
            raise ValueError(f"step_size must be a positive finite float, got {step_size!r}")
        self.step_size = float(step_size)
        self.metropolis = bool(metropolis)
        self.check_gradient = bool(check_gradient)

    def extra_repr(self) -> str:
        return f"step_size={self.step_size}, metropolis={self.metropolis}"

    # -- proposal ------------------------------------------------------------------------
    def _logits(self, energy: EnergyModel, x: Tensor, grad: Tensor) -> Tensor:
        """Per-coordinate proposal logits: ``(B, D)`` flip logits (binary) or ``(B, D, K)``."""
        space = energy.space
        if isinstance(space, Categorical):
            xr = relax(space, x, grad.dtype)
            return flip_gain(space, xr, grad) / 2 - (1.0 - xr) / self.step_size
        return half_flip_gain(x, grad).sub_(0.5 / self.step_size)

    def _log_q(self, energy: EnergyModel, x: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        r"""$\log q(y \mid x)$ ``(B,)`` from the proposal logits at $x$."""
        if isinstance(energy.space, Categorical):
            return torch.log_softmax(logits, -1).gather(2, y[..., None]).squeeze(2).sum(1)
        return self._log_q_binary(logits, x != y)

    @staticmethod
    def _log_q_binary(logits: Tensor, flipped: Tensor, e: Tensor | None = None) -> Tensor:
        r"""$\sum_i \log q_i$ ``(B,)``: $\log \sigma(s_i)$ with $s_i = l_i$ where bit $i$
        flipped, else $s_i = -l_i$. With $e_i = e^{-|l_i|}$ (``e``, computed here if not given),

        $$\sum_i \log \sigma(s_i) = \sum_i \min(s_i, 0) - \log \prod_i (1 + e_i),$$

        the product taken over chunks of at most ``_CHUNK`` coordinates (each factor is in
        $(1, 2]$, so a chunk's product stays below $2^{64}$): one logarithm per chain and chunk
        instead of a log-sigmoid per coordinate, which costs several exponentials' time on the
        CPU. Rounding $1 + e_i$ costs at most half an ulp of 1 per coordinate in absolute
        terms."""
        if e is None:
            e = _neg_abs_exp(logits)
        s = torch.where(flipped.bool(), logits, logits.neg())
        return s.clamp(max=0).sum(1) - _log_prod_one_plus(e)

    def _propose(self, energy: EnergyModel, x: Tensor, logits: Tensor,
                 generator: torch.Generator | None) -> Tensor:
        if isinstance(energy.space, Categorical):
            return rng.categorical_sample(logits, generator)
        return self._propose_binary(x, logits, generator)[0]

    @staticmethod
    def _propose_binary(x: Tensor, logits: Tensor,
                        generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        r"""Flip each bit with probability $\sigma(l)$: where $u < \sigma(l)$, tested as
        $u (1 + e) < 1$ for $l \ge 0$ and $u (1 + e) < e$ for $l < 0$, with $e = e^{-|l|}$
        (no logarithm). Returns ``(y, flip, e)``, all ``(B, D)``; ``flip`` is bool, or 0/1
        floats inside a compiled block (``stored_mask``)."""
        u = rng.rand(x.shape, generator, x.device, logits.dtype)
        e = _neg_abs_exp(logits)
        below = u.mul_(e + 1.0) < torch.where(logits >= 0, 1.0, e)
        flip = stored_mask(below, logits.dtype)
        return torch.where(flip.bool(), 1.0 - x, x), flip, e

    def log_proposal(self, energy: EnergyModel, x: Tensor, y: Tensor) -> Tensor:
        r"""Exact $\log q(y \mid x)$ ``(B,)`` for pairs of states (tests and diagnostics)."""
        _, grad = relaxed_energy_and_grad(type(self).__name__, energy, x)
        return self._log_q(energy, x, self._logits(energy, x, grad), y)

    # -- transition ----------------------------------------------------------------------
    def _propose_and_accept(
        self, energy: EnergyModel, x: Tensor, e: Tensor, g: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[ChainState, StepInfo]:
        name = type(self).__name__
        logits = self._logits(energy, x, g)
        binary = not isinstance(energy.space, Categorical)
        if binary:
            y, flipped, e_fwd = self._propose_binary(x, logits, generator)
        else:
            y = self._propose(energy, x, logits, generator)
            flipped = x != y
        e_new, g_new = relaxed_energy_and_grad(name, energy, y)
        flips = flipped.sum(1, dtype=e.dtype)
        if not self.metropolis:  # DULA: every proposal is taken
            ones = torch.ones_like(e)
            return ChainState(y, energy=e_new, grad=g_new), {"accept_rate": ones, "flips": flips}
        logits_rev = self._logits(energy, y, g_new)
        if binary:  # the same bits flip back
            log_q_fwd = self._log_q_binary(logits, flipped, e_fwd)
            log_q_rev = self._log_q_binary(logits_rev, flipped)
        else:
            log_q_fwd = self._log_q(energy, x, logits, y)
            log_q_rev = self._log_q(energy, y, logits_rev, x)
        x, e, g, acc, nonfinite = mh_select(x, e, g, y, e_new, g_new, log_q_fwd, log_q_rev,
                                            generator)
        info = {"accept_rate": acc, "flips": flips.mul_(acc), "nonfinite_rate": nonfinite}
        return ChainState(x, energy=e, grad=g), info

