"""Evaluation of a trained 2-D toy model: samples, MMD, NLL, mode weights and figures.

Used by ``ebmflow train`` and ``ebmflow evaluate``; every number is a plain float so
``metrics.json`` is flat and finite.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..energy.base import EnergyModel
from ..samplers.base import Sampler
from ..spaces import Continuous
from .registry import GRAY_BITS, RunConfig, _get, eval_init

__all__ = ["GrayDecodedEnergy", "draw_samples", "evaluate_model", "grid_log_partition", "write_figures"]


class GrayDecodedEnergy(EnergyModel):
    r"""$E(x) = E_{\text{bits}}(\operatorname{gray\_encode}(x, \text{bits}))$ on 2-D points: a
    Gray-coded binary model seen in the plane it encodes (for contour plots)."""

    def __init__(self, energy: EnergyModel, bits: int = GRAY_BITS):
        super().__init__(Continuous(2))
        self.inner = energy
        self.bits = int(bits)

    def energy(self, x: Tensor) -> Tensor:
        gray_encode = _get("ebmflow.data", "gray_encode")
        return self.inner(gray_encode(x.cpu(), self.bits).to(x.device))


def to_points(cfg: RunConfig, x: Tensor) -> Tensor:
    """States of the energy's space -> 2-D points (decodes Gray-coded bits)."""
    if cfg.encoding == "gray":
        return _get("ebmflow.data", "gray_decode")(x.detach().cpu(), GRAY_BITS)
    return x.detach().cpu().float()


def draw_samples(cfg: RunConfig, energy: EnergyModel, sampler: Sampler, train2d: Tensor, n: int,
                 seed: int = 1) -> Tensor:
    """``n`` model samples in the energy's space (chains from a data-scaled Gaussian or the
    space's noise)."""
    gen = torch.Generator().manual_seed(seed)
    ref = energy.reference_tensor()
    device = ref.device if ref is not None else torch.device("cpu")
    x0 = eval_init(cfg, train2d, n, gen)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if x0 is None:
            x0 = energy.space.noise(n, generator=gen).to(device)
            try:
                return sampler.sample(energy, n, x0=x0).detach()
            except TypeError:
                return sampler.sample(energy, n).detach()
        return sampler.sample(energy, n, x0=x0.to(device)).detach()


@torch.no_grad()
def grid_log_partition(energy: EnergyModel, limits: tuple[float, float, float, float],
                       resolution: int = 400) -> float:
    r"""$\log Z = \log \int \exp(-E(x)) \, dx$ over a box, by the midpoint rule on a grid
    (accurate for 2-D energies whose mass lies inside the box)."""
    x0, x1, y0, y1 = limits
    hx, hy = (x1 - x0) / resolution, (y1 - y0) / resolution
    gx = x0 + hx * (torch.arange(resolution) + 0.5)
    gy = y0 + hy * (torch.arange(resolution) + 0.5)
    grid = torch.cartesian_prod(gx, gy)
    ref = energy.reference_tensor()
    device = ref.device if ref is not None else torch.device("cpu")
    e = torch.cat([energy(c.to(device)).double().cpu() for c in grid.split(16384)])
    return float(torch.logsumexp(-e, 0) + math.log(hx * hy))


@torch.no_grad()
def _uniform_is_log_partition(energy: EnergyModel, dim: int, n: int, seed: int) -> float:
    r"""$\log Z \approx \log\big(2^D \operatorname{mean}_u \exp(-E(u))\big)$, $u$ uniform on
    $\{0, 1\}^D$ (importance sampling)."""
    gen = torch.Generator().manual_seed(seed)
    ref = energy.reference_tensor()
    device = ref.device if ref is not None else torch.device("cpu")
    u = (torch.rand(n, dim, generator=gen) < 0.5).float()
    e = torch.cat([energy(c.to(device)).double().cpu() for c in u.split(16384)])
    return float(torch.logsumexp(-e, 0) - math.log(n) + dim * math.log(2.0))


def _box(points: Tensor, margin: float = 3.0) -> tuple[float, float, float, float]:
    lo = points.min(0).values - margin
    hi = points.max(0).values + margin
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


@torch.no_grad()
def evaluate_model(cfg: RunConfig, energy: EnergyModel, samples: Tensor, test: Tensor,
                   test2d: Tensor) -> dict[str, Any]:
    r"""Metrics of ``samples`` (energy's space) against held-out ``test`` data.

    * ``mmd``: unbiased squared MMD (Gaussian kernel with the median bandwidth for continuous
      data; kernel $\exp(-0.1 \, d_{\text{H}}(x, y))$ for bits, $d_{\text{H}}$ the Hamming
      distance);
    * ``nll``: $\operatorname{mean} E(\text{test}) + \log Z$, $\log Z$ by grid quadrature (2-D)
      or uniform importance sampling (bits; an estimate); ``nll_true`` is the exact mixture's NLL where known;
    * ``mode_tv``, ``mode_weight_min/max``, ``mode_outliers``: mode weights of the samples
      (2-D, nearest mixture mean within 4 standard deviations) for the Gaussian-mixture sets.
    """
    mmd = _get("ebmflow.metrics", "mmd")
    ref = energy.reference_tensor()
    device = ref.device if ref is not None else torch.device("cpu")
    n = min(samples.shape[0], test.shape[0])
    out: dict[str, Any] = {}
    if cfg.encoding == "gray":
        out["mmd"] = float(mmd(samples[:n].cpu(), test[:n].cpu(), kernel="exp_hamming"))
        log_z = _uniform_is_log_partition(energy, test.shape[1], 50_000, cfg.seed)
    else:
        out["mmd"] = float(mmd(samples[:n].cpu().double(), test[:n].cpu().double()))
        log_z = grid_log_partition(energy, _box(test2d))
    e_test = torch.cat([energy(c.to(device)).double().cpu() for c in test.split(16384)])
    out["nll"] = float(e_test.mean()) + log_z
    mixtures = _get("ebmflow.data", "TOY_MIXTURES")
    points = to_points(cfg, samples)
    if cfg.data in mixtures:
        means_t, scale, weights = mixtures[cfg.data]
        means = torch.tensor(means_t)
        truth = torch.tensor(weights)
        if cfg.encoding == "none":
            gmm = _get("ebmflow.energy", "GaussianMixtureEnergy")
            try:
                target = gmm(means, float(scale), truth)
                out["nll_true"] = float(-target.log_prob(test2d).double().mean())
            except (TypeError, ValueError):
                pass
        mw = _get("ebmflow.metrics", "mode_weights")(points, means, max_distance=4.0 * scale)
        out["mode_tv"] = 0.5 * float((mw.weights.double() - truth.double()).abs().sum() + mw.outliers)
        out["mode_weight_min"] = float(mw.weights.min())
        out["mode_weight_max"] = float(mw.weights.max())
        out["mode_outliers"] = float(mw.outliers)
        out["mode_weights"] = [round(float(w), 4) for w in mw.weights]
    return out


def write_figures(cfg: RunConfig, energy: EnergyModel, samples: Tensor, test2d: Tensor,
                  out_dir: Path) -> None:
    """``samples.png`` (model samples beside held-out data) and ``energy.png`` (density and
    energy contours) in ``out_dir``."""
    from .plots import plot_energy, plot_samples

    points = to_points(cfg, samples)
    plot_samples(points, out_dir / "samples.png", data=test2d[: points.shape[0]])
    shown = GrayDecodedEnergy(energy) if cfg.encoding == "gray" else energy
    lo, hi = test2d.min(0).values - 1.0, test2d.max(0).values + 1.0
    plot_energy(shown, out_dir / "energy.png",
                limits=(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])))
