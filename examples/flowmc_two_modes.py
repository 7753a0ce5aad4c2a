"""The motivating example of Grenioux, Moulines, Gabrie: a 2-D two-mode mixture, weights 2:1.

An MLP energy is trained by maximum likelihood with short-run ULA, PCD (persistent ULA) and
flowMC negatives (plus flowMC with the flow-tilted energy). The estimated weight of the heavy
mode, by quadrature of exp(-E) on a grid, is recorded during training.

    python examples/flowmc_two_modes.py [--quick] [--config examples/configs/flowmc_two_modes.toml]

Writes (``_quick`` suffix with --quick) docs/results/flowmc_two_modes.json and docs/figures/flowmc_two_modes.png.
"""

from __future__ import annotations

import torch
from flowmc_common import (
    figure_path,
    grid,
    load_config,
    out_name,
    quadrature_weights,
    save_json,
    train,
)

from ebmflow.energy import GaussianMixtureEnergy

DEFAULTS = {
    "methods": ["ula", "pcd", "flowmc", "flowmc_tilted"],
    "iters": 1000, "eval_every": 50, "n_data": 10000, "batch_size": 256,
    "hidden": [64, 64, 64], "lr": 1e-3, "alpha": 0.1,
    "n_local": 20, "ula_step": 0.05, "mala_step": 0.1, "n_global": 10,
    "flow_layers": 4, "flow_hidden": [32, 32], "flow_lr": 2e-3, "flow_steps": 1,
    "grid": 160, "box": 9.0, "seed": 0,
    "quick": {"iters": 100, "eval_every": 25, "methods": ["pcd", "flowmc"], "grid": 80},
}


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(DEFAULTS, argv)
    target = GaussianMixtureEnergy.two_modes(dim=2, separation=8.0, scale=1.0)
    points, _ = grid(cfg["box"], cfg["grid"])
    labels = torch.cdist(points, target.means).argmin(1)

    def evaluate(energy):
        return quadrature_weights(energy, labels, points, 2)

    def data_fn(n, gen):
        return target.sample(n, gen)

    runs = {}
    for method in cfg["methods"]:
        out = train(method, data_fn, 2, cfg, evaluate, cfg["box"], seed=cfg["seed"])
        heavy = [w[0] for w in out["weights"]]
        runs[method] = {**{k: v for k, v in out.items() if k != "energy"}, "heavy": heavy,
                        "final_heavy": heavy[-1], "final_error": abs(heavy[-1] - 2 / 3),
                        "train_seconds": out["times"][-1]}
        runs[method]["_energy"] = out["energy"]
        print(f"{method:14s} heavy-mode weight {heavy[-1]:.3f} (truth 0.667), "
              f"error {abs(heavy[-1] - 2 / 3):.3f}, {out['times'][-1]:.1f} s")
    plot(runs, target, cfg)
    payload = {"config": cfg, "truth": 2 / 3,
               "runs": {m: {k: v for k, v in r.items() if k != "_energy"} for m, r in runs.items()}}
    save_json(out_name("flowmc_two_modes", cfg), payload)
    return payload


def plot(runs: dict, target, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    fig, axes = plt.subplots(1, n + 1, figsize=(4 * (n + 1), 3.6))
    ax = axes[0]
    for method, r in runs.items():
        ax.plot(r["steps"], r["heavy"], label=method)
    ax.axhline(2 / 3, color="k", ls="--", lw=1, label="truth 2/3")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("weight of the heavy mode")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    points, _ = grid(cfg["box"], 120)
    for ax, (method, r) in zip(axes[1:], runs.items()):
        with torch.no_grad():
            logp = -r["_energy"](points)
        dens = torch.softmax(logp, 0).reshape(120, 120).T
        ax.imshow(dens, origin="lower", extent=[-cfg["box"], cfg["box"]] * 2, cmap="viridis")
        ax.set_title(f"{method}: w = {r['final_heavy']:.2f}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(figure_path(out_name("flowmc_two_modes", cfg)), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
