"""Nearsightedness of score matching vs energy discrepancy (Schroeder et al. 2023, Fig. 1).

Data: 4,096 draws of 0.2 N(-5, 1) + 0.8 N(5, 1). Model family: the same mixture with a free
weight rho, p_rho = rho N(-5, 1) + (1 - rho) N(5, 1). For every rho on a grid we evaluate

* MLE: mean -log p_rho(x);
* exact score matching (Hyvarinen): mean |s(x)|^2 / 2 + ds/dx, s = d log p_rho / dx;
* denoising score matching (``DenoisingScoreMatching``, sigma = 0.1);
* energy discrepancy (``EnergyDiscrepancy(GaussianPerturbation(t), m=4, w=1)``) for
  t in {2, 4, 8, 32}, with common random numbers across rho (the same noise for every rho).

The modes are 10 standard deviations apart, so the score inside each mode hardly depends on
rho: score matching is flat in rho. Energy discrepancy's negatives travel a distance ~sqrt(2t),
so it sees the relative weight of the modes and has its minimum near rho = 0.2, sharper as t
grows.

    python examples/ed_nearsightedness.py            # 99 values of rho (seconds)
    python examples/ed_nearsightedness.py --quick    # 25 values of rho

Settings: the ``[example]`` table of examples/configs/ed_nearsightedness.toml (the defaults
above; ``--seed`` overrides it).

Writes runs/examples/figures/ed_nearsightedness.png and
runs/examples/results/ed_nearsightedness.json (``--update-docs``: docs/figures and docs/results)
and prints where.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from example_output import add_output_arguments, output_dir, report_written

from ebmflow.cli import load_example_settings
from ebmflow.energy import GaussianMixtureEnergy
from ebmflow.losses import DenoisingScoreMatching, EnergyDiscrepancy, GaussianPerturbation

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "ed_nearsightedness.toml"
T_VALUES = (2.0, 4.0, 8.0, 32.0)
DEFAULTS = {"n_data": 4096, "means": [-5.0, 5.0], "std": 1.0, "rho_true": 0.2, "n_rho": 99,
            "quick_n_rho": 25, "t_values": list(T_VALUES), "m": 4, "w": 1.0, "ed_repeats": 4,
            "dsm_sigma": 0.1, "seed": 0}


def load_example_config(path: Path) -> dict:
    """The ``[example]`` table of a config file: this script's settings. (The file's ``[train]``
    table is for ``ebmflow train``; see docs/cli.md.)"""
    table = load_example_settings(path)
    unknown = sorted(set(table) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"{path}: unknown key(s) {unknown} in [example]; valid: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **table}


def mixture(rho: float, means: tuple[float, float] = (-5.0, 5.0),
            std: float = 1.0) -> GaussianMixtureEnergy:
    """rho N(-5, 1) + (1 - rho) N(5, 1) (default means and std) as a normalised energy
    E = -log p."""
    return GaussianMixtureEnergy(torch.tensor([[float(means[0])], [float(means[1])]]), float(std),
                                 torch.tensor([rho, 1 - rho]))


def exact_score_matching(model: GaussianMixtureEnergy, x: torch.Tensor) -> float:
    """Hyvarinen's objective mean_x (|s(x)|^2 / 2 + ds/dx) with s = -dE/dx (1-D)."""
    x = x.detach().requires_grad_(True)
    e = model(x)
    (g,) = torch.autograd.grad(e.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    return float((0.5 * g.pow(2) - h).mean().detach())


def evaluate(rhos: list[float], n_data: int = 4096, seed: int = 0, n_repeats: int = 4,
             cfg: dict | None = None) -> dict:
    """Every loss at every rho; ``cfg`` (default ``DEFAULTS``) gives the mixture, the t values,
    M, w and the DSM sigma."""
    c = {**DEFAULTS, **(cfg or {})}
    means, std = tuple(c["means"]), c["std"]
    data = mixture(c["rho_true"], means, std).sample(n_data, torch.Generator().manual_seed(seed))
    t_values = [float(t) for t in c["t_values"]]
    curves: dict[str, list[float]] = {"mle": [], "score_matching": [], "dsm": []}
    curves.update({f"ed_t{t:g}": [] for t in t_values})
    for rho in rhos:
        model = mixture(rho, means, std)
        with torch.no_grad():
            curves["mle"].append(float(model(data).mean()))
        curves["score_matching"].append(exact_score_matching(model, data))
        dsm = DenoisingScoreMatching(c["dsm_sigma"])(model, data,
                                                     generator=torch.Generator().manual_seed(1))
        curves["dsm"].append(float(dsm.loss.detach()))
        for t in t_values:
            loss = EnergyDiscrepancy(GaussianPerturbation(t), m=c["m"], w=c["w"])
            gen = torch.Generator().manual_seed(seed + 1)  # common random numbers across rho
            with torch.no_grad():
                vals = [float(loss(model, data, generator=gen).loss) for _ in range(n_repeats)]
            curves[f"ed_t{t:g}"].append(sum(vals) / len(vals))
    summary = {}
    for name, vals in curves.items():
        i = min(range(len(vals)), key=vals.__getitem__)
        i05 = min(range(len(rhos)), key=lambda j: abs(rhos[j] - 0.5))
        summary[name] = {
            "argmin_rho": rhos[i],
            "min": vals[i],
            "rise_at_0.5": vals[i05] - vals[i],  # how much the loss rises from its minimum
            "range": max(vals) - min(vals),
        }
    return {"rho": rhos, "curves": curves, "summary": summary, "n_data": n_data,
            "ed_repeats": n_repeats, "seed": seed}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rho = results["rho"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in [k for k in results["curves"] if k == "mle" or k.startswith("ed_t")]:
        v = results["curves"][name]
        lo = min(v)
        axes[0].plot(rho, [a - lo for a in v], label=name.replace("_t", " t="))
    axes[0].set_title("MLE and energy discrepancy (minus minimum)")
    axes[0].set_ylim(0, 1.0)
    for ax, name, title in [(axes[1], "score_matching", "exact score matching"),
                            (axes[2], "dsm", "denoising score matching (sigma=0.1)")]:
        ax.plot(rho, results["curves"][name], color="k")
        ax.set_title(title)
    for ax in axes:
        ax.axvline(results.get("rho_true", 0.2), color="grey", ls=":", lw=1)
        ax.set_xlabel("rho (model weight of the left mode)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="25 values of rho")
    add_output_arguments(parser)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--seed", type=int, default=None, help="default: the config's seed (0)")
    args = parser.parse_args(argv)
    cfg = load_example_config(args.config)
    seed = cfg["seed"] if args.seed is None else args.seed
    n = cfg["quick_n_rho"] if args.quick else cfg["n_rho"]
    rhos = [round(0.01 + 0.98 * i / (n - 1), 4) for i in range(n)]
    start = time.perf_counter()
    results = evaluate(rhos, n_data=cfg["n_data"], seed=seed, n_repeats=cfg["ed_repeats"], cfg=cfg)
    results["seconds"] = time.perf_counter() - start
    results["quick"] = args.quick
    name = "ed_nearsightedness" + ("_quick" if args.quick else "")
    out = output_dir(args)
    plot(results, out / "figures" / f"{name}.png")
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(f"{'loss':16s} {'argmin rho':>10s} {'rise 0.2->0.5':>14s} {'range':>10s}")
    for key, s in results["summary"].items():
        print(f"{key:16s} {s['argmin_rho']:10.3f} {s['rise_at_0.5']:14.4f} {s['range']:10.4f}")
    report_written(out / "results" / f"{name}.json", out / "figures" / f"{name}.png")
    return results


if __name__ == "__main__":
    main()
