"""Energy discrepancy on a 16-dimensional, 5-state categorical toy.

A 2-D toy point is written as 8 base-5 digits per coordinate (``ebmflow.data.base_encode``),
giving states in {0, ..., 4}^16. An ``MLPEnergy`` on ``Categorical(16, 5)`` is trained with

* ED-Grid: ``EnergyDiscrepancy(GridPerturbation(num_classes=5), m=32)``;
* ED-uniform / ED-ordinal: ``EnergyDiscrepancy(CategoricalPerturbation(5, kind, t), m=32)``,
  the heat kernels exp(t L) of the complete graph and of the path 0 - 1 - 2 - 3 - 4;
* PCD with random-scan ``Gibbs`` chains (the contrastive-divergence baseline).

Evaluation as in ``ed_discrete_toys.py``: NLL with log Z by importance sampling over uniform
states (log Z = log mean exp(-E(u)) + 16 log 5; the uniform model has NLL 16 log 5 = 25.75),
and the exp(-0.1 Hamming) MMD against Gibbs samples.

    python examples/ed_categorical.py --quick    # 150 iterations (< 1 min)
    python examples/ed_categorical.py            # the config's iterations

    python examples/ed_categorical.py --plot-only --update-docs   # redraw the docs figure

Writes runs/examples/figures/ed_categorical.png and runs/examples/results/ed_categorical.json
(``--update-docs``: docs/figures and docs/results) and prints where. The JSON keeps each
model's samples decoded to 2-D, so ``--plot-only`` redraws the figure from it without training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ed_discrete_toys import ROOT, Task, parse, run, save  # noqa: E402
from example_output import report_written  # noqa: E402

from ebmflow.data import base_decode, base_encode, toy_2d  # noqa: E402
from ebmflow.spaces import Categorical  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "ed_categorical.toml"
FONT = 13  # points; the figure is 8 in wide at 100 dpi, shown at about its pixel size
LABELS = {"ed_grid": "ED-Grid", "ed_uniform": "ED, uniform kernel",
          "ed_ordinal": "ED, ordinal kernel", "pcd": "PCD with Gibbs"}


def base_task(data_cfg: dict) -> Task:
    k, digits, lo, hi = (data_cfg[key] for key in ("num_classes", "digits", "low", "high"))
    return Task(Categorical(2 * digits, k), lambda x: base_encode(x, k, digits, lo, hi),
                lambda c: base_decode(c, k, digits, lo, hi))


def plot(results: dict, path: Path) -> None:
    """Per data set: 2-D histograms of the (quantised) data and of each model's Gibbs samples,
    each with a colour bar (per cent of the points per bin), then the MMD of every model
    against the noise floor of two test sets; two panels a row, 8 in wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT,
                         "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1})
    cfg, runs = results["config"], results["runs"]
    ev, tr = cfg["eval"], cfg["train"]
    task = base_task(cfg["data"])
    for ds, ds_runs in runs.items():
        methods = [m for m in ds_runs if m != "data_vs_data" and "samples_2d" in ds_runs[m]]
        n_panels = len(methods) + 2
        nrow = math.ceil(n_panels / 2)
        fig, axes = plt.subplots(nrow, 2, figsize=(8.0, 3.5 * nrow + 0.6), squeeze=False)
        axes = axes.ravel()
        data = task.decode(task.encode(toy_2d(ds, 4000, torch.Generator().manual_seed(5))))
        lims = [[float(data[:, i].min()) - 0.5, float(data[:, i].max()) + 0.5] for i in (0, 1)]
        n_samples = {len(ds_runs[m]["samples_2d"]) for m in methods}
        panels = [("data (4,000 points, quantised)", data)] + [
            (f"{LABELS.get(m, m)}\nNLL {ds_runs[m]['nll']:.2f}, MMD {ds_runs[m]['mmd_1e4']:.2f}",
             torch.tensor(ds_runs[m]["samples_2d"])) for m in methods]
        for ax, (title, pts) in zip(axes, panels):
            w = torch.full((pts.shape[0],), 100.0 / pts.shape[0])
            *_, im = ax.hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=40, range=lims,
                               weights=w.numpy(), cmap="viridis")
            ax.set_title(title)
            ax.set_xticks([-4, 0, 4])
            ax.set_yticks([-4, 0, 4])
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            cb.set_label("% per bin", fontsize=FONT - 1)
            cb.ax.tick_params(labelsize=FONT - 1)
        ax = axes[len(panels)]
        mmds = [ds_runs[m]["mmd_1e4"] for m in methods]
        ax.barh(range(len(methods)), mmds, color=[f"C{i}" for i in range(len(methods))])
        ax.set_yticks(range(len(methods)), [LABELS.get(m, m) for m in methods])
        ax.invert_yaxis()
        floor = ds_runs.get("data_vs_data", {}).get("mmd_1e4")
        if floor is not None:
            ax.axvline(floor, color="k", ls="--", lw=1.5)
            ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("MMD x 1e-4 to test data")
        ax.set_title("MMD (lower is better)\ndashed: two test sets")
        for ax in axes[len(panels) + 1:]:
            ax.axis("off")
        sizes = "/".join(f"{n:,}" for n in sorted(n_samples))
        fig.suptitle(f"{ds} as 16 base-5 digits, {tr['iterations']:,} iterations\n"
                     f"model panels: {sizes} samples after {ev['gibbs_sweeps']} Gibbs sweeps; "
                     "NLL in nats, MMD x 1e-4", fontsize=FONT)
        fig.tight_layout()
        out = path if len(runs) == 1 else path.with_name(f"{path.stem}_{ds}{path.suffix}")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plot-only", action="store_true")
    known, argv = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    description = (__doc__.split("\n")[0] + " (--plot-only: redraw the figure from the results "
                   "JSON, without training)")
    args, cfg, datasets, iterations = parse(argv, description, CONFIG,
                                            "ed_grid,ed_uniform,ed_ordinal,pcd")
    name = "ed_categorical" + ("_quick" if args.quick else "")
    png = args.out / "figures" / f"{name}.png"
    if known.plot_only:
        results = json.loads((args.out / "results" / f"{name}.json").read_text())
        plot(results, png)
        report_written(png)
        return results
    torch.set_num_threads(1)

    def make_task(ds: str) -> Task:
        return base_task(cfg["data"])

    results = run(cfg, args.methods.split(","), datasets, iterations, make_task)
    results["quick"] = args.quick
    results = save(results, name, args.out, make_task, args.merge)
    plot(results, png)  # replaces the generic figure of save() by this page-width one
    return results


if __name__ == "__main__":
    main()
