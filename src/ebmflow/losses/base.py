"""The loss interface shared by every EBM objective, and the one check of a data batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import _capture
from ..energy.base import EnergyModel
from ..samplers.base import Sampler
from ..spaces import Categorical

__all__ = ["EBMLoss", "LossOutput", "CHECK_DATA_MODES"]

CHECK_DATA_MODES = ("auto", "always", "never")


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


def _capturing_or_compiling(x: Tensor) -> bool:
    """True while a CUDA graph is captured or torch.compile traces: no value may be read."""
    if _capture.capturing(x):
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class EBMLoss(nn.Module):
    """Base class of EBM training objectives: ``loss(energy, data, sampler=None) -> LossOutput``.

    ``requires_sampler`` tells the Trainer whether negatives must come from a sampler
    (contrastive divergence) or the loss draws its own (energy discrepancy, score matching).

    Every loss checks its ``data`` argument with ``check_data`` before using it:

    * always (no tensor value is read, so no host synchronisation): ``data`` is a tensor of
      shape ``(B, *event)`` of the energy's space with B >= 1, and its dtype is the space's
      (float for ``Continuous`` and ``Binary``, long for ``Categorical``; bool or integer
      data for a continuous space, float data for a categorical one are errors);
    * the values, with ``energy.space.validate`` (finite for ``Continuous``, in {0, 1} for
      ``Binary``, in [0, K) for ``Categorical``), according to ``check_data``:

      - ``"auto"`` (default): on every call for CPU tensors (reading host memory costs no
        device synchronisation; one pass over the batch), and on the first call only for
        tensors on an accelerator, so a CUDA training step stays free of host
        synchronisations;
      - ``"always"``: on every call (on CUDA this synchronises with the device each step);
      - ``"never"``: shape and dtype only.

      Values are never read while a CUDA graph is captured or ``torch.compile`` traces.

    A failed check raises ``ValueError`` naming ``data``, what was expected and received,
    and the fix.

    Args:
        check_data: ``"auto"``, ``"always"`` or ``"never"`` (see above).
    """

    requires_sampler: bool = False

    def __init__(self, *, check_data: str = "auto"):
        super().__init__()
        if check_data not in CHECK_DATA_MODES:
            raise ValueError(
                f"check_data must be one of {CHECK_DATA_MODES}, got {check_data!r}; "
                "'auto' checks values on CPU every call and on an accelerator once"
            )
        self.check_data_mode = check_data
        self._values_checked_on_device = False

    def forward(self, energy: EnergyModel, data: Tensor, sampler: Sampler | None = None) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def check_data(self, energy: EnergyModel, data: Tensor) -> Tensor:
        """Check a data batch ``(B, *event)`` against ``energy.space``; return it unchanged.

        See the class docstring for what is checked when. Raises ``ValueError``.
        """
        if not isinstance(energy, EnergyModel):
            raise ValueError(
                f"energy must be an ebmflow EnergyModel, got {type(energy).__name__}; subclass "
                "ebmflow.energy.EnergyModel and implement energy()"
            )
        space = energy.space
        shape = tuple(space.shape)
        if not isinstance(data, Tensor):
            raise ValueError(
                f"data must be a torch.Tensor of states of {space!r}, got "
                f"{type(data).__name__}; convert it first, e.g. data = torch.as_tensor(data)"
            )
        if data.dim() != len(shape) + 1 or tuple(data.shape[1:]) != shape:
            raise ValueError(
                f"data has shape {tuple(data.shape)} but the energy's space {space!r} expects "
                f"(B, {', '.join(map(str, shape))}); batch dimension first"
            )
        if data.shape[0] == 0:
            raise ValueError(
                f"data is an empty batch (shape {tuple(data.shape)}); pass B >= 1 states"
            )
        want_long = isinstance(space, Categorical)
        if (data.dtype == torch.long) != want_long or (
            not want_long and not data.is_floating_point()
        ):
            space.validate(data, "data")  # raises its dtype error (reads no values)
            raise ValueError(  # pragma: no cover - validate raised above for every space
                f"data has dtype {data.dtype}, which {space!r} does not accept"
            )
        if self._wants_value_check(data):
            space.validate(data, "data")
            if not data.is_cpu:
                self._values_checked_on_device = True
        return data

    # the name the losses have always called; kept for subclasses written against it
    _check_data = check_data

    def _wants_value_check(self, data: Tensor) -> bool:
        mode = getattr(self, "check_data_mode", "auto")
        if mode == "never" or _capturing_or_compiling(data):
            return False
        if mode == "always" or data.is_cpu:
            return True
        return not getattr(self, "_values_checked_on_device", False)

    def _check_sampler(self, sampler: Sampler | None) -> Sampler:
        if sampler is None:
            raise ValueError(
                f"{type(self).__name__} needs a sampler for its negative samples; pass "
                "sampler=... (e.g. Langevin() or PersistentSampler(...))"
            )
        if not isinstance(sampler, Sampler):
            raise ValueError(f"sampler must be an ebmflow Sampler, got {type(sampler).__name__}")
        return sampler
