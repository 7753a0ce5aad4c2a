"""Discrete energy discrepancy on 32-bit Gray-coded 2-D toys (Schroeder, Ou, Li, Duncan 2023).

Every 2-D point of a toy set is encoded as 32 bits (per coordinate 1 sign bit + 15-bit Gray
code, ``ebmflow.data.gray_encode`` with the literature's bound max|x| + 2). An ``MLPEnergy`` on
``Binary(32)`` is trained with

* ED-Bern: ``EnergyDiscrepancy(BernoulliPerturbation(eps=0.1), m=32, w=1)``;
* ED-Grid: ``EnergyDiscrepancy(GridPerturbation(), m=32, w=1)``;
* PCD: ``ContrastiveDivergence(alpha)`` with ``PersistentSampler(Gibbs(sweep=False),
  ReplayBuffer(space, buffer_size, reinit))``: L = mean E(x+) - mean E(x-) (+ alpha times the
  squared energies), negatives from persistent random-scan Gibbs chains kept in a buffer.

Training runs without any evaluation in the loop; the model is evaluated once, at the end.

Evaluation of the EMA model:

* NLL (nats) of 4,000 test points, log Z by importance sampling with uniform bit strings:
  log Z = log mean_i exp(-E(u_i)) + 32 log 2,  u_i ~ Uniform({0, 1}^32);
* MMD (x 1e-4) with the kernel exp(-0.1 Hamming) between 4,000 test points and 4,000 model
  samples drawn by systematic-scan ``Gibbs`` from uniform noise.

Hyperparameters: the ``[example.*]`` tables of examples/configs/ed_discrete_toys.toml (its
``[train]`` table is the closest ``ebmflow train`` run).

    python examples/ed_discrete_toys.py --quick    # one data set, 150 iterations (< 1 min)
    python examples/ed_discrete_toys.py            # the config's data sets and iterations
    python examples/ed_discrete_toys.py --plot-only --update-docs   # redraw the docs figure

Writes runs/examples/figures/ed_discrete_toys.png and runs/examples/results/ed_discrete_toys.json
(``--update-docs``: docs/figures and docs/results) and prints where. The JSON keeps each model's
samples decoded to 2-D, so ``--plot-only`` redraws the figure from it without training.
``ed_categorical.py`` reuses these functions for the 5-state categorical version.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from example_output import add_output_arguments, output_dir, report_written

from ebmflow.cli import load_example_settings
from ebmflow.data import gray_decode, gray_encode, quantisation_bound, toy_2d
from ebmflow.energy import EnergyModel, MLPEnergy
from ebmflow.losses import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    ContrastiveDivergence,
    EnergyDiscrepancy,
    GridPerturbation,
)
from ebmflow.metrics import mmd
from ebmflow.samplers import Gibbs, PersistentSampler, ReplayBuffer
from ebmflow.spaces import Binary, Categorical, Space

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "ed_discrete_toys.toml"


@dataclass
class Task:
    """A discretised toy: encoder, decoder (for plots) and the state space."""

    space: Space
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]

    @property
    def log_num_states(self) -> float:
        return self.space.dim * math.log(self.space.num_classes)


def gray_task(dataset: str, bits: int = 16, seed: int = 0) -> Task:
    bound = quantisation_bound(toy_2d(dataset, 5000, torch.Generator().manual_seed(seed)))
    return Task(Binary(2 * bits), lambda x: gray_encode(x, bits, bound),
                lambda c: gray_decode(c, bits, bound))


def make_loss(method: str, cfg: dict, space: Space):
    """(loss, sampler) for a method name: ``ed_bern``, ``ed_grid``, ``ed_uniform``,
    ``ed_ordinal``, ``ed_cyclic`` (energy discrepancy, sampler None) or ``pcd``."""
    c = cfg[method]
    k = getattr(space, "num_classes", 2)
    if method == "pcd":
        buffer = ReplayBuffer(space, capacity=c["buffer_size"], reinit_prob=c["reinit"])
        sampler = PersistentSampler(Gibbs(sweep=False, n_steps=c["gibbs_steps"]), buffer)
        return ContrastiveDivergence(alpha=c["alpha"]), sampler
    if method == "ed_bern":
        pert = BernoulliPerturbation(c["eps"])
    elif method == "ed_grid":
        pert = GridPerturbation(num_classes=k) if isinstance(space, Categorical) \
            else GridPerturbation()
    elif method in ("ed_uniform", "ed_ordinal", "ed_cyclic"):
        pert = CategoricalPerturbation(k, method[3:], c["t"])
    else:
        raise ValueError(f"unknown method {method!r}")
    return EnergyDiscrepancy(pert, m=c["m"], w=c["w"]), None


def ema_update(avg: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pa, pm in zip(avg.parameters(), model.parameters()):
            pa.lerp_(pm, 1 - decay)


def train(method: str, dataset: str, task: Task, cfg: dict, iterations: int,
          log=print) -> tuple[EnergyModel, dict]:
    """Train one model; returns the EMA energy and timing/loss information."""
    tr = cfg["train"]
    torch.manual_seed(tr["seed"])
    energy = MLPEnergy(task.space, hidden=cfg["model"]["hidden"])
    avg = copy.deepcopy(energy).requires_grad_(False)
    opt = torch.optim.Adam(energy.parameters(), lr=tr["lr"])
    gen = torch.Generator().manual_seed(tr["seed"] + 1)
    batch = cfg["data"]["batch_size"]
    loss_fn, sampler = make_loss(method, cfg, task.space)
    start, losses = time.perf_counter(), []
    for it in range(1, iterations + 1):
        x = task.encode(toy_2d(dataset, batch, gen))
        loss = loss_fn(energy, x, sampler, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(avg, energy, tr["ema"])
        if it % max(1, iterations // 10) == 0:
            losses.append(float(loss.detach()))
            log(f"  {dataset:12s} {method:10s} it {it:6d} loss {losses[-1]:9.4f} "
                f"({it / (time.perf_counter() - start):6.1f} it/s)")
    seconds = time.perf_counter() - start
    return avg, {"iterations": iterations, "train_seconds": seconds,
                 "iterations_per_second": iterations / seconds, "loss_trace": losses}


@torch.no_grad()
def log_partition_uniform(energy: EnergyModel, task: Task, n: int, seed: int = 7,
                          chunk: int = 65536) -> float:
    """log Z = log mean exp(-E(u)) + log |X| with u uniform on the state space."""
    gen = torch.Generator().manual_seed(seed)
    parts, done = [], 0
    while done < n:
        u = task.space.noise(min(chunk, n - done), gen)
        parts.append(torch.logsumexp(-energy(u).double(), 0))
        done += u.shape[0]
    return float(torch.logsumexp(torch.stack(parts), 0)) - math.log(n) + task.log_num_states


@torch.no_grad()
def evaluate(energy: EnergyModel, dataset: str, task: Task, ev: dict, seed: int = 123) -> dict:
    gen = torch.Generator().manual_seed(seed)
    test = task.encode(toy_2d(dataset, ev["n_test"], gen))
    log_z = log_partition_uniform(energy, task, ev["n_importance"])
    nll = float(energy(test).double().mean()) + log_z
    start = time.perf_counter()
    gibbs = Gibbs(sweep=True)
    samples = gibbs.run(energy, task.space.noise(ev["n_samples"], gen), ev["gibbs_sweeps"],
                        generator=gen)
    sample_seconds = time.perf_counter() - start
    k = getattr(task.space, "num_classes", 2)
    m = mmd(test[: ev["n_samples"]], samples, kernel="exp_hamming",
            hamming_scale=ev["hamming_scale"], num_classes=k if k > 2 else None)
    return {"nll": nll, "log_z": log_z, "mmd_1e4": float(m) * 1e4,
            "gibbs_seconds": sample_seconds, "samples": samples}


def run(cfg: dict, methods: list[str], datasets: list[str], iterations: int,
        make_task: Callable[[str], Task]) -> dict:
    results: dict = {"config": cfg, "runs": {}}
    for ds in datasets:
        task = make_task(ds)
        data_eval = evaluate_data_baseline(ds, task, cfg["eval"])
        results["runs"][ds] = {"data_vs_data": data_eval}
        for method in methods:
            model, info = train(method, ds, task, cfg, iterations)
            ev = evaluate(model, ds, task, cfg["eval"])
            info.update(ev)
            print(f"{ds:12s} {method:10s} NLL {info['nll']:8.3f}  MMD x1e-4 {info['mmd_1e4']:9.3f}"
                  f"  {info['iterations_per_second']:6.1f} it/s")
            results["runs"][ds][method] = info
    return results


@torch.no_grad()
def evaluate_data_baseline(dataset: str, task: Task, ev: dict) -> dict:
    """MMD between two independent test sets: the noise floor of the metric."""
    gen = torch.Generator().manual_seed(999)
    a = task.encode(toy_2d(dataset, ev["n_samples"], gen))
    b = task.encode(toy_2d(dataset, ev["n_samples"], gen))
    k = getattr(task.space, "num_classes", 2)
    m = mmd(a, b, kernel="exp_hamming", hamming_scale=ev["hamming_scale"],
            num_classes=k if k > 2 else None)
    return {"mmd_1e4": float(m) * 1e4}


FONT = 13  # points; the figure is 8 in wide at 100 dpi, shown at about its pixel size
LABELS = {"ed_bern": "ED-Bern", "ed_grid": "ED-Grid", "pcd": "PCD with Gibbs",
          "ed_uniform": "ED, uniform kernel", "ed_ordinal": "ED, ordinal kernel",
          "ed_cyclic": "ED, cyclic kernel"}


COVER_BINS = 24  # grid on which the titles count the samples that fall where the data lie


def plot(results: dict, make_task: Callable[[str], Task], path: Path, bins: int = 50) -> None:
    """2-D histograms (decoded to the plane) of each data set's quantised test points and of
    each method's Gibbs samples, two panels a row, 8 in wide, each with a colour bar (per cent
    of the panel's points per cell) and a title naming data set, method, NLL and MMD, and the
    share of samples in the cells of a coarse grid that hold test points (next to the share a
    uniform law on the plotted box would put there: a model that spreads its samples over the
    box is seen as such)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT,
                         "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1})
    import numpy as np

    runs = results["runs"]
    cfg = results.get("config", {})
    panels = []
    for ds, ds_runs in runs.items():
        task = make_task(ds)
        data = task.decode(task.encode(toy_2d(ds, 4000, torch.Generator().manual_seed(5))))
        lims = [[float(data[:, i].min()) - 0.5, float(data[:, i].max()) + 0.5] for i in (0, 1)]
        occupied = np.histogram2d(*data.numpy().T, bins=COVER_BINS, range=lims)[0] > 0

        def covered(pts: torch.Tensor, lims=lims, occupied=occupied) -> float:
            h = np.histogram2d(*pts.numpy().T, bins=COVER_BINS, range=lims)[0]
            return 100.0 * h[occupied].sum() / pts.shape[0]

        uniform = f"uniform {100.0 * occupied.mean():.0f}%"
        panels.append((f"{ds}: data\n4,000 test points, quantised", data, lims))
        for m, r in ds_runs.items():
            if m == "data_vs_data" or "samples_2d" not in r:
                continue
            pts = torch.tensor(r["samples_2d"])
            panels.append((f"{ds}: {LABELS.get(m, m)}\nNLL {r['nll']:.2f}, MMD {r['mmd_1e4']:.2f}\n"
                           f"data cells {covered(pts):.0f}% ({uniform})", pts, lims))
    ncol = 2
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(8.0, 3.8 * nrow + 1.3), squeeze=False)
    for ax, (title, pts, lims) in zip(axes.flat, panels):
        w = torch.full((pts.shape[0],), 100.0 / pts.shape[0])
        *_, im = ax.hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=bins, range=lims,
                           weights=w.numpy(), cmap="viridis")
        ax.set_title(title, fontsize=FONT - 1)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=FONT - 2)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label("% of points per cell", fontsize=FONT - 1)
        cb.ax.tick_params(labelsize=FONT - 2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    ev, tr = cfg.get("eval", {}), cfg.get("train", {})
    sizes = sorted({len(r["samples_2d"]) for ds_runs in runs.values() for r in ds_runs.values()
                    if "samples_2d" in r})
    fig.suptitle(f"2-D toys as 32-bit Gray codes, {tr.get('iterations', '?'):,} training "
                 f"iterations, decoded\nmodel panels: {'/'.join(f'{n:,}' for n in sizes)} "
                 f"samples after {ev.get('gibbs_sweeps', '?')} Gibbs sweeps; "
                 "NLL in nats, MMD x 1e-4\ndata cells: share of samples in the "
                 f"{COVER_BINS} x {COVER_BINS} cells holding test points", fontsize=FONT)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(results: dict, name: str, out: Path, make_task: Callable[[str], Task],
         merge: bool = False) -> dict:
    """Write <out>/results/<name>.json and <out>/figures/<name>.png; the model samples are kept
    in the JSON decoded to 2-D (``samples_2d``, 3 decimals) for the figure. ``merge=True``
    adds these runs to an existing JSON (runs of other data sets or methods are kept)."""
    for ds, runs in results["runs"].items():
        task = make_task(ds)
        for info in runs.values():
            if "samples" in info:
                info["samples_2d"] = task.decode(info.pop("samples")).mul(1000).round().div(
                    1000).tolist()
    json_path = out / "results" / f"{name}.json"
    if merge and json_path.exists():
        old = json.loads(json_path.read_text())
        for ds, runs in results["runs"].items():
            old["runs"].setdefault(ds, {}).update(runs)
        results = {**results, "runs": old["runs"]}
    plot(results, make_task, out / "figures" / f"{name}.png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    report_written(json_path, out / "figures" / f"{name}.png")
    return results


def parse(argv, description: str, config: Path, methods: str):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="one data set, 150 iterations")
    parser.add_argument("--config", type=Path, default=config)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--methods", default=methods)
    parser.add_argument("--datasets", default=None)
    add_output_arguments(parser)
    parser.add_argument("--merge", action="store_true",
                        help="add these runs to the existing results JSON (run data sets in "
                             "separate processes)")
    args = parser.parse_args(argv)
    args.out = output_dir(args)
    cfg = load_example_settings(args.config)
    datasets = args.datasets.split(",") if args.datasets else cfg["data"]["datasets"]
    iterations = args.iterations or cfg["train"]["iterations"]
    if args.quick:
        datasets = datasets[:1] if not args.datasets else datasets
        iterations = args.iterations or 150
        cfg["eval"].update(n_importance=100_000, n_test=1000, n_samples=500, gibbs_sweeps=5)
        cfg["pcd"]["buffer_size"] = 1000
        cfg["train"]["ema"] = 0.9
    return args, cfg, datasets, iterations


def plot_from_json(json_path: Path, path: Path) -> dict:
    """Redraw the figure from a results JSON (it keeps the samples decoded to 2-D)."""
    results = json.loads(Path(json_path).read_text())
    bits = results["config"]["data"]["bits"]
    plot(results, lambda ds: gray_task(ds, bits), path)
    return results


def main(argv: list[str] | None = None) -> dict:
    import sys

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plot-only", action="store_true")
    known, argv = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    description = (__doc__.split("\n")[0] + " (--plot-only: redraw the figure from the results "
                   "JSON, without training)")
    args, cfg, datasets, iterations = parse(argv, description, CONFIG, "ed_bern,ed_grid,pcd")
    name = "ed_discrete_toys" + ("_quick" if args.quick else "")
    if known.plot_only:
        png = args.out / "figures" / f"{name}.png"
        results = plot_from_json(args.out / "results" / f"{name}.json", png)
        report_written(png)
        return results
    torch.set_num_threads(1)

    def make_task(ds: str) -> Task:
        return gray_task(ds, cfg["data"]["bits"])

    results = run(cfg, args.methods.split(","), datasets, iterations, make_task)
    results["quick"] = args.quick
    return save(results, name, args.out, make_task, args.merge)


if __name__ == "__main__":
    main()
