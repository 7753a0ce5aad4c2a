"""Where training records go: JSON lines (always), TensorBoard (when installed), a progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = ["JSONLLogger", "TensorBoardLogger", "ProgressBar", "to_json_number"]


def to_json_number(value: float) -> float | str:
    """JSON has no NaN/inf: write them as the strings "nan", "inf", "-inf"."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class JSONLLogger:
    """Appends one JSON object per record to ``path`` (``{"step": ..., "loss": ..., ...}``).

    The file is opened in append mode so a resumed run continues the same log; each line is
    flushed as it is written.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: to_json_number(v) if isinstance(v, float) else v for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class TensorBoardLogger:
    """Writes scalars with ``torch.utils.tensorboard`` (needs the ``tensorboard`` package).

    ``TensorBoardLogger.available()`` tells whether it can be used; the Trainer adds one
    automatically when it is.
    """

    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except Exception:  # noqa: BLE001 - any import problem means "not available"
            return False
        return True

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


_BAR_KEYS = (("loss", "loss"), ("accept_rate", "acc"), ("ess", "ess"), ("it_per_s", "it/s"))


class ProgressBar:
    """A tqdm bar over training steps showing loss, acceptance, ESS and steps per second."""

    def __init__(self, total: int, initial: int = 0, disable: bool = False):
        self._bar = tqdm(total=total, initial=initial, disable=disable, desc="train",
                         dynamic_ncols=True, leave=True)

    def advance(self, n: int) -> None:
        self._bar.update(n)

    def show(self, record: dict[str, Any]) -> None:
        shown = {}
        for key, label in _BAR_KEYS:
            for full in (key, f"sampler/{key}"):
                if isinstance(record.get(full), float):
                    shown[label] = f"{record[full]:.4g}"
                    break
        self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._bar.close()
