r"""Trivial baselines that every ``ebmflow train`` run is compared with.

A model that has learned nothing still gets a finite NLL. The number to beat is the NLL of
the simplest model of the same data:

* Gray-coded (binary) data: the uniform law on $\{0, 1\}^D$, $\text{NLL} = D \log 2$;
* 2-D continuous data: one Gaussian fitted to the training data (mean and covariance).

``ebmflow train`` writes ``nll_baseline`` and ``baseline`` to ``metrics.json`` next to
``nll``, and warns when the model does not beat the baseline by ``MARGIN_NATS``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["MARGIN_NATS", "trivial_baseline", "gaussian_fit_nll", "uniform_bits_nll", "baseline_warning"]

MARGIN_NATS = 0.1


def uniform_bits_nll(dim: int) -> float:
    r"""NLL (nats per data point) of the uniform law on $\{0, 1\}^{\text{dim}}$:
    $\text{dim} \cdot \log 2$."""
    return dim * math.log(2.0)


def gaussian_fit_nll(train: Tensor, test: Tensor) -> float:
    """Mean NLL of ``test`` (N, D) under the Gaussian with the mean and covariance of
    ``train`` (maximum-likelihood fit, a 1e-6 ridge keeps it invertible)."""
    train, test = train.double().cpu(), test.double().cpu()
    mean = train.mean(0)
    cov = torch.cov(train.T, correction=0).reshape(train.shape[1], train.shape[1])
    cov = cov + 1e-6 * torch.eye(train.shape[1], dtype=cov.dtype)
    law = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    return float(-law.log_prob(test).mean())


def trivial_baseline(encoding: str, train: Tensor, test: Tensor, train2d: Tensor, test2d: Tensor) -> dict[str, Any]:
    """``{"nll_baseline": float, "baseline": description}`` for a run's data, in the same
    units as its ``nll`` (per data point, in the energy's space)."""
    if encoding == "gray":
        dim = int(test.shape[1])
        return {"nll_baseline": uniform_bits_nll(dim), "baseline": f"uniform law on {dim} bits"}
    return {"nll_baseline": gaussian_fit_nll(train2d, test2d),
            "baseline": "one Gaussian fitted to the training data"}


def baseline_warning(metrics: dict[str, Any], margin: float = MARGIN_NATS) -> str | None:
    """A one-line warning when ``metrics["nll"]`` is not below ``nll_baseline - margin``
    (or is not finite), else None."""
    nll, base = metrics.get("nll"), metrics.get("nll_baseline")
    if not isinstance(nll, float) or not isinstance(base, float):
        return None
    if math.isfinite(nll) and nll < base - margin:
        return None
    return (f"the model's NLL {nll:.3f} does not beat the trivial baseline ({metrics.get('baseline')}, "
            f"NLL {base:.3f}) by {margin} nats: it has learned little beyond it; train longer, "
            "raise the learning rate or check the loss and sampler settings")
