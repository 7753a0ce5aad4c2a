"""FlowMC flow-training schedules and local kernels on the 2:1 two-mode example.

Two measurements (modes at (-4, 0) and (4, 0), unit scale, heavy-mode weight 2/3):

* ``sampling``: the target is fixed; 256 chains all start in the heavy mode; each round is
  ``update`` (flow fit) then ``sample`` (10 MALA steps + 10 flow proposals). Reported: the
  error |w_heavy - 2/3| of the chains after the training rounds and, with the flow then
  frozen, averaged over production rounds; global acceptance; wall time.
  Schedules: ``current`` (one Adam step on the current chain states, clip 10), ``history``
  (the last 20 snapshots, 2 epochs of minibatches of 1,024, Adam, clip 10) and ``flowmc``
  (``FlowMC.flowmc_schedule``: 10,000 points from the last 100 snapshots, 5 epochs,
  AdamW 1e-3, clip 1).
* ``training``: an MLP energy trained by CD (alpha = 0) with FlowMC negatives, chains started
  at the data; local acceptance and the learned heavy weight (quadrature) over the last
  half, for the default local kernel (MALA eta = 0.005 retuned after every flow fit) and the
  previous default (MALA eta = 0.1 adapted during its first 200 steps only), and the default
  kernel with the ``history`` schedule.

    python examples/flowmc_schedules.py [--quick] [--seeds 0 1 2] [--parts sampling training]

Settings: the ``[example]`` table of examples/configs/flowmc_schedules.toml (``--quick``
applies ``[example.quick]``; ``--seeds`` and ``--parts`` override it). Prints one JSON line per
run; writes runs/examples/results/flowmc_schedules.json and
runs/examples/figures/flowmc_schedules.png (``_quick`` suffix with --quick) and prints where
(``--update-docs``: docs/results and docs/figures; ``--out FOLDER``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from example_output import add_output_arguments, output_dir, report_written

from ebmflow.cli import load_example_settings
from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy
from ebmflow.flows import FlowMC, RealNVP
from ebmflow.losses import ContrastiveDivergence
from ebmflow.samplers import MALA
from ebmflow.spaces import Continuous

TRUTH = 2 / 3
CONFIG = Path(__file__).resolve().parent / "configs" / "flowmc_schedules.toml"
DEFAULTS = {"seeds": [0, 1, 2], "parts": ["sampling", "training"], "rounds": 40,
            "production": 20, "iters": 400, "threads": 1,
            "quick": {"rounds": 10, "production": 5, "iters": 60}}


def target() -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy.two_modes(dim=2, separation=8.0, scale=1.0)


def heavy(x: torch.Tensor) -> float:
    return float((x[:, 0] < 0).float().mean())


def make(schedule: str, flow: RealNVP) -> FlowMC:
    kw = {"n_local": 10, "n_global": 10}
    if schedule == "current":
        return FlowMC(flow, **kw)
    if schedule == "history":
        return FlowMC(flow, history=20, flow_epochs=2, flow_batch_size=1024, **kw)
    if schedule == "flowmc":
        return FlowMC.flowmc_schedule(flow, **kw)
    raise ValueError(schedule)


def sampling(schedule: str, seed: int, rounds: int, production: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    p = target()
    flow = RealNVP(2, n_layers=4, hidden=(32, 32))
    sampler = make(schedule, flow)
    x0 = torch.tensor([-4.0, 0.0]) + torch.randn(256, 2, generator=gen)
    t0 = time.perf_counter()
    sampler.sample(p, x0=x0, generator=gen)
    for _ in range(rounds):
        sampler.update(p, generator=gen)
        x = sampler.sample(p, generator=gen)
    train_s = time.perf_counter() - t0
    err_train = abs(heavy(x) - TRUTH)
    fracs = [heavy(sampler.sample(p, generator=gen)) for _ in range(production)]
    return {"schedule": schedule, "seed": seed, "train_seconds": train_s,
            "err_after_training": err_train,
            "err_production": abs(statistics.fmean(fracs) - TRUTH),
            "global_accept": float(sampler.stats["global_accept"]),
            "local_accept": float(sampler.stats["local_accept"])}


def quadrature_heavy(energy, box: float = 9.0, n: int = 100) -> float:
    lin = torch.linspace(-box, box, n)
    pts = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        w = torch.softmax(-energy(pts), 0)
    return float(w[pts[:, 0] < 0].sum())


def training(kernel: str, seed: int, iters: int, schedule: str = "current") -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    p = target()
    data = p.sample(4096, gen)
    model = MLPEnergy(Continuous(2), hidden=(64, 64))
    flow = RealNVP(2, n_layers=4, hidden=(32, 32)).init_from_data(data)
    local = None if kernel == "default" else MALA(0.1, n_warmup=200)
    extra = ({"history": 20, "flow_epochs": 2, "flow_batch_size": 1024}
             if schedule == "history" else {})
    sampler = FlowMC(flow, local, n_local=10, n_global=10, lr=2e-3, **extra)
    sampler.update(model, data[:256].clone(), generator=gen)
    loss_fn = ContrastiveDivergence(alpha=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights, local_acc, global_acc = [], [], []
    t0 = time.perf_counter()
    for it in range(1, iters + 1):
        if it > 1:
            sampler.update(model, generator=gen)
        out = loss_fn(model, data[torch.randint(0, 4096, (256,), generator=gen)], sampler,
                      generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if it > iters // 2 and it % 25 == 0:
            weights.append(quadrature_heavy(model))
            local_acc.append(float(sampler.stats["local_accept"]))
            global_acc.append(float(sampler.stats["global_accept"]))
    return {"kernel": kernel, "schedule": schedule, "seed": seed, "seconds": time.perf_counter() - t0,
            "weight_error": abs(statistics.fmean(weights) - TRUTH),
            "local_accept": statistics.fmean(local_acc),
            "local_accept_min": min(local_acc),
            "global_accept": statistics.fmean(global_acc),
            "step_size": float(sampler.local.step_size)}


def load_settings(path: Path | None, quick: bool) -> dict:
    """``DEFAULTS`` overridden by the ``[example]`` table of ``path`` (``[example.quick]`` too
    with ``quick``); unknown keys are refused."""
    cfg = {k: v for k, v in DEFAULTS.items() if k != "quick"}
    quick_cfg = dict(DEFAULTS["quick"])
    if path is not None:
        table = dict(load_example_settings(path))
        quick_cfg.update(table.pop("quick", {}))
        unknown = sorted(set(table) - set(cfg)) + sorted(set(quick_cfg) - set(cfg))
        if unknown:
            raise SystemExit(f"{path}: unknown key(s) {unknown} in [example]; valid: {sorted(cfg)}")
        cfg.update(table)
    if quick:
        cfg.update(quick_cfg)
    return cfg


def plot(out: dict, path: Path) -> None:
    """Left: heavy-mode error of the chains per schedule (after training, in production);
    right: learned heavy-mode error and local acceptance per kernel / schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, key in enumerate(("err_after_training", "err_production")):
        groups: dict[str, list[float]] = {}
        for r in out["sampling"]:
            groups.setdefault(r["schedule"], []).append(r[key])
        xs = range(len(groups))
        ax.bar([x + 0.4 * i for x in xs], [statistics.fmean(v) for v in groups.values()],
               width=0.4, color=f"C{i}", label=key.replace("_", " "))
        ax.set_xticks([x + 0.2 for x in xs], list(groups))
    ax.set_ylabel("|w_heavy - 2/3| of the chains")
    ax.set_title(f"sampling, fixed target ({out['rounds']} rounds)", fontsize=10)
    if out["sampling"]:
        ax.legend(fontsize=8)
    groups = {}
    for r in out["training"]:
        groups.setdefault(f"{r['kernel']}\n{r['schedule']}", []).append(r)
    xs = range(len(groups))
    ax2.bar([x - 0.2 for x in xs], [statistics.fmean(r["weight_error"] for r in v)
                                    for v in groups.values()], width=0.4, color="C2",
            label="|learned w_heavy - 2/3|")
    ax2.bar([x + 0.2 for x in xs], [statistics.fmean(r["local_accept"] for r in v)
                                    for v in groups.values()], width=0.4, color="C3",
            label="local acceptance")
    ax2.set_xticks(list(xs), list(groups), fontsize=8)
    ax2.set_title(f"CD training with FlowMC negatives ({out['iters']} steps)", fontsize=10)
    if out["training"]:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a < 1 minute CPU run")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--parts", nargs="+", default=None, choices=["sampling", "training"])
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    cfg = load_settings(args.config, args.quick)
    seeds = args.seeds or cfg["seeds"]
    parts = args.parts or cfg["parts"]
    torch.set_num_threads(int(cfg["threads"]))
    rounds, production, iters = cfg["rounds"], cfg["production"], cfg["iters"]
    out: dict = {"rounds": rounds, "production": production, "iters": iters, "seeds": seeds,
                 "quick": args.quick, "sampling": [], "training": []}
    if "sampling" in parts:
        for schedule in ("current", "history", "flowmc"):
            for seed in seeds:
                r = sampling(schedule, seed, rounds, production)
                out["sampling"].append(r)
                print(json.dumps(r), flush=True)
    if "training" in parts:
        for kernel, schedule in (("default", "current"), ("mala0.1_warmup200", "current"),
                                 ("default", "history")):
            for seed in seeds:
                r = training(kernel, seed, iters, schedule)
                out["training"].append(r)
                print(json.dumps(r), flush=True)
    name = "flowmc_schedules_quick" if args.quick else "flowmc_schedules"
    folder = output_dir(args)
    json_path = folder / "results" / f"{name}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2))
    png_path = folder / "figures" / f"{name}.png"
    plot(out, png_path)
    report_written(json_path, png_path)
    return out


if __name__ == "__main__":
    main()
