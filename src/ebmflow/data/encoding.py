r"""Discretisation of continuous 2-D toys into binary (Gray code) and base-K categorical states.

Gray code (ALOE / EB-GFN / discrete energy discrepancy, 32 bits for a 2-D point). Each
coordinate $v$ becomes ``bits`` = 16 bits: one sign bit $s = [v < 0]$ followed by the 15-bit
reflected Gray code of the quantised magnitude

$$
\begin{aligned}
q &= \lfloor |v| \cdot \text{scale} \rfloor, \qquad
\text{scale} = 2^{\text{bits} - 1} / \text{bound}, \qquad
q \text{ clamped to } [0, 2^{\text{bits} - 1} - 1], \\
\operatorname{gray}(q) &= q \oplus (q \gg 1) \quad (\oplus = \text{XOR}).
\end{aligned}
$$

The literature uses $\text{scale} = 2^{15} / (f + 1)$ with $f = \max|x| + 1$ over 5,000 training
points, i.e. $\text{bound} = \max|x| + 2$ (``quantisation_bound``); for data in $[-4, 4]$ that
is $\text{bound} = 6$, our default. Neighbouring quantisation cells differ in exactly one bit,
so bit flips are local moves.

Decoding returns the centre of the cell, $v = (1 - 2s)(q + \tfrac{1}{2}) / \text{scale}$ (the
literature returns the cell's edge $q / \text{scale}$, half a cell, $10^{-4}$, away). With
centres the round trip ``gray_encode(gray_decode(b)) == b`` is exact for every bit pattern, and
$|\hat x - x| \le 1 / (2\, \text{scale})$ for $|x| < \text{bound}$, where $\hat x$ =
``gray_decode(gray_encode(x))``.

Base-K code (the 16-dimensional, 5-state categorical version of the toys): each coordinate is
mapped affinely from $[\text{low}, \text{high})$ onto $[0, K^{\text{digits}})$,
$q = \big\lfloor (v - \text{low}) / (\text{high} - \text{low}) \cdot K^{\text{digits}} \big\rfloor$
clamped to that range, and written as ``digits`` base-K digits, most significant first. Decoding
returns the cell centre
$\text{low} + (q + \tfrac{1}{2}) (\text{high} - \text{low}) / K^{\text{digits}}$. The
discrete-flow-sampler code uses the data-dependent range $\text{low} = -f$,
$\text{high} = f + 2$ with $f = \max|x| + 1$; our default is the symmetric $[-6, 6)$.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "int_to_gray",
    "gray_to_int",
    "int_to_bits",
    "bits_to_int",
    "gray_encode",
    "gray_decode",
    "base_encode",
    "base_decode",
    "quantisation_bound",
]


def int_to_gray(q: Tensor) -> Tensor:
    r"""Reflected binary Gray code of non-negative integers: $g = q \oplus (q \gg 1)$ (XOR,
    same dtype)."""
    _check_integer(q, "q")
    return q ^ (q >> 1)


def gray_to_int(g: Tensor) -> Tensor:
    r"""Inverse of ``int_to_gray``: $q = g \oplus (g \gg 1) \oplus (g \gg 2) \oplus \cdots$
    (XOR, same dtype)."""
    _check_integer(g, "g")
    q = g.clone()
    shift = 1
    while shift < 64:  # prefix XOR in log2(64) doubling steps
        q = q ^ (q >> shift)
        shift *= 2
    return q


def int_to_bits(q: Tensor, n_bits: int) -> Tensor:
    """Integers ``(...)`` -> their ``n_bits`` binary digits ``(..., n_bits)``, MSB first (long)."""
    shifts = torch.arange(n_bits - 1, -1, -1, device=q.device)
    return (q[..., None] >> shifts) & 1


def bits_to_int(bits: Tensor) -> Tensor:
    """Binary digits ``(..., n_bits)``, MSB first -> integers ``(...)`` (long)."""
    n_bits = bits.shape[-1]
    weights = 2 ** torch.arange(n_bits - 1, -1, -1, device=bits.device)
    return (bits.long() * weights).sum(-1)


def quantisation_bound(x: Tensor) -> float:
    r"""The literature's data-dependent Gray-code bound $\max|x| + 2$ ($= f_{\text{scale}} + 1$)."""
    return float(x.abs().max()) + 2.0


def gray_encode(x: Tensor, bits: int = 16, bound: float = 6.0) -> Tensor:
    r"""Encode points ``(n, d)`` as sign + Gray-code bits, float ``(n, d * bits)`` in $\{0, 1\}$.

    Coordinate $j$ occupies columns ``[j * bits, (j + 1) * bits)``: the sign bit $[x_j < 0]$,
    then the ``bits - 1``-bit Gray code of
    $q = \lfloor |x_j| \cdot 2^{\text{bits} - 1} / \text{bound} \rfloor$, MSB first.
    Magnitudes $\ge$ ``bound`` are clamped to the last cell. Defaults give the 32-bit code of
    the discrete EBM papers for 2-D points.

    Args:
        x: float ``(n, d)`` finite points.
        bits: bits per coordinate ($2 \le \text{bits} \le 62$), default 16.
        bound: magnitudes in $[0, \text{bound})$ are resolved; default 6 (literature:
            $\max|x| + 2$).
    """
    x = _check_points(x, "x")
    _check_bits(bits)
    _check_bound(bound)
    scale = 2 ** (bits - 1) / bound
    top = 2 ** (bits - 1) - 1
    q = torch.floor(x.double().abs() * scale).clamp_(0, top).long()
    sign = (x < 0).long()
    code = torch.cat([sign[..., None], int_to_bits(int_to_gray(q), bits - 1)], dim=-1)
    return rearrange(code, "n d b -> n (d b)").float()


def gray_decode(code: Tensor, bits: int = 16, bound: float = 6.0) -> Tensor:
    r"""Inverse of ``gray_encode``: bits ``(n, d * bits)`` -> cell centres float32 ``(n, d)``.

    $v = (1 - 2s)(q + \tfrac{1}{2}) \, \text{bound} / 2^{\text{bits} - 1}$ with $s$ the sign bit
    and $q$ the decoded Gray integer. ``gray_encode(gray_decode(c)) == c`` for every bit
    pattern ``c``.
    """
    _check_bits(bits)
    _check_bound(bound)
    code = _check_binary_code(code, bits)
    code = rearrange(code.long(), "n (d b) -> n d b", b=bits)
    sign, q = code[..., 0], gray_to_int(bits_to_int(code[..., 1:]))
    mag = (q.double() + 0.5) * (bound / 2 ** (bits - 1))
    return ((1 - 2 * sign).double() * mag).float()


def base_encode(
    x: Tensor, num_classes: int = 5, digits: int = 8, low: float = -6.0, high: float = 6.0
) -> Tensor:
    r"""Encode points ``(n, d)`` as base-K digits, long ``(n, d * digits)`` in $[0, K)$.

    $$
    q = \left\lfloor \frac{x_j - \text{low}}{\text{high} - \text{low}} \, K^{\text{digits}}
    \right\rfloor,
    $$

    clamped to $[0, K^{\text{digits}} - 1]$, written MSB first; coordinate $j$ occupies columns
    ``[j * digits, (j + 1) * digits)``. Defaults give the 16-dimensional, 5-state categorical
    version of the 2-D toys.
    """
    x = _check_points(x, "x")
    levels = _check_base(num_classes, digits, low, high)
    q = torch.floor((x.double() - low) * (levels / (high - low))).clamp_(0, levels - 1).long()
    powers = num_classes ** torch.arange(digits - 1, -1, -1, device=x.device)
    code = torch.div(q[..., None], powers, rounding_mode="floor") % num_classes
    return rearrange(code, "n d k -> n (d k)")


def base_decode(
    code: Tensor, num_classes: int = 5, digits: int = 8, low: float = -6.0, high: float = 6.0
) -> Tensor:
    """Inverse of ``base_encode``: digits ``(n, d * digits)`` -> cell centres float32 ``(n, d)``."""
    levels = _check_base(num_classes, digits, low, high)
    if not isinstance(code, Tensor) or code.dim() != 2 or code.shape[1] % digits != 0:
        got = tuple(code.shape) if isinstance(code, Tensor) else type(code).__name__
        raise ValueError(f"code must be a (n, d * {digits}) tensor of digits, got {got}")
    if code.is_floating_point() or bool(((code < 0) | (code >= num_classes)).any()):
        raise ValueError(f"code must hold integer digits in [0, {num_classes}); use .long()")
    code = rearrange(code.long(), "n (d k) -> n d k", k=digits)
    powers = num_classes ** torch.arange(digits - 1, -1, -1, device=code.device)
    q = (code * powers).sum(-1)
    return (low + (q.double() + 0.5) * ((high - low) / levels)).float()


# -- checks ------------------------------------------------------------------------------
def _check_integer(t: Tensor, name: str) -> None:
    if (
        not isinstance(t, Tensor)
        or t.is_floating_point()
        or t.is_complex()
        or t.dtype == torch.bool
    ):
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an integer tensor (e.g. torch.long), got {got}")


def _check_points(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor of points (n, d), got {got}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass n >= 1 points")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; clean the data first")
    return x


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 62:
        raise ValueError(f"bits must be an int in [2, 62], got {bits!r}")


def _check_bound(bound: float) -> None:
    if not float(bound) > 0 or bound != bound or bound == float("inf"):
        raise ValueError(f"bound must be a positive finite float, got {bound!r}")


def _check_binary_code(code: Tensor, bits: int) -> Tensor:
    if not isinstance(code, Tensor) or code.dim() != 2 or code.shape[1] % bits != 0:
        got = tuple(code.shape) if isinstance(code, Tensor) else type(code).__name__
        raise ValueError(f"code must be a (n, d * {bits}) tensor of bits, got {got}")
    if bool(((code != 0) & (code != 1)).any()):
        raise ValueError("code must contain only 0 and 1; binarise it first")
    return code


def _check_base(num_classes: int, digits: int, low: float, high: float) -> int:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive int, got {digits!r}")
    levels = num_classes**digits
    if levels >= 2**62:
        raise ValueError(
            f"num_classes ** digits = {num_classes}^{digits} overflows int64; use fewer digits"
        )
    if not float(high) > float(low):
        raise ValueError(f"need low < high, got low={low}, high={high}")
    return levels
