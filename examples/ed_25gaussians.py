"""25-Gaussians density estimation: energy discrepancy vs contrastive divergence vs denoising
score matching (Schroeder et al. 2023, Sec. 6).

An ``MLPEnergy`` is trained on fresh batches of ``toy_2d("25gaussians")`` with Adam and an EMA
of the weights. Every ``eval_every`` iterations the EMA model is scored by the mean squared
error of its normalised log-density against the exact one,

    MSE = mean_{x ~ p} (-E(x) - log Z_hat - log p(x))^2,
    log Z_hat = log mean_{x_i ~ p} exp(-E(x_i) - log p(x_i))   (importance sampling, p proposal).

Methods (hyperparameters in the ``[example.*]`` tables of examples/configs/ed_25gaussians.toml):

* ED: ``EnergyDiscrepancy(GaussianPerturbation(t=1), m=4, w=1)`` (no sampler);
* CD: ``ContrastiveDivergence(alpha, init="data")`` with a ``Langevin`` sampler (10 ULA steps
  started at the data batch), L = mean E(x+) - mean E(x-) + alpha (mean E(x+)^2 + mean E(x-)^2);
* DSM: ``DenoisingScoreMatching(sigma)``.

Training iterations per second are measured on this machine (one CPU thread, evaluation time
excluded).

    python examples/ed_25gaussians.py --quick     # 300 iterations each (< 1 min)
    python examples/ed_25gaussians.py             # the config's iterations

Writes runs/examples/figures/ed_25gaussians.png and runs/examples/results/ed_25gaussians.json
(``--update-docs``: docs/figures and docs/results) and prints where. The JSON holds the error
curves and the density grids the figure shows (true density and each method's ``exp(-E)``,
120 x 120 over [-4, 4]^2), so ``examples/replot_docs_figures.py`` can redraw it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from example_output import add_output_arguments, output_dir, report_written
from replot_docs_figures import _density, draw_ed_25gaussians, mode_weight_tv

from ebmflow.cli import load_example_settings
from ebmflow.data import TOY_MIXTURES, toy_2d
from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy
from ebmflow.losses import (
    ContrastiveDivergence,
    DenoisingScoreMatching,
    EnergyDiscrepancy,
    GaussianPerturbation,
)
from ebmflow.samplers import Langevin
from ebmflow.spaces import Continuous

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "ed_25gaussians.toml"
METHODS = ("ed", "cd", "dsm")


def exact_target(name: str) -> GaussianMixtureEnergy:
    means, scale, weights = TOY_MIXTURES[name]
    return GaussianMixtureEnergy(torch.tensor(means), scale, torch.tensor(weights))


@torch.no_grad()
def log_density_mse(energy, target: GaussianMixtureEnergy, n_is: int, n_test: int,
                    seed: int = 1234) -> tuple[float, float]:
    """(MSE of the normalised log-density, log Z_hat); proposal and test points from p."""
    gen = torch.Generator().manual_seed(seed)
    xs = target.sample(n_is, gen)
    log_z = torch.logsumexp(-energy(xs) - target.log_prob(xs), 0) - math.log(n_is)
    xt = target.sample(n_test, gen)
    err = -energy(xt) - log_z - target.log_prob(xt)
    return float(err.pow(2).mean()), float(log_z)


def make_loss(method: str, cfg: dict):
    """(loss, sampler) for a method name; the sampler is None for ED and DSM."""
    if method == "ed":
        c = cfg["ed"]
        return EnergyDiscrepancy(GaussianPerturbation(c["t"]), m=c["m"], w=c["w"]), None
    if method == "dsm":
        return DenoisingScoreMatching(cfg["dsm"]["sigma"]), None
    if method == "cd":
        c = cfg["cd"]
        return (ContrastiveDivergence(alpha=c["alpha"], init="data"),
                Langevin(step_size=c["step_size"], n_steps=c["langevin_steps"]))
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def ema_update(avg: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pa, pm in zip(avg.parameters(), model.parameters()):
            pa.lerp_(pm, 1 - decay)


def train(method: str, cfg: dict, iterations: int, log=print) -> dict:
    tr, data_cfg, ev = cfg["train"], cfg["data"], cfg["eval"]
    torch.manual_seed(tr["seed"])
    energy = MLPEnergy(Continuous(2), hidden=cfg["model"]["hidden"])
    avg = copy.deepcopy(energy).requires_grad_(False)
    opt = torch.optim.Adam(energy.parameters(), lr=tr["lr"])
    loss_fn, sampler = make_loss(method, cfg)
    target = exact_target(data_cfg["name"])
    gen = torch.Generator().manual_seed(tr["seed"] + 1)
    history: list[dict] = []
    train_time = 0.0
    for it in range(1, iterations + 1):
        start = time.perf_counter()
        x = toy_2d(data_cfg["name"], data_cfg["batch_size"], gen)
        if sampler is None:
            loss = loss_fn(energy, x, generator=gen).loss
        else:
            loss = loss_fn(energy, x, sampler, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(avg, energy, tr["ema"])
        train_time += time.perf_counter() - start
        if it % tr["eval_every"] == 0 or it == iterations:
            mse, log_z = log_density_mse(avg, target, ev["n_importance"], ev["n_test"])
            history.append({"iteration": it, "mse": mse, "log_z": log_z,
                            "loss": float(loss.detach())})
            log(f"{method:4s} it {it:6d}  mse {mse:9.4f}  loss {float(loss.detach()):9.4f}"
                f"  ({it / train_time:6.1f} it/s)")
    return {"history": history, "final_mse": history[-1]["mse"],
            "best_mse": min(h["mse"] for h in history),
            "iterations": iterations, "train_seconds": train_time,
            "iterations_per_second": iterations / train_time, "model": avg}


@torch.no_grad()
def density_grids(results: dict, target: GaussianMixtureEnergy, box: float = 4.0,
                  n: int = 120) -> dict:
    """The true density and each method's ``exp(-E)`` on an (n, n) grid over [-box, box]^2,
    each divided by its maximum, flattened x major (rounded to 4 decimals for the JSON)."""
    g = torch.linspace(-box, box, n)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], -1)

    def scaled(logp: torch.Tensor) -> list[float]:
        return [round(float(v), 4) for v in (logp - logp.max()).exp()]

    dens = {"truth": scaled(target.log_prob(pts))}
    for m, r in results["methods"].items():
        dens[m] = scaled(-r["model"](pts))
    return dens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 iterations per method")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    out = output_dir(args)
    torch.set_num_threads(1)
    cfg = load_example_settings(args.config)
    iterations = args.iterations or (300 if args.quick else cfg["train"]["iterations"])
    if args.quick:
        cfg["train"]["eval_every"] = 100
        cfg["train"]["ema"] = 0.9
        cfg["eval"]["n_importance"] = cfg["eval"]["n_test"] = 2000
    results: dict = {"config": cfg, "quick": args.quick, "methods": {}}
    for m in args.methods.split(","):
        results["methods"][m] = train(m, cfg, iterations)
    name = "ed_25gaussians" + ("_quick" if args.quick else "")
    figure = out / "figures" / f"{name}.png"
    target = exact_target(cfg["data"]["name"])
    box = 4.0
    densities = density_grids(results, target, box)
    for r in results["methods"].values():
        r.pop("model")
    means, scale, weights = TOY_MIXTURES[cfg["data"]["name"]]
    results["target"] = {"means": [list(map(float, mu)) for mu in means],
                         "scale": float(scale), "weights": list(map(float, weights))}
    results["grid"] = {"box": box, "n": math.isqrt(len(densities["truth"])),
                       "layout": "flattened x major, each divided by its maximum"}
    for m, r in results["methods"].items():
        r["mode_weight_tv"] = mode_weight_tv(_density(densities[m]), box, means, weights)
    # the grids on one line each, the rest readable
    text = json.dumps(results, indent=1)[:-2] + ',\n "densities": {\n' + ",\n".join(
        f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
        for k, v in densities.items()) + "\n }\n}"
    results["densities"] = densities
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{name}.json").write_text(text)
    draw_ed_25gaussians(results, figure)
    print(f"\n{'method':6s} {'final MSE':>10s} {'best MSE':>10s} {'mode TV':>8s} {'it/s':>8s}")
    for m, r in results["methods"].items():
        print(f"{m:6s} {r['final_mse']:10.4f} {r['best_mse']:10.4f} "
              f"{r['mode_weight_tv']:8.3f} {r['iterations_per_second']:8.1f}")
    report_written(out / "results" / f"{name}.json", figure)
    return results


if __name__ == "__main__":
    main()
