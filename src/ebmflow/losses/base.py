"""The loss interface shared by every EBM objective."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..energy.base import EnergyModel
from ..samplers.base import Sampler

__all__ = ["EBMLoss", "LossOutput"]


@dataclass
class LossOutput:
    """What every loss returns.

    Attributes:
        loss: 0-d tensor to minimise (carries gradient into the energy's parameters only).
        stats: named 0-d tensors for logging (``energy_pos``, ``energy_neg``, ``accept_rate``,
            ``ess``...); never converted with ``.item()`` inside a step.
        x_neg: the negative samples used, detached (or None).
    """

    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)
    x_neg: Tensor | None = None


class EBMLoss(nn.Module):
    """Base class of EBM training objectives: ``loss(energy, data, sampler=None) -> LossOutput``.

    ``requires_sampler`` tells the Trainer whether negatives must come from a sampler
    (contrastive divergence) or the loss draws its own (energy discrepancy, score matching).
    """

    requires_sampler: bool = False

    def forward(self, energy: EnergyModel, data: Tensor, sampler: Sampler | None = None) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def _check_data(self, energy: EnergyModel, data: Tensor) -> None:
        """Shape-only check of a data batch ``(B, *event)``, B >= 1 (reads no values)."""
        if not isinstance(energy, EnergyModel):
            raise ValueError(f"energy must be an EnergyModel, got {type(energy).__name__}")
        shape = tuple(energy.space.shape)
        if not isinstance(data, Tensor) or data.dim() != len(shape) + 1 or tuple(data.shape[1:]) != shape:
            got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(
                f"data has shape {got} but the energy's space {energy.space!r} expects "
                f"(B, {', '.join(map(str, shape))}); batch dimension first"
            )
        if data.shape[0] == 0:
            raise ValueError(
                f"data is an empty batch (shape {tuple(data.shape)}); pass B >= 1 states"
            )

    def _check_sampler(self, sampler: Sampler | None) -> Sampler:
        if sampler is None:
            raise ValueError(
                f"{type(self).__name__} needs a sampler for its negative samples; pass "
                "sampler=... (e.g. Langevin() or PersistentSampler(...))"
            )
        if not isinstance(sampler, Sampler):
            raise ValueError(f"sampler must be an ebmflow Sampler, got {type(sampler).__name__}")
        return sampler
