"""8 Gaussians and rings: learned energies and mode-weight errors for ULA, PCD and flowMC.

Mode weights of the learned density p ∝ exp(-E) are computed by quadrature on a grid
(8 Gaussians: nearest mean; rings: nearest ring radius); the error is the total variation
0.5 * sum_k |w_k - w_k^true| (true weights are equal).

    python examples/flowmc_toys.py [--quick] [--config examples/configs/flowmc_toys.toml]

Writes (``_quick`` suffix with --quick) docs/results/flowmc_toys.json and docs/figures/flowmc_toys.png.
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

from ebmflow.data import TOY_MIXTURES, toy_2d

DEFAULTS = {
    "datasets": ["8gaussians", "rings"],
    "methods": ["ula", "pcd", "flowmc"],
    "iters": 500, "eval_every": 100, "n_data": 10000, "batch_size": 256,
    "hidden": [64, 64, 64], "lr": 1e-3, "alpha": 0.1,
    "n_local": 20, "ula_step": 0.01, "mala_step": 0.05, "n_global": 10,
    "flow_layers": 6, "flow_hidden": [64, 64], "flow_lr": 2e-3, "flow_steps": 1,
    "grid": 160, "box": 4.5, "seed": 0, "threads": 1,
    "quick": {"iters": 40, "eval_every": 20, "datasets": ["8gaussians"],
              "methods": ["pcd", "flowmc"], "grid": 80},
}

RING_RADII = torch.tensor([0.8, 1.6, 2.4, 3.2])


def labeller(name: str, points: torch.Tensor) -> tuple[torch.Tensor, int]:
    if name == "rings":
        r = points.norm(dim=1, keepdim=True)
        return (r - RING_RADII).abs().argmin(1), len(RING_RADII)
    means = torch.tensor(TOY_MIXTURES[name][0])
    return torch.cdist(points, means).argmin(1), means.shape[0]


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(DEFAULTS, argv)
    points, _ = grid(cfg["box"], cfg["grid"])
    results, energies = {}, {}
    for name in cfg["datasets"]:
        labels, k = labeller(name, points)
        truth = torch.full((k,), 1.0 / k)
        for method in cfg["methods"]:
            out = train(method, lambda n, g, name=name: toy_2d(name, n, g), 2, cfg,
                        lambda e, labels=labels, k=k: quadrature_weights(e, labels, points, k),
                        cfg["box"], seed=cfg["seed"])
            w = torch.tensor(out["weights"][-1])
            tv = 0.5 * float((w - truth).abs().sum())
            results[f"{name}/{method}"] = {
                "weights": w.tolist(), "tv_error": tv, "train_seconds": out["times"][-1],
                "global_accept": out.get("global_accept"),
                "tv_history": [0.5 * float((torch.tensor(x) - truth).abs().sum())
                               for x in out["weights"]], "steps": out["steps"]}
            energies[(name, method)] = out["energy"]
            print(f"{name:10s} {method:8s} TV error of mode weights {tv:.3f} "
                  f"({out['times'][-1]:.1f} s)")
    plot(energies, cfg, results)
    payload = {"config": cfg, "results": results}
    save_json(out_name("flowmc_toys", cfg), payload)
    return payload


def plot(energies: dict, cfg: dict, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, methods = cfg["datasets"], cfg["methods"]
    fig, axes = plt.subplots(len(names), len(methods), figsize=(3.3 * len(methods),
                                                                  3.3 * len(names)),
                             squeeze=False)
    points, _ = grid(cfg["box"], 120)
    for i, name in enumerate(names):
        for j, method in enumerate(methods):
            with torch.no_grad():
                dens = torch.softmax(-energies[(name, method)](points), 0).reshape(120, 120).T
            ax = axes[i][j]
            ax.imshow(dens, origin="lower", extent=[-cfg["box"], cfg["box"]] * 2)
            ax.set_title(f"{name} {method}: TV {results[f'{name}/{method}']['tv_error']:.3f}",
                         fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(figure_path(out_name("flowmc_toys", cfg)), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
