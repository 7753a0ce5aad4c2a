"""Training losses of discrete flow models on the mixture path.

``velocity_regression_loss`` (samplingEBMs report): the model's output IS the velocity, and it
is regressed onto the conditional velocity, with the (1 - kappa) factor that keeps the target
bounded:

    L = mean_b w_b sum_{d, j != x_t^d} ((1 - kappa(t_b)) (u_theta(j | x_t)_bd - u_t(j | x_t, x1)_bd))^2.

Since u_t(.|x_t, x1) is linear in delta(x1), the minimiser over u_theta at each (t, x_t) is the
posterior mean of the conditional velocity: the marginal velocity u_t(j | x_t).

``posterior_loss`` (discrete flow matching, Gat et al. 2024): cross-entropy of predicted
logits of x1; the velocity is formed at sampling time as kappa'/(1 - kappa) (softmax - delta_x_t).

For the mask source only masked coordinates enter either sum: an unmasked token equals x1 and
its velocity row is zero by construction (the solver never moves it).
Weights w_b default to 1 (data); importance weights should be self-normalised to mean 1.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from .path import MixturePath

__all__ = ["velocity_regression_loss", "posterior_loss"]


def _check(name: str, out: Tensor, x_t: Tensor, x1: Tensor, t: Tensor, path: MixturePath,
           weights: Tensor | None) -> None:
    b, d = x1.shape
    if x_t.shape != x1.shape:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)} but x1 has {tuple(x1.shape)}; they must match")
    if out.shape != (b, d, path.num_classes):
        raise ValueError(
            f"{name} has shape {tuple(out.shape)}; expected (B, D, S) = ({b}, {d}, {path.num_classes})"
        )
    if t.shape != (b,):
        raise ValueError(f"t must have shape (B,)=({b},), got {tuple(t.shape)}")
    if weights is not None and weights.shape != (b,):
        raise ValueError(f"weights must have shape (B,)=({b},), got {tuple(weights.shape)}")


def _weighted_mean(per_sample: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return per_sample.mean()
    return (weights.detach().to(per_sample.dtype) * per_sample).mean()


def velocity_regression_loss(
    velocity: Tensor,
    x_t: Tensor,
    x1: Tensor,
    t: Tensor,
    path: MixturePath,
    weights: Tensor | None = None,
) -> Tensor:
    """Velocity regression L = mean_b w_b sum_{d, j != x_t^d} ((1 - kappa)(u_theta - u_t))^2.

    Args:
        velocity: model output u_theta(j | x_t), float ``(B, D, S)``.
        x_t: noisy tokens, long ``(B, D)`` (may hold MASK). x1: data tokens, long ``(B, D)``.
        t: times, float ``(B,)`` in [0, 1).
        path: the ``MixturePath`` x_t was drawn from.
        weights: per-sample weights w ``(B,)`` (default 1); detached.
    Returns: 0-d loss.
    """
    _check("velocity", velocity, x_t, x1, t, path, weights)
    one_minus_kappa = 1.0 - path.schedule.kappa(t)[:, None, None]
    # the target (1 - kappa) u_t = kappa' (delta(j = x1) - delta(j = x_t)) of
    # ``scaled_conditional_velocity``, on the rows and entries the loss sums over
    d_kappa = path.schedule.d_kappa(t)[:, None, None]
    if path.mask_token is not None:
        # mask source: only MASK rows count, and there delta(j = x_t) = 0 and every j is
        # off-diagonal, so target = kappa' delta(j = x1) and the mask is the row's
        target = d_kappa * path.one_hot_data(x1)
        mask = path.active(x_t)[..., None]
    else:
        delta_t = path.one_hot_data(x_t)
        target = d_kappa * (path.one_hot_data(x1) - delta_t)
        mask = delta_t == 0
    resid = one_minus_kappa * velocity - target
    per_sample = (resid.square() * mask).sum(dim=(1, 2))
    return _weighted_mean(per_sample, weights)


def posterior_loss(
    logits: Tensor,
    x_t: Tensor,
    x1: Tensor,
    t: Tensor,
    path: MixturePath,
    weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy L = mean_b w_b sum_d -log softmax(logits_bd)[x1^d] (masked coordinates only
    for the mask source).

    Args: logits ``(B, D, S)``; x_t, x1 long ``(B, D)``; t ``(B,)``; weights ``(B,)`` or None.
    """
    _check("logits", logits, x_t, x1, t, path, weights)
    nll = F.cross_entropy(logits.transpose(1, 2), x1, reduction="none")  # (B, D)
    per_sample = (nll * path.active(x_t)).sum(-1)
    return _weighted_mean(per_sample, weights)
