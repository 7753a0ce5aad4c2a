"""Callbacks: hooks the Trainer calls during ``fit``.

Subclass ``Callback`` and override any of ``on_fit_start``, ``on_step``, ``on_eval`` and
``on_end``. A callback stops training with ``trainer.request_stop(reason)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Callback", "EvalCallback", "PlotCallback", "StopOnNonFinite", "LambdaCallback"]


class Callback:
    """Base class of Trainer callbacks; every hook does nothing by default.

    * ``on_fit_start(trainer)``: once, after resume and before the first step.
    * ``on_step(trainer, step, stats)``: after every optimiser step; ``step`` counts completed
      steps (1-based) and ``stats`` maps names to 0-d tensors (convert with ``float`` only
      when needed: it synchronises with the device).
    * ``on_eval(trainer, step, metrics)``: after an evaluation, with float metrics.
    * ``on_end(trainer)``: once, when ``fit`` returns (normally or by a stop request).
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once when ``fit`` starts (after resume), before the first step."""

    def on_step(self, trainer: Trainer, step: int, stats: dict[str, Tensor]) -> None:
        """Called after every optimiser step with that step's 0-d tensor stats (do not ``.item()`` them every step)."""

    def on_eval(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """Called with the float metrics of a periodic evaluation."""

    def on_end(self, trainer: Trainer) -> None:
        """Called once when ``fit`` ends (also after an early stop)."""


class LambdaCallback(Callback):
    """A callback from plain functions: ``LambdaCallback(on_step=lambda t, step, stats: ...)``."""

    def __init__(self, on_fit_start=None, on_step=None, on_eval=None, on_end=None):
        self._fns = {"on_fit_start": on_fit_start, "on_step": on_step, "on_eval": on_eval,
                     "on_end": on_end}

    def on_fit_start(self, trainer):
        if self._fns["on_fit_start"]:
            self._fns["on_fit_start"](trainer)

    def on_step(self, trainer, step, stats):
        if self._fns["on_step"]:
            self._fns["on_step"](trainer, step, stats)

    def on_eval(self, trainer, step, metrics):
        if self._fns["on_eval"]:
            self._fns["on_eval"](trainer, step, metrics)

    def on_end(self, trainer):
        if self._fns["on_end"]:
            self._fns["on_end"](trainer)


class EvalCallback(Callback):
    """Periodic evaluation: every ``every`` steps (and at the end) call
    ``evaluate(trainer) -> dict[str, float]``; the Trainer logs the result under ``eval/``
    and passes it to every callback's ``on_eval``.

    ``evaluate`` typically samples from the (EMA) energy and compares with held-out data using
    ``ebmflow.metrics``, e.g.::

        def evaluate(trainer):
            x = trainer.sampler.sample(trainer.eval_energy, 1000)
            return {"mmd": float(mmd(x, held_out))}

    Args:
        evaluate: the evaluation function.
        every: period in steps (default 1000); ``None`` evaluates only at the end.
        at_end: also evaluate after the last step (default True).
    """

    def __init__(self, evaluate: Callable[[Trainer], dict[str, float]], every: int | None = 1000,
                 at_end: bool = True):
        if every is not None and int(every) < 1:
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        self.evaluate = evaluate
        self.every = every
        self.at_end = at_end
        self.last_step = -1
        self.last: dict[str, float] = {}

    def _run(self, trainer: Trainer, step: int) -> None:
        if step == self.last_step:
            return
        self.last_step = step
        self.last = {k: float(v) for k, v in self.evaluate(trainer).items()}
        trainer.report_eval(step, self.last)

    def on_step(self, trainer, step, stats):
        if self.every is not None and step % self.every == 0:
            self._run(trainer, step)

    def on_end(self, trainer):
        if self.at_end and trainer.is_main:
            self._run(trainer, trainer.step)


class PlotCallback(Callback):
    """Every ``every`` steps (and at the end) save a figure of samples and energy contours of a
    2-D model: ``<out_dir>/samples_<step>.png`` and ``energy_<step>.png`` (``name_format``
    changes the names). Needs matplotlib (the ``plot`` extra).

    The energy must be 2-D continuous, or binary Gray-coded 2-D points (``gray_bits``: bits
    per coordinate of ``ebmflow.data.gray_encode``); those are decoded to the plane before
    plotting. The settings are checked when ``fit`` starts, not at the first figure.

    Args:
        out_dir: folder of the figures.
        sample_fn: ``trainer -> Tensor (N, 2)`` (or Gray-coded bits) of model samples
            (default: the Trainer's sampler on ``trainer.eval_energy``, 2,000 states).
        every: period in steps (default None: only at the end).
        data: optional reference points ``(N, 2)`` drawn beside the samples.
        gray_bits: bits per coordinate of a Gray-coded binary energy (e.g. 16 for the
            32-bit code of ``ebmflow train --encoding gray``); None for continuous energies.
    """

    def __init__(self, out_dir: str | Path, sample_fn: Callable[[Trainer], Tensor] | None = None,
                 every: int | None = None, data: Tensor | None = None,
                 name_format: str = "{kind}_{step}.png", gray_bits: int | None = None):
        if every is not None and int(every) < 1:
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        self.out_dir = Path(out_dir)
        self.sample_fn = sample_fn
        self.every = every
        self.data = data
        self.name_format = name_format
        self.gray_bits = gray_bits

    def on_fit_start(self, trainer):
        from ..spaces import Binary, Continuous

        if self.sample_fn is None and trainer.sampler is None:
            raise ValueError(
                "PlotCallback draws its samples with the Trainer's sampler, but the Trainer has "
                "none (the loss draws its own negatives); pass sample_fn=lambda trainer: "
                "MALA(n_steps=300).sample(trainer.eval_energy, 2000), or a sampler to the Trainer"
            )
        space = trainer.energy.space
        if self.gray_bits is not None:
            if not isinstance(space, Binary) or space.dim != 2 * int(self.gray_bits):
                raise ValueError(
                    f"gray_bits={self.gray_bits} means Gray-coded 2-D points, i.e. "
                    f"Binary({2 * int(self.gray_bits)}), but the energy's space is {space!r}"
                )
        elif not (isinstance(space, Continuous) and space.dim == 2):
            hint = (f"; for Gray-coded 2-D points pass gray_bits={space.dim // 2}"
                    if isinstance(space, Binary) and space.dim % 2 == 0 else "")
            raise ValueError(f"PlotCallback plots 2-D models, but the energy's space is {space!r}{hint}")

    def _plot(self, trainer: Trainer, step: int) -> None:
        from .evaluation import GrayDecodedEnergy
        from .plots import plot_energy, plot_samples

        if self.sample_fn is not None:
            x = self.sample_fn(trainer)
        else:
            x = trainer.sampler.sample(trainer.eval_energy, 2000)  # type: ignore[union-attr]
        energy = trainer.eval_energy
        if self.gray_bits is not None:
            from ..data import gray_decode

            x = gray_decode(x.detach().cpu(), int(self.gray_bits))
            energy = GrayDecodedEnergy(energy, int(self.gray_bits))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        plot_samples(x, self.out_dir / self.name_format.format(kind="samples", step=step),
                     data=self.data)
        plot_energy(energy, self.out_dir / self.name_format.format(kind="energy", step=step),
                    data=self.data if self.data is not None else x)

    def on_step(self, trainer, step, stats):
        if self.every is not None and step % self.every == 0 and trainer.is_main:
            self._plot(trainer, step)

    def on_end(self, trainer):
        if trainer.is_main:
            self._plot(trainer, trainer.step)


class StopOnNonFinite(Callback):
    """Stop when a logged quantity is NaN or inf (checked every ``every`` steps; reading the
    values synchronises with the device). The Trainer already raises on a non-finite loss;
    this callback watches any stat, e.g. ``keys=("energy_pos", "grad_norm")``, and stops
    gracefully instead of raising."""

    def __init__(self, keys: tuple[str, ...] | None = None, every: int = 1):
        self.keys = keys
        self.every = max(int(every), 1)

    def on_step(self, trainer, step, stats):
        if step % self.every:
            return
        for k, v in stats.items():
            if (self.keys is None or k in self.keys) and v.numel() == 1 and not bool(v.isfinite()):
                trainer.request_stop(f"{k} became {float(v)} at step {step}")
                return
