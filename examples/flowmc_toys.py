"""8 Gaussians and rings: learned energies and mode-weight errors for ULA, PCD and flowMC.

Mode weights of the learned density p ∝ exp(-E) are computed by quadrature on a grid
(8 Gaussians: nearest mean; rings: nearest ring radius); the error is the total variation
0.5 * sum_k |w_k - w_k^true| (true weights are equal).

    python examples/flowmc_toys.py [--quick] [--config examples/configs/flowmc_toys.toml]

Writes (``_quick`` suffix with --quick) runs/examples/results/flowmc_toys.json (after every
evaluation) and runs/examples/figures/flowmc_toys.png and prints where (``--update-docs``:
docs/results and docs/figures; ``--out FOLDER``); ``--plot-only`` redraws from the JSON.
``name`` is the stem of the output files. ``overrides`` sets per-data-set options: the rings (radial std 0.05) need ULA steps below
2 / curvature = 2 * 0.05^2 = 0.005 once the energy is sharp.
"""

from __future__ import annotations

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

from ebmflow.data import TOY_MIXTURES, toy_2d

DEFAULTS = {
    "datasets": ["rings", "8gaussians"],
    "methods": ["ula", "pcd", "flowmc"],
    "iters": 1500,
    "eval_every": 250,
    "n_data": 10000,
    "batch_size": 256,
    "hidden": [64, 64, 64],
    "lr": 1e-3,
    "alpha": 0.01,
    "n_local": 20,
    "flowmc_n_local": 10,
    "ula_step": 0.01,
    "mala_step": 0.05,
    "n_global": 10,
    "mala_warmup": 15000,
    "flow_layers": 6,
    "flow_hidden": [64, 64],
    "flow_lr": 2e-3,
    "flow_steps": 1,
    "grid": 300,
    "box": 4.5,
    "seed": 0,
    "threads": 1,
    "overrides": {"rings": {"ula_step": 0.002, "mala_step": 0.01}},
    "name": "flowmc_toys",
    "quick": {
        "iters": 40,
        "eval_every": 20,
        "datasets": ["8gaussians"],
        "methods": ["pcd", "flowmc"],
        "grid": 80,
        "mala_warmup": 200,
    },
}

PLOT_GRID = 150
RING_RADII = torch.tensor([0.8, 1.6, 2.4, 3.2])


def labeller(name: str, points: torch.Tensor) -> tuple[torch.Tensor, int]:
    if name == "rings":
        r = points.norm(dim=1, keepdim=True)
        return (r - RING_RADII).abs().argmin(1), len(RING_RADII)
    means = torch.tensor(TOY_MIXTURES[name][0])
    return torch.cdist(points, means).argmin(1), means.shape[0]


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(DEFAULTS, argv)
    fname = out_name(cfg["name"], cfg)
    if cfg["plot_only"]:
        payload = load_json(fname)
        plot(payload, cfg)
        report(fname, plot_only=True)
        return payload
    points, _ = grid(cfg["box"], cfg["grid"])
    dpoints, _ = grid(cfg["box"], PLOT_GRID)
    results: dict = {}
    payload = {"config": cfg, "results": results, "densities": {}}
    for name in cfg["datasets"]:
        labels, k = labeller(name, points)
        truth = torch.full((k,), 1.0 / k)
        run_cfg = {**cfg, **cfg["overrides"].get(name, {})}
        for method in cfg["methods"]:
            key = f"{name}/{method}"

            def progress(hist, key=key, truth=truth):
                w = torch.tensor(hist["weights"][-1])
                results[key] = {
                    "weights": w.tolist(),
                    "tv_error": 0.5 * float((w - truth).abs().sum()),
                    "train_seconds": hist["times"][-1],
                    "global_accept": hist["global_accept"][-1],
                    "tv_history": [
                        0.5 * float((torch.tensor(x) - truth).abs().sum()) for x in hist["weights"]
                    ],
                    "steps": hist["steps"],
                    "finished": hist["steps"][-1] == cfg["iters"],
                }
                save_json(fname, payload)

            out = train(
                method,
                lambda n, g, name=name: toy_2d(name, n, g),
                2,
                run_cfg,
                lambda e, labels=labels, k=k: quadrature_weights(e, labels, points, k),
                cfg["box"],
                seed=cfg["seed"],
                on_eval=progress,
            )
            with torch.no_grad():
                dens = torch.softmax(-out["energy"](dpoints), 0)
            payload["densities"][key] = [round(float(v), 7) for v in dens]
            save_json(fname, payload)
            print(
                f"{name:10s} {method:8s} TV error of mode weights "
                f"{results[key]['tv_error']:.3f} ({out['times'][-1]:.1f} s)",
                flush=True,
            )
    plot(payload, cfg)
    report(fname)
    return payload


def plot(payload: dict, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, dens_all = payload["results"], payload["densities"]
    names, methods = cfg["datasets"], cfg["methods"]
    fig, axes = plt.subplots(
        len(names), len(methods), figsize=(3.3 * len(methods), 3.3 * len(names)), squeeze=False
    )
    for i, name in enumerate(names):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            if f"{name}/{method}" not in dens_all:
                ax.axis("off")
                continue
            dens = torch.tensor(dens_all[f"{name}/{method}"]).reshape(PLOT_GRID, PLOT_GRID).T
            ax.imshow(dens, origin="lower", extent=[-cfg["box"], cfg["box"]] * 2)
            ax.set_title(
                f"{name} {method}: TV {results[f'{name}/{method}']['tv_error']:.3f}", fontsize=9
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(figure_path(out_name(cfg["name"], cfg)), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
