"""ebmflow: composable PyTorch components for training energy-based models.

Subpackages: ``spaces``, ``energy``, ``samplers``, ``losses``, ``discrete_flows``, ``flows``,
``training``, ``data``, ``metrics``. They are imported lazily on first attribute access, so
``import ebmflow`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_SUBMODULES = (
    "spaces", "energy", "samplers", "losses", "discrete_flows", "flows", "training", "data",
    "metrics",
)

__all__ = ["__version__", "seed_everything", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name == "seed_everything":  # lazily, like the subpackages (it imports torch)
        from ._seed import seed_everything

        return seed_everything
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ebmflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
