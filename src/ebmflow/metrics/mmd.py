"""Unbiased maximum mean discrepancy between two samples."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_positive_int, check_same_event, check_samples

__all__ = ["mmd", "median_bandwidth", "KERNELS"]

KERNELS = ("rbf", "exp_hamming")


@torch.no_grad()
def mmd(
    x: Tensor,
    y: Tensor,
    kernel: str = "rbf",
    bandwidth: float | None = None,
    hamming_scale: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 2048,
) -> Tensor:
    """Unbiased estimate of the squared MMD between the laws of ``x`` and ``y``.

    MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y), estimated without the diagonal terms:

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (n (n - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                  - 2 sum_{i, j} k(x_i, y_j) / (n m).

    The estimate is unbiased, so it fluctuates around 0 (and can be negative) when both
    samples come from one distribution.

    Kernels:

    * ``"rbf"``: k(a, b) = exp(-|a - b|^2 / (2 h^2)), h = ``bandwidth`` or, if None, the median
      heuristic (``median_bandwidth``: median pairwise distance of up to 1,000 pooled points).
    * ``"exp_hamming"``: k(a, b) = exp(-``hamming_scale`` * H(a, b)), H the number of differing
      coordinates (default scale 0.1: the discrete energy-discrepancy / EB-GFN metric). For
      binary float states in {0, 1} or categorical long states in [0, K).

    Args:
        x: ``(n, ...)`` samples (all non-batch dims are the event), n >= 2.
        y: ``(m, ...)`` samples with the same event shape, m >= 2.
        kernel: "rbf" or "exp_hamming".
        bandwidth: RBF length scale h > 0; None = median heuristic.
        hamming_scale: the 0.1 of the exponential-Hamming kernel.
        num_classes: K for categorical (long) states; default max value + 1.
        chunk_size: side of the square kernel blocks; memory is O(chunk_size^2).

    Returns:
        0-d float tensor (float32 for discrete input, else the input's dtype).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    x = check_samples(x, "x", min_rows=2)
    y = check_samples(y, "y", min_rows=2)
    check_same_event(x, y, "x", "y")
    check_positive_int(chunk_size, "chunk_size")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if kernel == "rbf":
        if not (x.is_floating_point() and y.is_floating_point()):
            raise ValueError(
                "the rbf kernel needs float samples; use .float() or kernel='exp_hamming'"
            )
        h = median_bandwidth(x, y) if bandwidth is None else _check_bandwidth(bandwidth)
        gamma = 1.0 / (2.0 * h * h)

        def block(a: Tensor, b: Tensor) -> Tensor:
            d2 = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1) - 2.0 * a @ b.T
            return torch.exp(-gamma * d2.clamp_min(0.0))

    else:
        if not hamming_scale >= 0:
            raise ValueError(f"hamming_scale must be >= 0, got {hamming_scale!r}")
        dim = x.shape[1]
        x, y = _agreement_features(x, y, num_classes)

        def block(a: Tensor, b: Tensor) -> Tensor:
            return torch.exp(-hamming_scale * (dim - a @ b.T))

    n, m = x.shape[0], y.shape[0]
    sxx = _kernel_sum(block, x, x, chunk_size, exclude_diagonal=True)
    syy = _kernel_sum(block, y, y, chunk_size, exclude_diagonal=True)
    sxy = _kernel_sum(block, x, y, chunk_size, exclude_diagonal=False)
    value = sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m)
    return value.to(x.dtype)


@torch.no_grad()
def median_bandwidth(x: Tensor, y: Tensor, max_points: int = 1000) -> float:
    """Median heuristic h = median_{i < j} |z_i - z_j| over up to ``max_points`` pooled points
    (the first half from ``x``, the rest from ``y``; deterministic)."""
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    nx = min(x.shape[0], max_points // 2)
    z = torch.cat([x[:nx], y[: max_points - nx]]).double()
    d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    h = float(d[iu[0], iu[1]].median())
    if not h > 0:
        raise ValueError(
            "median pairwise distance is 0 (samples are mostly identical); pass bandwidth="
        )
    return h


def _check_bandwidth(bandwidth: float) -> float:
    h = float(bandwidth)
    if not (h > 0 and h != float("inf")):
        raise ValueError(f"bandwidth must be a positive finite float or None, got {bandwidth!r}")
    return h


def _agreement_features(x: Tensor, y: Tensor, num_classes: int | None) -> tuple[Tensor, Tensor]:
    """One-hot features phi with phi(a) . phi(b) = number of equal coordinates."""
    if x.is_floating_point() != y.is_floating_point():
        raise ValueError(
            f"x and y must both be binary float or both long, got {x.dtype}, {y.dtype}"
        )
    if x.is_floating_point():
        for t, name in ((x, "x"), (y, "y")):
            if bool(((t != 0) & (t != 1)).any()):
                raise ValueError(
                    f"{name} must hold binary states in {{0, 1}} for kernel='exp_hamming' "
                    f"(or long class indices); binarise it first"
                )
        return torch.cat([x, 1.0 - x], -1), torch.cat([y, 1.0 - y], -1)
    k = num_classes if num_classes is not None else int(torch.maximum(x.max(), y.max())) + 1
    if bool((x < 0).any() | (y < 0).any() | (x >= k).any() | (y >= k).any()):
        raise ValueError(f"class indices must lie in [0, {k}) (num_classes={num_classes})")
    one_hot = torch.nn.functional.one_hot
    return one_hot(x, k).flatten(1).float(), one_hot(y, k).flatten(1).float()


def _kernel_sum(block, a: Tensor, b: Tensor, chunk: int, exclude_diagonal: bool) -> Tensor:
    """sum_{i, j} k(a_i, b_j) in (chunk x chunk) blocks; without i == j if ``exclude_diagonal``
    (then a is b, and diagonal entries only occur in blocks on the block diagonal)."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for r in range(0, a.shape[0], chunk):
        for c in range(0, b.shape[0], chunk):
            k = block(a[r : r + chunk], b[c : c + chunk])
            if exclude_diagonal and r == c:
                k = k - torch.diag_embed(torch.diagonal(k))
            total = total + k.sum(dtype=torch.float64)
    return total
