"""The Trainer: one loop for every loss with every sampler.

Per step: ``sampler.update(energy, batch)`` (learned samplers adapt), ``loss(energy, batch,
sampler)``, backward, gradient all-reduce (data parallel), clipping, optimiser step, learning
rate schedule, EMA. Statistics stay on the device as 0-d tensors and are read only every
``log_every`` steps, so a step adds no host synchronisation (and can be captured as one CUDA
graph in fast mode).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..energy.base import EnergyModel
from ..losses.base import EBMLoss, LossOutput
from ..samplers.base import Sampler
from .batches import BatchStream, first_tensor
from .callbacks import Callback
from .distributed import (
    DistInfo,
    all_reduce_gradients,
    all_reduce_mean,
    average_module,
    broadcast_module,
    setup_distributed,
)
from .ema import EMA
from .loggers import JSONLLogger, ProgressBar, TensorBoardLogger
from .monitor import StepStats, TrainingDiverged
from .resume import scalar_attributes
from .run_folder import check_run_folder
from .setup import build_optimizer, build_scheduler, resolve_device
from .state import restore_trainer, save_trainer, trainer_state_dict
from .threads import ThreadChoice, choose_threads, warn_if_oversubscribed

__all__ = ["Trainer", "TrainingDiverged"]

_log = logging.getLogger("ebmflow.training")


def keep_tensor_lr(optimizer: torch.optim.Optimizer, tensors: list[Tensor | None]) -> None:
    """After an LR scheduler step: write each group's new learning rate into the tensor the
    group started with, and put that tensor back.

    A scheduler assigns ``group["lr"] = <float>``; a CUDA graph recorded with a tensor learning
    rate keeps reading the old tensor, so without this the schedule would silently stop at
    capture time.
    """
    for group, t in zip(optimizer.param_groups, tensors):
        lr = group["lr"]
        if t is None or lr is t:
            continue
        t.fill_(float(lr))
        group["lr"] = t


def _scalar(v: Tensor) -> Tensor:
    """``v`` (one element) as a detached 0-d tensor (no op when it already is one)."""
    v = v.detach()
    return v if v.dim() == 0 else v.reshape(())


class Trainer:
    """Train an energy with any loss and any sampler whose states fit the energy's space.

    Example::

        trainer = Trainer(MLPEnergy(Continuous(2)), EnergyDiscrepancy(GaussianPerturbation(1.0)),
                          sampler=MALA(), lr=1e-3, ema=0.999, out_dir="runs/ed")
        trainer.fit(data, steps=10_000, batch_size=128)

    Args:
        energy: the ``EnergyModel`` to train.
        loss: an ``EBMLoss``; losses with ``requires_sampler`` need ``sampler``.
        sampler: a ``Sampler`` (negatives for contrastive divergence, or a learned sampler
            that adapts in ``update``); optional for losses that draw their own negatives.
        optimizer: a ``torch.optim.Optimizer`` over the energy's parameters, or a function
            ``params -> optimizer``; default Adam(lr), with PyTorch's fused kernel when the
            parameters allow it (CPU/CUDA floating point).
        lr: learning rate of the default optimiser (default 1e-3).
        scheduler: None, "cosine" (cosine decay to 0 over the ``steps`` of ``fit``), an
            ``LRScheduler`` or a function ``optimizer -> LRScheduler``; stepped once per step.
        ema: None (default: no averaging), an EMA decay (e.g. 0.999) or an ``EMA``;
            ``trainer.eval_energy`` is then the averaged energy.
        grad_clip: clip the global gradient norm to this value (logged as ``grad_norm``).
        device: "cpu", "cuda", ... ; energy, sampler, loss buffers and batches are moved there
            once. Default: where the energy's parameters are.
        amp: run the loss under ``torch.autocast`` with bfloat16.
        compile: run the loss through ``torch.compile``.
        fast: on CUDA, capture the whole step as one CUDA graph after ``warmup_steps`` eager
            steps (falls back to eager with a warning when the step cannot be captured; eager
            on CPU).
        callbacks: ``Callback`` objects (evaluation, plots, early stopping).
        out_dir: folder of ``log.jsonl``, TensorBoard files and ``checkpoint.pt``. A folder
            holding an earlier run (its checkpoint or log) is refused unless ``fit`` is called
            with ``resume=True`` or the Trainer with ``overwrite=True``.
        overwrite: start over in an ``out_dir`` that holds an earlier run (its log, TensorBoard
            files and checkpoint are removed when ``fit`` starts). Default False.
        log_every: steps between log records (and progress bar updates); default 100.
        checkpoint_every: steps between checkpoints (default: only at the end of ``fit``);
            needs ``out_dir`` or ``checkpoint_path``.
        checkpoint_path: default ``out_dir / "checkpoint.pt"``.
        progress: show a tqdm bar (default True); ``quiet=True`` turns off the bar and prints.
        seed: seeds torch's generators (plus the rank under data parallelism) when ``fit``
            starts, and the data order; None keeps the current RNG state. It does not cover
            what happened before ``fit``, such as the energy's random initialisation: call
            ``ebmflow.seed_everything(seed)`` before building the energy for a fully
            repeatable script.
        threads: CPU threads during ``fit``: "auto" (default), an int, or None (leave torch's
            setting). "auto" keeps a setting you made (``torch.set_num_threads``,
            ``OMP_NUM_THREADS``) and otherwise uses the cores the load average leaves free, at
            most 4 for energies under 1M parameters, because small ops run far slower
            multi-threaded on busy cores (see ``ebmflow.training.threads``). The choice is
            printed with the progress bar, logged to ``log.jsonl`` and kept in
            ``trainer.thread_choice``; the previous setting is restored when ``fit`` returns.
        distributed: "auto" (join a ``torchrun`` process group when WORLD_SIZE > 1), True, False.
        tensorboard: "auto" (when installed and ``out_dir`` is set), True, False.
        on_nonfinite: "raise" (default) raises ``TrainingDiverged``; "stop" ends ``fit``
            with a warning. Either way no checkpoint of a diverged model is written.
        check_every: steps between non-finite checks (default 1 on CPU, ``log_every`` on GPU,
            where a check synchronises with the device).
        config: a JSON-able dict stored in checkpoints (the CLI keeps its settings there).
    """

    def __init__(
        self,
        energy: EnergyModel,
        loss: EBMLoss,
        sampler: Sampler | None = None,
        optimizer: torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        *,
        lr: float = 1e-3,
        scheduler: Any = None,
        ema: float | EMA | None = None,
        grad_clip: float | None = None,
        device: str | torch.device | None = None,
        amp: bool = False,
        compile: bool = False,
        fast: bool = False,
        warmup_steps: int = 3,
        callbacks: Sequence[Callback] = (),
        out_dir: str | Path | None = None,
        log_every: int = 100,
        checkpoint_every: int | None = None,
        checkpoint_path: str | Path | None = None,
        progress: bool = True,
        quiet: bool = False,
        seed: int | None = None,
        distributed: str | bool = "auto",
        tensorboard: str | bool = "auto",
        on_nonfinite: str = "raise",
        check_every: int | None = None,
        config: dict[str, Any] | None = None,
        threads: int | str | None = "auto",
        overwrite: bool = False,
    ):
        if not isinstance(energy, EnergyModel):
            raise ValueError(f"energy must be an ebmflow EnergyModel, got {type(energy).__name__}")
        if not isinstance(loss, EBMLoss):
            raise ValueError(
                f"loss must be an ebmflow EBMLoss (e.g. EnergyDiscrepancy, ContrastiveDivergence), "
                f"got {type(loss).__name__}"
            )
        if sampler is not None and not isinstance(sampler, Sampler):
            raise ValueError(f"sampler must be an ebmflow Sampler or None, got {type(sampler).__name__}")
        if loss.requires_sampler and sampler is None:
            raise ValueError(
                f"{type(loss).__name__} draws its negatives from a sampler; pass sampler=... "
                "(e.g. Langevin() for continuous data, GibbsWithGradients() for binary data)"
            )
        if sampler is not None and not sampler.supports(energy):
            raise ValueError(
                f"{type(sampler).__name__} cannot draw states of {energy.space!r} (the energy's "
                "space); pick a sampler for this space"
            )
        if on_nonfinite not in ("raise", "stop"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'stop', got {on_nonfinite!r}")
        if int(log_every) < 1:
            raise ValueError(f"log_every must be a positive int, got {log_every!r}")
        if checkpoint_every is not None and int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")

        if device is None:  # the energy's own device decides the backend (NCCL on CUDA)
            ref = energy.reference_tensor()
            hint = ref.device if ref is not None else None
        else:
            hint = torch.device(device)
        self.dist: DistInfo = setup_distributed(distributed, hint)
        self.device = resolve_device(energy, device, self.dist)
        self.energy = energy.to(self.device)
        self.loss = loss.to(self.device)
        self.sampler = sampler.to(self.device) if sampler is not None else None
        if self.dist.enabled:
            broadcast_module(self.energy)
            if self.sampler is not None:  # learned weights agree; chains (buffers) stay per rank
                broadcast_module(self.sampler, buffers=False)
                world = self.dist.world_size
                self.sampler.grad_sync = lambda params: all_reduce_gradients(params, world)

        self.params = [p for p in self.energy.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{type(energy).__name__} has no trainable parameters")
        self.fast = bool(fast) and self.device.type == "cuda"
        self.lr = float(lr)
        self.optimizer = build_optimizer(optimizer, self.params, self.lr, self.fast, self.device)
        # tensor learning rates as built (a captured graph reads these very tensors)
        self._lr_tensors: list[Tensor | None] = [
            g["lr"] if isinstance(g["lr"], Tensor) else None for g in self.optimizer.param_groups]
        self._scheduler_spec = scheduler
        self.scheduler: Any = None
        if isinstance(ema, EMA):
            self.ema: EMA | None = ema.to(self.device)
        elif ema is not None:
            self.ema = EMA(self.energy, decay=float(ema)).to(self.device)
        else:
            self.ema = None
        self.grad_clip = float(grad_clip) if grad_clip is not None else None
        self.amp = bool(amp)
        self.compile = bool(compile)
        self.warmup_steps = max(int(warmup_steps), 1)
        self.callbacks = list(callbacks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log_every = int(log_every)
        self.checkpoint_every = int(checkpoint_every) if checkpoint_every is not None else None
        if checkpoint_path is not None:
            self.checkpoint_path: Path | None = Path(checkpoint_path)
        elif self.out_dir is not None:
            self.checkpoint_path = self.out_dir / "checkpoint.pt"
        else:
            self.checkpoint_path = None
        if self.checkpoint_every is not None and self.checkpoint_path is None:
            raise ValueError("checkpoint_every needs out_dir or checkpoint_path")
        self.quiet = bool(quiet)
        self.progress = bool(progress) and not self.quiet
        self.seed = seed
        self.tensorboard = tensorboard
        self.on_nonfinite = on_nonfinite
        self.check_every = int(check_every) if check_every else (
            1 if self.device.type == "cpu" else self.log_every
        )
        self.config = dict(config or {})
        self.overwrite = bool(overwrite)
        self.threads = threads
        self.thread_choice: ThreadChoice = choose_threads(
            threads, self.device, sum(p.numel() for p in self.params))
        # constructor arguments of the sampler, loss and EMA, to tell on resume what changed
        self._built = self._scalar_state()

        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.data_seed: int | None = None
        self.last_checkpoint: Path | None = None
        self._stop_reason: str | None = None
        self._seeded = False
        self.step_stats = StepStats(self.device)  # running sums and divergence monitoring
        self._captured: Any = None
        self._last_vec: Tensor | None = None
        self._capture_failed = False
        self._loss_fn: Callable[[Tensor], LossOutput] = self._compute_loss
        if self.compile:
            # static shapes: a short last batch compiles once more instead of turning every
            # shape symbolic (random draws of a symbolic shape fail to trace)
            self._loss_fn = torch.compile(self._compute_loss, dynamic=False)
        self._loggers: list[Any] = []
        self._threads_unlogged = False

    # -- construction helpers ------------------------------------------------------------
    def _resumable(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "loss": self.loss, "ema": self.ema}

    def _scalar_state(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {k: scalar_attributes(m) for k, m in self._resumable().items() if m is not None}

    # -- properties ----------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints (rank 0)."""
        return self.dist.is_main

    @property
    def eval_energy(self) -> EnergyModel:
        """The energy to evaluate and sample: the EMA average when there is one."""
        return self.ema.module if self.ema is not None else self.energy  # type: ignore[return-value]

    def request_stop(self, reason: str) -> None:
        """Ask ``fit`` to end after the current step (callbacks use this)."""
        self._stop_reason = reason

    # -- one step ------------------------------------------------------------------------
    def _compute_loss(self, batch: Tensor) -> LossOutput:
        return self.loss(self.energy, batch, self.sampler)

    def _autocast(self) -> Any:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _step_math(self, batch: Tensor) -> dict[str, Tensor]:
        """One training step without host synchronisation; returns 0-d stats tensors."""
        stats: dict[str, Tensor] = {}
        if self.sampler is not None:
            upd = self.sampler.update(self.energy, batch) or {}
            if self.dist.enabled and not self.sampler.syncs_gradients:
                # a learned sampler that does not average its gradients: keep the ranks'
                # copies identical by averaging the parameters after its separate steps
                average_module(self.sampler, self.dist.world_size)
            stats.update({f"sampler/{k}": v for k, v in upd.items() if isinstance(v, Tensor)})
        with self._autocast():
            out = self._loss_fn(batch)
        if not isinstance(out, LossOutput):
            raise TypeError(f"{type(self.loss).__name__} must return a LossOutput, got {type(out).__name__}")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.dist.enabled:
            all_reduce_gradients(self.params, self.dist.world_size)
        if self.grad_clip is not None:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        stats["loss"] = out.loss.detach()
        for k, v in out.stats.items():
            if isinstance(v, Tensor) and v.numel() == 1:
                stats[k] = _scalar(v)
        if self.sampler is not None:
            for k, v in self.sampler.stats.items():
                if isinstance(v, Tensor) and v.numel() == 1 and k not in stats:
                    stats[f"sampler/{k}"] = _scalar(v)
        return stats

    def _pack(self, stats: dict[str, Tensor], exact: bool = True) -> Tensor:
        return self.step_stats.pack(stats, exact, on_new_layout=self._check_finite)

    def _eager_step(self, batch: Tensor) -> None:
        self._last_vec = self._pack(self._step_math(batch), exact=self.device.type != "cpu")

    def train_step(self, batch: Tensor) -> None:
        """Run one step on ``batch`` (already on the device) and advance ``self.step``."""
        if self.fast and not self._capture_failed:
            self._fast_step(batch)
        else:
            self._eager_step(batch)
        self.step_stats.count += 1
        if self.scheduler is not None:
            self.scheduler.step()
            if self.fast:
                keep_tensor_lr(self.optimizer, self._lr_tensors)
        if self.ema is not None:
            self.ema.update(self.energy)
        self.step += 1

    def _fast_step(self, batch: Tensor) -> None:
        if self._captured is not None:
            self._captured(batch)
            return
        if self.step < self.warmup_steps:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._eager_step(batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        from .graph import capture_step

        try:
            layout = self.step_stats.layout
            self._captured = capture_step(
                lambda b: self._pack(self._step_math(b)), batch,
                lambda: self.optimizer.zero_grad(set_to_none=True),
            )
            if self.step_stats.layout != layout:
                raise RuntimeError("the step's statistics changed between steps")
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager
            self._capture_failed = True
            self._captured = None
            torch.cuda.synchronize(self.device)
            warnings.warn(
                f"fast mode: the training step could not be captured as a CUDA graph "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "continuing with eager steps",
                RuntimeWarning, stacklevel=3,
            )
            self._eager_step(batch)
            return
        self._captured(batch)

    # -- checks, logging, checkpoints ----------------------------------------------------
    def _check_finite(self) -> None:
        reduce_min = None
        if self.dist.enabled:
            import torch.distributed as tdist

            def reduce_min(t: Tensor) -> Tensor:
                tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
                return t

        found = self.step_stats.first_divergence(reduce_min)
        if found is None:
            return
        key, step = found
        kept = (f"; the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint is not None else "; no checkpoint was written")
        raise TrainingDiverged(
            f"training diverged: {key} became NaN/inf at step {step}{kept}. Lower the "
            "learning rate, clip gradients (grad_clip=...), or regularise the energy")

    def _log(self, elapsed: float, steps_done: int) -> dict[str, Any]:
        self._check_finite()
        means = self.step_stats.take_means()
        if self.dist.enabled:
            means = all_reduce_mean(means, self.dist.world_size)
        values = means.tolist()
        record: dict[str, Any] = {"step": self.step}
        record.update(dict(zip(self.step_stats.layout or [], values)))
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        record["it_per_s"] = steps_done / elapsed if elapsed > 0 else float("nan")
        record["threads"] = torch.get_num_threads()
        if self._threads_unlogged:  # the first record of each fit says why
            record["threads_reason"] = self.thread_choice.reason
            self._threads_unlogged = False
        if self.is_main:
            self.history.append(record)
            for logger in self._loggers:
                logger.log(record)
        return record

    def report_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Log evaluation metrics (called by ``EvalCallback``) and notify every callback."""
        record = {"step": step, **{f"eval/{k}": float(v) for k, v in metrics.items()}}
        if self.is_main:
            self.history.append(record)
            for logger in self._loggers:
                logger.log(record)
        for cb in self.callbacks:
            cb.on_eval(self, step, metrics)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (see ``save_checkpoint``)."""
        return trainer_state_dict(self)

    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Write a checkpoint atomically (rank 0 only; other ranks wait). Refuses to write
        when the loss or the parameters are non-finite, so a checkpoint is never corrupt."""
        return save_trainer(self, path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by ``save_checkpoint`` (energy, optimiser, scheduler,
        EMA, sampler and loss state, RNG states, step and data order).

        Sampler, loss and EMA attributes (``n_steps``, ``step_size``, ``reinit_prob``, ...)
        take the checkpoint's values, except those whose constructor argument differs from
        the saved run's: the new argument wins, with a warning naming each one, its old and
        its new value (``ebmflow.training.resume``)."""
        restore_trainer(self, path)

    # -- the loop ------------------------------------------------------------------------
    def _prepare_data(self, data: Any, batch_size: int | None) -> BatchStream:
        if isinstance(data, Tensor):
            self.energy.space.validate(data, "data")
            data = data.to(self.device)
        elif not isinstance(data, (Dataset, DataLoader)):
            raise ValueError(
                f"data must be a Tensor, a torch Dataset or a DataLoader, got {type(data).__name__}"
            )
        if self.data_seed is None:
            if self.seed is not None:
                self.data_seed = int(self.seed)
            else:
                self.data_seed = int(torch.randint(0, 2**31 - 1, (1,)))
                if self.dist.enabled:
                    t = torch.tensor([self.data_seed], device=self.device)
                    broadcast_t = t.clone()
                    import torch.distributed as tdist

                    tdist.broadcast(broadcast_t, 0)
                    self.data_seed = int(broadcast_t)
        return BatchStream(data, batch_size, seed=self.data_seed, rank=self.dist.rank,
                           world_size=self.dist.world_size)

    def _open_loggers(self) -> None:
        self._loggers = []
        if not self.is_main or self.out_dir is None:
            return
        self._loggers.append(JSONLLogger(self.out_dir / "log.jsonl"))
        want_tb = self.tensorboard is True or (self.tensorboard == "auto" and TensorBoardLogger.available())
        if want_tb:
            self._loggers.append(TensorBoardLogger(self.out_dir / "tensorboard"))

    def _close_loggers(self) -> None:
        for logger in self._loggers:
            logger.close()
        self._loggers = []

    def fit(
        self,
        data: Tensor | Dataset | DataLoader,
        steps: int,
        *,
        batch_size: int | None = 128,
        resume: str | Path | bool | None = None,
    ) -> dict[str, Any]:
        """Train until ``self.step == steps``.

        Args:
            data: states ``(N, *event)`` of the energy's space, a Dataset of them (or of
                ``(x, y)`` pairs), or a DataLoader.
            steps: total number of optimiser steps (a resumed run continues to this number).
            batch_size: per-process batch size for tensor/Dataset data (default 128).
            resume: a checkpoint path, or True for ``checkpoint_path`` when it exists.
                Without it, an ``out_dir`` holding an earlier run raises ``RunExistsError``
                (unless the Trainer was built with ``overwrite=True``, or this Trainer wrote
                or loaded that run itself, as in a second ``fit`` call).

        Returns the last log record (floats). Raises ``TrainingDiverged`` when a monitored
        quantity becomes NaN/inf (``on_nonfinite="raise"``).
        """
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        if not self._seeded:  # once per Trainer: a second fit() continues the same streams
            self._seeded = True
            if self.seed is not None:
                torch.manual_seed(self.seed + self.dist.rank)
            elif self.dist.enabled:
                torch.manual_seed(torch.initial_seed() + self.dist.rank)
        if self.scheduler is None:  # built once; a later fit() continues its schedule
            self.scheduler = build_scheduler(self._scheduler_spec, self.optimizer, steps)
        if resume is True:
            resume = self.checkpoint_path if self.checkpoint_path is not None and self.checkpoint_path.exists() else None
        own_run = self.last_checkpoint is not None or self.step > 0
        if self.is_main:
            check_run_folder(self.out_dir, self.checkpoint_path, resuming=bool(resume) or own_run,
                             overwrite=self.overwrite)
        if resume:
            self.load_checkpoint(resume)
        stream = self._prepare_data(data, batch_size)
        previous_threads = torch.get_num_threads()
        self._apply_threads()
        try:
            return self._fit(stream, steps)
        finally:
            if torch.get_num_threads() != previous_threads:
                torch.set_num_threads(previous_threads)

    def _apply_threads(self) -> None:
        choice = self.thread_choice
        if choice.threads is not None and choice.changed:
            torch.set_num_threads(choice.threads)
        _log.info("%s", choice.reason)
        if self.progress and self.is_main and self.step == 0:
            print(f"ebmflow: CPU {choice.reason}" if self.device.type == "cpu" else
                  f"ebmflow: {choice.reason}")
        if choice.threads is None:
            warn_if_oversubscribed(sum(p.numel() for p in self.params), self.device)

    def _fit(self, stream: BatchStream, steps: int) -> dict[str, Any]:
        self._open_loggers()
        self._threads_unlogged = True
        bar = ProgressBar(total=steps, initial=self.step, disable=not (self.progress and self.is_main))
        self._stop_reason = None
        record: dict[str, Any] = {}
        diverged: TrainingDiverged | None = None
        self.energy.train()
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
            batches = stream.batches(self.step)
            t0, since = time.perf_counter(), 0
            while self.step < steps and self._stop_reason is None:
                batch = first_tensor(next(batches))
                if batch.device != self.device:
                    batch = batch.to(self.device, non_blocking=True)
                self.train_step(batch)
                since += 1
                bar.advance(1)
                if self.step % self.check_every == 0:
                    self._check_finite()
                stats = None
                if self.callbacks:
                    stats = dict(zip(self.step_stats.layout or [], (self._last_stats_view())))
                    for cb in self.callbacks:
                        cb.on_step(self, self.step, stats)
                if self.step % self.log_every == 0 or self.step == steps:
                    record = self._log(time.perf_counter() - t0, since)
                    bar.show(record)
                    t0, since = time.perf_counter(), 0
                if self.checkpoint_every is not None and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.step_stats.count:
                record = self._log(time.perf_counter() - t0, max(since, 1))
            if self.checkpoint_path is not None:
                self.save_checkpoint()
            for cb in self.callbacks:
                cb.on_end(self)
        except TrainingDiverged as err:
            diverged = err
        finally:
            bar.close()
            self._close_loggers()
        if diverged is not None:
            if self.on_nonfinite == "raise":
                raise diverged
            warnings.warn(str(diverged), RuntimeWarning, stacklevel=2)
            self._stop_reason = str(diverged)
        elif self._stop_reason is not None and not self.quiet and self.is_main:
            print(f"training stopped at step {self.step}: {self._stop_reason}")
        return record

    def _last_stats_view(self) -> list[Tensor]:
        """Per-key views of the latest step's stats (0-d tensors, no synchronisation)."""
        if self._captured is not None:
            vec = self._captured.outputs
        else:
            vec = self._last_vec
        return list(vec.unbind(0))
