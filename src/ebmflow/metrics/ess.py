"""Effective sample size of importance weights (the one implementation in ebmflow: the
discrete-flow weights and AIS call it)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["effective_sample_size"]


def effective_sample_size(
    log_weights: Tensor, normalized: bool = False, check: bool = True
) -> Tensor:
    r"""Kish effective sample size of weights $w_i = e^{l_i}$, $l$ = ``log_weights``:

    $$\mathrm{ESS} = \frac{(\sum_i w_i)^2}{\sum_i w_i^2}
    = \exp\big(2 \operatorname{logsumexp}(l) - \operatorname{logsumexp}(2 l)\big),$$

    computed from the log-weights, so it is invariant to a constant shift of $l$ and never
    overflows. $1 \le \mathrm{ESS} \le n$; ``normalized=True`` returns $\mathrm{ESS} / n$
    in $(0, 1]$.

    Args:
        log_weights: ``(n,)`` unnormalised log-weights, n >= 1; -inf (zero weight) allowed,
            but not all of them; NaN and +inf are errors.
        normalized: divide by n.
        check: validate the values (reads them: a host sync). Pass False inside a training
            step; shape checks are always done.

    Returns:
        0-d tensor (same dtype as ``log_weights``).
    """
    if not isinstance(log_weights, Tensor) or log_weights.dim() != 1:
        got = (
            tuple(log_weights.shape)
            if isinstance(log_weights, Tensor)
            else type(log_weights).__name__
        )
        raise ValueError(f"log_weights must be a 1-d tensor (n,), got {got}")
    if log_weights.numel() == 0:
        raise ValueError("log_weights is empty; pass n >= 1 log-weights")
    if not log_weights.is_floating_point():
        raise ValueError(f"log_weights must be float, got {log_weights.dtype}")
    if check and bool(torch.isnan(log_weights).any() | (log_weights == float("inf")).any()):
        raise ValueError("log_weights contains NaN or +inf; check the energies/proposal")
    if check and bool((log_weights == float("-inf")).all()):
        raise ValueError("all log_weights are -inf (every weight is 0); the ESS is undefined")
    ess = torch.exp(2.0 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2.0 * log_weights, 0))
    return ess / log_weights.numel() if normalized else ess
