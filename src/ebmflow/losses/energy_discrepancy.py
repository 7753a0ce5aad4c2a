"""Energy discrepancy (Schroeder et al., NeurIPS 2023): an EBM loss that needs no sampler."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..energy.base import EnergyModel
from ..samplers.base import Sampler
from .base import EBMLoss, LossOutput
from .perturbations import Perturbation

__all__ = ["EnergyDiscrepancy"]


class EnergyDiscrepancy(EBMLoss):
    r"""Stabilised energy-discrepancy loss with a symmetric perturbation kernel $q$.

    For every data point $x_i$ draw one perturbed point $y_i \sim q(\cdot \mid x_i)$ and $M$
    negatives $x'_{ij} \sim q(\cdot \mid y_i)$, $j = 1, \dots, M$; then

    $$
    L = \frac{1}{B} \sum_i \log\Big( w + \sum_{j=1}^{M} e^{E(x_i) - E(x'_{ij})} \Big) - \log M .
    $$

    With $w = 1$ this is the cross-entropy of picking the data point among the $M + 1$
    candidates $\{x_i, x'_{i1}, \dots, x'_{iM}\}$ with logits $-E$, minus $\log M$. At a
    constant energy $L = \log(w + M) - \log M$. The negatives are drawn under ``torch.no_grad`` and the data are
    detached, so gradients reach the energy's parameters only. No MCMC sampler is needed:
    pass ``sampler=None`` (the Trainer does).

    Args:
        perturbation: the kernel $q$ (``GaussianPerturbation(t)`` for continuous states,
            ``BernoulliPerturbation(eps)`` / ``GridPerturbation()`` for binary,
            ``GridPerturbation(num_classes=K)`` / ``CategoricalPerturbation(K, kind, t)`` for
            categorical).
        m: number of negatives $M$ per data point (default 4; the discrete papers use 32).
        w: stabiliser $w \ge 0$ (default 1.0). $w = 0$ gives the unstabilised estimator.
        check_data: when the values of ``data`` are checked against the energy's space
            (``"auto"``: every call on CPU, once on an accelerator; ``"always"``; ``"never"``);
            shape and dtype are always checked. See ``EBMLoss``.

    Shapes: ``data`` is a batch of states ``(B, *event)`` of the energy's space. The energy is
    evaluated once on the concatenation of the B data points and the B * M negatives.

    Returns ``LossOutput(loss, stats, x_neg)`` with stats ``energy_pos`` (mean E(x_i)) and
    ``energy_neg`` (mean E(x'_ij)), 0-d detached tensors, and ``x_neg`` the negatives
    ``(B * M, *event)`` (row i * M + j is x'_ij).
    """

    requires_sampler = False

    def __init__(self, perturbation: Perturbation, m: int = 4, w: float = 1.0, *,
                 check_data: str = "auto"):
        super().__init__(check_data=check_data)
        if not isinstance(perturbation, Perturbation):
            raise ValueError(
                f"perturbation must be an ebmflow Perturbation (e.g. GaussianPerturbation(t=1.0)),"
                f" got {type(perturbation).__name__}"
            )
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m (number of negatives) must be an int >= 1, got {m!r}; e.g. m=4")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(
                f"w (stabiliser) must be a finite float >= 0, got {w!r}; w=1.0 is the default"
            )
        self.perturbation = perturbation
        self.m = m
        self.w = float(w)

    def forward(
        self,
        energy: EnergyModel,
        data: Tensor,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """ED loss of ``energy`` on ``data`` ``(B, *event)``; ``sampler`` is ignored."""
        self.check_data(energy, data)
        self.perturbation.check_space(energy.space)
        shape = tuple(energy.space.shape)
        b, m = data.shape[0], self.m
        data = data.detach()
        pert = self.perturbation
        with torch.no_grad():
            y = pert.perturb(data, generator)
            if type(pert).negatives is Perturbation.negatives:
                # the default negatives(), without its (B, M) round trip: row i * M + j is
                # perturb(y_i) for the j-th copy, the same draws in the same order
                ys = y.unsqueeze(1).expand(b, m, *shape).reshape(b * m, *shape)
                x_neg = pert.perturb(ys, generator)
            else:
                x_neg = pert.negatives(y, m, generator).reshape(b * m, *shape)
        e_all = energy(torch.cat([data, x_neg], dim=0))
        e_pos = e_all[:b]
        e_neg = e_all[b:].view(b, m)
        diff = e_pos[:, None] - e_neg  # (B, M)
        if self.w > 0:
            log_w = torch.full((b, 1), math.log(self.w), dtype=diff.dtype, device=diff.device)
            diff = torch.cat([log_w, diff], dim=1)
        loss = torch.logsumexp(diff, dim=1).mean() - math.log(m)
        stats = {"energy_pos": e_pos.detach().mean(), "energy_neg": e_neg.detach().mean()}
        return LossOutput(loss=loss, stats=stats, x_neg=x_neg)

    def extra_repr(self) -> str:
        return f"m={self.m}, w={self.w}"
