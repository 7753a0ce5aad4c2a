"""Factorised Bernoulli energy: an exact base measure for binary data."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import logsigmoid

from ..spaces import Binary
from .base import EnergyModel

__all__ = ["BernoulliBaseEnergy"]


class BernoulliBaseEnergy(EnergyModel):
    r"""Factorised Bernoulli $p(x) = \prod_i p_i^{x_i} (1 - p_i)^{1 - x_i}$ on $\{0, 1\}^D$.

    $E(x) = -\sum_i \big[x_i \log p_i + (1 - x_i) \log(1 - p_i)\big]$ is normalised
    ($\log Z = 0$), so ``MLPEnergy(...) + BernoulliBaseEnergy.from_data(x)`` is a learned
    correction on top of a base measure that already matches the data's marginals.

    Args:
        logits: ``(D,)`` logits $l_i$ with $p_i = \sigma(l_i)$ (the sigmoid).
        learnable: train the logits (default: fixed buffer).
    """

    def __init__(self, logits: Tensor, learnable: bool = False):
        logits = torch.as_tensor(logits, dtype=torch.get_default_dtype())
        if logits.dim() != 1:
            raise ValueError(f"logits must have shape (D,), got {tuple(logits.shape)}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits must be finite (probabilities in (0, 1)), got NaN/inf")
        super().__init__(Binary(logits.shape[0]))
        if learnable:
            self.logits = nn.Parameter(logits.clone())
        else:
            self.register_buffer("logits", logits.clone())

    @classmethod
    def from_probs(cls, probs: Tensor, learnable: bool = False, eps: float = 1e-3) -> BernoulliBaseEnergy:
        r"""From marginal probabilities $p_i$, clamped to $[\text{eps}, 1 - \text{eps}]$."""
        p = torch.as_tensor(probs, dtype=torch.get_default_dtype()).clamp(eps, 1 - eps)
        return cls(torch.log(p) - torch.log1p(-p), learnable)

    @classmethod
    def from_data(cls, data: Tensor, learnable: bool = False, eps: float = 1e-3) -> BernoulliBaseEnergy:
        r"""Fit the marginals of binary ``data`` ``(N, D)`` (clamped to
        $[\text{eps}, 1 - \text{eps}]$)."""
        Binary(data.shape[-1]).validate(data, "data")
        return cls.from_probs(data.float().mean(0), learnable, eps)

    @property
    def probs(self) -> Tensor:
        return torch.sigmoid(self.logits)

    def energy(self, x: Tensor) -> Tensor:
        return -(x * logsigmoid(self.logits) + (1 - x) * logsigmoid(-self.logits)).sum(-1)

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Exact $\log p(x)$, ``(B,)``."""
        return -self.energy(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples ``(n, D)``."""
        n = self.space.check_n(n)
        u = torch.rand(n, self.space.dim, generator=generator, device=self.logits.device)
        return (u < self.probs).to(self.logits.dtype)
