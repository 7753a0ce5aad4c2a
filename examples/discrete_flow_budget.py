"""NLL against training budget on 32-bit Gray-coded 8gaussians (samplingEBMs report, issue #7).

examples/discrete_flow_toys.py trains each recipe for 400 EBM steps and ends 0.8-1.1 nats behind
the published PCD / ED-Bern NLLs, which come from ~100x longer runs. This script asks whether
the gap is only the budget: ONE run per method on 8gaussians (Gray code, 32 bits), evaluated at
checkpoints along training (e.g. after 400, 1200, 2400, ... EBM steps):

* the three recipes (``FlowNegatives``, ``BootstrapFlow``, ``BackAndForth``, each with
  ``ContrastiveDivergence(alpha=0.1)``) and ED-Bern (eps 0.1, M 32, w 1), same energy MLP,
  same optimiser as discrete_flow_toys.py (its ``train_recipe`` / ``train_ed_bern`` /
  ``evaluate_recipe`` are imported, not copied);
* at each checkpoint: NLL in nats (log Z by importance sampling over uniform bit strings), and
  for the recipes the MMD x 1e-4 (kernel exp(-0.1 Hamming)) of the flow's samples to held-out
  data, before and after 10 DMALA steps on the energy;
* one cheap extra the short runs skip: an exponential moving average of the energy's weights,
  theta_ema <- d theta_ema + (1 - d) theta with d = min(ema, (1 + t) / (10 + t)) at step t,
  used for evaluation only (``nll_ema``; training is unchanged).

Checkpoint evaluations draw from their own generator, so they do not perturb training: the
numbers at a checkpoint are those of a run stopped there. Hyperparameters: the ``[example.*]``
tables of examples/configs/discrete_flow_budget.toml. Writes
runs/examples/results/discrete_flow_budget.json and
runs/examples/figures/discrete_flow_budget.png (``_quick`` suffix with --quick) and prints
where (``--update-docs``: docs/results and docs/figures; ``--out FOLDER``).

    python examples/discrete_flow_budget.py --quick     # < 1 minute on CPU
    python examples/discrete_flow_budget.py             # the documented run (~20 min, 1 thread)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from discrete_flow_toys import (
    RECIPES,
    evaluate_recipe,
    nll,
    toy_encoder,
    train_ed_bern,
    train_recipe,
)
from example_output import add_output_arguments, output_dir, report_written

from ebmflow.cli import load_example_settings
from ebmflow.data import toy_2d
from ebmflow.spaces import Binary

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "discrete_flow_budget.toml"
METHODS = (*RECIPES, "ed_bern")
LABELS = {"negatives": "1 flow negatives", "bootstrap": "2 bootstrap (10 DMALA)",
          "back_and_forth": "3 back-and-forth", "ed_bern": "ED-Bern"}
# 8gaussians, 32-bit Gray code: published NLLs of the discrete energy-discrepancy paper
# (Schroeder et al.), from runs ~100x longer than ours.
PUBLISHED_NLL = {"PCD": 19.991, "ED-Bern": 19.992}
UNIFORM_NLL = 32 * math.log(2)


class EnergyEMA:
    """Evaluation-only moving average of an energy's parameters.

    After each training step t (from 1): theta_ema <- d theta_ema + (1 - d) theta with
    d = min(decay, (1 + t) / (10 + t)), so early steps are not dominated by the initial weights.
    ``model`` is a frozen copy of the energy holding theta_ema.
    """

    def __init__(self, energy: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(energy).requires_grad_(False)
        self.decay = decay
        self.t = 0

    @torch.no_grad()
    def update(self, energy: torch.nn.Module) -> None:
        self.t += 1
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        for p_ema, p in zip(self.model.parameters(), energy.parameters(), strict=True):
            p_ema.lerp_(p, 1 - d)


def run_method(method, cfg, space, enc, test, checkpoints, log):
    """Train ``method`` once for max(checkpoints) EBM steps; returns one row per checkpoint."""
    seed = cfg["eval"]["seed"]
    train_gen = torch.Generator().manual_seed(seed)
    eval_gen = torch.Generator().manual_seed(seed + 1)
    batch, name, n_nll = cfg["data"]["batch_size"], cfg["data"]["dataset"], cfg["eval"]["nll_samples"]
    next_batch = lambda: enc(toy_2d(name, batch, train_gen))  # noqa: E731
    rows: list[dict] = []
    ema: list[EnergyEMA] = []
    clock = {"start": time.perf_counter(), "eval": 0.0}

    def record(step, energy, flow=None, stats=None):
        if not ema:
            ema.append(EnergyEMA(energy, cfg["energy"]["ema"]))  # copy of the step-1 weights
        else:
            ema[0].update(energy)
        if step not in checkpoints:
            return
        t0 = time.perf_counter()
        if flow is None:
            row = {"nll": nll(energy, test, n_nll, eval_gen)}
        else:
            row, _ = evaluate_recipe(energy, flow, test, cfg, eval_gen)
        row["nll_ema"] = nll(ema[0].model, test, n_nll, eval_gen)
        if step == checkpoints[-1]:  # the log Z estimator's own spread: a second, independent draw
            row["nll_repeat"] = nll(energy, test, n_nll, eval_gen)
        row.update({k: float(v) for k, v in (stats or {}).items()
                    if k in ("ess_fraction", "accept_rate", "loss")})
        clock["eval"] += time.perf_counter() - t0
        row = {"step": step, **row,
               "train_seconds": time.perf_counter() - clock["start"] - clock["eval"]}
        rows.append(row)
        log(f"{method} {json.dumps({k: round(v, 3) for k, v in row.items()})}")

    if method == "ed_bern":
        train_ed_bern(cfg, space, next_batch, checkpoints[-1], train_gen, seed, callback=record)
    else:
        cfg = {**cfg, "recipes": {**cfg["recipes"], "iterations": checkpoints[-1]}}
        train_recipe(method, cfg, space, next_batch, train_gen, seed, callback=record)
    return rows


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_nll, ax_mmd) = plt.subplots(1, 2, figsize=(10, 5.6))
    for i, (method, rows) in enumerate(results.items()):
        steps = [r["step"] for r in rows]
        color = f"C{i}"
        ax_nll.plot(steps, [r["nll"] for r in rows], "o-", color=color, label=LABELS[method])
        ax_nll.plot(steps, [r["nll_ema"] for r in rows], "x--", color=color, alpha=0.6,
                    label=f"{LABELS[method]}, EMA weights")
        if "flow_mmd" in rows[0]:
            ax_mmd.plot(steps, [r["flow_mmd"] for r in rows], "o-", color=color, label=LABELS[method])
            ax_mmd.plot(steps, [r["flow_plus_dmala_mmd"] for r in rows], "x--", color=color,
                        alpha=0.6, label=f"{LABELS[method]} + 10 DMALA")
    for j, (name, value) in enumerate(PUBLISHED_NLL.items()):
        ax_nll.axhline(value, color="k", ls=":", lw=1.2 + j,
                       alpha=0.8 - 0.4 * j, label=f"published {name} ({value:.2f})")
    ax_nll.set(ylabel="test NLL (nats)", title="8gaussians, 32-bit Gray code")
    ax_mmd.set(yscale="log", ylabel="flow MMD x 1e-4", title="flow samples vs held-out data")
    steps = [r["step"] for r in next(iter(results.values()))]
    for ax in (ax_nll, ax_mmd):
        ax.set(xscale="log", xlabel="EBM steps (one run per method, evaluated at checkpoints)")
        ax.set_xticks(steps, [str(s) for s in steps], minor=False)
        ax.set_xticks([], minor=True)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts (< 1 min)")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--methods", nargs="*", default=None, choices=METHODS)
    ap.add_argument("--checkpoints", nargs="*", type=int, default=None,
                    help="EBM steps at which to evaluate (overrides the config)")
    add_output_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_example_settings(args.config)
    if args.quick:
        cfg["budget"]["checkpoints"] = [5, 10]
        cfg["flow"].update(hidden=[64, 64], proposal_batch=128)
        cfg["energy"].update(hidden=[64, 64])
        cfg["eval"].update(nll_samples=20_000, test_points=1000, mmd_samples=500)
    checkpoints = sorted(set(args.checkpoints or cfg["budget"]["checkpoints"]))
    if not checkpoints or checkpoints[0] < 1:
        raise SystemExit(f"checkpoints must be positive step counts, got {checkpoints}")
    methods = args.methods or cfg["budget"]["methods"]
    seed = cfg["eval"]["seed"]
    enc, _ = toy_encoder(cfg["data"]["dataset"], seed)
    test = enc(toy_2d(cfg["data"]["dataset"], cfg["eval"]["test_points"],
                      torch.Generator().manual_seed(seed + 2)))
    suffix = "_quick" if args.quick else ""
    folder = output_dir(args)
    out = folder / "results" / f"discrete_flow_budget{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict = {}
    for method in methods:  # the JSON is rewritten after each method (a long run keeps its part)
        results[method] = run_method(method, cfg, Binary(32), enc, test, checkpoints,
                                     lambda line: print(line, flush=True))
        out.write_text(json.dumps({"config": cfg, "quick": args.quick, "checkpoints": checkpoints,
                                   "published_nll": PUBLISHED_NLL, "uniform_nll": UNIFORM_NLL,
                                   "results": results, "seconds": time.perf_counter() - start},
                                  indent=2))
    fig = folder / "figures" / f"discrete_flow_budget{suffix}.png"
    fig.parent.mkdir(parents=True, exist_ok=True)
    plot(results, fig)
    report_written(out, fig)
    print(f"took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
