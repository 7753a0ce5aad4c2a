"""Discrete flow samplers on 32-bit Gray-coded 2-D toys (samplingEBMs report).

(a) A flow sampler learned from data vs one learned data-free from a pre-trained energy
    (ED-Bern, importance weights with a proposal fitted to the data marginals): MMD x 1e-4
    (kernel exp(-0.1 Hamming)) of its samples to held-out data.
(b) EBMs trained by the three recipes (``FlowNegatives``, ``BootstrapFlow``, ``BackAndForth``,
    each with ``ContrastiveDivergence(alpha=0.1)``), beside ED-Bern on the same protocol:
    NLL in nats (log Z by importance sampling over uniform bit strings), MMD of the flow's
    samples, and of the same samples after 10 DMALA steps on the learned energy (how much
    MCMC refinement recovers).

Hyperparameters: the ``[example.*]`` tables of examples/configs/discrete_flow_toys.toml
(its ``[train]`` table is the closest ``ebmflow train`` run). Writes
runs/examples/results/discrete_flow_toys.json and
runs/examples/figures/discrete_flow_toys.png (``_quick`` suffix with --quick) and prints
where (``--update-docs``: docs/results and docs/figures; ``--out FOLDER``).

    python examples/discrete_flow_toys.py --quick     # < 1 minute on CPU
    python examples/discrete_flow_toys.py             # the documented run
    python examples/discrete_flow_toys.py --quick --plot-only   # redraw from the JSON

The JSON keeps each flow's samples decoded to 2-D, so ``--plot-only`` redraws the figure from
it without training.

``--recipes-table`` trains the three recipes on the seven toys of examples/ed_discrete_toys.py
(``[example.table]``: data sets, budgets) and evaluates each EBM with that script's
``evaluate_repeats`` and its ``[example.eval]`` (NLL with 10^6 uniform strings, MMD of 4,000
Gibbs samples x 10 repeats), plus the MMD of the flow's own samples, at every budget of one
run per (data set, recipe). Records and checkpoints in runs/discrete_flow_recipes_toys/ (a
rerun skips reached budgets and extends stored runs); writes
runs/examples/results/discrete_flow_recipes_toys.json (``--update-docs``: docs/results) and
prints the tables; ``--collect`` gathers the stored runs without training.

    python examples/discrete_flow_toys.py --recipes-table --budgets 1000 3000
    python examples/discrete_flow_toys.py --recipes-table --collect --update-docs
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import warnings
from pathlib import Path

import torch
from example_output import add_output_arguments, output_dir, report_written

from ebmflow.cli import load_example_settings
from ebmflow.data import gray_decode, gray_encode, quantisation_bound, toy_2d
from ebmflow.discrete_flows import (
    BackAndForth,
    BootstrapFlow,
    CTMCSolver,
    DiscreteFlowSampler,
    FactorizedProposal,
    FlowNegatives,
    MixturePath,
    MLPVelocity,
    ebm_step,
)
from ebmflow.energy import MLPEnergy
from ebmflow.losses import BernoulliPerturbation, ContrastiveDivergence, EnergyDiscrepancy
from ebmflow.metrics import mmd
from ebmflow.samplers import DiscreteLangevin
from ebmflow.spaces import Binary

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "discrete_flow_toys.toml"
RECIPES = ("negatives", "bootstrap", "back_and_forth")


@torch.no_grad()
def nll(energy, test, n, gen, chunk=50_000):
    """mean E(test) + log Z, log Z = log mean_u exp(-E(u)) + D log 2 over uniform u."""
    d = test.shape[1]
    vals = [-energy(Binary(d).noise(min(chunk, n - i), gen)) for i in range(0, n, chunk)]
    log_z = torch.logsumexp(torch.cat(vals), 0) - math.log(n) + d * math.log(2)
    return float(energy(test).mean() + log_z)


def mmd_e4(x, y):
    return 1e4 * float(mmd(x, y, kernel="exp_hamming", hamming_scale=0.1))


def make_flow(cfg, gen_seed):
    torch.manual_seed(gen_seed)
    path = MixturePath(2, "mask")
    model = MLPVelocity(32, 2, hidden=cfg["flow"]["hidden"], schedule=path.schedule)
    return DiscreteFlowSampler(model, path, CTMCSolver(path, dt=cfg["flow"]["step_size"]),
                               lr=cfg["flow"]["lr"], batch_size=cfg["flow"]["proposal_batch"],
                               fit_to="data")


def make_recipe(recipe, flow, r):
    if recipe == "negatives":
        return FlowNegatives(flow, k=r["k"])
    if recipe == "bootstrap":
        return BootstrapFlow(flow, n_steps=r["dmala_steps"])
    return BackAndForth(flow, t_star=r["t_star"])


def toy_encoder(name, seed):
    """(enc, bound): the 32-bit Gray code of toy ``name`` (16 bits per coordinate), with the
    quantisation bound from 5,000 points drawn under ``seed``."""
    bound = quantisation_bound(toy_2d(name, 5000, torch.Generator().manual_seed(seed)))
    return (lambda x: gray_encode(x, 16, bound)), bound


def train_ed_bern(cfg, space, next_batch, iterations, gen, seed, callback=None):
    """ED-Bern (eps 0.1, M 32, w 1) on a fresh ``MLPEnergy`` (``cfg["energy"]``), seeded by
    ``seed``: ``iterations`` Adam steps on batches ``next_batch()``; ``callback(step, energy)``
    after each step (step from 1). Returns the energy with gradients off."""
    torch.manual_seed(seed)
    energy = MLPEnergy(space, hidden=cfg["energy"]["hidden"])
    opt = torch.optim.Adam(energy.parameters(), lr=cfg["energy"]["lr"])
    ed = EnergyDiscrepancy(BernoulliPerturbation(0.1), m=32, w=1.0)
    for step in range(1, iterations + 1):
        opt.zero_grad()
        ed(energy, next_batch(), generator=gen).loss.backward()
        opt.step()
        if callback is not None:
            callback(step, energy)
    energy.requires_grad_(False)
    return energy


def train_recipe(recipe, cfg, space, next_batch, gen, seed, callback=None):
    """One EBM (``MLPEnergy``, CD alpha from ``cfg["recipes"]``) trained with its own flow by
    ``recipe`` for ``cfg["recipes"]["iterations"]`` steps on batches ``next_batch()``;
    ``callback(step, energy, flow, stats)`` after each step (step from 1). Returns (energy
    with gradients off, flow, last step's stats)."""
    torch.manual_seed(seed)
    energy = MLPEnergy(space, hidden=cfg["energy"]["hidden"])
    flow = make_flow(cfg, seed)
    flow.batch_size = cfg["data"]["batch_size"]
    r = cfg["recipes"]
    sampler = make_recipe(recipe, flow, r)
    loss = ContrastiveDivergence(alpha=r["alpha"])
    opt = torch.optim.Adam(energy.parameters(), lr=cfg["energy"]["lr"])
    stats: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, r["iterations"] + 1):
            stats = ebm_step(energy, loss, sampler, next_batch(), opt, gen)
            if callback is not None:
                callback(step, energy, flow, stats)
    energy.requires_grad_(False)
    return energy, flow, stats


def evaluate_recipe(energy, flow, test, cfg, gen):
    """NLL of ``energy`` on ``test``, MMD x 1e-4 of the flow's samples to ``test`` and of the
    same samples after ``cfg["recipes"]["dmala_steps"]`` DMALA steps on the energy.
    Returns (metrics dict, flow samples)."""
    n_mmd, n_nll = cfg["eval"]["mmd_samples"], cfg["eval"]["nll_samples"]
    x_flow = flow.sample(energy, n_mmd, generator=gen)
    x_ref = DiscreteLangevin(metropolis=True).run(energy, x_flow, cfg["recipes"]["dmala_steps"],
                                                  generator=gen)
    return {"nll": nll(energy, test, n_nll, gen), "flow_mmd": mmd_e4(x_flow, test[:n_mmd]),
            "flow_plus_dmala_mmd": mmd_e4(x_ref, test[:n_mmd])}, x_flow


def run_dataset(name, cfg, quick, log):
    seed = cfg["eval"]["seed"]
    gen = torch.Generator().manual_seed(seed)
    enc, bound = toy_encoder(name, seed)
    batch = cfg["data"]["batch_size"]
    test = enc(toy_2d(name, cfg["eval"]["test_points"], gen))
    n_mmd, n_nll = cfg["eval"]["mmd_samples"], cfg["eval"]["nll_samples"]
    space = Binary(32)
    probe = MLPEnergy(space, hidden=(4,))  # only its space is used by flow.sample
    out: dict = {"dataset": name}

    # (a) flow from data
    t0 = time.perf_counter()
    flow = make_flow(cfg, seed)
    for _ in range(cfg["flow"]["fit_steps"]):
        flow.update(probe, enc(toy_2d(name, batch, gen)), generator=gen)
    x_data_flow = flow.sample(probe, n_mmd, generator=gen)
    out["flow_from_data_mmd"] = mmd_e4(x_data_flow, test[:n_mmd])
    # ED-Bern energy, then a data-free flow from it
    next_batch = lambda: enc(toy_2d(name, batch, gen))  # noqa: E731
    ed_energy = train_ed_bern(cfg, space, next_batch, cfg["energy"]["ed_iterations"], gen, seed)
    out["ed_bern_nll"] = nll(ed_energy, test, n_nll, gen)
    free = make_flow(cfg, seed)
    free.set_proposal(FactorizedProposal.fit(enc(toy_2d(name, 10_000, gen)).long(), 2))
    ess = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(cfg["flow"]["fit_steps"]):
            ess.append(free.update(ed_energy, generator=gen)["ess_fraction"])
    x_free = free.sample(ed_energy, n_mmd, generator=gen)
    out["flow_data_free_mmd"] = mmd_e4(x_free, test[:n_mmd])
    out["flow_data_free_ess_fraction_last100"] = float(torch.stack(ess[-100:]).mean())
    dmala = DiscreteLangevin(metropolis=True)
    x_ref = dmala.run(ed_energy, x_free, cfg["recipes"]["dmala_steps"], generator=gen)
    out["flow_data_free_plus_dmala_mmd"] = mmd_e4(x_ref, test[:n_mmd])
    log(f"{name} (a): {json.dumps({k: round(v, 3) for k, v in out.items() if k != 'dataset'})} "
        f"[{time.perf_counter() - t0:.0f}s]")
    samples = {"flow from data": x_data_flow, "data-free flow": x_free}

    # (b) recipes
    for recipe in RECIPES:
        t0 = time.perf_counter()
        energy, flow, stats = train_recipe(recipe, cfg, space, next_batch, gen, seed)
        metrics, x_flow = evaluate_recipe(energy, flow, test, cfg, gen)
        res = {**metrics, "seconds": time.perf_counter() - t0,
               **{k: float(v) for k, v in stats.items() if k in ("ess_fraction", "accept_rate")}}
        out[recipe] = res
        samples[recipe] = x_flow
        log(f"{name} (b) {recipe}: {json.dumps({k: round(v, 3) for k, v in res.items()})}")
    return out, {k: gray_decode(v, 16, bound) for k, v in samples.items()}


# ---------------------------------------------------------------------------------------------
# --recipes-table: the three recipes on the seven toys of the ED table, evaluated with
# examples/ed_discrete_toys.py's protocol (evaluate_repeats), one resumable run per cell.


def recipe_settings(recipe, cfg, ev):
    """What a stored recipe run depends on (all but the budgets): resumed only when equal."""
    return {"recipe": recipe, "flow": {k: v for k, v in cfg["flow"].items() if k != "fit_steps"},
            "energy": {k: v for k, v in cfg["energy"].items() if k != "ed_iterations"},
            "recipes": {k: v for k, v in cfg["recipes"].items() if k != "iterations"},
            "batch_size": cfg["data"]["batch_size"], "seed": cfg["eval"]["seed"], "eval": ev}


@torch.no_grad()
def flow_mmd_repeats(flow, energy, dataset, task, ev, gen, seed=123):
    """MMD x 1e-4 of the flow's own samples (no MCMC) to fresh test points, with the repeats
    and reference sets of ``ed_discrete_toys.evaluate_repeats``: (mean, std)."""
    from ebmflow.metrics import mmd as _mmd

    reps, n = ev.get("mmd_repeats", 1), ev["n_samples"]
    x = flow.sample(energy, reps * n, generator=gen)
    vals = []
    for r in range(reps):
        ref = task.encode(toy_2d(dataset, n, torch.Generator().manual_seed(seed + 1 + r)))
        vals.append(1e4 * float(_mmd(ref, x[r * n:(r + 1) * n], kernel="exp_hamming",
                                     hamming_scale=ev["hamming_scale"])))
    v = torch.tensor(vals, dtype=torch.float64)
    return float(v.mean()), float(v.std()) if reps > 1 else 0.0


def train_recipe_budgets(recipe, dataset, cfg, ev, budgets, state_dir, restart=False, log=print):
    """Train ``recipe`` (as ``train_recipe``) on ``dataset`` to ``max(budgets)`` EBM steps and
    evaluate the energy at every budget with ``ed_discrete_toys.evaluate_repeats`` (NLL with
    ``ev["n_importance"]`` uniform strings, MMD of Gibbs samples over ``ev["mmd_repeats"]``
    repeats), plus the MMD of the flow's own samples. Record and checkpoint in
    ``state_dir/<dataset>_<recipe>.{json,pt}``, rewritten at every budget; a later call with
    the same settings reads reached budgets back and continues from the checkpoint."""
    from ed_discrete_toys import evaluate_repeats, gray_task

    state_dir.mkdir(parents=True, exist_ok=True)
    rec_path, ckpt_path = state_dir / f"{dataset}_{recipe}.json", state_dir / f"{dataset}_{recipe}.pt"
    settings = json.loads(json.dumps(recipe_settings(recipe, cfg, ev)))
    seed = cfg["eval"]["seed"]
    gen = torch.Generator().manual_seed(seed)
    enc, _ = toy_encoder(dataset, seed)
    task = gray_task(dataset, cfg["data"]["bits"], seed)
    batch = cfg["data"]["batch_size"]
    torch.manual_seed(seed)
    energy = MLPEnergy(Binary(32), hidden=cfg["energy"]["hidden"])
    flow = make_flow(cfg, seed)
    flow.batch_size = batch
    sampler = make_recipe(recipe, flow, cfg["recipes"])
    loss = ContrastiveDivergence(alpha=cfg["recipes"]["alpha"])
    opt = torch.optim.Adam(energy.parameters(), lr=cfg["energy"]["lr"])
    record = {"dataset": dataset, "recipe": recipe, "settings": settings, "iteration": 0,
              "train_seconds": 0.0, "budgets": {}, "loss_trace": []}
    if not restart and rec_path.exists() and ckpt_path.exists():
        old = json.loads(rec_path.read_text())
        if old["settings"] != settings:
            raise RuntimeError(f"{rec_path} was trained with other settings; pass --restart")
        record = old
        if max(budgets) > record["iteration"]:
            ck = torch.load(ckpt_path, weights_only=False)
            energy.load_state_dict(ck["energy"])
            opt.load_state_dict(ck["optimizer"])
            flow.model.load_state_dict(ck["flow_model"])
            flow.optimizer.load_state_dict(ck["flow_optimizer"])
            for key, value in ck["flow_state"].items():
                setattr(flow, key, value)
            if ck.get("kept") is not None:  # BootstrapFlow: the last refined negatives
                sampler._kept = ck["kept"]
            gen.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            log(f"  {dataset:12s} {recipe:14s} resumed at iteration {record['iteration']}")
    done = record["iteration"]
    seconds = record["train_seconds"]
    for point in sorted(b for b in set(budgets) if b > done):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for it in range(done + 1, point + 1):
                stats = ebm_step(energy, loss, sampler, enc(toy_2d(dataset, batch, gen)), opt,
                                 gen)
                if it % 100 == 0:
                    record["loss_trace"].append(
                        [it, {k: float(v) for k, v in stats.items() if torch.as_tensor(v).numel() == 1}])
        seconds += time.perf_counter() - start
        done = point
        energy.requires_grad_(False)
        t0 = time.perf_counter()
        res = evaluate_repeats(energy, dataset, task, ev)
        res.pop("samples")
        fm, fs = flow_mmd_repeats(flow, energy, dataset, task, ev, gen)
        energy.requires_grad_(True)
        record["budgets"][str(point)] = {**res, "flow_mmd_1e4": fm, "flow_mmd_1e4_std": fs,
                                         "iteration": point, "train_seconds": seconds,
                                         "eval_seconds": time.perf_counter() - t0}
        log(f"  {dataset:12s} {recipe:14s} it {point:5d} NLL {res['nll']:7.3f}  MMD x1e-4 "
            f"{res['mmd_1e4']:6.2f} ± {res['mmd_1e4_std']:4.2f}  flow MMD {fm:6.2f} ± {fs:4.2f}"
            f"  ({point / seconds:5.1f} it/s)")
        record["iteration"], record["train_seconds"] = point, seconds
        ckpt = {"energy": energy.state_dict(), "optimizer": opt.state_dict(),
                "flow_model": flow.model.state_dict(),
                "flow_optimizer": flow.optimizer.state_dict(),
                "flow_state": {k: getattr(flow, k) for k in ("_free_updates", "_proposal")
                               if hasattr(flow, k)},
                "kept": getattr(sampler, "_kept", None), "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state()}
        try:
            torch.save(ckpt, ckpt_path)
        except Exception as err:  # the record is still written; only resuming is lost
            log(f"  {dataset:12s} {recipe:14s} no checkpoint ({err})")
            ckpt_path.unlink(missing_ok=True)
        tmp = rec_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(rec_path)
    return record


def recipes_table(cfg, ev, datasets, recipes, budgets, state_dir, restart=False, collect=False):
    """Every (data set, recipe) with ``train_recipe_budgets`` (``collect``: the stored records
    only); returns the results JSON's payload."""
    results = {"config": cfg, "eval": ev, "budgets": sorted(budgets), "runs": {}}
    for ds in datasets:
        for recipe in recipes:
            if collect:
                path = state_dir / f"{ds}_{recipe}.json"
                if not path.exists():
                    continue
                rec = json.loads(path.read_text())
            else:
                rec = train_recipe_budgets(recipe, ds, cfg, ev, budgets, state_dir, restart)
            results["runs"].setdefault(ds, {})[recipe] = rec
    return results


RECIPE_NAMES = {"negatives": "FlowNegatives", "bootstrap": "BootstrapFlow",
                "back_and_forth": "BackAndForth"}


def recipes_markdown(results):
    """The docs tables (data sets as columns, one row per recipe and budget): NLL, MMD x 1e-4
    of Gibbs samples of the energy (the ED table's MMD), MMD x 1e-4 of the flow's samples."""
    datasets = list(results["runs"])
    rows = {}  # (recipe, budget) -> {dataset: entry}
    for ds, runs in results["runs"].items():
        for recipe, rec in runs.items():
            for b, e in rec["budgets"].items():
                rows.setdefault((recipe, int(b)), {})[ds] = e
    order = sorted(rows, key=lambda k: (list(RECIPES).index(k[0]), k[1]))
    head = ["| recipe, iterations | " + " | ".join(datasets) + " |",
            "|---" * (len(datasets) + 1) + "|"]
    tables = []
    for title, fmt in (
            ("NLL (nats)", lambda e: f"{e['nll']:.3f}"),
            ("MMD x 1e-4, Gibbs samples of the energy",
             lambda e: f"{e['mmd_1e4']:.2f} ± {e['mmd_1e4_std']:.2f}"),
            ("MMD x 1e-4, the flow's own samples",
             lambda e: f"{e['flow_mmd_1e4']:.2f} ± {e['flow_mmd_1e4_std']:.2f}")):
        lines = [title, "", *head]
        for recipe, b in order:
            cells = [fmt(rows[recipe, b][ds]) if ds in rows[recipe, b] else "not run"
                     for ds in datasets]
            lines.append(f"| {RECIPE_NAMES[recipe]}, ours, {b:,} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


FONT = 13  # points; the figure is 8 in wide at 100 dpi, shown at about its pixel size
PANELS = {  # key in samples_2d -> (title, key of its metrics in the results)
    "flow from data": ("flow fitted to data", "flow_from_data_mmd"),
    "data-free flow": ("data-free flow (ED energy)", "flow_data_free_mmd"),
    "negatives": ("recipe 1: flow negatives", "negatives"),
    "bootstrap": ("recipe 2: bootstrap", "bootstrap"),
    "back_and_forth": ("recipe 3: back-and-forth", "back_and_forth"),
}


def _panel_title(key, res):
    title, metric = PANELS.get(key, (key, None))
    value = res.get(metric)
    if isinstance(value, dict):  # a recipe: its flow's MMD and its EBM's NLL
        return f"{title}\nMMD {value['flow_mmd']:.1f}, NLL {value['nll']:.2f}"
    return f"{title}\nMMD {value:.1f}" if value is not None else title


def plot(results, cfg, path):
    """Per data set: a 2-D histogram of quantised data, then of each flow's samples (decoded
    from the Gray code; the flow alone, before any DMALA refinement), each with a colour bar
    (per cent of the points per bin); three panels a row, 8 in wide. ``results`` is the JSON's
    list, each entry with ``samples_2d``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT,
                         "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1})
    ncol = 3
    rows = []  # (dataset, [(title, points)])
    for res in results:
        name = res["dataset"]
        enc, bound = toy_encoder(name, cfg["eval"]["seed"])
        data = gray_decode(enc(toy_2d(name, 4000, torch.Generator().manual_seed(5))), 16, bound)
        panels = [(f"{name}: data\n4,000 points", data)]
        for key, pts in res["samples_2d"].items():
            panels.append((_panel_title(key, res), torch.tensor(pts)))
        rows.append((name, panels))
    nrow = sum(math.ceil(len(panels) / ncol) for _, panels in rows)
    fig, axes = plt.subplots(nrow, ncol, figsize=(8.0, 3.0 * nrow + 0.8), squeeze=False)
    r = 0
    for _name, panels in rows:
        data = panels[0][1]
        lims = [[float(data[:, i].min()) - 0.5, float(data[:, i].max()) + 0.5] for i in (0, 1)]
        block = axes[r:r + math.ceil(len(panels) / ncol)].ravel()
        r += math.ceil(len(panels) / ncol)
        for ax, (title, pts) in zip(block, panels):
            w = torch.full((pts.shape[0],), 100.0 / pts.shape[0])
            *_, im = ax.hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=36, range=lims,
                               weights=w.numpy(), cmap="viridis")
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            cb.ax.tick_params(labelsize=FONT - 1)
        for ax in block[len(panels):]:
            ax.axis("off")
    n = sorted({len(p) for res in results for p in res["samples_2d"].values()})
    fig.suptitle(f"Flow samples, {'/'.join(f'{k:,}' for k in n)} each (colour: % per bin), after "
                 f"{cfg['flow']['fit_steps']} flow steps / {cfg['recipes']['iterations']} EBM "
                 "steps\nMMD x 1e-4 to test data; NLL (nats) of the recipe's EBM",
                 fontsize=FONT)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_json(payload):
    """``json.dumps(payload, indent=2)`` with each sample list of ``samples_2d`` on one line."""
    lists = []

    def stub(res):
        if "samples_2d" not in res:
            return res
        keys = {}
        for k, v in res["samples_2d"].items():
            keys[k] = f"@@samples{len(lists)}@@"
            lists.append(json.dumps(v, separators=(",", ":")))
        return {**res, "samples_2d": keys}

    text = json.dumps({**payload, "results": [stub(r) for r in payload["results"]]}, indent=2)
    return re.sub(r'"@@samples(\d+)@@"', lambda m: lists[int(m.group(1))], text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts, one dataset (< 1 min)")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw the figure from the results JSON, without training")
    ap.add_argument("--recipes-table", action="store_true",
                    help="the three recipes on the ED table's toys, evaluated with "
                         "ed_discrete_toys.py's protocol at each of --budgets (resumable)")
    ap.add_argument("--budgets", type=int, nargs="+", default=None)
    ap.add_argument("--recipes", nargs="+", default=None, choices=RECIPES)
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="per-run records and checkpoints (default runs/discrete_flow_recipes_toys)")
    ap.add_argument("--restart", action="store_true", help="train stored runs afresh")
    ap.add_argument("--collect", action="store_true",
                    help="gather the stored runs into the JSON without training")
    add_output_arguments(ap)
    args = ap.parse_args()
    suffix = "_quick" if args.quick else ""
    folder = output_dir(args)
    if args.recipes_table:
        return main_recipes_table(args, folder, suffix)
    out = folder / "results" / f"discrete_flow_toys{suffix}.json"
    fig = folder / "figures" / f"discrete_flow_toys{suffix}.png"
    if args.plot_only:
        payload = json.loads(out.read_text())
        if any("samples_2d" not in res for res in payload["results"]):
            raise SystemExit(f"{out} holds no samples (written by an older version of this "
                             "script): re-run the example to store them")
        plot(payload["results"], payload["config"], fig)
        report_written(fig)
        return
    torch.set_num_threads(1)
    cfg = load_example_settings(args.config)
    datasets = args.datasets or cfg["data"]["datasets"]
    if args.quick:
        datasets = datasets[:1]
        cfg["flow"].update(fit_steps=20, hidden=[64, 64], proposal_batch=128)
        cfg["energy"].update(ed_iterations=20, hidden=[64, 64])
        cfg["recipes"]["iterations"] = 10
        cfg["eval"].update(nll_samples=20_000, test_points=1000, mmd_samples=500)
    results = []
    start = time.perf_counter()
    for name in datasets:
        res, samples = run_dataset(name, cfg, args.quick, print)
        # each flow's samples decoded to 2-D (3 decimals), for the figure and --plot-only
        res["samples_2d"] = {k: [[round(c, 3) + 0.0 for c in xy] for xy in v.tolist()]
                             for k, v in samples.items()}
        results.append(res)
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(results_json({"config": cfg, "quick": args.quick, "results": results,
                                 "seconds": seconds}))
    plot(results, cfg, fig)
    report_written(out, fig)
    print(f"took {time.perf_counter() - start:.0f} s")


def main_recipes_table(args, folder, suffix):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ed_discrete_toys import CONFIG as ED_CONFIG

    torch.set_num_threads(1)
    cfg = load_example_settings(args.config)
    ev = dict(load_example_settings(ED_CONFIG)["eval"])  # the ED table's protocol, unchanged
    tab = cfg["table"]
    datasets = args.datasets or tab["datasets"]
    recipes = args.recipes or list(RECIPES)
    budgets = args.budgets or tab["budgets"]
    state_dir = args.state_dir or ROOT / "runs" / f"discrete_flow_recipes_toys{suffix}"
    if args.quick:
        datasets, budgets = datasets[:1], args.budgets or [20]
        cfg["flow"].update(hidden=[64, 64], proposal_batch=128)
        cfg["energy"].update(hidden=[64, 64])
        ev.update(n_importance=20_000, n_test=1000, n_samples=500, mmd_repeats=2,
                  gibbs_sweeps=2)
    start = time.perf_counter()
    results = recipes_table(cfg, ev, datasets, recipes, budgets, state_dir, args.restart,
                            args.collect)
    results["seconds"] = time.perf_counter() - start
    out = folder / "results" / f"discrete_flow_recipes_toys{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(recipes_markdown(results))
    report_written(out)


if __name__ == "__main__":
    main()
