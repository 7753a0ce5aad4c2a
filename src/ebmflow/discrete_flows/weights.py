r"""Self-normalised importance weights and their effective sample size.

For $x_b \sim q$ and a target $p \propto e^{-E / T}$:

$$\log w_b = -E(x_b) / T - \log q(x_b), \qquad w_b \leftarrow B\, \operatorname{softmax}(\log w)_b
\quad (\text{mean } 1, \text{ detached}),$$

$$\mathrm{ESS} = \frac{(\sum_b w_b)^2}{\sum_b w_b^2} \in [1, B]$$

(``ebmflow.metrics.effective_sample_size``, the one implementation of the ESS).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..metrics.ess import effective_sample_size as _ess

__all__ = ["LowESSWarning", "importance_weights", "effective_sample_size"]


class LowESSWarning(UserWarning):
    """The effective sample size of the importance weights collapsed below the threshold."""


def effective_sample_size(log_weights: Tensor) -> Tensor:
    r"""Deprecated: use ``ebmflow.metrics.effective_sample_size(log_weights, check=False)``.

    $\mathrm{ESS} = (\sum w)^2 / \sum w^2$ from unnormalised log-weights ``(B,)``; 0-d tensor.
    """
    warnings.warn(
        "ebmflow.discrete_flows.effective_sample_size is deprecated and will be removed in the "
        "next release; use ebmflow.metrics.effective_sample_size(log_weights, check=False)",
        DeprecationWarning,
        stacklevel=2,
    )
    return _ess(log_weights, check=False)


@torch.no_grad()
def importance_weights(energy_values: Tensor, log_q: Tensor, temperature: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Self-normalised weights $w$ ``(B,)`` (mean 1) and stats for $p \propto e^{-E/T}$,
    $x \sim q$.

    Returns ``(w, stats)`` with stats ``ess`` (in samples), ``ess_fraction`` (ESS / B),
    ``weight_max`` (largest $w / B$, the share of the heaviest sample) and ``log_weight_std``.
    Non-finite inputs are not checked here (see ``DiscreteFlowSampler.update``); shapes and
    the temperature are (no host synchronisation).
    """
    if energy_values.dim() != 1 or log_q.shape != energy_values.shape or energy_values.numel() == 0:
        raise ValueError(
            f"energy_values and log_q must both have shape (B,) with B >= 1, got "
            f"energy_values {tuple(energy_values.shape)} and log_q {tuple(log_q.shape)}"
        )
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    log_w = -energy_values.detach().float() / temperature - log_q.detach().float()
    b = log_w.shape[0]
    normalised = torch.softmax(log_w, dim=0)
    ess = _ess(log_w, check=False)
    finite = torch.isfinite(log_w)
    lw = torch.where(finite, log_w, torch.zeros_like(log_w))
    n_fin = finite.sum().clamp_min(1)
    mean = lw.sum() / n_fin
    std = (((lw - mean) * finite).pow(2).sum() / n_fin).sqrt()
    stats = {"ess": ess, "ess_fraction": ess / b, "weight_max": normalised.max(), "log_weight_std": std}
    return normalised * b, stats
