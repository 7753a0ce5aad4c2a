"""Figures of 2-D models: sample scatter plots and energy contours (matplotlib, ``plot`` extra)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..energy.base import EnergyModel

__all__ = ["plot_samples", "plot_energy"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plots need matplotlib; install it with `pip install ebmflow[plot]`"
        ) from None
    return plt


def _limits(points: Tensor, margin: float = 0.1) -> tuple[float, float, float, float]:
    lo = points.min(0).values
    hi = points.max(0).values
    pad = (hi - lo) * margin + 1e-3
    lo, hi = (lo - pad).tolist(), (hi + pad).tolist()
    return lo[0], hi[0], lo[1], hi[1]


def _as_2d(x: Tensor, name: str) -> Tensor:
    x = x.detach().float().cpu()
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"{name} must be 2-D points of shape (N, 2) to plot, got {tuple(x.shape)}")
    return x


def plot_samples(x: Tensor, path: str | os.PathLike, data: Tensor | None = None,
                 title: str = "model samples") -> Path:
    """Scatter plot of samples ``(N, 2)`` (beside reference ``data`` when given) saved to ``path``."""
    plt = _pyplot()
    x = _as_2d(x, "x")
    panels = [(x, title)] + ([(_as_2d(data, "data"), "data")] if data is not None else [])
    ref = torch.cat([p for p, _ in panels]) if data is None else _as_2d(data, "data")
    finite = ref[torch.isfinite(ref).all(1)]
    x0, x1, y0, y1 = _limits(finite if len(finite) else torch.zeros(1, 2))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (pts, name) in zip(axes[0], panels):
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.5)
        ax.set(xlim=(x0, x1), ylim=(y0, y1), title=name, aspect="equal")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_energy(energy: EnergyModel, path: str | os.PathLike, data: Tensor | None = None,
                limits: tuple[float, float, float, float] | None = None,
                resolution: int = 200) -> Path:
    r"""Contours of the density $\exp(-E)$ and of $E$ for a 2-D energy, on a grid covering
    ``data`` (or ``limits = (xmin, xmax, ymin, ymax)``, default $[-4, 4]^2$), saved to
    ``path``."""
    plt = _pyplot()
    if limits is None:
        limits = _limits(_as_2d(data, "data")) if data is not None else (-4.0, 4.0, -4.0, 4.0)
    ref = energy.reference_tensor()
    device = ref.device if ref is not None else torch.device("cpu")
    gx = torch.linspace(limits[0], limits[1], resolution)
    gy = torch.linspace(limits[2], limits[3], resolution)
    xx, yy = torch.meshgrid(gx, gy, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    e = torch.cat([energy(chunk.to(device)).float().cpu() for chunk in grid.split(8192)])
    e = e.reshape(resolution, resolution)
    log_p = -(e - e.min())
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    density = axes[0].imshow(log_p.exp().numpy(), origin="lower", extent=limits, cmap="viridis",
                             aspect="auto")
    axes[0].set_title("exp(-(E - min E))")
    fig.colorbar(density, ax=axes[0])
    levels = axes[1].contourf(xx.numpy(), yy.numpy(), e.clamp(max=e.min() + 20).numpy(), levels=30,
                              cmap="magma")
    axes[1].set_title("energy E(x) (capped at min E + 20)")
    fig.colorbar(levels, ax=axes[1], label="E")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
