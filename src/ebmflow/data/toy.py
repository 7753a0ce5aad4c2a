"""2-D toy data sets of the EBM literature, re-implemented in torch (no scikit-learn).

The definitions follow the toy generators used by FFJORD and reused by ALOE, EB-GFN, the
discrete energy-discrepancy and the discrete-flow-sampler papers (data on roughly $[-4, 4]^2$).
Differences from those generators, all of which leave the distribution unchanged:

* samples are i.i.d.: where the originals place points on a deterministic ``linspace`` grid or
  split a batch into exactly equal groups (circles, moons, pinwheel, 2spirals), we draw the
  angle / group of every point independently;
* every draw uses the given ``torch.Generator``, so a seed fixes the whole sample.

The Gaussian-mixture sets (``8gaussians``, ``25gaussians``, ``two_modes``) are described
exactly by ``TOY_MIXTURES[name] = (means, scales, weights)``, so an exact target can be built
with ``ebmflow.energy.GaussianMixtureEnergy(*TOY_MIXTURES[name])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import Tensor

__all__ = ["toy_2d", "TOY_DATASETS", "TOY_MIXTURES"]

# The literature divides the 8- and 25-Gaussian sets by 1.414 (not sqrt(2)); kept for fidelity.
_SHRINK = 1.414
_S = 1.0 / math.sqrt(2.0)
_RING8 = (
    (1.0, 0.0),
    (-1.0, 0.0),
    (0.0, 1.0),
    (0.0, -1.0),
    (_S, _S),
    (_S, -_S),
    (-_S, _S),
    (-_S, -_S),
)

Mixture = tuple[tuple[tuple[float, float], ...], float, tuple[float, ...]]


def _mixtures() -> Mapping[str, Mixture]:
    ring = tuple((4.0 * a / _SHRINK, 4.0 * b / _SHRINK) for a, b in _RING8)
    grid = tuple((2.0 * i / _SHRINK, 2.0 * j / _SHRINK) for i in range(-2, 3) for j in range(-2, 3))
    return MappingProxyType(
        {
            "8gaussians": (ring, 0.5 / _SHRINK, (1.0 / 8,) * 8),
            "25gaussians": (grid, 0.2 / _SHRINK, (1.0 / 25,) * 25),
            "two_modes": (((-4.0, 0.0), (4.0, 0.0)), 1.0, (2.0 / 3.0, 1.0 / 3.0)),
        }
    )


TOY_MIXTURES: Mapping[str, Mixture] = _mixtures()
r"""Exact mixtures behind the Gaussian toy sets: ``name -> (means, scale, weights)``.

``means`` is a tuple of $K$ $(x, y)$ pairs, ``scale`` the shared isotropic standard deviation and
``weights`` the $K$ mixture weights (sum 1). Read-only; build tensors with ``torch.tensor``.

* ``8gaussians``: means $4 (\cos a_k, \sin a_k) / 1.414$ at $45^\circ$ steps (radius 2.83),
  std $0.5 / 1.414 = 0.354$, equal weights.
* ``25gaussians``: means $2 (i, j) / 1.414$ for $i, j \in \{-2, \dots, 2\}$,
  std $0.2 / 1.414 = 0.141$, equal weights (discrete energy-discrepancy definition).
* ``two_modes``: the 2:1 mixture of the balanced-training paper, means $(-4, 0)$ and $(4, 0)$,
  std 1, weights $(2/3, 1/3)$ (same as ``GaussianMixtureEnergy.two_modes()``).
"""


def _uniform(n: int, gen, device) -> Tensor:
    return torch.rand(n, generator=gen, device=device)


def _normal(shape: tuple[int, ...], gen, device) -> Tensor:
    return torch.randn(shape, generator=gen, device=device)


def _mixture(name: str) -> Callable[[int, torch.Generator | None, torch.device], Tensor]:
    def sample(n: int, gen, device) -> Tensor:
        means, scale, weights = TOY_MIXTURES[name]
        mu = torch.tensor(means, device=device)
        w = torch.tensor(weights, device=device)
        k = torch.multinomial(w, n, replacement=True, generator=gen)
        return mu[k] + scale * _normal((n, 2), gen, device)

    return sample


def _swissroll(n, gen, device) -> Tensor:
    # sklearn make_swiss_roll(noise=1.0), coordinates (x, z), divided by 5.
    t = 1.5 * math.pi * (1.0 + 2.0 * _uniform(n, gen, device))
    x = torch.stack([t * t.cos(), t * t.sin()], dim=-1) + _normal((n, 2), gen, device)
    return x / 5.0


def _circles(n, gen, device) -> Tensor:
    # sklearn make_circles(factor=0.5, noise=0.08), times 3: radius 1 or 0.5 with prob 1/2.
    angle = 2.0 * math.pi * _uniform(n, gen, device)
    radius = torch.where(_uniform(n, gen, device) < 0.5, 1.0, 0.5)
    x = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=-1)
    return 3.0 * (x + 0.08 * _normal((n, 2), gen, device))


def _moons(n, gen, device) -> Tensor:
    # sklearn make_moons(noise=0.1), then x * 2 + (-1, -0.2).
    angle = math.pi * _uniform(n, gen, device)
    upper = torch.stack([angle.cos(), angle.sin()], dim=-1)
    lower = torch.stack([1.0 - angle.cos(), 0.5 - angle.sin()], dim=-1)
    pick = (_uniform(n, gen, device) < 0.5)[:, None]
    x = torch.where(pick, upper, lower) + 0.1 * _normal((n, 2), gen, device)
    return 2.0 * x + torch.tensor([-1.0, -0.2], device=device)


def _pinwheel(n, gen, device) -> Tensor:
    # 5 arms; radial feature N(1, 0.3^2), tangential N(0, 0.1^2), rotated by
    # angle = 2 pi k / 5 + 0.25 exp(radial), then scaled by 2.
    arm = torch.randint(0, 5, (n,), generator=gen, device=device)
    feat = _normal((n, 2), gen, device) * torch.tensor([0.3, 0.1], device=device)
    radial = feat[:, 0] + 1.0
    angle = arm * (2.0 * math.pi / 5.0) + 0.25 * radial.exp()
    c, s = angle.cos(), angle.sin()
    tangential = feat[:, 1]
    return 2.0 * torch.stack([radial * c + tangential * s, -radial * s + tangential * c], dim=-1)


def _two_spirals(n, gen, device) -> Tensor:
    # r = sqrt(u) * 3 pi; point (-cos r * r, sin r * r) + U(0, 0.5)^2, mirrored for the
    # second spiral, divided by 3, plus N(0, 0.1^2) noise.
    r = _uniform(n, gen, device).sqrt() * (540.0 * 2.0 * math.pi / 360.0)
    jitter = 0.5 * torch.rand((n, 2), generator=gen, device=device)
    x = torch.stack([-r.cos() * r, r.sin() * r], dim=-1) + jitter
    sign = torch.where(_uniform(n, gen, device) < 0.5, 1.0, -1.0)
    return sign[:, None] * x / 3.0 + 0.1 * _normal((n, 2), gen, device)


def _checkerboard(n, gen, device) -> Tensor:
    # x1 ~ U(-2, 2); x2 ~ U(0, 1) - 2 b (b ~ Bernoulli(1/2)) + (floor(x1) mod 2); times 2.
    x1 = 4.0 * _uniform(n, gen, device) - 2.0
    b = torch.randint(0, 2, (n,), generator=gen, device=device)
    x2 = _uniform(n, gen, device) - 2.0 * b + torch.remainder(torch.floor(x1), 2.0)
    return 2.0 * torch.stack([x1, x2], dim=-1)


def _rings(n, gen, device) -> Tensor:
    # 4 concentric rings of radius 0.8 (k + 1), equal weights, radial std 0.05 (the discrete
    # ED definition truncates the radius at 0, which is 16 standard deviations away).
    k = torch.randint(0, 4, (n,), generator=gen, device=device)
    radius = (0.8 * (k + 1) + 0.05 * _normal((n,), gen, device)).abs()
    angle = 2.0 * math.pi * _uniform(n, gen, device)
    return radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=-1)


_GENERATORS: dict[str, Callable[[int, torch.Generator | None, torch.device], Tensor]] = {
    "swissroll": _swissroll,
    "circles": _circles,
    "moons": _moons,
    "8gaussians": _mixture("8gaussians"),
    "25gaussians": _mixture("25gaussians"),
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
    "two_modes": _mixture("two_modes"),
}

TOY_DATASETS: tuple[str, ...] = tuple(_GENERATORS)
"""Names accepted by ``toy_2d``."""


def toy_2d(
    name: str,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Draw ``n`` i.i.d. points of a 2-D toy data set, float32 ``(n, 2)``.

    Args:
        name: one of ``TOY_DATASETS``: swissroll, circles, moons, 8gaussians, 25gaussians,
            pinwheel, 2spirals, checkerboard, rings, two_modes.
        n: number of points ($\ge 1$).
        generator: random generator (deterministic under a seed). Samples are drawn on its
            device.
        device: device of the result when no generator is given (default CPU); with a
            generator it must match the generator's device.

    Returns:
        float32 tensor ``(n, 2)``; all sets lie roughly in $[-4.5, 4.5]^2$ (two_modes in
        $[-8, 8] \times [-4, 4]$).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), ``n < 1``, or a
            device that does not match the generator.
    """
    if name not in _GENERATORS:
        raise ValueError(f"unknown toy data set {name!r}; valid names: {', '.join(TOY_DATASETS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if generator is not None:
        if device is not None and torch.device(device).type != generator.device.type:
            raise ValueError(
                f"device={device} does not match the generator's device {generator.device}; "
                f"create the generator on {device} or drop device"
            )
        dev = generator.device
    else:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    return _GENERATORS[name](n, generator, dev).to(torch.float32)
