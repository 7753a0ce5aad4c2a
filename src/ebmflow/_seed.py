"""``seed_everything``: one call that makes a script repeatable."""

from __future__ import annotations

import os
import random

import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> int:
    """Seed Python's ``random``, NumPy's global generator (when installed) and torch's CPU
    and CUDA generators with ``seed``; returns it.

    Call it first in a script, before building the energy: ``Trainer(seed=...)`` seeds only
    when ``fit`` starts, so the energy's random initialisation and anything drawn before
    ``fit`` are not covered by it. Also sets ``PYTHONHASHSEED`` for child processes.
    Bit-for-bit repeatability additionally needs the same thread count and, on GPU,
    ``torch.use_deterministic_algorithms(True)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import numpy as np

        np.random.seed(seed)  # noqa: NPY002 - seeding the global generator is the point
    except ImportError:
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed
