"""Lattice Ising coupling recovery with persistent contrastive divergence and Gibbs-with-Gradients.

The experiment of the GWG paper (Grathwohl et al. 2021) and the discrete energy-discrepancy
paper: data come from an Ising model p(s) ∝ exp(s^T J s) on a 10 x 10 periodic lattice with
J = sigma * adjacency; an ``IsingEnergy(learnable=True)`` initialised at J = 0 (bias fixed at 0)
is trained by

    L = mean E(x+) - mean E(x-) + l1 * sum_ij |J_ij|   (``ContrastiveDivergence`` + l1)

with negatives from a ``PersistentSampler(GibbsWithGradients(), ReplayBuffer(...))`` (the
persistent chains are the buffer; no re-initialisation). The l1 penalty is the one of the
papers' code. The score is the negative log RMSE of the learned coupling over all D^2
entries, -log sqrt(mean_ij (J_ij - J*_ij)^2) (higher is better). Published (Gibbs / GWG PCD):
4.8, 4.7, 3.4 for sigma = 0.1, 0.2, 0.3.

Training data: 2,000 samples, each the end of a long systematic-scan ``Gibbs`` chain started
from uniform noise (``source = "gibbs"``, the papers' protocol), or exact samples by transfer
matrices (``source = "exact"``, used by --quick because it takes a second). Either way the mean
nearest-neighbour correlation of the data is compared with that of exact samples.

    python examples/ising_recovery.py --quick     # exact data, 300 updates (< 1 min)
    python examples/ising_recovery.py             # the config (Gibbs data, 8,000 updates)
    python examples/ising_recovery.py --sigmas 0.1 --set train.l1=0.02 train.iterations=2000

Writes runs/examples/figures/ising_recovery.png and runs/examples/results/ising_recovery.json
(``--quick``: ``*_quick.png`` / ``*_quick.json``; ``--update-docs``: docs/figures and
docs/results) and prints where. The JSON keeps the learned couplings, so ``--plot-only``
redraws the figure from it without training (with ``--quick`` / ``--update-docs`` as above).

The whole published table (``--table``): the methods of ``table.methods`` (``gwg``: PCD + GWG
as above; ``ed_bern`` / ``ed_grid``: ``EnergyDiscrepancy`` with the Bernoulli / grid kernel of
the [ed_bern] / [ed_grid] sections, same data, l1, optimiser and updates) times the
(lattice side, sigma) columns of ``table.columns`` (D = 100 with sigma 0.1 to 0.5, D = 81 with
sigma -0.1 and -0.2):

    python examples/ising_recovery.py --table                   # every cell, resumable
    python examples/ising_recovery.py --table --update-docs     # copy finished cells to docs/
    python examples/ising_recovery.py --table --methods ed_bern --columns 10:0.4 9:-0.1
    python examples/ising_recovery.py --table --quick           # exact data, 300 updates

writes runs/examples/results/ising_recovery_table.json (cells keyed by method, then column
"D=100, sigma=0.1"; each with the settings it was run with) after every cell, and the bar
chart runs/examples/figures/ising_recovery_table.png at the end. A cell already in the JSON
(or in a ``--merge`` file, or with ``--update-docs`` in the runs/ JSON) with the same settings
is not recomputed; changing a setting recomputes exactly the cells it affects.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from example_output import RUNS_DIR, add_output_arguments, output_dir, report_written

from ebmflow.cli import load_example_settings
from ebmflow.energy import IsingEnergy, lattice_adjacency
from ebmflow.losses import (
    BernoulliPerturbation,
    ContrastiveDivergence,
    EnergyDiscrepancy,
    GridPerturbation,
)
from ebmflow.samplers import Gibbs, GibbsWithGradients, PersistentSampler, ReplayBuffer
from ebmflow.samplers._lattice import lattice_exact_sample

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "ising_recovery.toml"
PUBLISHED = {0.1: 4.8, 0.2: 4.7, 0.3: 3.4}
# --table: the methods and the published table (discrete ED paper, Schroeder et al. 2023),
# -log RMSE(J) per (lattice side, sigma) column; side 10 is D = 100, side 9 is D = 81
METHODS = {"gwg": "Gibbs / GWG (PCD)", "ed_bern": "ED-Bern", "ed_grid": "ED-Grid"}
PUBLISHED_COLUMNS = [(10, 0.1), (10, 0.2), (10, 0.3), (10, 0.4), (10, 0.5), (9, -0.1), (9, -0.2)]
PUBLISHED_TABLE = {
    "gwg": [4.8, 4.7, 3.4, 2.6, 2.3, 4.8, 4.7],
    "ed_bern": [5.1, 4.0, 2.9, 2.5, 2.3, 5.1, 4.3],
    "ed_grid": [4.6, 4.0, 3.1, 2.6, 2.3, 4.5, 4.0],
}


def _parse_value(text: str) -> object:
    """'0.02' -> 0.02, '300' -> 300, 'true' -> True, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(path: Path = CONFIG, quick: bool = False) -> dict:
    cfg = load_example_settings(path)
    if quick:
        for key, value in cfg.get("quick", {}).items():
            cfg["data" if key in cfg["data"] else "train"][key] = value
    return cfg


@torch.no_grad()
def neighbour_correlation(x: torch.Tensor, side: int) -> float:
    """Mean of s_i s_j over lattice edges and samples (s = 2x - 1)."""
    s = 2.0 * x - 1.0
    adj = lattice_adjacency(side)
    return float(torch.einsum("ni,ij,nj->", s, adj, s) / (adj.sum() * s.shape[0]))


def make_data(truth: IsingEnergy, side: int, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    n = cfg["n"]
    if cfg["source"] == "exact":
        return lattice_exact_sample(truth, n, side, generator=gen)
    if cfg["source"] != "gibbs":
        raise ValueError(f"data.source must be 'gibbs' or 'exact', got {cfg['source']!r}")
    return Gibbs(sweep=True).sample(truth, n, generator=gen, n_steps=cfg["gibbs_sweeps"])


def rmse(model: IsingEnergy, truth: IsingEnergy) -> float:
    return float((model.coupling.detach() - truth.coupling).pow(2).mean().sqrt())


def lr_factor(it: int, iters: int, schedule: str, decay_frac: float) -> float:
    """Multiplier of the base learning rate at update ``it`` (0-based) of ``iters``.

    "constant": 1. "cosine": 0.5 (1 + cos(pi it / iters)). "constant_cosine": 1 for the first
    (1 - decay_frac) iters, then a cosine from 1 to 0 over the last decay_frac * iters.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * it / iters))
    if schedule == "constant_cosine":
        start = (1.0 - decay_frac) * iters
        if it < start:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (it - start) / max(iters - start, 1.0)))
    raise ValueError(
        f"train.lr_schedule must be 'constant', 'cosine' or 'constant_cosine', got {schedule!r}"
    )


def train(data: torch.Tensor, truth: IsingEnergy, cfg: dict, log_every: int = 50,
          method: str = "gwg") -> dict:
    """Train from J = 0 with ``method``; returns the score, its curve and the statistics.

    ``method`` = "gwg": PCD with GWG negatives. "ed_bern" / "ed_grid": energy discrepancy
    (``EnergyDiscrepancy(perturbation, m=cfg["m"], w=cfg["w"])``, no sampler) with the
    Bernoulli kernel of flip probability ``cfg["eps"]`` or the one-bit grid kernel; its loss
    replaces the CD term below, the l1 penalty, optimiser and schedule stay the same.

    Loss per update (data minibatch x+ of ``batch_size``, negatives x- from the persistent
    chains after ``gwg_steps`` GWG steps):

        L = mean E(x+) - mean E(x-) + l1 * sum_ij |J_ij|

    The l1 term is the papers' sparsity penalty on the coupling (its gradient is l1 * sign(J)
    per entry, next to the CD gradient <s_i s_j>_model - <s_i s_j>_data). The bias b is
    trained only if ``learn_bias`` (the papers keep it at 0, as the data model has none).
    """
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    d = truth.space.dim
    model = IsingEnergy(torch.zeros(d, d), learnable=True)
    model.bias.requires_grad_(bool(cfg.get("learn_bias", False)))
    batch, iters = cfg["batch_size"], cfg["iterations"]
    l1 = float(cfg.get("l1", 0.0))
    if method == "gwg":
        buffer = ReplayBuffer(model.space, capacity=cfg.get("n_chains", batch), reinit_prob=0.0)
        sampler = PersistentSampler(GibbsWithGradients(), buffer, n_steps=cfg["gwg_steps"])
        loss_fn = ContrastiveDivergence()
    elif method in ("ed_bern", "ed_grid"):
        sampler = None
        pert = (BernoulliPerturbation(float(cfg["eps"])) if method == "ed_bern"
                else GridPerturbation())
        loss_fn = EnergyDiscrepancy(pert, m=int(cfg["m"]), w=float(cfg["w"]))
    else:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    schedule = cfg.get("lr_schedule", "cosine")
    decay_frac = float(cfg.get("decay_frac", 1.0))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: lr_factor(it, iters, schedule, decay_frac))
    curve, accept, flips = [], torch.zeros(()), torch.zeros(())
    start = time.perf_counter()
    for it in range(1, iters + 1):
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        out = loss_fn(model, data[idx], sampler, generator=gen)
        loss = out.loss + l1 * model.coupling.abs().sum() if l1 > 0 else out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if sampler is not None:
            accept += out.stats["accept_rate"] / iters
            flips += out.stats["flips"] / iters
        if it % log_every == 0 or it == iters:
            curve.append((it, -math.log(rmse(model, truth))))
    seconds = time.perf_counter() - start
    err = rmse(model, truth)
    j = model.coupling.detach()
    on = truth.coupling != 0
    return {
        "neg_log_rmse": -math.log(err),
        "rmse": err,
        "rmse_on_lattice": float((j - truth.coupling)[on].pow(2).mean().sqrt()),
        "rmse_off_lattice": float(j[~on].pow(2).mean().sqrt()),
        "mean_on_lattice": float(j[on].mean()),
        "curve": curve,
        **({"accept_rate": float(accept), "flips_per_step": float(flips)}
           if sampler is not None else {}),
        "seconds": seconds,
        "updates_per_s": iters / seconds,
        "coupling": j,
    }


FONT = 13  # points; the figure is 8 in wide at 100 dpi, shown at about its pixel size


def compact_json(obj) -> str:
    """``json.dumps(obj, indent=2)`` with every list of numbers on one line (a coupling row,
    a curve point), so that the stored matrices stay readable and small."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                  text)


def plot(results: dict, side: int, path: Path, title: str = "") -> None:
    """The score during training (published values dotted), then for each sigma the learned
    coupling block J[:2 side, :2 side] (the first two lattice rows) with a colour bar; two
    panels a row, 8 in wide. ``results[sigma]`` holds ``curve`` and ``coupling`` (D x D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT,
                         "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1,
                         "legend.fontsize": FONT - 1})
    sigmas = list(results)
    ncol = 2
    nrow = math.ceil((len(sigmas) + 1) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(8.0, 4.6 * nrow), squeeze=False)
    axes = axes.ravel()
    ax = axes[0]
    for i, sigma in enumerate(sigmas):
        it, score = zip(*results[sigma]["curve"])
        pub = f", published {PUBLISHED[sigma]}" if sigma in PUBLISHED else ""
        ax.plot(it, score, color=f"C{i}", lw=2, label=f"sigma = {sigma}{pub}")
        if sigma in PUBLISHED:
            ax.axhline(PUBLISHED[sigma], ls=":", lw=1.5, color=f"C{i}")
    ax.set(xlabel="update", ylabel="-log RMSE(J)")
    ax.set_title("Recovery score during training\n(higher is better; dotted: published)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=FONT - 1)
    ax.grid(alpha=0.3)
    k = 2 * side
    for ax, sigma in zip(axes[1:], sigmas):
        r = results[sigma]
        j = torch.as_tensor(r["coupling"], dtype=torch.float32)[:k, :k]
        im = ax.imshow(j.numpy(), cmap="RdBu_r", vmin=-sigma, vmax=sigma,
                       extent=(0.5, k + 0.5, k + 0.5, 0.5))
        ax.set_title(f"sigma = {sigma}: learned J[1:{k}, 1:{k}]\n"
                     f"mean on edges {r['mean_on_lattice']:.3f} (true {sigma})\n"
                     f"-log RMSE {r['neg_log_rmse']:.2f}")
        ax.set_xticks([1, side, k])
        ax.set_yticks([1, side, k])
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label("J_ij", fontsize=FONT - 1)
        cb.ax.tick_params(labelsize=FONT - 1)
    for ax in axes[len(sigmas) + 1:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=FONT + 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_title(cfg: dict) -> str:
    tr, data = cfg["train"], cfg["data"]
    source = "Gibbs" if data["source"] == "gibbs" else "exact"
    return (f"{tr['iterations']} updates, {tr['gwg_steps']} GWG steps, "
            f"{data['n']} {source} samples")


def plot_from_json(json_path: Path, png_path: Path) -> None:
    """Redraw the figure from a results JSON (no training); it must hold the couplings."""
    payload = json.loads(json_path.read_text())
    results = {float(s): r for s, r in payload["results"].items()}
    if any("coupling" not in r for r in results.values()):
        raise SystemExit(f"{json_path} holds no learned couplings (written by an older version "
                         "of this script): re-run the example to store them")
    plot(results, payload["config"]["lattice"]["side"], png_path, figure_title(payload["config"]))


# -- the table (--table): methods x (side, sigma) columns, resumable ----------------------------
def column_key(side: int, sigma: float) -> str:
    """'D=100, sigma=0.1': the JSON key of a (lattice side, sigma) column."""
    return f"D={side * side}, sigma={sigma:g}"


def parse_column(text: str) -> tuple[int, float]:
    """'10:0.1' -> (10, 0.1), '9:-0.2' -> (9, -0.2): lattice side, then sigma."""
    side, sep, sigma = text.partition(":")
    if not sep:
        raise ValueError(f"a column is SIDE:SIGMA, e.g. 10:0.1 or 9:-0.2; got {text!r}")
    return int(side), float(sigma)


def method_settings(cfg: dict, method: str) -> dict:
    """The training settings of ``method``: [train], then (ED) its own section on top, without
    the keys that only the PCD sampler reads."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method == "gwg":
        return dict(cfg["train"])
    out = {k: v for k, v in cfg["train"].items() if k not in ("gwg_steps", "n_chains")}
    out.update(cfg.get(method, {}))
    return out


def cell_settings(cfg: dict, method: str, side: int, sigma: float) -> dict:
    """Everything that determines a cell's number: a finished cell is reused only if these
    settings are equal (data, method, training budget, lattice)."""
    return {"method": method, "side": side, "sigma": sigma, "data": dict(cfg["data"]),
            "train": method_settings(cfg, method)}


def _cells_of(payload: dict) -> dict:
    """{method: {column: cell}} from a results JSON: a table JSON (``cells``), or a JSON of
    the single-method mode (PCD + GWG per sigma, whose config gives the settings)."""
    if "cells" in payload:
        return payload["cells"]
    cfg, side = payload["config"], payload["config"]["lattice"]["side"]
    cells = {}
    for sigma, res in payload.get("results", {}).items():
        cell = {k: v for k, v in res.items() if k != "coupling"}
        cell["settings"] = cell_settings(cfg, "gwg", side, float(sigma))
        cell["curve"] = cell.get("curve", [])[::4]
        cells[column_key(side, float(sigma))] = cell
    return {"gwg": cells}


def load_cells(paths: list[Path]) -> dict:
    """Merge the cells of every existing JSON in ``paths`` (later files win)."""
    cells: dict = {}
    for path in paths:
        if path.exists():
            for method, cols in _cells_of(json.loads(path.read_text())).items():
                cells.setdefault(method, {}).update(cols)
    return cells


_DATA_CACHE: dict = {}


def column_data(cfg: dict, side: int, sigma: float) -> tuple:
    """(data, exact samples, seconds) of a column, as in the single-method mode; drawn once
    per process and data settings, so that the methods of a column train on the same data."""
    key = (side, sigma, json.dumps(cfg["data"], sort_keys=True))
    if key not in _DATA_CACHE:
        truth = IsingEnergy.lattice(side, sigma)
        gen = torch.Generator().manual_seed(cfg["data"]["seed"])
        t0 = time.perf_counter()
        data = make_data(truth, side, cfg["data"], gen)
        data_s = time.perf_counter() - t0
        exact = data if cfg["data"]["source"] == "exact" else lattice_exact_sample(
            truth, cfg["data"]["n"], side, generator=gen)
        _DATA_CACHE.clear()  # one column at a time
        _DATA_CACHE[key] = (data, exact, data_s)
    return _DATA_CACHE[key]


def run_cell(cfg: dict, method: str, side: int, sigma: float) -> dict:
    """One training run on the column's data; the cell's JSON entry."""
    truth = IsingEnergy.lattice(side, sigma)
    data, exact, data_s = column_data(cfg, side, sigma)
    settings = method_settings(cfg, method)
    cpu0 = time.process_time()
    res = train(data, truth, settings, log_every=200, method=method)
    res.pop("coupling")
    res.update(data_seconds=data_s, train_cpu_seconds=time.process_time() - cpu0,
               data_nn_corr=neighbour_correlation(data, side),
               exact_nn_corr=neighbour_correlation(exact, side),
               settings=cell_settings(cfg, method, side, sigma))
    return res


def table_payload(cfg: dict, cells: dict, quick: bool) -> dict:
    published = {m: {column_key(*c): v for c, v in zip(PUBLISHED_COLUMNS, vals)}
                 for m, vals in PUBLISHED_TABLE.items()}
    return {"config": cfg, "quick": quick, "methods": METHODS, "published": published,
            "threads": torch.get_num_threads(), "cells": cells}


def write_json(path: Path, payload: dict) -> None:
    """Write atomically (a killed run leaves the previous file, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(compact_json(payload))
    tmp.replace(path)


def plot_table(payload: dict, path: Path) -> None:
    """Bars: our -log RMSE(J) per column and method; black ticks: the published values;
    dotted: the score of J = 0 (nothing learned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT,
                         "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1,
                         "legend.fontsize": FONT - 1})
    methods = [m for m in METHODS if m in payload["cells"] or m in payload["published"]]
    columns = list(dict.fromkeys(
        [column_key(*c) for c in PUBLISHED_COLUMNS]
        + [c for m in methods for c in payload["cells"].get(m, {})]))
    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(columns))]
        ours = [payload["cells"].get(m, {}).get(c, {}).get("neg_log_rmse", float("nan"))
                for c in columns]
        pub = [payload["published"].get(m, {}).get(c, float("nan")) for c in columns]
        ax.bar(xs, ours, width=width * 0.9, color=f"C{i}", label=f"{METHODS[m]} (ours)")
        ax.scatter(xs, pub, marker="_", s=220, color="black", lw=2,
                   label="published" if i == 0 else None, zorder=3)
    for k, c in enumerate(columns):  # the score of J = 0: -log(|sigma| sqrt(4 / D))
        d, sigma = (float(v.split("=")[1]) for v in c.split(", "))
        ax.hlines(-math.log(abs(sigma) * math.sqrt(4.0 / d)), k - 0.45, k + 0.45,
                  colors="0.4", linestyles=":", lw=1.5, label="J = 0" if k == 0 else None)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([c.replace(", sigma=", "\n$\\sigma$=") for c in columns])
    ax.set_ylabel("-log RMSE(J) (higher is better)")
    iters = sorted({cell["settings"]["train"]["iterations"]
                    for cols in payload["cells"].values() for cell in cols.values()})
    budget = " / ".join(f"{i:,}" for i in iters) + " updates per cell" if iters else ""
    ax.set_title("Lattice Ising coupling recovery: ours (bars) vs published (ticks)\n"
                 f"dotted: the score of J = 0; {budget}")
    ax.legend(loc="upper right", ncol=2, fontsize=FONT - 2)
    ax.set_ylim(0, 7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(payload: dict) -> None:
    columns = [column_key(*c) for c in PUBLISHED_COLUMNS]
    extra = [c for cols in payload["cells"].values() for c in cols if c not in columns]
    columns += list(dict.fromkeys(extra))
    print("| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for m in METHODS:
        row = []
        for c in columns:
            cell = payload["cells"].get(m, {}).get(c)
            ours = f"{cell['neg_log_rmse']:.2f}" if cell else "-"
            pub = payload["published"].get(m, {}).get(c)
            row.append(f"{ours} ({pub})" if pub is not None else ours)
        print(f"| {METHODS[m]} | " + " | ".join(row) + " |")


def run_table(args: argparse.Namespace, cfg: dict) -> dict:
    """Every (method, column) cell not already finished with the same settings, one after the
    other; the JSON is rewritten after each cell, so an interrupted run resumes where it
    stopped. Finished cells are read from the output JSON, from ``--merge`` files and, with
    ``--update-docs``, from the default runs/ JSON (so that ``--update-docs`` after a run
    copies its cells into docs/ instead of recomputing them)."""
    name = "ising_recovery_table_quick" if args.quick else "ising_recovery_table"
    folder = output_dir(args)
    json_path, png_path = folder / "results" / f"{name}.json", folder / "figures" / f"{name}.png"
    if args.plot_only:
        payload = json.loads(json_path.read_text())
        plot_table(payload, png_path)
        print_table(payload)
        report_written(png_path)
        return payload
    methods = args.methods or cfg["table"]["methods"]
    columns = ([parse_column(c) for c in args.columns] if args.columns
               else [tuple(c) for c in cfg["table"]["columns"]])
    runs_json = RUNS_DIR / "results" / f"{name}.json"
    sources = [*(args.merge or []), *([runs_json] if args.update_docs else []), json_path]
    cells = load_cells(sources)
    todo = [(m, side, sigma) for side, sigma in columns for m in methods  # column by column
            if cells.get(m, {}).get(column_key(side, sigma), {}).get("settings")
            != cell_settings(cfg, m, side, sigma)]
    done = len(methods) * len(columns) - len(todo)
    print(f"{done} of {len(methods) * len(columns)} cells finished with these settings; "
          f"{len(todo)} to run", flush=True)
    for i, (m, side, sigma) in enumerate(todo, 1):
        res = run_cell(cfg, m, side, sigma)
        cells.setdefault(m, {})[column_key(side, sigma)] = res
        pub = dict(zip(PUBLISHED_COLUMNS, PUBLISHED_TABLE.get(m, [])))
        print(f"[{i}/{len(todo)}] {METHODS[m]}, {column_key(side, sigma)}: -log RMSE(J) = "
              f"{res['neg_log_rmse']:.2f} (published {pub.get((side, sigma), float('nan'))}; "
              f"mean J on edges {res['mean_on_lattice']:.3f}, RMSE off edges "
              f"{res['rmse_off_lattice']:.4f}); {res['train_cpu_seconds']:.0f} CPU s, "
              f"{res['seconds']:.0f} s wall; data nn-corr {res['data_nn_corr']:.3f} vs exact "
              f"{res['exact_nn_corr']:.3f}", flush=True)
        if not args.no_save:
            write_json(json_path, table_payload(cfg, cells, args.quick))
    payload = table_payload(cfg, cells, args.quick)
    if not args.no_save:
        write_json(json_path, payload)
        plot_table(payload, png_path)
        report_written(json_path, png_path)
    print_table(payload)
    return payload


def apply_overrides(cfg: dict, args: argparse.Namespace) -> dict:
    """--iterations, --source and --set SECTION.KEY=VALUE on top of the config."""
    if args.iterations:
        cfg["train"]["iterations"] = args.iterations
    if args.source:
        cfg["data"]["source"] = args.source
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, setting = key.partition(".")
        if section not in cfg or not setting or not value:
            raise ValueError(f"--set expects SECTION.KEY=VALUE with SECTION in {list(cfg)}, "
                             f"got {item!r}")
        cfg[section][setting] = _parse_value(value)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="exact data, short training")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--sigmas", type=float, nargs="*", help="override lattice.sigmas")
    parser.add_argument("--iterations", type=int, help="override train.iterations")
    parser.add_argument("--source", choices=["gibbs", "exact"], help="override data.source")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any setting, e.g. train.l1=0.02 data.gibbs_sweeps=100")
    parser.add_argument("--no-save", action="store_true", help="do not write JSON / figure")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the figure from the results JSON, without training")
    parser.add_argument("--table", action="store_true",
                        help="the whole table: methods x (side, sigma) columns of [table], "
                             "resuming from finished cells")
    parser.add_argument("--methods", nargs="*", choices=list(METHODS),
                        help="--table: override table.methods")
    parser.add_argument("--columns", nargs="*", metavar="SIDE:SIGMA",
                        help="--table: override table.columns, e.g. 10:0.4 9:-0.1")
    parser.add_argument("--merge", nargs="*", type=Path, metavar="JSON",
                        help="--table: also take finished cells from these results JSON files")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.table and not args.plot_only:
        torch.set_num_threads(1)
        return run_table(args, apply_overrides(load_config(args.config, args.quick), args))
    if args.table:
        return run_table(args, {})
    name = "ising_recovery_quick" if args.quick else "ising_recovery"
    if args.plot_only:
        folder = output_dir(args)
        json_path, png_path = folder / "results" / f"{name}.json", folder / "figures" / f"{name}.png"
        plot_from_json(json_path, png_path)
        report_written(png_path)
        return {}
    torch.set_num_threads(1)
    cfg = apply_overrides(load_config(args.config, args.quick), args)
    side = cfg["lattice"]["side"]
    sigmas = args.sigmas or cfg["lattice"]["sigmas"]
    results = {}
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for sigma in sigmas:
        truth = IsingEnergy.lattice(side, sigma)
        data, exact, data_s = column_data(cfg, side, sigma)
        res = train(data, truth, cfg["train"])
        res["data_seconds"] = data_s
        res["data_nn_corr"] = neighbour_correlation(data, side)
        res["exact_nn_corr"] = neighbour_correlation(exact, side)
        results[sigma] = res
        print(f"sigma={sigma}: -log RMSE(J) = {res['neg_log_rmse']:.2f} (published "
              f"{PUBLISHED.get(sigma, float('nan'))}; RMSE on/off lattice {res['rmse_on_lattice']:.4f}/"
              f"{res['rmse_off_lattice']:.4f}, mean J on lattice {res['mean_on_lattice']:.3f}), accept {res['accept_rate']:.2f}, "
              f"{res['updates_per_s']:.1f} updates/s; data nn-corr {res['data_nn_corr']:.3f} "
              f"vs exact {res['exact_nn_corr']:.3f} ({cfg['data']['source']}, "
              f"{data_s:.1f} s)", flush=True)
    if not args.no_save:
        out = {
            "config": cfg,
            "quick": args.quick,
            "wall_seconds": time.perf_counter() - wall_start,
            "cpu_seconds": time.process_time() - cpu_start,
            "threads": torch.get_num_threads(),
            "published": {str(k): v for k, v in PUBLISHED.items()},
            "results": {
                str(s): {**{k: v for k, v in r.items() if k != "coupling"},
                         # the learned D x D coupling (4 decimals), for the figure
                         "coupling": [[round(v, 4) + 0.0 for v in row]
                                      for row in r["coupling"].tolist()]}
                for s, r in results.items()
            },
        }
        folder = output_dir(args)
        (folder / "results").mkdir(parents=True, exist_ok=True)
        (folder / "results" / f"{name}.json").write_text(compact_json(out))
        plot(results, side, folder / "figures" / f"{name}.png", figure_title(cfg))
        report_written(folder / "results" / f"{name}.json", folder / "figures" / f"{name}.png")
    return results


if __name__ == "__main__":
    main()
