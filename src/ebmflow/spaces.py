"""State spaces: what a state tensor looks like, how to check it and how to draw noise.

Conventions (batch first):

* ``Continuous(shape)``: float ``(B, *shape)``, any real value.
* ``Binary(dim)``: float ``(B, dim)`` with values in {0, 1}.
* ``Categorical(dim, num_classes)``: long ``(B, dim)`` with values in ``[0, K)``; where a
  gradient with respect to the state is needed it is carried as one-hot float ``(B, dim, K)``
  (``Categorical.one_hot``).

``validate(x)`` is the one place where a state is checked; it synchronises with the device
(it reads values), so samplers and losses call it once at their public entry points, never
inside a hot loop.

Examples:
    >>> import torch
    >>> from ebmflow.spaces import Binary, Categorical, Continuous
    >>> Continuous(2).noise(3).shape
    torch.Size([3, 2])
    >>> Continuous((1, 8, 8)).dim
    64
    >>> Binary(4).validate(torch.tensor([[0.0, 1.0, 1.0, 0.0]])).shape
    torch.Size([1, 4])
    >>> Categorical(3, num_classes=4).dtype
    torch.int64
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Space", "Continuous", "Binary", "Categorical", "check_same_device"]


def _as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape
    ):  # int(2.5) would silently truncate
        raise ValueError(f"shape must be a positive int or a tuple of positive ints, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a positive int or a tuple of positive ints, got {shape}")
    return shape


def check_same_device(x: Tensor, device: torch.device | str | None, name: str = "x") -> None:
    """Raise ``ValueError`` when ``x`` does not live on ``device`` (no transfer is made)."""
    if device is None:
        return
    device = torch.device(device)
    if x.device.type != device.type or (
        device.index is not None and x.device.index is not None and x.device.index != device.index
    ):
        raise ValueError(
            f"{name} is on device {x.device} but the model is on {device}; "
            f"move it first, e.g. {name} = {name}.to('{device}')"
        )


class Space:
    """Base class of state spaces.

    Attributes:
        shape: event shape (the non-batch dimensions of a state tensor).
        dtype: dtype of a state tensor.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    discrete: bool = False

    @property
    def dim(self) -> int:
        """Number of coordinates in one state, prod(shape)."""
        return math.prod(self.shape)

    def validate(self, x: Tensor, name: str = "x", device: torch.device | str | None = None) -> Tensor:
        """Check that ``x`` is a batch of states of this space; return it unchanged.

        Raises ``ValueError`` naming what was expected and what was received (type, shape,
        dtype, device, non-finite or out-of-range values) and how to fix it.
        """
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        expected = ("B",) + self.shape
        if x.dim() != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {self!r} expects (B, "
                f"{', '.join(str(s) for s in expected[1:])}); batch dimension first"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); pass B >= 1 states")
        check_same_device(x, device, name)
        self._check_values(x, name)
        return x

    def _check_values(self, x: Tensor, name: str) -> None:
        raise NotImplementedError

    def noise(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw ``n`` states from the space's reference noise (for chain initialisation)."""
        raise NotImplementedError

    def check_n(self, n: int) -> int:
        """``n`` (a number of states to draw) if it is a positive int, else ValueError."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return n

    _check_n = check_n  # the former private name, kept for callers that still use it

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.__dict__.items()))))


def _generator_device(generator: torch.Generator | None, device: torch.device | str | None):
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    return torch.device(device)


class Continuous(Space):
    """Real-valued states of event shape ``shape``: float ``(B, *shape)``.

    ``noise(n)`` draws x ~ N(0, I). Images are ``Continuous((C, H, W))``.

    Args:
        shape: event shape, an int D for vectors ``(B, D)`` or a tuple such as ``(C, H, W)``.

    Examples:
        >>> import torch
        >>> space = Continuous(2)
        >>> space
        Continuous(2)
        >>> g = torch.Generator().manual_seed(0)
        >>> space.noise(5, generator=g).shape
        torch.Size([5, 2])
        >>> Continuous((3, 4, 4)).shape, Continuous((3, 4, 4)).dim
        ((3, 4, 4), 48)
        >>> space.validate(torch.tensor([[0.0, float("nan")]]))
        Traceback (most recent call last):
            ...
        ValueError: x contains NaN or inf (rows [0]...); clean the data first
    """

    discrete = False

    def __init__(self, shape: int | Sequence[int]):
        self.shape = _as_shape(shape)
        self.dtype = torch.float32

    def __repr__(self) -> str:
        inner = self.shape[0] if len(self.shape) == 1 else self.shape
        return f"Continuous({inner})"

    def _check_values(self, x: Tensor, name: str) -> None:
        if not x.is_floating_point():
            raise ValueError(
                f"{name} has dtype {x.dtype} but {self!r} expects a floating dtype; "
                f"use {name}.float()"
            )
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = torch.nonzero(bad.flatten(1).any(1)).flatten()[:5].tolist()
            raise ValueError(f"{name} contains NaN or inf (rows {rows}...); clean the data first")

    def noise(self, n, generator=None, device=None) -> Tensor:
        n = self.check_n(n)
        device = _generator_device(generator, device)
        return torch.randn((n, *self.shape), generator=generator, device=device)


class Binary(Space):
    r"""Binary states $x \in \{0, 1\}^{\text{dim}}$, stored as float ``(B, dim)``.

    ``noise(n)`` draws each bit from Bernoulli(1/2).

    Args:
        dim: number of bits D.

    Examples:
        >>> import torch
        >>> space = Binary(3)
        >>> x = space.noise(4, generator=torch.Generator().manual_seed(0))
        >>> x.shape, x.dtype, bool(((x == 0) | (x == 1)).all())
        (torch.Size([4, 3]), torch.float32, True)
        >>> space.validate(torch.tensor([[0.0, 0.5, 1.0]]))
        Traceback (most recent call last):
            ...
        ValueError: x has a value 0.5 outside {0, 1} for Binary(3); binarise it first, e.g. (x > 0.5).float()
    """

    discrete = True

    def __init__(self, dim: int):
        (self.num_dims,) = _as_shape(dim)
        self.shape = (self.num_dims,)
        self.dtype = torch.float32

    @property
    def num_classes(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"Binary({self.num_dims})"

    def _check_values(self, x: Tensor, name: str) -> None:
        if not x.is_floating_point():
            raise ValueError(
                f"{name} has dtype {x.dtype} but {self!r} expects float states in {{0, 1}}; "
                f"use {name}.float()"
            )
        # x - x^2 is 0 exactly on {0, 1} (NaN/inf give NaN): one fused pass, one host read
        if int(torch.count_nonzero(x - x * x)) > 0:
            val = x[(x != 0) & (x != 1)][0].item()
            raise ValueError(
                f"{name} has a value {val} outside {{0, 1}} for {self!r}; binarise it first, "
                f"e.g. ({name} > 0.5).float()"
            )

    def noise(self, n, generator=None, device=None) -> Tensor:
        n = self.check_n(n)
        device = _generator_device(generator, device)
        u = torch.rand((n, self.num_dims), generator=generator, device=device)
        return (u < 0.5).float()


class Categorical(Space):
    r"""Categorical states $x \in \{0, \dots, K-1\}^{\text{dim}}$, stored as long ``(B, dim)``.

    ``one_hot(x)`` gives the float ``(B, dim, K)`` relaxation used for gradients;
    ``from_one_hot`` inverts it. ``noise(n)`` draws each coordinate uniformly.

    Args:
        dim: number of coordinates D.
        num_classes: number of classes $K \ge 2$.

    Examples:
        >>> import torch
        >>> space = Categorical(2, num_classes=3)
        >>> x = torch.tensor([[0, 2], [1, 1]])
        >>> space.one_hot(x)
        tensor([[[1., 0., 0.],
                 [0., 0., 1.]],
        <BLANKLINE>
                [[0., 1., 0.],
                 [0., 1., 0.]]])
        >>> torch.equal(space.from_one_hot(space.one_hot(x)), x)
        True
        >>> space.is_one_hot(x), space.is_one_hot(space.one_hot(x))
        (False, True)
        >>> space.validate(torch.tensor([[0, 3]]))
        Traceback (most recent call last):
            ...
        ValueError: x has a value 3 outside [0, 3) for Categorical(2, 3)
    """

    discrete = True

    def __init__(self, dim: int, num_classes: int):
        (self.num_dims,) = _as_shape(dim)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.shape = (self.num_dims,)
        self.dtype = torch.long

    def __repr__(self) -> str:
        return f"Categorical({self.num_dims}, {self.num_classes})"

    def _check_values(self, x: Tensor, name: str) -> None:
        if x.dtype != torch.long:
            raise ValueError(
                f"{name} has dtype {x.dtype} but {self!r} expects long class indices in "
                f"[0, {self.num_classes}); use {name}.long() (or from_one_hot for one-hot input)"
            )
        lo, hi = torch.aminmax(x)
        if int(lo) < 0 or int(hi) >= self.num_classes:
            val = x[(x < 0) | (x >= self.num_classes)][0].item()
            raise ValueError(
                f"{name} has a value {val} outside [0, {self.num_classes}) for {self!r}"
            )

    def is_one_hot(self, x: Tensor) -> bool:
        """True when ``x`` is a float ``(B, dim, K)`` relaxed state."""
        return x.is_floating_point() and x.dim() == 3 and tuple(x.shape[1:]) == (
            self.num_dims,
            self.num_classes,
        )

    def one_hot(self, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Long ``(B, dim)`` -> float ``(B, dim, K)``; a one-hot input is returned as is."""
        if self.is_one_hot(x):
            return x
        if x.dtype != torch.long:
            raise ValueError(
                f"one_hot expects long (B, {self.num_dims}) indices or float "
                f"(B, {self.num_dims}, {self.num_classes}) one-hot states, got {x.dtype} "
                f"{tuple(x.shape)}"
            )
        return torch.nn.functional.one_hot(x, self.num_classes).to(dtype)

    def from_one_hot(self, x: Tensor) -> Tensor:
        """Float ``(B, dim, K)`` -> long ``(B, dim)`` by argmax over the last axis."""
        return x.argmax(-1)

    def noise(self, n, generator=None, device=None) -> Tensor:
        n = self.check_n(n)
        device = _generator_device(generator, device)
        return torch.randint(
            0, self.num_classes, (n, self.num_dims), generator=generator, device=device
        )
