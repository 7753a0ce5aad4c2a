"""Mode weights: how a sample distributes its mass over known modes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_positive_int, check_samples

__all__ = ["mode_weights", "ModeWeights"]


@dataclass(frozen=True)
class ModeWeights:
    """Result of ``mode_weights``.

    Attributes:
        weights: ``(K,)`` fraction of ALL samples whose nearest mode is k (and, with
            ``max_distance``, lies within it); ``weights.sum() + outliers == 1``.
        outliers: 0-d fraction of samples farther than ``max_distance`` from every mode
            (0 without ``max_distance``).
        counts: ``(K,)`` long number of samples assigned to each mode.
        labels: ``(n,)`` long index of the assigned mode, -1 for outliers.
    """

    weights: Tensor
    outliers: Tensor
    counts: Tensor
    labels: Tensor

    @property
    def inlier_weights(self) -> Tensor:
        """``(K,)`` weights among the assigned samples only (sum 1; NaN if all are outliers)."""
        return self.counts.to(self.weights.dtype) / self.counts.sum()


@torch.no_grad()
def mode_weights(
    x: Tensor, means: Tensor, max_distance: float | None = None, chunk_size: int = 65536
) -> ModeWeights:
    """Assign every sample to its nearest mode (Euclidean) and report the fractions.

    label_i = argmin_k |x_i - mu_k|, or -1 when min_k |x_i - mu_k| > ``max_distance``;
    weights_k = #{i : label_i = k} / n.

    Args:
        x: float ``(n, D)`` (or ``(n, ...)``, flattened) samples, n >= 1.
        means: float ``(K, D)`` mode locations (e.g. ``GaussianMixtureEnergy.means``).
        max_distance: samples farther than this from every mode count as outliers
            (e.g. 3 to 4 component standard deviations); None: no outliers.
        chunk_size: samples per distance block (memory O(chunk_size * K)).

    Returns:
        ``ModeWeights(weights, outliers, counts, labels)``.
    """
    x = check_samples(x, "x")
    if not x.is_floating_point():
        raise ValueError(f"x must be float samples, got {x.dtype}")
    x = x.reshape(x.shape[0], -1)
    means = torch.as_tensor(means, dtype=x.dtype, device=x.device)
    if means.dim() != 2 or means.shape[1] != x.shape[1] or means.shape[0] < 1:
        raise ValueError(
            f"means must have shape (K, D) = (K, {x.shape[1]}) to match x {tuple(x.shape)}, "
            f"got {tuple(means.shape)}"
        )
    if not bool(means.isfinite().all()):
        raise ValueError("means contains NaN or inf")
    if max_distance is not None and not float(max_distance) > 0:
        raise ValueError(f"max_distance must be positive or None, got {max_distance!r}")
    check_positive_int(chunk_size, "chunk_size")
    labels = []
    for start in range(0, x.shape[0], chunk_size):
        dist = torch.cdist(x[start : start + chunk_size], means)
        best, idx = dist.min(dim=1)
        if max_distance is not None:
            idx = torch.where(best > max_distance, -1, idx)
        labels.append(idx)
    lab = torch.cat(labels)
    k = means.shape[0]
    counts = torch.bincount(lab[lab >= 0], minlength=k)
    n = x.shape[0]
    weights = counts.to(x.dtype) / n
    outliers = (lab < 0).sum().to(x.dtype) / n
    return ModeWeights(weights, outliers, counts, lab)
