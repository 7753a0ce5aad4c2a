"""A Trainer's checkpoint: what it saves, how it writes it safely, and how a run resumes.

The checkpoint (``CHECKPOINT_FORMAT`` 1) holds the energy, optimiser, scheduler, EMA,
sampler and loss state, the RNG states of every rank, the step, the data order's seed, the
run's settings and the constructor arguments (so a resumed run can tell which arguments
changed). ``Trainer.state_dict`` / ``save_checkpoint`` / ``load_checkpoint`` call these.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from .checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_module_state,
    module_state,
    rng_state,
    set_rng_state,
)
from .monitor import TrainingDiverged
from .resume import apply_changed_arguments

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["CHECKPOINT_FORMAT", "trainer_state_dict", "save_trainer", "restore_trainer"]

CHECKPOINT_FORMAT = 1


def trainer_state_dict(trainer: Trainer) -> dict[str, Any]:
    """Everything a resumed run needs (gathers every rank's RNG state when data parallel)."""
    rng: Any = rng_state([trainer.device])
    if trainer.dist.enabled:
        import torch.distributed as tdist

        states: list[Any] = [None] * trainer.dist.world_size
        tdist.all_gather_object(states, rng)
        rng = {"ranks": states}
    return {
        "format": CHECKPOINT_FORMAT,
        "ebmflow_version": __version__,
        "step": trainer.step,
        "data_seed": trainer.data_seed,
        "world_size": trainer.dist.world_size,
        "energy": trainer.energy.state_dict(),
        "energy_class": type(trainer.energy).__name__,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "sampler": module_state(trainer.sampler) if trainer.sampler is not None else None,
        "loss": module_state(trainer.loss),
        "rng": rng,
        "config": trainer.config,
        "constructed": trainer._built,
    }


def save_trainer(trainer: Trainer, path: str | Path | None = None) -> Path | None:
    """Write ``trainer``'s checkpoint atomically to ``path`` (default: its
    ``checkpoint_path``), on rank 0; the other ranks wait. Refuses (``TrainingDiverged``)
    when a monitored statistic or a parameter is non-finite."""
    path = Path(path) if path is not None else trainer.checkpoint_path
    if path is None:
        raise ValueError("no checkpoint path: pass path=... or build the Trainer with out_dir")
    trainer._check_finite()
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in trainer.params]).all()
    if not bool(finite):
        raise TrainingDiverged(
            f"the energy's parameters are NaN/inf at step {trainer.step}; not writing a "
            f"checkpoint (the last good one is {trainer.last_checkpoint})"
        )
    state = trainer_state_dict(trainer)
    if trainer.is_main:
        atomic_save(state, path)
    if trainer.dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
    trainer.last_checkpoint = path
    return path


def restore_trainer(trainer: Trainer, path: str | Path) -> None:
    """Load a checkpoint written by ``save_trainer`` into ``trainer`` (see
    ``Trainer.load_checkpoint``)."""
    ckpt = load_checkpoint(path, map_location=trainer.device)
    if ckpt.get("format") != CHECKPOINT_FORMAT or "energy" not in ckpt:
        raise CheckpointError(f"{path} is not an ebmflow Trainer checkpoint")
    try:
        trainer.energy.load_state_dict(ckpt["energy"])
    except RuntimeError as err:
        raise CheckpointError(
            f"the checkpoint's energy ({ckpt.get('energy_class')}) does not match "
            f"{type(trainer.energy).__name__}: {str(err).splitlines()[0]}"
        ) from err
    before = trainer._scalar_state()
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    if trainer.scheduler is not None and ckpt.get("scheduler") is not None:
        trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if trainer.ema is not None and ckpt.get("ema") is not None:
        trainer.ema.load_state_dict(ckpt["ema"])
    if trainer.sampler is not None and ckpt.get("sampler") is not None:
        load_module_state(trainer.sampler, ckpt["sampler"], "sampler", trainer.device)
    if ckpt.get("loss") is not None:
        load_module_state(trainer.loss, ckpt["loss"], "loss", trainer.device)
    saved_built = ckpt.get("constructed")
    for what, module in trainer._resumable().items():
        if module is not None and ckpt.get(what) is not None:
            apply_changed_arguments(
                module, what, trainer._built.get(what, {}),
                saved_built.get(what, {}) if isinstance(saved_built, dict) else None,
                before.get(what, {}))
    rng = ckpt["rng"]
    if "ranks" in rng:
        ranks = rng["ranks"]
        rng = ranks[trainer.dist.rank] if trainer.dist.rank < len(ranks) else ranks[0]
    set_rng_state(rng)
    trainer.step = int(ckpt["step"])
    trainer.step_stats.step_t.fill_(trainer.step)
    trainer.data_seed = ckpt.get("data_seed")
    trainer.last_checkpoint = Path(path)
