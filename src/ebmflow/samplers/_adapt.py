r"""Argument checks and warm-up step-size adaptation shared by the continuous samplers.

Robbins-Monro on the log step size, driven by the batch-mean acceptance probability
$a_t = \operatorname{mean}_b \min(1, e^{\log \alpha_b})$ of step $t$:

$$\log \eta_{t+1} = \log \eta_t + \gamma_t (a_t - \text{target}), \qquad
\gamma_t = \text{rate} \cdot (t + 1)^{-0.6}$$

during the first ``n_warmup`` steps of the sampler's life (counted across runs), then off.
One global step size is adapted for all chains (chains are exchangeable, and a global value
survives runs with a different number of chains). The adapted value is stored back in the
sampler's ``step_size`` at the end of each run that adapted (one host read per such run).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_positive", "check_probability", "check_count", "rm_update", "accept_prob"]

RM_EXPONENT = 0.6


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """``value`` as a float; ValueError unless finite and > 0 (or >= 0 with ``allow_zero``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def check_probability(name: str, value: float) -> float:
    v = check_positive(name, value)
    if not v < 1:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return v


def check_count(name: str, value: int, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def accept_prob(log_alpha: Tensor) -> Tensor:
    r"""$\min(1, e^{\log \alpha})$ with NaN mapped to 0 ``(B,)``."""
    return torch.nan_to_num(log_alpha.clamp(max=0.0).exp(), nan=0.0)


def rm_update(extra: dict[str, Tensor], prob: Tensor, target: float, n_warmup: int,
              rate: float) -> dict[str, Tensor]:
    """One Robbins-Monro step on ``extra["log_step_size"]`` while ``extra["adapt_t"] < n_warmup``.

    Branch-free (a 0/1 mask instead of ``if``), so it can be recorded in a CUDA graph.
    """
    if "adapt_t" not in extra:
        return extra
    t = extra["adapt_t"]
    active = (t < n_warmup).to(t.dtype)
    gain = rate * (t + 1).pow(-RM_EXPONENT)
    log_eta = extra["log_step_size"] + active * gain * (prob.mean() - target)
    return {**extra, "log_step_size": log_eta, "adapt_t": t + active}


def initial_extra(step_size: float, adapted: int, n_warmup: int, x: Tensor) -> dict[str, Tensor]:
    """Chain extras at the start of a run: the log step size (0-d) and, while warm-up steps
    remain, the adaptation counter ``adapt_t`` (0-d)."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    extra = {"log_step_size": torch.full((), math.log(step_size), dtype=dtype, device=x.device)}
    if adapted < n_warmup:
        extra["adapt_t"] = torch.full((), float(adapted), dtype=dtype, device=x.device)
    return extra


def finish_adaptation(extra: dict[str, Tensor]) -> tuple[float, int] | None:
    """(new step size, adaptation steps done) when this run adapted, else None (no host read)."""
    if "adapt_t" not in extra:
        return None
    return float(extra["log_step_size"].exp()), int(extra["adapt_t"])
