"""Discrete energy discrepancy on 32-bit Gray-coded 2-D toys (Schroeder, Ou, Li, Duncan 2023).

Every 2-D point of a toy set is encoded as 32 bits (per coordinate 1 sign bit + 15-bit Gray
code, ``ebmflow.data.gray_encode`` with the literature's bound max|x| + 2). An ``MLPEnergy`` on
``Binary(32)`` is trained with

* ED-Bern: ``EnergyDiscrepancy(BernoulliPerturbation(eps=0.1), m=32, w=1)``;
* ED-Grid: ``EnergyDiscrepancy(GridPerturbation(), m=32, w=1)``;
* PCD: ``ContrastiveDivergence(alpha)`` with ``PersistentSampler(Gibbs(sweep=False),
  ReplayBuffer(space, buffer_size, reinit))``: L = mean E(x+) - mean E(x-) (+ alpha times the
  squared energies), negatives from persistent random-scan Gibbs chains kept in a buffer.

One training run per (data set, method), evaluated on the way: at every budget
(``--budgets 1000 3000 10000``; the config's ``budgets``) the EMA model gets the full
evaluation, at the learning-curve points (100, 200, 300, 500, 1k, 2k, 3k, 5k, 10k, ...) the
NLL only. Each run keeps its record and a checkpoint (model, EMA, Adam, random generator, PCD
buffer) in a state folder (``runs/ed_discrete_toys/<dataset>_<method>.{json,pt}``, rewritten at
every evaluation point): a later call with the same settings continues where the run stopped,
so an interrupted run resumes and ``--budgets ... 30000`` extends a finished one (reached
budgets are read back, not retrained; ``--restart`` trains afresh).

Evaluation of the EMA model:

* NLL (nats) of 4,000 test points, log Z by importance sampling with uniform bit strings:
  log Z = log mean_i exp(-E(u_i)) + 32 log 2,  u_i ~ Uniform({0, 1}^32);
* MMD (x 1e-4) with the kernel exp(-0.1 Hamming), ``mmd_repeats`` repeats, each between 4,000
  fresh test points and 4,000 model samples drawn by systematic-scan ``Gibbs`` from uniform
  noise: mean and standard deviation over the repeats.

Hyperparameters: the ``[example.*]`` tables of examples/configs/ed_discrete_toys.toml (its
``[train]`` table is the closest ``ebmflow train`` run).

    python examples/ed_discrete_toys.py --quick    # one data set, 150 iterations (< 1 min)
    python examples/ed_discrete_toys.py            # the config's data sets and budgets
    python examples/ed_discrete_toys.py --methods pcd --budgets 1000 3000 --merge
    python examples/ed_discrete_toys.py --plot-only --update-docs   # redraw the docs figures

Writes runs/examples/results/ed_discrete_toys.json, runs/examples/figures/ed_discrete_toys.png
(samples at the largest budget) and ed_discrete_toys_curves.png (learning curves: NLL against
iterations, the published levels dashed); ``--update-docs``: docs/results and docs/figures.
``--collect`` gathers the stored runs without training (each at the largest budget it has
reached), ``--markdown`` prints the docs tables. The JSON keeps each model's samples decoded
to 2-D, so ``--plot-only`` redraws the figures from it without training. ``ed_categorical.py``
reuses ``train``, ``evaluate``, ``run`` and ``save`` (one evaluation at the end) for the
5-state categorical version.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import tempfile
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


def fresh_model(task: Task, cfg: dict) -> tuple[EnergyModel, torch.nn.Module,
                                                   torch.optim.Optimizer, torch.Generator]:
    """The seeded starting point of a run: energy, its EMA copy, Adam, the data generator."""
    tr = cfg["train"]
    torch.manual_seed(tr["seed"])
    energy = MLPEnergy(task.space, hidden=cfg["model"]["hidden"])
    avg = copy.deepcopy(energy).requires_grad_(False)
    opt = torch.optim.Adam(energy.parameters(), lr=tr["lr"])
    return energy, avg, opt, torch.Generator().manual_seed(tr["seed"] + 1)


def train(method: str, dataset: str, task: Task, cfg: dict, iterations: int,
          log=print) -> tuple[EnergyModel, dict]:
    """Train one model; returns the EMA energy and timing/loss information."""
    tr = cfg["train"]
    energy, avg, opt, gen = fresh_model(task, cfg)
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


# ---------------------------------------------------------------------------------------------
# One resumable run per (data set, method), evaluated at every budget on the way.

CURVE_POINTS = (100, 200, 300, 500, 1000, 2000, 3000, 5000, 10_000, 20_000, 30_000, 50_000,
                100_000)  # NLL-only evaluations for the learning curve (cheap: log Z only)
SAMPLES_KEPT = 2000  # decoded model samples kept per run (largest budget) for the figure


def ema_decay(decay: float, step: int, warmup: bool) -> float:
    """EMA decay at optimiser step ``step`` (1-based); with ``warmup`` it is
    min(decay, (1 + step) / (10 + step)), so that an early budget (1k iterations with
    decay 0.999) does not still carry a third of the initial weights."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def run_settings(method: str, cfg: dict) -> dict:
    """What a stored run depends on (everything but the budgets): a checkpoint is resumed only
    when these match."""
    tr = {k: v for k, v in cfg["train"].items() if k not in ("iterations", "budgets")}
    return {"method": method, "method_settings": cfg.get(method, {}), "model": cfg["model"],
            "train": tr, "batch_size": cfg["data"]["batch_size"], "bits": cfg["data"]["bits"],
            "eval": cfg["eval"]}


@torch.no_grad()
def evaluate_repeats(energy: EnergyModel, dataset: str, task: Task, ev: dict,
                     seed: int = 123) -> dict:
    """NLL of ``n_test`` test points (log Z from ``n_importance`` uniform strings) and the MMD
    x 1e-4 over ``mmd_repeats`` repeats, each between ``n_samples`` fresh test points and
    ``n_samples`` model samples (systematic-scan Gibbs from uniform noise, ``gibbs_sweeps``
    sweeps; all repeats' chains run as one batch)."""
    gen = torch.Generator().manual_seed(seed)
    test = task.encode(toy_2d(dataset, ev["n_test"], gen))
    log_z = log_partition_uniform(energy, task, ev["n_importance"])
    nll = float(energy(test).double().mean()) + log_z
    reps, n = ev.get("mmd_repeats", 1), ev["n_samples"]
    start = time.perf_counter()
    samples = Gibbs(sweep=True).run(energy, task.space.noise(reps * n, gen), ev["gibbs_sweeps"],
                                    generator=gen)
    sample_seconds = time.perf_counter() - start
    values = []
    for r in range(reps):
        ref = task.encode(toy_2d(dataset, n, torch.Generator().manual_seed(seed + 1 + r)))
        values.append(float(mmd(ref, samples[r * n:(r + 1) * n], kernel="exp_hamming",
                                hamming_scale=ev["hamming_scale"])) * 1e4)
    vals = torch.tensor(values, dtype=torch.float64)
    return {"nll": nll, "log_z": log_z, "mmd_1e4": float(vals.mean()),
            "mmd_1e4_std": float(vals.std()) if reps > 1 else 0.0, "mmd_1e4_repeats": values,
            "gibbs_seconds": sample_seconds, "samples": samples[:n]}


def train_budgets(method: str, dataset: str, task: Task, cfg: dict, budgets: list[int],
                  state_dir: Path, restart: bool = False, log=print) -> dict:
    """Train one model to ``max(budgets)`` iterations, evaluating its EMA at every budget (NLL
    and MMD) and at the ``CURVE_POINTS`` on the way (NLL only).

    Resumable: ``state_dir/<dataset>_<method>.json`` holds the record (settings, learning
    curve, one entry per budget reached) and ``<dataset>_<method>.pt`` the checkpoint (model,
    EMA, optimiser, random generator, PCD buffer), both rewritten at every evaluation point;
    a later call with the same settings continues from the checkpoint (a larger budget
    extends the run, a reached one is read back) unless ``restart``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    rec_path = state_dir / f"{dataset}_{method}.json"
    ckpt_path = state_dir / f"{dataset}_{method}.pt"
    settings = run_settings(method, cfg)
    tr = cfg["train"]
    energy, avg, opt, gen = fresh_model(task, cfg)
    loss_fn, sampler = make_loss(method, cfg, task.space)
    record = {"dataset": dataset, "method": method, "settings": settings, "iteration": 0,
              "train_seconds": 0.0, "curve": [], "budgets": {}, "loss_trace": []}
    if not restart and rec_path.exists() and ckpt_path.exists():
        old = json.loads(rec_path.read_text())
        if old["settings"] != json.loads(json.dumps(settings)):
            raise RuntimeError(f"{rec_path} was trained with other settings; pass --restart "
                               "(or another --state-dir) to train afresh")
        record = old
        ck = torch.load(ckpt_path, weights_only=False)
        energy.load_state_dict(ck["model"])
        avg.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        if sampler is not None and ck.get("buffer") is not None:
            sampler.buffer.states = ck["buffer"]
        log(f"  {dataset:12s} {method:8s} resumed at iteration {record['iteration']}")
    target = max(budgets)
    done = record["iteration"]
    missing = [b for b in budgets if b < done and str(b) not in record["budgets"]]
    if missing:
        log(f"  {dataset:12s} {method:8s} budgets {missing} were passed without evaluation "
            "(only budgets asked for are evaluated)")
    points = sorted({p for p in (*CURVE_POINTS, *budgets) if done < p <= target})
    batch = cfg["data"]["batch_size"]
    warmup = tr.get("ema_warmup", False)
    seconds = record["train_seconds"]
    for point in points:
        start = time.perf_counter()
        for it in range(done + 1, point + 1):
            x = task.encode(toy_2d(dataset, batch, gen))
            loss = loss_fn(energy, x, sampler, generator=gen).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(avg, energy, ema_decay(tr["ema"], it, warmup))
            if it % 100 == 0:
                record["loss_trace"].append([it, float(loss.detach())])
        seconds += time.perf_counter() - start
        done = point
        if point in budgets:
            ev = evaluate_repeats(avg, dataset, task, cfg["eval"])
            samples = ev.pop("samples")
            entry = {**ev, "iteration": point, "train_seconds": seconds}
            record["budgets"][str(point)] = entry
            if point == target:  # the figure shows the largest budget's samples
                record["samples_2d"] = task.decode(samples[:SAMPLES_KEPT]).mul(1000).round() \
                    .div(1000).tolist()
                record["samples_iteration"] = point
            log(f"  {dataset:12s} {method:8s} it {point:6d} NLL {ev['nll']:7.3f}  MMD x1e-4 "
                f"{ev['mmd_1e4']:6.2f} ± {ev['mmd_1e4_std']:4.2f}  ({point / seconds:5.1f} it/s)")
        else:
            nll = float(avg(task.encode(toy_2d(dataset, cfg["eval"]["n_test"],
                                               torch.Generator().manual_seed(123)))
                            ).double().mean()) + log_partition_uniform(
                                avg, task, cfg["eval"]["n_importance"])
            entry = {"iteration": point, "nll": nll, "train_seconds": seconds}
            log(f"  {dataset:12s} {method:8s} it {point:6d} NLL {nll:7.3f}")
        record["curve"] = [c for c in record["curve"] if c["iteration"] != point]
        record["curve"].append({"iteration": point, "nll": entry["nll"],
                                "train_seconds": seconds})
        record["iteration"], record["train_seconds"] = point, seconds
        torch.save({"model": energy.state_dict(), "ema": avg.state_dict(),
                    "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "buffer": None if sampler is None else sampler.buffer.states},
                   ckpt_path)
        tmp = rec_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(rec_path)
    return record


def load_record(method: str, dataset: str, cfg: dict, state_dir: Path) -> dict | None:
    """The stored record of a run (None if there is none or it has other settings)."""
    path = state_dir / f"{dataset}_{method}.json"
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    return rec if rec["settings"] == json.loads(json.dumps(run_settings(method, cfg))) else None


def run_budgets(cfg: dict, methods: list[str], datasets: list[str], budgets: list[int],
                state_dir: Path, restart: bool = False, collect: bool = False) -> dict:
    """``train_budgets`` for every (data set, method), one after the other; returns the results
    JSON: per data set the noise floor of the MMD and per method the run's record, with the
    NLL/MMD of the largest budget reached also at the top level (``nll``, ``mmd_1e4``,
    ``budget``). ``collect=True`` trains nothing: it gathers the stored records as they are."""
    results: dict = {"config": cfg, "budgets": sorted(budgets), "runs": {}}
    for ds in datasets:
        task = gray_task(ds, cfg["data"]["bits"])
        results["runs"][ds] = {"data_vs_data": evaluate_data_floor(ds, task, cfg["eval"])}
        for method in methods:
            if collect:
                rec = load_record(method, ds, cfg, state_dir)
                if rec is None or not rec["budgets"]:
                    print(f"  {ds:12s} {method:8s} no stored run with these settings")
                    continue
            else:
                rec = train_budgets(method, ds, task, cfg, budgets, state_dir, restart)
            reached = max(int(b) for b in rec["budgets"])
            top = rec["budgets"][str(reached)]
            results["runs"][ds][method] = {**rec, "nll": top["nll"], "mmd_1e4": top["mmd_1e4"],
                                           "budget": reached}
    return results


@torch.no_grad()
def evaluate_data_floor(dataset: str, task: Task, ev: dict) -> dict:
    """MMD between independent test sets, over ``mmd_repeats`` repeats: the metric's noise."""
    n, reps = ev["n_samples"], ev.get("mmd_repeats", 1)
    gen = torch.Generator().manual_seed(999)
    values = []
    for _ in range(reps):
        a = task.encode(toy_2d(dataset, n, gen))
        b = task.encode(toy_2d(dataset, n, gen))
        values.append(float(mmd(a, b, kernel="exp_hamming",
                                hamming_scale=ev["hamming_scale"])) * 1e4)
    vals = torch.tensor(values, dtype=torch.float64)
    return {"mmd_1e4": float(vals.mean()),
            "mmd_1e4_std": float(vals.std()) if reps > 1 else 0.0}


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


# Published numbers (Schroeder, Ou, Li, Duncan 2023, 32-bit Gray-coded toys; 10^5 iterations).
PUBLISHED_NLL = {
    "pcd": {"2spirals": 20.094, "8gaussians": 19.991, "circles": 20.565, "moons": 19.763,
            "pinwheel": 19.593, "swissroll": 20.172, "checkerboard": 21.214},
    "ed_bern": {"2spirals": 20.039, "8gaussians": 19.992, "circles": 20.601, "moons": 19.710,
                "pinwheel": 19.568, "swissroll": 20.084, "checkerboard": 20.679},
    "ed_grid": {"2spirals": 20.049, "8gaussians": 19.965, "circles": 20.601, "moons": 19.715,
                "pinwheel": 19.564, "swissroll": 20.088, "checkerboard": 20.678},
}
PUBLISHED_MMD = {
    "pcd": {"2spirals": 2.160, "8gaussians": 0.954, "circles": 0.188, "moons": 0.962,
            "pinwheel": 0.505, "swissroll": 1.382, "checkerboard": 2.831},
    "ed_bern": {"2spirals": 0.120, "8gaussians": 0.014, "circles": 0.137, "moons": -0.088,
                "pinwheel": 0.046, "swissroll": 0.045, "checkerboard": 1.541},
    "ed_grid": {"2spirals": 0.097, "8gaussians": -0.066, "circles": 0.022, "moons": 0.018,
                "pinwheel": 0.351, "swissroll": 0.097, "checkerboard": 2.049},
}
COLORS = {"ed_bern": "tab:blue", "ed_grid": "tab:orange", "pcd": "tab:green"}
UNIFORM_NLL = 32 * math.log(2)


def _setup_matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT,
                         "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1,
                         "legend.fontsize": FONT - 1})
    return plt


def plot_curves(results: dict, path: Path) -> None:
    """Learning curves: per data set the EMA model's test NLL against training iterations (log
    x), one solid line per method, the published level of each method (10^5 iterations) as a
    dashed line of the same colour; two panels a row, 9 in wide, the legend in a panel of its
    own."""
    plt = _setup_matplotlib()
    runs = results["runs"]
    datasets = list(runs)
    ncol = 2
    nrow = math.ceil((len(datasets) + 1) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(9.0, 3.1 * nrow + 0.9), squeeze=False)
    handles = {}
    methods = [m for m in COLORS if any(r.get(m, {}).get("curve") for r in runs.values())]
    all_its = [c["iteration"] for r in runs.values() for m in methods
               for c in r.get(m, {}).get("curve", [])] or [100, 1000]
    ticks = [t for t in (100, 300, 1000, 3000, 10_000, 30_000, 100_000)
             if min(all_its) <= t <= max(all_its)]
    for ax, ds in zip(axes.flat, datasets):
        values = []
        for m in methods:
            color, label = COLORS[m], LABELS.get(m, m)
            curve = runs[ds].get(m, {}).get("curve", [])
            if curve:
                nll = [c["nll"] for c in curve]
                (line,) = ax.plot([c["iteration"] for c in curve], nll, "o-", color=color,
                                  lw=2, ms=4)
                handles[f"{label} (ours)"] = line
                values += nll
            pub = PUBLISHED_NLL.get(m, {}).get(ds)
            if pub is not None:
                dash = ax.axhline(pub, color=color, ls="--", lw=1.5)
                handles[f"{label}, published (10$^5$ it.)"] = dash
                values.append(pub)
        ax.set_xscale("log")
        ax.set_xlim(min(all_its) / 1.25, max(all_its) * 1.25)
        ax.set_xticks(ticks, [f"{t // 1000}k" if t >= 1000 else str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_title(ds)
        if values:
            top = min(max(values), UNIFORM_NLL)
            ax.set_ylim(min(values) - 0.1, top + 0.1)
        ax.grid(alpha=0.3)
        ax.set_xlabel("training iterations")
        ax.set_ylabel("test NLL (nats)")
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    spare = list(axes.flat)[len(datasets):]
    labels = sorted(handles, key=lambda k: ("published" in k, k))
    if spare:
        spare[0].legend([handles[k] for k in labels], labels, loc="center", frameon=False)
    fig.suptitle("32-bit Gray-coded toys: test NLL of the EMA model during training\n"
                 "(one run per data set and method; uniform model: 22.18 nats)",
                 fontsize=FONT + 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(results: dict, path: Path, bins: int = 48) -> None:
    """Per data set (one row): the quantised test data and each method's Gibbs samples at its
    largest budget, decoded to the plane as 2-D histograms, 10 in wide."""
    plt = _setup_matplotlib()
    import numpy as np

    runs = results["runs"]
    ev = results["config"]["eval"]
    bits = results["config"]["data"]["bits"]
    methods = [m for m in ("ed_bern", "ed_grid", "pcd")
               if any("samples_2d" in r.get(m, {}) for r in runs.values())]
    methods += sorted({m for r in runs.values() for m in r
                       if m not in methods and "samples_2d" in r[m]})
    ncol = 1 + len(methods)
    fig, axes = plt.subplots(len(runs), ncol, figsize=(2.55 * ncol, 2.75 * len(runs) + 0.8),
                             squeeze=False)
    for row, (ds, ds_runs) in zip(axes, runs.items()):
        task = gray_task(ds, bits)
        data = task.decode(task.encode(toy_2d(ds, 4000, torch.Generator().manual_seed(5))))
        lims = [[float(data[:, i].min()) - 0.5, float(data[:, i].max()) + 0.5] for i in (0, 1)]
        panels = [(f"{ds}: data", data)]
        for m in methods:
            r = ds_runs.get(m, {})
            if "samples_2d" not in r:
                panels.append((f"{LABELS.get(m, m)}: not run", None))
                continue
            panels.append((f"{LABELS.get(m, m)}, {r['samples_iteration']:,} it.\n"
                           f"NLL {r['nll']:.2f}, MMD {r['mmd_1e4']:.2f}",
                           torch.tensor(r["samples_2d"])))
        for ax, (title, pts) in zip(row, panels):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=FONT - 2)
            if pts is None:
                continue
            h = np.histogram2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=bins, range=lims)[0]
            ax.imshow(h.T, origin="lower", cmap="viridis", aspect="equal",
                      extent=[*lims[0], *lims[1]])
    kept = sorted({len(r["samples_2d"]) for ds_runs in runs.values() for r in ds_runs.values()
                   if "samples_2d" in r})
    fig.suptitle(f"Model samples decoded to the plane ({'/'.join(f'{n:,}' for n in kept)} per "
                 f"model,\n{ev['gibbs_sweeps']} Gibbs sweeps from noise); NLL in nats, "
                 "MMD x 1e-4", fontsize=FONT)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_path(path: Path) -> Path:
    """The learning-curve figure beside the samples figure ``path``."""
    return path.with_name(f"{path.stem}_curves{path.suffix}")


def markdown_tables(results: dict) -> str:
    """The NLL and MMD tables of the docs page: one row per method and budget (``-`` where a
    run has not reached the budget), the published row (10^5 iterations) under each method,
    the best of ours per data set and method in bold when within 0.1 nats of the published."""
    runs = results["runs"]
    datasets = list(runs)
    methods = ["ed_bern", "ed_grid", "pcd"]
    budgets = sorted({int(b) for r in runs.values() for m in methods
                      for b in r.get(m, {}).get("budgets", {})})
    head = "| method, iterations | " + " | ".join(datasets) + " |\n|---|" + "---|" * len(
        datasets) + "\n"

    def cell(ds, m, b, key):
        e = runs[ds].get(m, {}).get("budgets", {}).get(str(b))
        if e is None:
            return "-"
        if key == "nll":
            pub = PUBLISHED_NLL.get(m, {}).get(ds)
            text = f"{e['nll']:.3f}"
            return f"**{text}**" if pub is not None and e["nll"] - pub <= 0.1 else text
        return f"{e['mmd_1e4']:.2f} ± {e['mmd_1e4_std']:.2f}"

    out = []
    for key, pub_table, title in (("nll", PUBLISHED_NLL, "NLL (nats)"),
                                  ("mmd", PUBLISHED_MMD, "MMD x 1e-4")):
        rows = []
        for m in methods:
            for b in budgets:
                if any(str(b) in runs[ds].get(m, {}).get("budgets", {}) for ds in datasets):
                    rows.append(f"| {LABELS.get(m, m)}, ours, {b:,} | "
                                + " | ".join(cell(ds, m, b, key) for ds in datasets) + " |")
            fmt = "{:.3f}" if key == "nll" else "{:.3f}"
            rows.append(f"| {LABELS.get(m, m)}, published, 100,000 | " + " | ".join(
                fmt.format(pub_table[m][ds]) if ds in pub_table.get(m, {}) else "-"
                for ds in datasets) + " |")
        if key == "mmd":
            rows.append("| two test sets (noise floor) | " + " | ".join(
                f"{runs[ds]['data_vs_data']['mmd_1e4']:.2f} ± "
                f"{runs[ds]['data_vs_data'].get('mmd_1e4_std', 0):.2f}" for ds in datasets) + " |")
        out.append(f"{title}\n\n" + head + "\n".join(rows) + "\n")
    return "\n".join(out)


def save_budgets(results: dict, name: str, out: Path, merge: bool = False) -> dict:
    """Write <out>/results/<name>.json, <out>/figures/<name>.png (samples at the largest
    budget) and <out>/figures/<name>_curves.png (learning curves); ``merge=True`` adds these
    runs to an existing JSON."""
    json_path = out / "results" / f"{name}.json"
    if merge and json_path.exists():
        old = json.loads(json_path.read_text())
        if "budgets" in old:
            for ds, runs in results["runs"].items():
                old["runs"].setdefault(ds, {}).update(runs)
            results = {**results, "runs": old["runs"],
                       "budgets": sorted(set(old["budgets"]) | set(results["budgets"]))}
    for ds_runs in results["runs"].values():
        for r in ds_runs.values():
            if "samples_2d" in r:  # 3 decimals (float32 lists print 16 digits)
                r["samples_2d"] = [[round(a, 3), round(b, 3)] for a, b in r["samples_2d"]]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # one line per 2-D sample and per [iteration, loss] pair
    text = re.sub(r"\[\s+(-?[\d.eE+-]+),\s+(-?[\d.eE+-]+)\s+\]", r"[\1, \2]",
                  json.dumps(results, indent=1))
    json_path.write_text(text)
    png = out / "figures" / f"{name}.png"
    plot_samples(results, png)
    plot_curves(results, curves_path(png))
    report_written(json_path, png, curves_path(png))
    return results


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
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="iteration counts at which each run is evaluated (one run per "
                             "data set and method, resumed from its checkpoint)")
    parser.add_argument("--restart", action="store_true",
                        help="train afresh, ignoring the checkpoints in the state folder")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: gather the stored runs (each at the budgets it "
                             "has reached) into the results JSON and figures")
    parser.add_argument("--markdown", action="store_true",
                        help="print the docs page's NLL and MMD tables")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="folder of the per-run records and checkpoints (default "
                             "runs/<name>, or <--out>/state/<name>)")
    add_output_arguments(parser)
    parser.add_argument("--merge", action="store_true",
                        help="add these runs to the existing results JSON (run data sets in "
                             "separate processes)")
    args = parser.parse_args(argv)
    args.out_given = args.out is not None
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
        if "mmd_repeats" in cfg["eval"]:
            cfg["eval"]["mmd_repeats"] = 2
    if args.budgets:
        args.budgets = sorted(set(args.budgets))
    elif args.quick or args.iterations:
        args.budgets = [iterations]
    else:
        args.budgets = sorted(set(cfg["train"].get("budgets", [iterations])))
    return args, cfg, datasets, iterations


def plot_from_json(json_path: Path, path: Path) -> dict:
    """Redraw the figure from a results JSON (it keeps the samples decoded to 2-D)."""
    results = json.loads(Path(json_path).read_text())
    if "budgets" in results:  # one resumable run per data set and method: curves + samples
        plot_samples(results, path)
        plot_curves(results, curves_path(path))
        return results
    bits = results["config"]["data"]["bits"]
    plot(results, lambda ds: gray_task(ds, bits), path)
    return results


def state_dir_for(args, name: str) -> Path:
    """Per-run records and checkpoints: ``--state-dir``, else ``<--out>/state/<name>`` when
    ``--out`` is given, else ``runs/<name>`` (git ignores ``runs/``). ``--quick`` runs keep
    theirs in a temporary folder unless ``--state-dir`` is given."""
    if args.state_dir is not None:
        return Path(args.state_dir)
    return args.out / "state" / name if args.out_given else ROOT / "runs" / name


def main(argv: list[str] | None = None) -> dict:
    import sys

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plot-only", action="store_true")
    known, argv = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    description = (__doc__.split("\n")[0] + " (--plot-only: redraw the figure from the results "
                   "JSON, without training)")
    args, cfg, datasets, _ = parse(argv, description, CONFIG, "ed_bern,ed_grid,pcd")
    name = "ed_discrete_toys" + ("_quick" if args.quick else "")
    if known.plot_only:
        png = args.out / "figures" / f"{name}.png"
        results = plot_from_json(args.out / "results" / f"{name}.json", png)
        report_written(png, *([curves_path(png)] if "budgets" in results else []))
        return results
    torch.set_num_threads(1)
    if args.quick and args.state_dir is None and not args.collect:
        # a quick run is not worth resuming: its checkpoints go to a temporary folder, so it
        # writes only the results JSON and the figures
        with tempfile.TemporaryDirectory() as tmp:
            results = run_budgets(cfg, args.methods.split(","), datasets, args.budgets,
                                  Path(tmp), args.restart, args.collect)
    else:
        results = run_budgets(cfg, args.methods.split(","), datasets, args.budgets,
                              state_dir_for(args, name), args.restart, args.collect)
    results["quick"] = args.quick
    results = save_budgets(results, name, args.out, args.merge)
    if args.markdown:
        print(markdown_tables(results))
    return results


if __name__ == "__main__":
    main()
