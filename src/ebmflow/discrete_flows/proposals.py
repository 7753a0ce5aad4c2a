r"""Factorised proposals $q(x) = \prod_d q_d(x^d)$ for data-free, importance-weighted training.

A proposal draws token states $x_1 \sim q$ (long ``(n, D)``) and evaluates $\log q(x_1)$
``(n,)``.
Any object with ``sample(n, generator=None) -> (n, D)`` and ``log_prob(x) -> (n,)`` works with
``DiscreteFlowSampler``; ``FactorizedProposal`` covers the uniform, Bernoulli and categorical
cases and can be fitted to the per-coordinate marginals of data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..samplers import rng

__all__ = ["FactorizedProposal"]


class FactorizedProposal(nn.Module):
    r"""Independent categorical coordinates: $q(x) = \prod_d \mathtt{probs}[d, x^d]$.

    Args:
        probs: ``(D, S)`` non-negative rows summing to 1 (a Bernoulli proposal is $S = 2$ with
            columns $(1 - p, p)$). Stored as a buffer (follows ``.to()``).

    Build with ``FactorizedProposal.uniform(D, S)``, ``.bernoulli(p)`` or ``.fit(x, S)``.
    """

    def __init__(self, probs: Tensor):
        super().__init__()
        probs = torch.as_tensor(probs, dtype=torch.float32)
        if probs.dim() != 2 or probs.shape[1] < 2:
            raise ValueError(f"probs must have shape (D, S) with S >= 2, got {tuple(probs.shape)}")
        if bool((probs < 0).any()) or not torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-4):
            raise ValueError("probs must be non-negative with rows summing to 1")
        self.register_buffer("probs", probs / probs.sum(-1, keepdim=True))

    @property
    def dim(self) -> int:
        return self.probs.shape[0]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[1]

    @classmethod
    def uniform(cls, dim: int, num_classes: int = 2) -> FactorizedProposal:
        r"""$q$ uniform on $\{0, \dots, S-1\}^D$ ($\log q = -D \log S$)."""
        return cls(torch.full((dim, num_classes), 1.0 / num_classes))

    @classmethod
    def bernoulli(cls, p: Tensor) -> FactorizedProposal:
        """Binary proposal with $q(x^d = 1) = p[d]$, ``p`` of shape ``(D,)``."""
        p = torch.as_tensor(p, dtype=torch.float32)
        return cls(torch.stack([1.0 - p, p], dim=-1))

    @classmethod
    @torch.no_grad()
    def fit(cls, x: Tensor, num_classes: int, smoothing: float = 1.0) -> FactorizedProposal:
        r"""Fit the marginals of tokens ``x`` (long ``(N, D)``):
        $\mathtt{probs}[d, j] \propto \text{count} + \text{smoothing}$.

        ``smoothing > 0`` keeps every state in the support (finite $\log q$).
        """
        if x.dtype != torch.long or x.dim() != 2:
            raise ValueError(f"x must be long (N, D) tokens, got {x.dtype} {tuple(x.shape)}")
        if not smoothing >= 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        counts = torch.nn.functional.one_hot(x, num_classes).float().sum(0) + smoothing
        return cls(counts / counts.sum(-1, keepdim=True))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """$n$ states, long ``(n, D)``."""
        return rng.categorical_sample(probs=self.probs.expand(n, -1, -1), generator=generator)

    def log_prob(self, x: Tensor) -> Tensor:
        r"""$\log q(x) = \sum_d \log \mathtt{probs}[d, x^d]$, ``(n,)`` ($-\infty$ outside the
        support)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be long (n, {self.dim}) tokens, got shape {tuple(x.shape)}")
        return self.probs.log().gather(-1, x.T).T.sum(-1)
