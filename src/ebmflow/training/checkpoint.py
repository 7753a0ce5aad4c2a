"""Checkpoints: atomic writes, RNG states and the plain-attribute state of samplers and losses.

A checkpoint is a dict saved with ``torch.save``; it holds only tensors, numbers, strings,
lists and dicts, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "atomic_save",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "module_state",
    "load_module_state",
    "CheckpointError",
]

_SIMPLE = (bool, int, float, str)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Save ``obj`` with ``torch.save`` to ``path`` atomically.

    The object is written to a temporary file in the same folder, flushed to disk, then
    renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows), so a crash never
    leaves a half-written checkpoint: readers see the old file or the new one.
    Temporary files left by a process killed mid-write are removed by the next successful
    save to the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # a process killed mid-write (SIGKILL, power loss) leaves its temporary file behind;
    # once a newer write has succeeded such leftovers are stale partial files
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``atomic_save`` (tensors mapped to ``map_location``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the cause
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{str(path)!r} is not an ebmflow checkpoint (got {type(ckpt).__name__})")
    return ckpt


def rng_state(devices: list[torch.device] | None = None) -> dict[str, Any]:
    """States of torch's CPU generator and of the CUDA generators of ``devices``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    cuda = sorted({d.index or 0 for d in devices or [] if d.type == "cuda"})
    if cuda:
        state["cuda"] = {str(i): torch.cuda.get_rng_state(i) for i in cuda}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by ``rng_state``."""
    torch.set_rng_state(state["torch"].cpu())
    for idx, s in state.get("cuda", {}).items():
        if torch.cuda.is_available() and int(idx) < torch.cuda.device_count():
            torch.cuda.set_rng_state(s.cpu(), int(idx))


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """Public attributes that ``state_dict`` misses: numbers, strings and tensors."""
    skip = {"training"}
    out: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name in skip:
            continue
        if isinstance(value, Tensor):
            out[name] = value.detach().clone()
        elif isinstance(value, _SIMPLE) or value is None:
            out[name] = value
        elif isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()
        ):
            out[name] = {k: v.detach().clone() for k, v in value.items()}
    return out


def module_state(module: nn.Module) -> dict[str, Any]:
    """Everything needed to restore a sampler or loss: ``state_dict`` plus, for the module
    and each submodule, its plain attributes (step sizes kept as floats, adaptation counters,
    tensors held outside buffers such as a replay buffer's states)."""
    attrs = {name or ".": _plain_attributes(m) for name, m in module.named_modules()}
    return {"state_dict": module.state_dict(), "attributes": attrs}


def load_module_state(
    module: nn.Module, state: dict[str, Any], what: str, device: torch.device | None = None
) -> None:
    """Inverse of ``module_state``; ``what`` names the module in error messages. Saved tensors
    go to the device of the attribute they replace, else to ``device``."""
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"the checkpoint's {what} does not match this {what} ({type(module).__name__}): "
            f"{str(err).splitlines()[0]}; build it with the same settings as the saved run"
        ) from err
    mods = dict(module.named_modules())
    for name, attrs in state.get("attributes", {}).items():
        target = mods.get("" if name == "." else name)
        if target is None:
            continue
        for key, value in attrs.items():
            current = getattr(target, key, None)
            if isinstance(value, Tensor):
                value = value.to(current.device if isinstance(current, Tensor) else device or value.device)
            elif isinstance(value, dict):
                cur = current if isinstance(current, dict) else {}
                value = {
                    k: v.to(cur[k].device if isinstance(cur.get(k), Tensor) else device or v.device)
                    for k, v in value.items()
                }
            setattr(target, key, value)
