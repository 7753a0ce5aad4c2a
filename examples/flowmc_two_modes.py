"""The motivating example of Grenioux, Moulines, Gabrie: a 2-D two-mode mixture, weights 2:1.

An MLP energy is trained with the CD loss and short-run ULA, PCD (persistent ULA) and flowMC
negatives (plus flowMC with the flow-tilted energy, and flowMC with a large CD regulariser as
an ablation). The estimated weight of the heavy mode, by quadrature of exp(-E) on a grid, is
recorded every ``eval_every`` iterations, with the fraction of negatives in the heavy mode and
flowMC's global acceptance. ``seeds`` repeat the runs of ``seed_methods``.

MALA's step size adapts during its first ``mala_warmup`` steps; it must keep adapting while
the energy is learned (the default covers all of training): adapted on the flat initial
energy only, it grows to ~100 and local moves are then never accepted.
``reuse = {from = "<json stem>", runs = [...]}`` copies finished runs from an earlier output.

The CD loss's regulariser alpha * (mean E(x+)^2 + mean E(x-)^2) biases the weights even with
exact negatives: its stationary point satisfies, pointwise on the grid,

    p_data(x) - p_model(x) + 2 alpha E(x) (p_data(x) + p_model(x)) = 0,

which is solved here by preconditioned fixed-point iteration (``cd_fixed_point``) to give the
heavy-mode weight an unbiased sampler would converge to for the chosen alpha.

    python examples/flowmc_two_modes.py [--quick] [--config examples/configs/flowmc_two_modes.toml]
    python examples/flowmc_two_modes.py --plot-only   # redraw the figure from the JSON

Writes (``_quick`` suffix with --quick) runs/examples/results/flowmc_two_modes.json (after
every evaluation, so an interrupted run leaves its partial results) and
runs/examples/figures/flowmc_two_modes.png and prints where (``--update-docs``: docs/results
and docs/figures; ``--out FOLDER``).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from flowmc_common import (
    figure_path,
    grid,
    load_config,
    load_json,
    out_name,
    quadrature_weights,
    report,
    save_json,
    train,
)

from ebmflow.energy import GaussianMixtureEnergy

DEFAULTS = {
    "methods": ["ula", "pcd", "flowmc", "flowmc_tilted"],
    "seeds": [0, 1, 2],
    "seed_methods": ["ula", "pcd", "flowmc"],
    "ablations": [{"name": "flowmc_alpha0.1", "method": "flowmc", "alpha": 0.1}],
    "iters": 2000,
    "eval_every": 100,
    "n_data": 10000,
    "batch_size": 256,
    "hidden": [64, 64, 64],
    "lr": 1e-3,
    "alpha": 0.01,
    "n_local": 20,
    "flowmc_n_local": 10,
    "ula_step": 0.05,
    "mala_step": 0.1,
    "n_global": 10,
    "mala_warmup": 20000,
    "reuse": {},
    "tilt_pretrain": 500,
    "flow_layers": 4,
    "flow_hidden": [32, 32],
    "flow_lr": 2e-3,
    "flow_steps": 1,
    "grid": 160,
    "box": 9.0,
    "density_grid": 60,
    "seed": 0,
    "threads": 1,
    "quick": {
        "iters": 100,
        "eval_every": 25,
        "methods": ["pcd", "flowmc"],
        "seeds": [0],
        "ablations": [],
        "grid": 80,
        "mala_warmup": 1000,
    },
}
TRUTH = 2 / 3


def cd_fixed_point(alpha: float, box: float, n: int = 160, iters: int = 20000) -> float:
    """Heavy-mode weight at the stationary point of the regularised CD loss with exact
    negatives, for a free energy on an n x n grid (see the module docstring)."""
    target = GaussianMixtureEnergy.two_modes(dim=2, separation=8.0, scale=1.0)
    points, _ = grid(box, n)
    labels = torch.cdist(points, target.means).argmin(1)
    p_data = torch.softmax(target.log_prob(points).double(), 0)
    e = -p_data.clamp_min(1e-300).log()
    e = e - (p_data * e).sum()
    for _ in range(iters):
        p_model = torch.softmax(-e, 0)
        g = p_data - p_model + 2 * alpha * e * (p_data + p_model)
        e = e - 0.5 * g / (p_data + p_model + 1e-12)
    return float(torch.softmax(-e, 0)[labels == 0].sum())


def plateau(values: list[float], steps: list[int]) -> float:
    """Mean over the checkpoints of the last quarter of training."""
    last = steps[-1]
    vals = [v for v, s in zip(values, steps) if s >= 0.75 * last and s > 0]
    return sum(vals) / len(vals)


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    """Per run name, over seeds: final and plateau heavy weights, and the swing of the weight
    during training (sd over the checkpoints of the second half); mean and sd of each."""
    out: dict[str, Any] = {}
    for key, r in runs.items():
        name = key.split("/seed")[0]
        entry = out.setdefault(name, {"seeds": [], "final": [], "plateau": [], "swing": []})
        if r["steps"][-1] < r["iters"]:
            continue  # unfinished
        entry["seeds"].append(r["seed"])
        entry["final"].append(r["heavy"][-1])
        entry["plateau"].append(plateau(r["heavy"], r["steps"]))
        late = [w for w, s in zip(r["heavy"], r["steps"]) if s >= r["steps"][-1] / 2]
        entry["swing"].append(statistics.pstdev(late))
    for entry in out.values():
        for k in ("final", "plateau", "swing"):
            v = entry[k]
            entry[f"{k}_mean"] = statistics.fmean(v) if v else None
            entry[f"{k}_sd"] = statistics.stdev(v) if len(v) > 1 else None
    return out


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(DEFAULTS, argv)
    name = out_name("flowmc_two_modes", cfg)
    if cfg["plot_only"]:
        payload = load_json(name)
        plot(payload, cfg)
        report(name, plot_only=True)
        return payload
    target = GaussianMixtureEnergy.two_modes(dim=2, separation=8.0, scale=1.0)
    points, _ = grid(cfg["box"], cfg["grid"])
    labels = torch.cdist(points, target.means).argmin(1)
    dpoints, _ = grid(cfg["box"], cfg["density_grid"])

    def evaluate(energy):
        return quadrature_weights(energy, labels, points, 2)

    def chain_labels(x):
        return torch.cdist(x, target.means).argmin(1)

    def data_fn(n, gen):
        return target.sample(n, gen)

    payload: dict[str, Any] = {"config": cfg, "truth": TRUTH, "runs": {}, "densities": {}}
    if not cfg["quick_mode"]:
        payload["cd_fixed_point"] = {
            str(a): cd_fixed_point(a, cfg["box"]) for a in sorted({cfg["alpha"], 0.1})
        }
        print(
            "heavy weight at the CD-loss stationary point (exact negatives):",
            payload["cd_fixed_point"],
        )
    plan = [(m, m, cfg["seeds"][0], {}) for m in cfg["methods"] if m in cfg["seed_methods"]]
    plan += [(m, m, s, {}) for s in cfg["seeds"][1:] for m in cfg["seed_methods"]]
    plan += [
        (
            a["name"],
            a["method"],
            cfg["seeds"][0],
            {k: v for k, v in a.items() if k not in ("name", "method")},
        )
        for a in cfg["ablations"]
    ]
    plan += [(m, m, cfg["seeds"][0], {}) for m in cfg["methods"] if m not in cfg["seed_methods"]]
    reuse = cfg["reuse"]
    if reuse:  # finished runs of an earlier invocation (same settings for those methods)
        old = load_json(reuse["from"])
        for key, r in old["runs"].items():
            if key.split("/seed")[0] in reuse["runs"] and r["steps"][-1] == cfg["iters"]:
                payload["runs"][key] = {**r, "reused_from": reuse["from"]}
                if key in old["densities"]:
                    payload["densities"][key] = old["densities"][key]
    for run_name, method, seed, over in plan:
        key = run_name if seed == cfg["seeds"][0] else f"{run_name}/seed{seed}"
        run_cfg = {**cfg, **over}
        if key in payload["runs"]:
            continue

        def progress(hist, key=key, seed=seed, over=over):
            payload["runs"][key] = {
                **hist,
                "heavy": [w[0] for w in hist["weights"]],
                "chain_heavy": [None if c is None else c[0] for c in hist["chain_weights"]],
                "seed": seed,
                "iters": cfg["iters"],
                "overrides": over,
            }
            payload["summary"] = summarise(payload["runs"])
            save_json(name, payload)

        out = train(
            method,
            data_fn,
            2,
            run_cfg,
            evaluate,
            cfg["box"],
            seed=seed,
            chain_labels=chain_labels,
            on_eval=progress,
        )
        r = payload["runs"][key]
        r["train_seconds"] = out["times"][-1]
        if seed == cfg["seeds"][0]:
            with torch.no_grad():
                dens = torch.softmax(-out["energy"](dpoints), 0)
            payload["densities"][run_name] = [round(float(v), 7) for v in dens]
        save_json(name, payload)
        acc = r["global_accept"][-1]
        acc_text = f", global accept {acc:.3f}" if acc is not None else ""  # flowMC only
        print(
            f"{key:20s} heavy-mode weight {r['heavy'][-1]:.3f} (truth 0.667), plateau "
            f"{plateau(r['heavy'], r['steps']):.3f}{acc_text}, {out['times'][-1]:.1f} s",
            flush=True,
        )
    plot(payload, cfg)
    report(name)
    return payload


def plot(payload: dict, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, dens = payload["runs"], payload["densities"]
    names = list(dens)
    ncol = max(3, len(names))
    fig, axes = plt.subplots(2, ncol, figsize=(3.3 * ncol, 6.6), squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for key, r in runs.items():
        base = key.split("/seed")[0]
        c, main_run = colors.get(base, "k"), "/seed" not in key
        kw = {
            "color": c,
            "lw": 1.6 if main_run else 0.8,
            "alpha": 1.0 if main_run else 0.5,
            "label": base if main_run else None,
        }
        axes[0][0].plot(r["steps"], r["heavy"], **kw)
        ch = [(s, v) for s, v in zip(r["steps"], r["chain_heavy"]) if v is not None]
        if ch:
            axes[0][1].plot(*zip(*ch), **kw)
        ga = [(s, v) for s, v in zip(r["steps"], r["global_accept"]) if v is not None]
        if ga and main_run:
            axes[0][2].plot(*zip(*ga), **kw)
    for ax in axes[0][:2]:
        ax.axhline(TRUTH, color="k", ls="--", lw=1, label="truth 2/3")
        ax.set_ylim(0.25, 1.03)
        ax.set_xlabel("training iteration")
    for a, w in payload.get("cd_fixed_point", {}).items():
        axes[0][0].axhline(w, color="grey", ls=":", lw=1, label=f"CD optimum, alpha={a}")
    axes[0][0].set_ylabel("learned weight of the heavy mode")
    axes[0][0].legend(fontsize=6, loc="lower left", ncol=2)
    axes[0][1].set_ylabel("fraction of negatives in heavy mode")
    axes[0][2].set_ylabel("flowMC global acceptance")
    axes[0][2].set_xlabel("training iteration")
    axes[0][2].set_ylim(0, 1)
    if axes[0][2].lines:
        axes[0][2].legend(fontsize=7)
    for ax in axes[0][3:]:
        ax.axis("off")
    n, box = cfg["density_grid"], cfg["box"]
    for ax, name in zip(axes[1], names):
        img = torch.tensor(dens[name]).reshape(n, n).T
        ax.imshow(img, origin="lower", extent=[-box, box] * 2, cmap="viridis")
        ax.set_title(f"{name}: w = {runs[name]['heavy'][-1]:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[1][len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(figure_path(out_name("flowmc_two_modes", cfg)), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
