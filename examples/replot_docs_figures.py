"""Redraw the documentation's figures from their saved results, legible at page width.

The example scripts draw their figures for a wide screen: many small panels side by side,
9-point titles, no colour scales. This script reads the committed results under
``docs/results/`` (no training, seconds) and draws the figures whose JSON holds everything
shown, for a page about 8 inches wide: panels stacked, text of at least 12 points, a colour
bar beside every density, and titles that say what the panel shows (a model that learned a
ring on ``8gaussians`` is titled so, not only by its mode-weight error).

    python examples/replot_docs_figures.py                  # writes runs/docs_figures/*.png
    python examples/replot_docs_figures.py --update-docs    # writes docs/figures/*.png
    python examples/replot_docs_figures.py --only flowmc_toys ed_nearsightedness

Redrawn: ``flowmc_toys`` (and ``_quick``), ``flowmc_rings_long``, ``flowmc_two_modes`` (and
``_quick``), ``flowmc_highdim`` (and ``_quick``), ``discrete_flow_budget``,
``ed_nearsightedness`` and ``ed_25gaussians`` (and ``_quick``; its JSON stores the density
grids); and, by the drawing functions of their example scripts (which import torch),
``ising_recovery`` (and ``_quick``; the JSON stores the learned couplings), ``ed_categorical``,
``ed_discrete_toys`` and ``discrete_flow_toys`` (and ``_quick``; the JSON files store the
samples, decoded to 2-D) and ``discrete_flow_digits`` (and ``_quick``; the JSON stores 12
samples of every sampler as bit strings).
The other figures show samples or matrices that the JSON files do not store; their scripts
redraw them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGE_WIDTH = 8.0  # inches; saved at 100 dpi, the figure is shown at about its pixel size
FONT = 13
TRUTH_TWO_MODES = 2 / 3


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT,
        "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1, "legend.fontsize": FONT - 1,
        "figure.dpi": 100,
    })
    return plt


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _density(values: list[float]) -> np.ndarray:
    """A density saved as a flattened (n, n) grid, x major, as an image (row = y)."""
    arr = np.asarray(values, dtype=float)
    n = math.isqrt(arr.size)
    if n * n != arr.size:
        raise ValueError(f"a density grid must be square, got {arr.size} values")
    return arr.reshape(n, n).T


def _show_density(fig, ax, img: np.ndarray, box: float, title: str) -> None:
    im = ax.imshow(img / img.max(), origin="lower", extent=[-box, box, -box, box],
                   cmap="viridis", vmin=0, vmax=1)
    ax.set_title(title)
    ax.set_xticks([-box, 0, box])
    ax.set_yticks([-box, 0, box])
    ax.tick_params(labelsize=FONT - 2)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label("density / max", fontsize=FONT - 2)
    cb.ax.tick_params(labelsize=FONT - 3)


def angular_contrast(img: np.ndarray, box: float) -> float:
    """How much the density varies around its densest circle: (max - min) / mean over 64
    angles at the radius of largest mean density. Eight resolved modes give values of about
    2 and more; a ring that spreads its mass evenly over the angles gives well under 1."""
    n = img.shape[0]
    lin = np.linspace(-box, box, n)
    radii = np.linspace(0.2, box * 0.95, 80)
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)

    def on_circle(r: float) -> np.ndarray:
        xs, ys = r * np.cos(angles), r * np.sin(angles)
        ix = np.clip(np.searchsorted(lin, xs), 0, n - 1)
        iy = np.clip(np.searchsorted(lin, ys), 0, n - 1)
        return img[iy, ix]

    best = max(radii, key=lambda r: on_circle(r).mean())
    ring = on_circle(best)
    return float((ring.max() - ring.min()) / max(ring.mean(), 1e-300))


def _toy_title(dataset: str, method: str, tv: float, img: np.ndarray, box: float) -> str:
    lines = [f"{dataset}, {method}"]
    if dataset == "8gaussians":
        lines.append("separate modes" if angular_contrast(img, box) >= 1.0
                     else "a ring: modes not resolved")
    lines.append(f"mode-weight TV {tv:.3f}")
    return "\n".join(lines)


def plot_flowmc_toys(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None:
        return None
    cfg, results, dens = payload["config"], payload["results"], payload["densities"]
    keys = [k for k in dens if k in results]
    ncol = 2
    nrow = math.ceil(len(keys) / ncol)
    plt = _plt()
    fig, axes = plt.subplots(nrow, ncol, figsize=(PAGE_WIDTH, 4.2 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        dataset, method = key.split("/")
        img = _density(dens[key])
        _show_density(fig, ax, img, cfg["box"],
                      _toy_title(dataset, method, results[key]["tv_error"], img, cfg["box"]))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    iters = cfg.get("iters")
    fig.suptitle(f"Learned densities exp(-E) after {iters} iterations", fontsize=FONT + 1)
    fig.tight_layout()
    return _save(fig, out, name)


def plot_flowmc_two_modes(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None:
        return None
    cfg, runs, dens = payload["config"], payload["runs"], payload["densities"]
    names = list(dens)
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    plt = _plt()
    n_dens_rows = math.ceil(len(names) / 2)
    fig = plt.figure(figsize=(PAGE_WIDTH, 5.4 + 3.0 + 3.6 * n_dens_rows))
    grid = fig.add_gridspec(2 + n_dens_rows, 2, height_ratios=[5.4, 3.0] + [3.6] * n_dens_rows)
    ax_w = fig.add_subplot(grid[0, :])
    ax_neg = fig.add_subplot(grid[1, 0])
    ax_acc = fig.add_subplot(grid[1, 1])
    for key, r in runs.items():
        base = key.split("/seed")[0]
        main_run = "/seed" not in key
        kw = {"color": colors.get(base, "k"), "lw": 2.0 if main_run else 0.9,
              "alpha": 1.0 if main_run else 0.45, "label": base if main_run else None}
        ax_w.plot(r["steps"], r["heavy"], **kw)
        ch = [(s, v) for s, v in zip(r["steps"], r["chain_heavy"]) if v is not None]
        if ch:
            ax_neg.plot(*zip(*ch), **kw)
        ga = [(s, v) for s, v in zip(r["steps"], r["global_accept"]) if v is not None]
        if ga and main_run:
            ax_acc.plot(*zip(*ga), **kw)
    for ax in (ax_w, ax_neg):
        ax.axhline(TRUTH_TWO_MODES, color="k", ls="--", lw=1.2, label="truth 2/3")
        ax.set_ylim(0.25, 1.03)
    for a, w in payload.get("cd_fixed_point", {}).items():
        ax_w.axhline(w, color="grey", ls=":", lw=1.2, label=f"CD optimum, alpha = {a}")
    ax_w.set_title("Learned weight of the heavy mode (thin lines: other seeds)")
    ax_w.set_xlabel("training iteration")
    ax_w.set_ylabel("weight")
    ax_w.legend(ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=FONT - 3)
    ax_neg.set_title("Negatives in the heavy mode")
    ax_neg.set_xlabel("training iteration")
    ax_acc.set_title("flowMC global acceptance")
    ax_acc.set_xlabel("training iteration")
    ax_acc.set_ylim(0, 1)
    box = cfg["box"]
    for i, key in enumerate(names):
        ax = fig.add_subplot(grid[2 + i // 2, i % 2])
        _show_density(fig, ax, _density(dens[key]), box,
                      f"{key}: heavy weight {runs[key]['heavy'][-1]:.3f}")
    fig.tight_layout()
    return _save(fig, out, name)


def plot_ed_nearsightedness(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None:
        return None
    rho, curves = np.asarray(payload["rho"]), payload["curves"]
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(PAGE_WIDTH, 10.5), sharex=True)
    panels = [
        ("Maximum likelihood", [("mle", "negative log-likelihood")]),
        ("Score matching: nearly flat in rho (note the scale: about 1e-3)",
         [("score_matching", "exact score matching"), ("dsm", "denoising, sigma = 0.1")]),
        ("Energy discrepancy: minimum near the true rho",
         [(k, f"t = {k.split('_t')[1]}") for k in curves if k.startswith("ed_t")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            if key in curves:
                y = np.asarray(curves[key], dtype=float)
                ax.plot(rho, y - np.nanmin(y), lw=2, label=label)
        ax.axvline(0.2, color="k", ls="--", lw=1.2, label="true rho = 0.2")
        ax.set_title(title)
        ax.set_ylabel("loss - its minimum")
        ax.legend(loc="upper left", ncol=2, fontsize=FONT - 2)
    axes[-1].set_xlabel("model's weight rho of the left mode")
    fig.tight_layout()
    return _save(fig, out, name)


def _late_error(row: dict, truth: float) -> float:
    """Mean |w - truth| over the checkpoints of the second half of training (as the example
    reports it: checkpoints at or after half the last step)."""
    last = row["steps"][-1]
    return float(np.mean([abs(w - truth) for w, step in zip(row["history"], row["steps"])
                          if step >= last / 2]))


def plot_flowmc_highdim(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None:
        return None
    cfg, results, truth = payload["config"], payload["results"], payload["truth"]
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(PAGE_WIDTH, 9.0))
    styles = ("-", "--", ":")
    dims_all: list[int] = []
    for i, method in enumerate(cfg["methods"]):
        done = sorted((r for r in results.values() if r["method"] == method and r["finished"]),
                      key=lambda r: r["dim"])
        dims = [r["dim"] for r in done]
        dims_all += dims
        ax.plot(dims, [r["error"] for r in done], "o-", color=f"C{i}", lw=2, ms=8,
                label=f"{method}: final")
        ax.plot(dims, [_late_error(r, truth) for r in done], "s--", color=f"C{i}", alpha=0.7,
                ms=7, label=f"{method}: mean over 2nd half")
        for j, r in enumerate(done):
            ax2.plot(r["steps"], r["history"], color=f"C{i}", ls=styles[j % 3], lw=2,
                     label=f"{method}, D = {r['dim']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(dims_all)), [str(d) for d in sorted(set(dims_all))])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("dimension D")
    ax.set_ylabel("|heavy-mode weight - 2/3|")
    ax.set_title(f"Error of the learned heavy-mode weight ({cfg['iters']} iterations, one seed)")
    ax.legend(ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax2.axhline(truth, color="k", lw=1.2, ls="--", label=f"truth {truth:.3f}")
    ax2.set_xlabel("training iteration")
    ax2.set_ylabel("heavy-mode weight")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("Learned heavy-mode weight during training")
    ax2.legend(ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    return _save(fig, out, name)


BUDGET_LABELS = {"negatives": "1 flow negatives", "bootstrap": "2 bootstrap",
                 "back_and_forth": "3 back-and-forth", "ed_bern": "ED-Bern"}


def plot_discrete_flow_budget(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None:
        return None
    results, published = payload["results"], payload["published_nll"]
    steps = payload["checkpoints"]
    plt = _plt()
    fig, (ax_nll, ax_mmd) = plt.subplots(2, 1, figsize=(PAGE_WIDTH, 11.0))
    for i, (method, rows) in enumerate(results.items()):
        label, color = BUDGET_LABELS.get(method, method), f"C{i}"
        x = [r["step"] for r in rows]
        ax_nll.plot(x, [r["nll"] for r in rows], "o-", color=color, lw=2, label=label)
        ax_nll.plot(x, [r["nll_ema"] for r in rows], "x--", color=color, alpha=0.7,
                    label=f"{label}, EMA weights")
        if "flow_mmd" in rows[0]:
            ax_mmd.plot(x, [r["flow_mmd"] for r in rows], "o-", color=color, lw=2,
                        label=f"{label}: flow")
            ax_mmd.plot(x, [r["flow_plus_dmala_mmd"] for r in rows], "x--", color=color,
                        alpha=0.7, label=f"{label}: flow + 10 DMALA")
    by_value: dict[float, list[str]] = {}
    for pub, value in published.items():  # methods published at the same NLL share one line
        by_value.setdefault(round(value, 2), []).append(pub)
    for j, (value, pubs) in enumerate(by_value.items()):
        ax_nll.axhline(value, color="k", ls=(":", "-.")[j % 2], lw=1.5,
                       label=f"published {' and '.join(pubs)} ({value:.2f}, far longer runs)")
    ax_nll.set(ylabel="held-out NLL (nats)",
               title="Test NLL against training budget (8gaussians, 32-bit Gray code)")
    ax_mmd.set(yscale="log", ylabel="MMD x 1e-4 (log scale)",
               title="Flow samples against held-out data")
    for ax in (ax_nll, ax_mmd):
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("EBM training steps (one run per method)")
        ax.legend(ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.17))
    fig.tight_layout()
    return _save(fig, out, name)


ED25_LABELS = {"ed": "ED", "cd": "CD", "dsm": "DSM"}


def mode_weights(img: np.ndarray, box: float, means: np.ndarray) -> np.ndarray:
    """Mass of a gridded density (image, row = y) nearest to each mixture mean, normalised."""
    n = img.shape[0]
    lin = np.linspace(-box, box, n)
    xx, yy = np.meshgrid(lin, lin, indexing="xy")
    pts = np.stack([xx.ravel(), yy.ravel()], -1)
    nearest = ((pts[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    mass = np.bincount(nearest, weights=img.ravel(), minlength=len(means))
    return mass / mass.sum()


def mode_weight_tv(img: np.ndarray, box: float, means, weights) -> float:
    """Total variation between the mode weights of a gridded density and the true weights."""
    w = np.asarray(weights, dtype=float)
    return float(0.5 * np.abs(mode_weights(img, box, np.asarray(means, float)) - w / w.sum()).sum())


def draw_ed_25gaussians(payload: dict, path: Path) -> Path:
    """The 25-Gaussians figure from its results JSON: the error curves over training, then the
    true density and each method's learned ``exp(-E)`` with a colour bar (stacked, page width)."""
    grid, target, dens = payload["grid"], payload["target"], payload["densities"]
    box, methods = grid["box"], payload["methods"]
    iters = max(r["iterations"] for r in methods.values())
    panels = ["truth"] + [m for m in methods if m in dens]
    n_rows = math.ceil(len(panels) / 2)
    plt = _plt()
    fig = plt.figure(figsize=(PAGE_WIDTH, 4.2 + 4.0 * n_rows))
    gs = fig.add_gridspec(1 + n_rows, 2, height_ratios=[4.2] + [4.0] * n_rows)
    ax = fig.add_subplot(gs[0, :])
    for i, (m, r) in enumerate(methods.items()):
        h = r["history"]
        ax.semilogy([e["iteration"] for e in h], [e["mse"] for e in h], "o-", ms=4, lw=2,
                    color=f"C{i}", label=f"{ED25_LABELS.get(m, m)}: final {r['final_mse']:.3g}")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("MSE (log scale)")
    ax.set_title(f"Error of the normalised log-density (EMA weights, {iters} iterations)")
    ax.legend(loc="best")
    ax.grid(True, which="major", alpha=0.3)
    for i, key in enumerate(panels):
        ax = fig.add_subplot(gs[1 + i // 2, i % 2])
        img = _density(dens[key])
        tv = mode_weight_tv(img, box, target["means"], target["weights"])
        if key == "truth":
            w = np.asarray(target["weights"], dtype=float)
            equal = "equal weights" if np.allclose(w, w[0]) else "unequal weights"
            title = f"true density\n{len(w)} modes, {equal}"
        else:
            title = (f"{ED25_LABELS.get(key, key)}: learned exp(-E)\n"
                     f"log-density MSE {methods[key]['final_mse']:.2g}\n"
                     f"mode-weight TV {tv:.3f}")
        _show_density(fig, ax, img, box, title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ed_25gaussians(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None or "densities" not in payload:
        return None
    return draw_ed_25gaussians(payload, out / f"{name}.png")


def _example(module: str):
    """An example script's module (examples/ is on sys.path when this script runs)."""
    import importlib
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(module)


def plot_ising_recovery(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None or any("coupling" not in r for r in payload["results"].values()):
        return None
    path = out / f"{name}.png"
    _example("ising_recovery").plot_from_json(RESULTS / f"{name}.json", path)
    return path


def plot_ed_categorical(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None or not any("samples_2d" in r for runs in payload["runs"].values()
                                  for r in runs.values()):
        return None
    path = out / f"{name}.png"
    _example("ed_categorical").plot(payload, path)
    return path


def plot_ed_discrete_toys(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None or not any("samples_2d" in r for runs in payload["runs"].values()
                                  for r in runs.values()):
        return None
    path = out / f"{name}.png"
    _example("ed_discrete_toys").plot_from_json(RESULTS / f"{name}.json", path)
    return path


def plot_discrete_flow_digits(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None or "samples" not in payload:
        return None
    path = out / f"{name}.png"
    _example("discrete_flow_digits").plot(payload, path)
    return path


def plot_discrete_flow_toys(name: str, out: Path) -> Path | None:
    payload = _load(name)
    if payload is None or any("samples_2d" not in r for r in payload["results"]):
        return None
    path = out / f"{name}.png"
    _example("discrete_flow_toys").plot(payload["results"], payload["config"], path)
    return path


FIGURES: dict[str, Callable[[str, Path], Path | None]] = {
    "flowmc_toys": plot_flowmc_toys,
    "flowmc_toys_quick": plot_flowmc_toys,
    "flowmc_rings_long": plot_flowmc_toys,
    "flowmc_two_modes": plot_flowmc_two_modes,
    "flowmc_two_modes_quick": plot_flowmc_two_modes,
    "ed_nearsightedness": plot_ed_nearsightedness,
    "flowmc_highdim": plot_flowmc_highdim,
    "flowmc_highdim_quick": plot_flowmc_highdim,
    "discrete_flow_budget": plot_discrete_flow_budget,
    "ed_25gaussians": plot_ed_25gaussians,
    "ed_25gaussians_quick": plot_ed_25gaussians,
    "ising_recovery": plot_ising_recovery,
    "ising_recovery_quick": plot_ising_recovery,
    "ed_categorical": plot_ed_categorical,
    "discrete_flow_toys": plot_discrete_flow_toys,
    "discrete_flow_toys_quick": plot_discrete_flow_toys,
    "ed_discrete_toys": plot_ed_discrete_toys,
    "discrete_flow_digits": plot_discrete_flow_digits,
    "discrete_flow_digits_quick": plot_discrete_flow_digits,
}


def _save(fig, out: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-docs", action="store_true",
                        help="write docs/figures (default: runs/docs_figures)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the figures")
    parser.add_argument("--only", nargs="*", choices=sorted(FIGURES), default=None)
    args = parser.parse_args(argv)
    out = args.out or (ROOT / "docs" / "figures" if args.update_docs
                       else ROOT / "runs" / "docs_figures")
    for name in args.only or FIGURES:
        path = FIGURES[name](name, out)
        print(f"wrote {path}" if path else
              f"skipped {name}: docs/results/{name}.json not found or without the data it "
              "draws (density grids, couplings or samples)")


# A documentation tool, not an experiment: it trains nothing and has no config or --quick
# mode, so tests/test_examples.py (which collects the scripts with a double-quoted main guard)
# does not run it as an example.
if __name__ == '__main__':
    main()
