"""How many CPU threads a training run uses: the Trainer's ``threads`` option.

Energy-based models on CPU are mostly small ops (an MLP on a batch of 2-D points, one MCMC
step). PyTorch splits each op over all its intra-op threads and the threads wait for each
other at the end of every op; when other processes keep the cores busy, a waiting thread is
descheduled and every op waits for it. On a 2-core machine with two busy processes, a CD
step with 10 Langevin steps ran at 9.6 it/s with torch's default of 2 threads and 163 it/s
with 1 thread (docs/training.md). On an idle machine, 2 threads were 1.3-1.5x faster than 1.

``choose_threads`` (``threads="auto"``) therefore:

* keeps the setting when the device is not the CPU, or when the user chose one: the
  environment sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, or ``torch.set_num_threads``
  changed the count since ebmflow was imported (an explicit setting is never changed);
* otherwise uses at most the cores that the 1-minute load average leaves free (at least 1),
  and at most ``SMALL_MODEL_MAX_THREADS`` for small energies (fewer than
  ``SMALL_MODEL_PARAMS`` parameters), whose ops are too small to split well.

The choice and its reason are returned as a ``ThreadChoice`` (the Trainer logs it).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "ThreadChoice",
    "choose_threads",
    "free_cores",
    "user_set_threads",
    "warn_if_oversubscribed",
    "SMALL_MODEL_PARAMS",
    "SMALL_MODEL_MAX_THREADS",
]

SMALL_MODEL_PARAMS = 1_000_000
SMALL_MODEL_MAX_THREADS = 4
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_THREADS_AT_IMPORT = torch.get_num_threads()
_warned = False


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count for a run: ``threads`` (None = leave torch's setting),
    ``changed`` (whether it differs from the current setting) and ``reason`` (one line)."""

    threads: int | None
    changed: bool
    reason: str


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def free_cores() -> tuple[int, float | None]:
    r"""(cores this process may use that the 1-minute load average leaves free ($\ge 1$), that
    load average or None where the platform has none)."""
    cores = _cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores, None
    return max(1, min(cores, int(cores - load + 0.5))), load


def user_set_threads() -> str | None:
    """Why the thread count counts as the user's choice, or None when it is torch's default."""
    for var in _ENV_VARS:
        if os.environ.get(var):
            return f"{var}={os.environ[var]} is set"
    if torch.get_num_threads() != _THREADS_AT_IMPORT:
        return "torch.set_num_threads was called"
    return None


def choose_threads(threads: int | str | None, device: torch.device, n_params: int) -> ThreadChoice:
    """Resolve the Trainer's ``threads`` option.

    Args:
        threads: "auto", a positive int (used as given) or None (leave torch's setting).
        device: the training device; only CPU runs are affected.
        n_params: number of trainable parameters of the energy (what "small" is measured on).
    """
    current = torch.get_num_threads()
    if threads is None:
        return ThreadChoice(None, False, f"threads=None: keeping torch's setting ({current})")
    if isinstance(threads, bool) or not (isinstance(threads, int) or threads == "auto"):
        raise ValueError(
            f"threads must be 'auto', a positive int or None, got {threads!r}; e.g. threads=1 "
            "for small models on a shared machine"
        )
    if isinstance(threads, int):
        if threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads}; e.g. threads=1")
        return ThreadChoice(threads, threads != current, f"threads={threads} (as given)")
    if device.type != "cpu":
        return ThreadChoice(None, False, f"threads='auto': {device.type} run, keeping torch's setting ({current})")
    why = user_set_threads()
    if why is not None:
        return ThreadChoice(None, False, f"threads='auto': keeping {current} ({why})")
    free, load = free_cores()
    n = min(current, free)
    parts = [f"{_cores()} cores"]
    if load is not None:
        parts.append(f"1-min load {load:.1f}")
    if n_params < SMALL_MODEL_PARAMS:
        n = min(n, SMALL_MODEL_MAX_THREADS)
        parts.append(f"small energy ({n_params:,} parameters)")
    n = max(n, 1)
    return ThreadChoice(n, n != current, f"threads='auto' chose {n} ({', '.join(parts)}; torch default {current})")


def warn_if_oversubscribed(n_params: int, device: torch.device) -> bool:
    """Warn once per process when a small CPU model runs multi-threaded on a machine whose
    cores are busy (the slow case above). Returns whether it warned."""
    global _warned
    threads = torch.get_num_threads()
    if _warned or device.type != "cpu" or threads <= 1 or n_params >= SMALL_MODEL_PARAMS:
        return False
    free, load = free_cores()
    if threads <= free or load is None:  # no load average on this platform: nothing to say
        return False
    _warned = True
    warnings.warn(
        f"a small energy ({n_params:,} parameters) trains with {threads} CPU threads while the "
        f"1-minute load average is {load:.1f} on {_cores()} cores: small ops run far slower "
        "multi-threaded on busy cores (up to 10x); use Trainer(threads='auto') or 1, or "
        "torch.set_num_threads(1)",
        RuntimeWarning, stacklevel=3,
    )
    return True
