"""Metrics: sample quality (MMD, mode weights), exact comparisons on small discrete spaces
(TV, KL, log Z by enumeration), importance-weight diagnostics (ESS) and annealed importance
sampling (AIS) estimates of log Z.

Everything except the AIS module depends on torch only; ``ais_log_partition`` (whose path
energy is an ``ebmflow.energy.EnergyModel``; the sampler is any object with ``run``) is
imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from .discrete import (
    empirical_probs,
    enumerate_states,
    exact_log_partition,
    exact_log_partition_binary,
    kl_divergence,
    state_index,
    total_variation,
)
from .ess import effective_sample_size
from .mmd import KERNELS, median_bandwidth, mmd
from .modes import ModeWeights, mode_weights

_LAZY = {
    "ais_log_partition": "ais",
    "annealing_schedule": "ais",
    "GeometricPathEnergy": "ais",
    "TransitionKernel": "ais",
}

__all__ = [
    "mmd",
    "median_bandwidth",
    "KERNELS",
    "mode_weights",
    "ModeWeights",
    "total_variation",
    "kl_divergence",
    "empirical_probs",
    "enumerate_states",
    "state_index",
    "exact_log_partition",
    "exact_log_partition_binary",
    "effective_sample_size",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ebmflow.metrics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
