"""Self-normalised importance weights and their effective sample size.

For x_b ~ q and a target p ∝ exp(-E / T):

    log w_b = -E(x_b) / T - log q(x_b),   w_b <- B softmax(log w)_b   (mean 1, detached),
    ESS = (sum w)^2 / sum w^2 = 1 / sum_b softmax(log w)_b^2     (between 1 and B).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LowESSWarning", "importance_weights", "effective_sample_size"]


class LowESSWarning(UserWarning):
    """The effective sample size of the importance weights collapsed below the threshold."""


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """ESS = (sum w)^2 / sum w^2 from unnormalised log-weights ``(B,)``; 0-d tensor."""
    return torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0))


@torch.no_grad()
def importance_weights(energy_values: Tensor, log_q: Tensor, temperature: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Self-normalised weights w ``(B,)`` (mean 1) and stats for p ∝ exp(-E/T), x ~ q.

    Returns ``(w, stats)`` with stats ``ess`` (in samples), ``ess_fraction`` (ESS / B),
    ``weight_max`` (largest w / B, the share of the heaviest sample) and ``log_weight_std``.
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
    ess = 1.0 / normalised.pow(2).sum()
    finite = torch.isfinite(log_w)
    lw = torch.where(finite, log_w, torch.zeros_like(log_w))
    n_fin = finite.sum().clamp_min(1)
    mean = lw.sum() / n_fin
    std = (((lw - mean) * finite).pow(2).sum() / n_fin).sqrt()
    stats = {"ess": ess, "ess_fraction": ess / b, "weight_max": normalised.max(), "log_weight_std": std}
    return normalised * b, stats
