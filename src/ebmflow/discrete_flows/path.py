"""The mixture probability path on {0..S-1}^D and its conditional velocity.

Given data x1 and a source state x0 (all-MASK, or uniform tokens), each coordinate d of x_t is

    x_t^d = x1^d with probability kappa(t),  x0^d otherwise       (independently over d).

The velocity that generates this path conditionally on x1 (Gat et al. 2024) is, for a token j,

    u_t(j | x_t, x1) = kappa'(t) / (1 - kappa(t)) * (delta(j = x1) - delta(j = x_t)),

and the marginal velocity of the path is its posterior mean,
u_t(j | x_t) = sum_x1 u_t(j | x_t, x1) p(x1 | x_t).

Token conventions: data tokens are 0..S-1; the mask source adds the token ``mask_token = S``
(vocabulary of S + 1 input tokens). Velocities are ``(B, D, S)`` over the S data tokens: the
velocity into MASK is always 0. With the mask source a revealed token never changes again, so
rows of unmasked coordinates are structurally zero (``CTMCSolver`` enforces this).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import LinearSchedule, Schedule

__all__ = ["MixturePath", "check_time"]

_SOURCES = ("mask", "uniform")


def check_time(t: Tensor | float, batch: int, device: torch.device, name: str = "t") -> Tensor:
    """Return ``t`` as a float ``(batch,)`` tensor on ``device``; ``ValueError`` outside [0, 1].

    Python floats and CPU tensors are range-checked; on an accelerator only the shape and
    device are (reading the values would synchronise with the device on every call).
    """
    if not isinstance(t, Tensor):
        t = torch.tensor(float(t), device=device)
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the states are on {device}; move it first")
    t = t.float()
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape (B,)=({batch},), got {tuple(t.shape)}")
    if _readable(t) and bool(((t < 0) | (t > 1) | ~torch.isfinite(t)).any()):
        bad = t[(t < 0) | (t > 1) | ~torch.isfinite(t)][0].item()
        raise ValueError(f"{name} must lie in [0, 1], got {bad}; times run from source 0 to data 1")
    return t


def _readable(x: Tensor) -> bool:
    """Whether the values of ``x`` can be read without a host-device synchronisation (CPU
    tensors). Value checks run only then; shapes and dtypes are checked on every device."""
    return x.device.type == "cpu"


class MixturePath:
    """Mixture path between a source p0 and data, per coordinate x_t = x1 w.p. kappa(t) else x0.

    Args:
        num_classes: S, the number of data tokens (2 for binary states).
        source: "mask" (default; p0 = all tokens MASK = S) or "uniform" (p0 uniform on 0..S-1).
        schedule: kappa(t) (default ``LinearSchedule()``, kappa = t).

    Attributes:
        vocab_size: number of input tokens, S + 1 for the mask source, S for uniform.
        mask_token: S for the mask source, None for uniform.
    """

    def __init__(self, num_classes: int, source: str = "mask", schedule: Schedule | None = None):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if source not in _SOURCES:
            raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
        self.num_classes = num_classes
        self.source = source
        self.schedule = schedule if schedule is not None else LinearSchedule()
        if not isinstance(self.schedule, Schedule):
            raise ValueError(
                f"schedule must be a Schedule (LinearSchedule, PolynomialSchedule), got "
                f"{type(self.schedule).__name__}"
            )
        self.mask_token: int | None = num_classes if source == "mask" else None
        self.vocab_size = num_classes + (1 if source == "mask" else 0)

    def __repr__(self) -> str:
        return f"MixturePath(num_classes={self.num_classes}, source={self.source!r}, schedule={self.schedule!r})"

    # -- checks ----------------------------------------------------------------------------
    def check_tokens(self, x: Tensor, name: str = "x", allow_mask: bool = False) -> Tensor:
        """``ValueError`` unless ``x`` is long ``(B, D)`` with tokens in the vocabulary.

        Token values are checked for CPU tensors only (dtype and shape on every device), so
        no call synchronises with an accelerator.
        """
        if not isinstance(x, Tensor) or x.dtype != torch.long or x.dim() != 2:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a long (B, D) tensor of tokens, got {got}")
        high = self.vocab_size if allow_mask else self.num_classes
        if not _readable(x):
            return x  # values on an accelerator are not read (no synchronisation per call)
        bad = (x < 0) | (x >= high)
        if bool(bad.any()):
            val = x[bad][0].item()
            what = f"[0, {high})" + (" (MASK included)" if allow_mask and self.mask_token is not None else "")
            raise ValueError(
                f"{name} has a token {val} outside the vocabulary {what}; "
                f"data tokens are 0..{self.num_classes - 1}"
            )
        return x

    # -- source and path -------------------------------------------------------------------
    def sample_source(
        self,
        n: int,
        dim: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """n source states ``(n, dim)``: all MASK, or uniform tokens."""
        if self.mask_token is not None:
            return torch.full((n, dim), self.mask_token, dtype=torch.long, device=device)
        return torch.randint(0, self.num_classes, (n, dim), generator=generator, device=device)

    def sample(
        self,
        x1: Tensor,
        t: Tensor | float,
        generator: torch.Generator | None = None,
        x0: Tensor | None = None,
        *,
        check: bool = True,
    ) -> Tensor:
        r"""Draw $x_t \sim p_t(\cdot \mid x_1)$: keep $x_1^d$ with probability $\kappa(t)$, else
        the source token.

        Args:
            x1: data tokens, long ``(B, D)``.
            t: time in [0, 1], scalar or ``(B,)``.
            x0: source states ``(B, D)`` (default: drawn from the source).
            check: validate ``x1`` and ``t`` (reads the tokens: a host sync). Pass False in a
                training step with tokens and a float ``(B,)`` time already checked.
        Returns: x_t, long ``(B, D)``.
        """
        if check:
            self.check_tokens(x1, "x1")
            t = check_time(t, x1.shape[0], x1.device)
        return self._sample(x1, t, generator, x0)

    def _sample(self, x1: Tensor, t: Tensor, generator=None, x0: Tensor | None = None) -> Tensor:
        if x0 is None:
            x0 = self.sample_source(x1.shape[0], x1.shape[1], generator, x1.device)
        keep = torch.rand(x1.shape, generator=generator, device=x1.device) < self.schedule.kappa(t)[:, None]
        return torch.where(keep, x1, x0)

    # -- velocities ------------------------------------------------------------------------
    def is_masked(self, x_t: Tensor) -> Tensor:
        """Bool ``(B, D)``: True where the coordinate still carries the MASK token."""
        if self.mask_token is None:
            return torch.zeros_like(x_t, dtype=torch.bool)
        return x_t == self.mask_token

    def active(self, x_t: Tensor) -> Tensor:
        """Bool ``(B, D)``: coordinates whose velocity rows can be non-zero (all for uniform
        source, masked ones for the mask source)."""
        if self.mask_token is None:
            return torch.ones_like(x_t, dtype=torch.bool)
        return x_t == self.mask_token

    def one_hot_data(self, x: Tensor) -> Tensor:
        """delta(j = x^d) over the S data tokens, float ``(B, D, S)`` (all zero at MASK)."""
        classes = torch.arange(self.num_classes, device=x.device)
        return (x.unsqueeze(-1) == classes).float()  # MASK = S matches no class: a zero row

    def off_diagonal(self, x_t: Tensor) -> Tensor:
        """Bool ``(B, D, S)``: True for j != x_t^d (every j where x_t^d is MASK)."""
        return self.one_hot_data(x_t) == 0

    def conditional_velocity(self, x_t: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        """u_t(j | x_t, x1) = kappa'/(1 - kappa) (delta(j = x1) - delta(j = x_t)), ``(B, D, S)``.

        Finite for t < 1 (1 - kappa is clamped at 1e-6).
        """
        t = check_time(t, x_t.shape[0], x_t.device)
        rate = self.schedule.rate(t)[:, None, None]
        return rate * (self.one_hot_data(x1) - self.one_hot_data(x_t))

    def scaled_conditional_velocity(self, x_t: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """(1 - kappa(t)) u_t(j | x_t, x1) = kappa'(t) (delta(j = x1) - delta(j = x_t)),
        ``(B, D, S)``: the bounded regression target of ``velocity_regression_loss``."""
        d_kappa = self.schedule.d_kappa(t)[:, None, None]
        return d_kappa * (self.one_hot_data(x1) - self.one_hot_data(x_t))

    def posterior_to_velocity(self, logits: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from posterior logits of x1: kappa'/(1 - kappa) (softmax(logits) - delta(x_t)).

        Args: logits ``(B, D, S)``, x_t ``(B, D)``, t scalar or ``(B,)``. Returns ``(B, D, S)``.
        """
        t = check_time(t, x_t.shape[0], x_t.device)
        return self._posterior_to_velocity(logits, x_t, t)

    def _posterior_to_velocity(self, logits: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        rate = self.schedule.rate(t)[:, None, None].to(logits.dtype)
        return rate * (torch.softmax(logits, dim=-1) - self.one_hot_data(x_t))

    @torch.no_grad()
    def marginal_velocity(self, x_t: Tensor, t: float, support: Tensor, probs: Tensor) -> Tensor:
        """Exact marginal velocity u_t(j | x_t) = sum_x1 u_t(j | x_t, x1) p(x1 | x_t) by
        enumeration of a target with ``support`` ``(N, D)`` (long) and ``probs`` ``(N,)``.

        p(x1 | x_t) ∝ p(x1) prod_d p_t(x_t^d | x1^d), with p_t(x_t^d | x1^d) = kappa delta(x_t = x1)
        + (1 - kappa) p0(x_t^d). For tiny spaces (tests, references); returns ``(B, D, S)``
        (zero rows for states x_t that have probability 0 at time t).
        """
        tt = torch.tensor(float(t), device=x_t.device)
        kappa = self.schedule.kappa(tt)
        same = (x_t[:, None, :] == support[None, :, :]).float()  # (B, N, D)
        if self.mask_token is not None:
            p0 = (x_t == self.mask_token).float()[:, None, :]
        else:
            p0 = torch.full_like(same, 1.0 / self.num_classes)
        lik = (kappa * same + (1 - kappa) * p0).clamp_min(0).log().sum(-1)  # (B, N)
        post = torch.softmax(lik + probs.log()[None, :], dim=-1).nan_to_num(0.0)  # (B, N)
        rate = self.schedule.rate(tt)
        x1_onehot = self.one_hot_data(support)  # (N, D, S)
        mean_x1 = torch.einsum("bn,nds->bds", post, x1_onehot)
        return rate * (mean_x1 - self.one_hot_data(x_t))
