"""High-dimensional two-mode Gaussian mixtures (weights 2:1): mode-weight error against D.

Target: p = 2/3 N(-4 u, I) + 1/3 N(4 u, I), u = (1, ..., 1) / sqrt(D). An MLP energy is
trained with PCD and with flowMC negatives; the heavy-mode weight of the learned density
p ∝ exp(-E) is estimated by self-normalised importance sampling with the true mixture as the
proposal (``importance_weights``).

    python examples/flowmc_highdim.py [--quick] [--config examples/configs/flowmc_highdim.toml]

Writes (``_quick`` suffix with --quick) docs/results/flowmc_highdim.json and docs/figures/flowmc_highdim.png.
"""

from __future__ import annotations

import math

import torch
from flowmc_common import figure_path, importance_weights, load_config, out_name, save_json, train

from ebmflow.energy import GaussianMixtureEnergy

DEFAULTS = {
    "dims": [16, 32, 64],
    "methods": ["pcd", "flowmc"],
    "iters": 400, "eval_every": 100, "n_data": 10000, "batch_size": 256,
    "hidden": [128, 128], "lr": 1e-3, "alpha": 0.1,
    "n_local": 20, "ula_step": 0.05, "mala_step": 0.1, "n_global": 10,
    "flow_layers": 6, "flow_hidden": [64, 64], "flow_lr": 2e-3, "flow_steps": 1,
    "n_eval": 20000, "seed": 0, "threads": 1,
    "quick": {"iters": 40, "eval_every": 20, "dims": [16]},
}


def mixture(dim: int) -> GaussianMixtureEnergy:
    u = torch.ones(dim) / math.sqrt(dim)
    return GaussianMixtureEnergy(torch.stack([-4 * u, 4 * u]), 1.0, torch.tensor([2.0, 1.0]))


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(DEFAULTS, argv)
    results = {}
    for dim in cfg["dims"]:
        target = mixture(dim)
        gen_eval = torch.Generator().manual_seed(123)

        def evaluate(energy, target=target, gen_eval=gen_eval):
            return importance_weights(energy, target, cfg["n_eval"], gen_eval)

        for method in cfg["methods"]:
            out = train(method, lambda n, g, t=target: t.sample(n, g), dim, cfg, evaluate,
                        box=8.0, seed=cfg["seed"])
            heavy = out["weights"][-1][0]
            results[f"{dim}/{method}"] = {
                "dim": dim, "method": method, "heavy": heavy, "error": abs(heavy - 2 / 3),
                "history": [w[0] for w in out["weights"]], "steps": out["steps"],
                "train_seconds": out["times"][-1], "global_accept": out.get("global_accept")}
            print(f"D={dim:3d} {method:8s} heavy weight {heavy:.3f} (truth 0.667) "
                  f"error {abs(heavy - 2 / 3):.3f} ({out['times'][-1]:.1f} s)")
    plot(results, cfg)
    payload = {"config": cfg, "results": results}
    save_json(out_name("flowmc_highdim", cfg), payload)
    return payload


def plot(results: dict, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for method in cfg["methods"]:
        dims = [r["dim"] for r in results.values() if r["method"] == method]
        errs = [r["error"] for r in results.values() if r["method"] == method]
        ax.plot(dims, errs, "o-", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("dimension D")
    ax.set_ylabel("|w_heavy - 2/3|")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure_path(out_name("flowmc_highdim", cfg)), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
