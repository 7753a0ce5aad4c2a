"""Load a trained energy back from a checkpoint, ready to sample: ``load_energy``."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..energy.base import EnergyModel
from .checkpoint import CheckpointError, load_checkpoint

__all__ = ["load_energy", "energy_state"]

_EMA_PREFIX = "module."


def energy_state(ckpt: dict[str, Any], ema: bool | None = None) -> tuple[dict[str, Any], bool]:
    """The energy's ``state_dict`` in a Trainer checkpoint: the EMA average (stored under
    ``module.``-prefixed keys of the ``ema`` entry) or the raw trained weights.

    ``ema``: True (the average; an error when the run had no EMA), False (raw weights) or
    None (the average when there is one). Returns ``(state_dict, used_ema)``.
    """
    if "energy" not in ckpt:
        raise CheckpointError("not an ebmflow Trainer checkpoint (no 'energy' entry)")
    saved = ckpt.get("ema")
    if ema is False or (ema is None and not saved):
        return ckpt["energy"], False
    if not saved:
        raise CheckpointError(
            "the checkpoint has no EMA weights (the run was trained without ema=...); "
            "pass ema=False for the trained weights"
        )
    state = {k[len(_EMA_PREFIX):]: v for k, v in saved.items() if k.startswith(_EMA_PREFIX)}
    return state, True


def load_energy(path: str | os.PathLike, ema: bool | None = None, energy: EnergyModel | None = None,
                map_location: str | torch.device = "cpu") -> EnergyModel:
    """The trained energy of a checkpoint, in eval mode and ready to sample.

    Example::

        energy = load_energy("runs/8gaussians-ed/checkpoint.pt")          # EMA when saved
        x = MALA(step_size=0.05, n_steps=300).sample(energy, 1000)

    Args:
        path: a ``checkpoint.pt`` written by ``Trainer`` or ``ebmflow train``.
        ema: True for the EMA average (error if the run had none), False for the raw trained
            weights, None (default) for the EMA average when the checkpoint has one.
        energy: an energy to load the weights into, built as in the training script (same
            class and sizes). May be omitted for checkpoints of ``ebmflow train``, which record
            the run's settings; the energy is then rebuilt from them.
        map_location: where the weights go (default "cpu"; the energy is moved there).

    Raises ``CheckpointError`` when the file is not a checkpoint, the energy cannot be
    rebuilt, or the weights do not fit ``energy``.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    state, _ = energy_state(ckpt, ema)
    if energy is None:
        energy = _rebuild(ckpt, str(path))
    elif not isinstance(energy, EnergyModel):
        raise ValueError(f"energy must be an ebmflow EnergyModel or None, got {type(energy).__name__}")
    try:
        energy.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights in {str(path)!r} ({ckpt.get('energy_class')}) do not fit "
            f"{type(energy).__name__}: {str(err).splitlines()[0]}; build the energy with the "
            "same class and sizes as the training run"
        ) from err
    energy.requires_grad_(False)
    return energy.to(map_location).eval()


def _rebuild(ckpt: dict[str, Any], path: str) -> EnergyModel:
    config = ckpt.get("config") or {}
    from .registry import RunConfig, build_energy

    if not config or not set(config) <= set(RunConfig.keys()):
        raise CheckpointError(
            f"{path!r} does not record how to build its energy ({ckpt.get('energy_class')}); "
            "pass energy=... built as in the training script, e.g. "
            "load_energy(path, energy=MLPEnergy(Continuous(2), hidden=(128, 128, 128)))"
        )
    return build_energy(RunConfig.from_dict(config, source=path))
