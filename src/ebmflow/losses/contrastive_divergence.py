"""Contrastive divergence: data energies down, sampler energies up."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..energy.base import EnergyModel
from ..samplers.base import Sampler
from .base import EBMLoss, LossOutput

__all__ = ["ContrastiveDivergence"]

InitFn = Callable[[Tensor, "torch.Generator | None"], Tensor]
_INITS = ("default", "noise", "data")


class ContrastiveDivergence(EBMLoss):
    r"""Contrastive divergence with an energy-magnitude regulariser.

    $$
    L = \frac{1}{B} \sum_i E(x^+_i) - \frac{1}{B} \sum_j E(x^-_j)
        + \alpha \Big( \frac{1}{B} \sum_i E(x^+_i)^2 + \frac{1}{B} \sum_j E(x^-_j)^2 \Big)
    $$

    $x^+$ is the data batch ``(B, *event)``; the $B$ negatives
    $x^-$ = ``sampler.sample(energy, n=B, x0=...)`` are drawn without gradient (detached), so
    the loss's gradient reaches only the energy's parameters:
    $\nabla_\theta L = \mathbb{E}_{\text{data}}[\nabla_\theta E] - \mathbb{E}_{\text{model}}[\nabla_\theta E]$
    + regulariser.

    Where chains start (``init``):

    * ``"default"``: ``x0=None``, the sampler's own start: the space's noise for MCMC
      samplers (short-run CD from noise), the replay buffer for ``PersistentSampler``
      (persistent CD);
    * ``"noise"``: ``x0 = energy.space.noise(B)`` explicitly (also for persistent samplers,
      which then leave their buffer untouched);
    * ``"data"``: ``x0 = data`` (Hinton's CD-k);
    * a callable ``init(data, generator) -> x0``.

    Args:
        alpha: regulariser weight $\alpha \ge 0$ (default 0: plain CD; 0.1 to 1 stabilises neural
            energies by keeping them near 0, at the cost of a small bias).
        init: see above (default "default").
        n_steps: sampler steps per loss call (default None: the sampler's own default).
        check_data: when the values of ``data`` are checked against the energy's space
            (``"auto"``: every call on CPU, once on an accelerator; ``"always"``; ``"never"``);
            shape and dtype are always checked. See ``EBMLoss``.

    Stats (0-d tensors): ``energy_pos``, ``energy_neg`` (batch means), ``energy_gap``
    (energy_pos - energy_neg) and the sampler's stats (``accept_rate``, ``nonfinite``,
    ``reinit_rate``...). ``requires_sampler = True``.
    """

    requires_sampler = True

    def __init__(self, alpha: float = 0.0, init: str | InitFn = "default",
                 n_steps: int | None = None, *, check_data: str = "auto"):
        super().__init__(check_data=check_data)
        alpha = float(alpha)
        if not alpha >= 0 or alpha == float("inf"):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
        if not callable(init) and init not in _INITS:
            raise ValueError(f"init must be one of {_INITS} or a callable, got {init!r}")
        if n_steps is not None and (not isinstance(n_steps, int) or n_steps < 0):
            raise ValueError(f"n_steps must be a non-negative int or None, got {n_steps!r}")
        self.alpha = alpha
        self.init = init
        self.n_steps = n_steps

    def _start(self, energy: EnergyModel, data: Tensor,
               generator: torch.Generator | None) -> Tensor | None:
        if callable(self.init):
            return self.init(data, generator)
        if self.init == "data":
            return data.detach()
        if self.init == "noise":
            return energy.space.noise(data.shape[0], generator=generator, device=data.device)
        return None

    def forward(self, energy: EnergyModel, data: Tensor, sampler: Sampler | None = None,
                *, generator: torch.Generator | None = None) -> LossOutput:
        """Loss for one data batch ``(B, *event)``; see the class docstring."""
        sampler = self._check_sampler(sampler)
        self.check_data(energy, data)
        batch = data.shape[0]
        x0 = self._start(energy, data, generator)
        kwargs = {} if self.n_steps is None else {"n_steps": self.n_steps}
        with torch.no_grad():
            try:
                x_neg = sampler.sample(energy, n=batch, x0=x0, generator=generator, **kwargs)
            except TypeError as err:
                if not kwargs:
                    raise
                raise ValueError(
                    f"{type(sampler).__name__}.sample does not accept n_steps ({err}); pass "
                    "n_steps=None to ContrastiveDivergence and set the steps on the sampler"
                ) from err
        x_neg = x_neg.detach()
        if x_neg.dtype == data.dtype:  # one forward pass over both batches
            e = energy(torch.cat([data, x_neg]))
            e_pos, e_neg = e[:batch], e[batch:]
        else:
            e_pos, e_neg = energy(data), energy(x_neg)
        m_pos, m_neg = e_pos.mean(), e_neg.mean()
        loss = m_pos - m_neg
        if self.alpha > 0:
            loss = loss + self.alpha * (e_pos.square().mean() + e_neg.square().mean())
        stats = {
            **{k: v.detach() for k, v in sampler.stats.items()},
            "energy_pos": m_pos.detach(),
            "energy_neg": m_neg.detach(),
            "energy_gap": (m_pos - m_neg).detach(),
        }
        return LossOutput(loss, stats, x_neg)

    def extra_repr(self) -> str:
        init = self.init if isinstance(self.init, str) else getattr(self.init, "__name__", "fn")
        return f"alpha={self.alpha}, init={init!r}, n_steps={self.n_steps}"
