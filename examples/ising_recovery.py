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
docs/results) and prints where.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from example_output import add_output_arguments, output_dir, report_written

from ebmflow.cli import load_example_settings
from ebmflow.energy import IsingEnergy, lattice_adjacency
from ebmflow.losses import ContrastiveDivergence
from ebmflow.samplers import Gibbs, GibbsWithGradients, PersistentSampler, ReplayBuffer
from ebmflow.samplers._lattice import lattice_exact_sample

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "ising_recovery.toml"
PUBLISHED = {0.1: 4.8, 0.2: 4.7, 0.3: 3.4}


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


def train(data: torch.Tensor, truth: IsingEnergy, cfg: dict, log_every: int = 50) -> dict:
    """PCD with GWG from J = 0; returns the score, its curve and the sampler statistics.

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
    buffer = ReplayBuffer(model.space, capacity=cfg.get("n_chains", batch), reinit_prob=0.0)
    sampler = PersistentSampler(GibbsWithGradients(), buffer, n_steps=cfg["gwg_steps"])
    loss_fn = ContrastiveDivergence()
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
        "accept_rate": float(accept),
        "flips_per_step": float(flips),
        "seconds": seconds,
        "updates_per_s": iters / seconds,
        "coupling": j,
    }


def plot(results: dict, side: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = list(results)
    fig, axes = plt.subplots(1, len(sigmas) + 1, figsize=(4 * (len(sigmas) + 1), 3.6))
    for sigma in sigmas:
        it, score = zip(*results[sigma]["curve"])
        axes[0].plot(it, score, label=f"sigma={sigma}")
        axes[0].axhline(PUBLISHED.get(sigma, float("nan")), ls=":", c="gray")
    axes[0].set(xlabel="update", ylabel="-log RMSE(J)", title="PCD + GWG (dotted: published)")
    axes[0].legend()
    for ax, sigma in zip(axes[1:], sigmas):
        j = results[sigma]["coupling"][: 2 * side, : 2 * side]
        im = ax.imshow(j, cmap="RdBu_r", vmin=-sigma, vmax=sigma)
        ax.set_title(f"learned J[:20, :20], sigma={sigma}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.quick)
    if args.iterations:
        cfg["train"]["iterations"] = args.iterations
    if args.source:
        cfg["data"]["source"] = args.source
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in cfg or not name or not value:
            raise ValueError(f"--set expects SECTION.KEY=VALUE with SECTION in {list(cfg)}, "
                             f"got {item!r}")
        cfg[section][name] = _parse_value(value)
    side = cfg["lattice"]["side"]
    sigmas = args.sigmas or cfg["lattice"]["sigmas"]
    results = {}
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for sigma in sigmas:
        truth = IsingEnergy.lattice(side, sigma)
        gen = torch.Generator().manual_seed(cfg["data"]["seed"])
        t0 = time.perf_counter()
        data = make_data(truth, side, cfg["data"], gen)
        data_s = time.perf_counter() - t0
        exact = data if cfg["data"]["source"] == "exact" else lattice_exact_sample(
            truth, cfg["data"]["n"], side, generator=gen)
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
                str(s): {k: v for k, v in r.items() if k != "coupling"} for s, r in results.items()
            },
        }
        name = "ising_recovery_quick" if args.quick else "ising_recovery"
        folder = output_dir(args)
        (folder / "results").mkdir(parents=True, exist_ok=True)
        (folder / "results" / f"{name}.json").write_text(json.dumps(out, indent=2))
        plot(results, side, folder / "figures" / f"{name}.png")
        report_written(folder / "results" / f"{name}.json", folder / "figures" / f"{name}.png")
    return results


if __name__ == "__main__":
    main()
