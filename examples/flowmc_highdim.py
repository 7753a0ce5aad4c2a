"""High-dimensional two-mode Gaussian mixtures (weights 2:1): mode-weight error against D.

Target: p = 2/3 N(-4 u, I) + 1/3 N(4 u, I), u = (1, ..., 1) / sqrt(D). An MLP energy is
trained with PCD and with flowMC negatives; the heavy-mode weight of the learned density
p ∝ exp(-E) is estimated by self-normalised importance sampling with the true mixture as the
proposal (``importance_weights``).

    python examples/flowmc_highdim.py [--quick] [--config examples/configs/flowmc_highdim.toml]

Writes (``_quick`` suffix with --quick) runs/examples/results/flowmc_highdim.json (after
every evaluation) and runs/examples/figures/flowmc_highdim.png and prints where
(``--update-docs``: docs/results and docs/figures; ``--out FOLDER``); ``--plot-only`` redraws
from the JSON.
The CD regulariser alpha is small (0.001) because its bias on the weights grows with the
spread of the energy within a mode (about D / 2).
"""

from __future__ import annotations

import math

import torch
from flowmc_common import (
    figure_path,
    importance_weights,
    load_config,
    load_json,
    out_name,
    report,
    save_json,
    train,
)

from ebmflow.energy import GaussianMixtureEnergy

DEFAULTS = {
    "dims": [16, 32, 64],
    "methods": ["pcd", "flowmc"],
    "iters": 600,
    "eval_every": 100,
    "n_data": 10000,
    "batch_size": 256,
    "hidden": [128, 128],
    "lr": 1e-3,
    "alpha": 0.001,
    "n_local": 20,
    "flowmc_n_local": 10,
    "ula_step": 0.05,
    "mala_step": 0.1,
    "n_global": 10,
    "mala_warmup": 6000,
    "flow_layers": 6,
    "flow_hidden": [64, 64],
    "flow_lr": 2e-3,
    "flow_steps": 1,
    "n_eval": 20000,
    "seed": 0,
    "threads": 1,
    "quick": {"iters": 40, "eval_every": 20, "dims": [16], "mala_warmup": 400},
}


def mixture(dim: int) -> GaussianMixtureEnergy:
    u = torch.ones(dim) / math.sqrt(dim)
    return GaussianMixtureEnergy(torch.stack([-4 * u, 4 * u]), 1.0, torch.tensor([2.0, 1.0]))


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(DEFAULTS, argv)
    name = out_name("flowmc_highdim", cfg)
    if cfg["plot_only"]:
        payload = load_json(name)
        plot(payload["results"], cfg)
        report(name, plot_only=True)
        return payload
    results: dict = {}
    payload = {"config": cfg, "truth": 2 / 3, "results": results}
    for dim in cfg["dims"]:
        target = mixture(dim)
        gen_eval = torch.Generator().manual_seed(123)

        def evaluate(energy, target=target, gen_eval=gen_eval):
            return importance_weights(energy, target, cfg["n_eval"], gen_eval)

        for method in cfg["methods"]:

            def progress(hist, key=f"{dim}/{method}", dim=dim, method=method):
                heavy = hist["weights"][-1][0]
                results[key] = {
                    "dim": dim,
                    "method": method,
                    "heavy": heavy,
                    "error": abs(heavy - 2 / 3),
                    "history": [w[0] for w in hist["weights"]],
                    "steps": hist["steps"],
                    "chain_heavy": [None if c is None else c[0] for c in hist["chain_weights"]],
                    "train_seconds": hist["times"][-1],
                    "global_accept": hist["global_accept"][-1],
                    "local_accept": hist["local_accept"][-1],
                    "finished": hist["steps"][-1] == cfg["iters"],
                }
                save_json(name, payload)

            out = train(
                method,
                lambda n, g, t=target: t.sample(n, g),
                dim,
                cfg,
                evaluate,
                box=8.0,
                seed=cfg["seed"],
                on_eval=progress,
                chain_labels=lambda x, t=target: torch.cdist(x, t.means).argmin(1),
            )
            heavy = out["weights"][-1][0]
            print(
                f"D={dim:3d} {method:8s} heavy weight {heavy:.3f} (truth 0.667) "
                f"error {abs(heavy - 2 / 3):.3f} ({out['times'][-1]:.1f} s)"
            )
    plot(results, cfg)
    report(name)
    return payload


def late_error(r: dict) -> float:
    """Mean |w_heavy - 2/3| over the checkpoints of the second half of training."""
    last = r["steps"][-1]
    errs = [abs(w - 2 / 3) for w, s in zip(r["history"], r["steps"]) if s >= last / 2]
    return sum(errs) / len(errs)


def plot(results: dict, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, method in enumerate(cfg["methods"]):
        done = [r for r in results.values() if r["method"] == method and r["finished"]]
        dims = [r["dim"] for r in done]
        errs = [r["error"] for r in done]
        ax.plot(dims, errs, "o-", color=f"C{i}", label=f"{method}, final")
        half = [late_error(r) for r in done]
        ax.plot(dims, half, "s--", color=f"C{i}", alpha=0.6, label=f"{method}, 2nd-half mean")
        for j, r in enumerate(done):
            ax2.plot(
                r["steps"],
                r["history"],
                color=f"C{i}",
                ls=("-", "--", ":")[j % 3],
                label=f"{method} D={r['dim']}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("dimension D")
    ax.set_ylabel("|w_heavy - 2/3|")
    ax.legend(fontsize=7)
    ax2.axhline(2 / 3, color="k", lw=1, ls="--")
    ax2.set_xlabel("training iteration")
    ax2.set_ylabel("learned weight of the heavy mode")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(figure_path(out_name("flowmc_highdim", cfg)), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
