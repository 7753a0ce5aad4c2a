"""Input checks shared by the metrics (each reads tensor values once, at the public entry)."""

from __future__ import annotations

from torch import Tensor


def check_samples(x: Tensor, name: str, min_rows: int = 1) -> Tensor:
    """A batch ``(n, ...)`` with n >= ``min_rows`` and finite values (float) ; returns it."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (n, ...), got a 0-d tensor")
    if x.shape[0] < min_rows:
        raise ValueError(
            f"{name} has {x.shape[0]} samples (shape {tuple(x.shape)}); need at least {min_rows}"
        )
    if x.is_floating_point() and not bool(x.isfinite().all()):
        raise ValueError(f"{name} contains NaN or inf; remove or fix those samples first")
    return x


def check_same_event(x: Tensor, y: Tensor, xname: str, yname: str) -> None:
    if tuple(x.shape[1:]) != tuple(y.shape[1:]):
        raise ValueError(
            f"{xname} and {yname} must have the same event shape: {xname} is {tuple(x.shape)}, "
            f"{yname} is {tuple(y.shape)} (batch dimension first)"
        )
    if x.device != y.device:
        raise ValueError(f"{xname} is on {x.device} but {yname} is on {y.device}; move one")


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
