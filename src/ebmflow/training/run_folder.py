"""The output folder of a Trainer run: refuse to overwrite a finished run by accident.

A folder that already holds a checkpoint or a ``log.jsonl`` belongs to an earlier run. A new
``Trainer.fit`` there would replace that checkpoint and append to that log, so it is refused
unless the call says what it wants: ``fit(..., resume=True)`` continues the run, and
``Trainer(..., overwrite=True)`` starts over (the old ``log.jsonl`` and checkpoint are
removed first). ``ebmflow train`` follows the same rule with ``--resume`` / ``--overwrite``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["RunExistsError", "earlier_run_files", "check_run_folder"]


class RunExistsError(FileExistsError):
    """The output folder holds an earlier run; the message names it and the two ways on."""


def earlier_run_files(out_dir: Path | None, checkpoint_path: Path | None) -> list[Path]:
    """Files of an earlier run that a new run would overwrite or append to."""
    files = [checkpoint_path] if checkpoint_path is not None else []
    if out_dir is not None:
        files.append(out_dir / "log.jsonl")
    return [f for f in files if f.is_file()]


def check_run_folder(out_dir: Path | None, checkpoint_path: Path | None, *, resuming: bool,
                     overwrite: bool) -> list[Path]:
    """Check (and with ``overwrite`` clear) the output of a run about to start.

    Args:
        out_dir: the Trainer's ``out_dir`` (``log.jsonl``, ``tensorboard/``), or None.
        checkpoint_path: where the run will write its checkpoint, or None.
        resuming: the run continues the one in the folder (nothing is checked).
        overwrite: remove the earlier run's log, TensorBoard files and checkpoint.

    Returns the files removed. Raises ``RunExistsError`` when an earlier run is there and
    neither ``resuming`` nor ``overwrite`` is set.
    """
    found = earlier_run_files(out_dir, checkpoint_path)
    if resuming or not found:
        return []
    if not overwrite:
        names = ", ".join(str(f) for f in found)
        raise RunExistsError(
            f"{names} already exist(s) from an earlier run; pass resume=True to fit() to "
            "continue that run, overwrite=True to the Trainer to replace it, or choose another "
            "out_dir"
        )
    for f in found:
        f.unlink()
    if out_dir is not None and (out_dir / "tensorboard").is_dir():
        shutil.rmtree(out_dir / "tensorboard")
        found.append(out_dir / "tensorboard")
    return found
