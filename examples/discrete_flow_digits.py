"""Discrete flow samplers on binarized 8x8 digits (64 binary dims): where they fall short.

Issue 7 asks how the discrete flow samplers of the samplingEBMs report fare beyond the
32-bit toys, and how much MCMC refinement recovers. On scikit-learn's bundled digits
(pixel >= 8 -> 1, 1,438 train / 359 held-out images) this script

1. trains an energy by energy discrepancy (ED-Bern, eps 0.1, M 32, w 1; MLPEnergy);
2. trains ``DiscreteFlowSampler`` flows (a) from data and (b) data-free from that energy, with
   a uniform proposal and with ``FactorizedProposal.fit`` to the data marginals (ESS / B of the
   self-normalised importance weights is recorded during training);
3. reports MMD x 1e-4 (kernel exp(-0.1 Hamming)) of each flow's samples to the held-out
   images, and after n DMALA steps (``DiscreteLangevin(metropolis=True)``) on the energy, next
   to plain DMALA from uniform noise with the same n (and a long chain: what the energy
   itself gives), the factorised proposal alone, and the train images (the MMD floor).

Hyperparameters: the ``[example.*]`` tables of examples/configs/discrete_flow_digits.toml (its
``[train]`` table is the closest ``ebmflow train`` run; the CLI has no image data). Writes
runs/examples/results/discrete_flow_digits.json and
runs/examples/figures/discrete_flow_digits.png (``_quick`` suffix with --quick) and prints
where (``--update-docs``: docs/results and docs/figures; ``--out FOLDER``).

    python examples/discrete_flow_digits.py --quick     # < 1 minute on CPU
    python examples/discrete_flow_digits.py             # the documented run
    python examples/discrete_flow_digits.py --plot-only --update-docs   # redraw the figure

The JSON keeps the first 12 samples of every sampler (as 64-character bit strings) with their
MMD, so ``--plot-only`` redraws the figure from it without training.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from example_output import add_output_arguments, output_dir, report_written

from ebmflow.cli import load_example_settings
from ebmflow.data import digits
from ebmflow.discrete_flows import (
    CTMCSolver,
    DiscreteFlowSampler,
    FactorizedProposal,
    MixturePath,
    MLPVelocity,
)
from ebmflow.energy import MLPEnergy
from ebmflow.losses import BernoulliPerturbation, EnergyDiscrepancy
from ebmflow.metrics import mmd
from ebmflow.samplers import DiscreteLangevin
from ebmflow.spaces import Binary

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "discrete_flow_digits.toml"
DIM = 64


def mmd_e4(x: torch.Tensor, y: torch.Tensor) -> float:
    """1e4 * unbiased MMD^2 with k(a, b) = exp(-0.1 * Hamming(a, b))."""
    return 1e4 * float(mmd(x, y, kernel="exp_hamming", hamming_scale=0.1))


def batches(x: torch.Tensor, size: int, gen: torch.Generator):
    """Endless minibatches of the rows of ``x`` (fresh permutation every epoch)."""
    while True:
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0] - size + 1, size):
            yield x[perm[i:i + size]]


def train_energy(cfg: dict, train: torch.Tensor, gen: torch.Generator, seed: int) -> MLPEnergy:
    """ED-Bern: EnergyDiscrepancy(BernoulliPerturbation(eps), m, w) with Adam."""
    e = cfg["energy"]
    torch.manual_seed(seed)
    energy = MLPEnergy(Binary(DIM), hidden=e["hidden"])
    opt = torch.optim.Adam(energy.parameters(), lr=e["lr"])
    ed = EnergyDiscrepancy(BernoulliPerturbation(e["eps"]), m=e["m"], w=e["w"])
    data = batches(train, cfg["data"]["batch_size"], gen)
    for _ in range(e["iterations"]):
        opt.zero_grad()
        ed(energy, next(data), generator=gen).loss.backward()
        opt.step()
    energy.requires_grad_(False)
    return energy


def make_flow(cfg: dict, seed: int, proposal=None) -> DiscreteFlowSampler:
    f = cfg["flow"]
    torch.manual_seed(seed)
    path = MixturePath(2, "mask")
    model = MLPVelocity(DIM, 2, hidden=f["hidden"], schedule=path.schedule)
    return DiscreteFlowSampler(model, path, CTMCSolver(path, dt=f["step_size"]), proposal=proposal,
                               lr=f["lr"], batch_size=f["proposal_batch"], fit_to="data")


def fit_flow(flow, energy, cfg, data_iter, gen) -> list[float]:
    """``fit_steps`` updates, from data (``data_iter``) or data-free (None); ESS / B per update."""
    ess = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LowESSWarning is expected here; ESS is recorded
        for _ in range(cfg["flow"]["fit_steps"]):
            stats = flow.update(energy, None if data_iter is None else next(data_iter), generator=gen)
            if "ess_fraction" in stats:
                ess.append(stats["ess_fraction"])
    return [float(v) for v in torch.stack(ess)] if ess else []


def refine(energy, x0, steps: list[int], gen) -> dict[int, tuple[torch.Tensor, float]]:
    """DMALA chains from ``x0``; the states after each n in ``steps`` and the mean acceptance."""
    out, x, done = {}, x0, 0
    for n in sorted(steps):
        sampler = DiscreteLangevin(step_size=0.1, metropolis=True)
        x = sampler.run(energy, x, n - done, generator=gen)
        done = n
        out[n] = (x, float(sampler.stats.get("accept_rate", torch.tensor(float("nan")))))
    return out


def run(cfg: dict, log) -> tuple[dict, dict]:
    seed = cfg["eval"]["seed"]
    gen = torch.Generator().manual_seed(seed)
    train, _ = digits(binarize=True, split="train")
    test, _ = digits(binarize=True, split="test")
    n = cfg["eval"]["samples"]
    steps = list(cfg["eval"]["refine_steps"])
    res: dict = {"n_train": train.shape[0], "n_test": test.shape[0], "mmd_samples": n,
                 "train_vs_test_mmd": mmd_e4(train, test)}
    t0 = time.perf_counter()
    energy = train_energy(cfg, train, gen, seed)
    res["energy_seconds"] = time.perf_counter() - t0
    with torch.no_grad():
        res["energy_mean"] = {"train": float(energy(train).mean()), "test": float(energy(test).mean()),
                              "uniform": float(energy(Binary(DIM).noise(2000, gen)).mean())}
    log(f"energy: {res['energy_seconds']:.0f}s, mean E {res['energy_mean']}")

    fitted = FactorizedProposal.fit(train.long(), 2)
    x_prop = fitted.sample(n, gen).float()
    res["factorized_proposal_mmd"] = mmd_e4(x_prop, test)
    samples = {"held-out data": test[:n], "factorised q": x_prop}
    flows = {"from data": None, "data-free, uniform q": FactorizedProposal.uniform(DIM, 2),
             "data-free, fitted q": fitted}
    res["flows"] = {}
    for name, proposal in flows.items():
        t0 = time.perf_counter()
        flow = make_flow(cfg, seed, proposal)
        data_iter = batches(train, cfg["data"]["batch_size"], gen) if proposal is None else None
        ess = fit_flow(flow, energy, cfg, data_iter, gen)
        with torch.no_grad():
            x = flow.sample(energy, n, generator=gen)
        r: dict = {"mmd": mmd_e4(x, test), "seconds": time.perf_counter() - t0}
        if ess:
            r["ess_fraction_first10"] = sum(ess[:10]) / len(ess[:10])
            r["ess_fraction_last100"] = sum(ess[-100:]) / len(ess[-100:])
            r["ess_fraction_min"] = min(ess)
        for k, (xr, acc) in refine(energy, x, steps, gen).items():
            r[f"dmala{k}_mmd"], r[f"dmala{k}_accept"] = mmd_e4(xr, test), acc
            if k == max(steps):
                samples[f"{name} + {k} DMALA"] = xr
        with torch.no_grad():
            r["energy_mean"] = float(energy(x).mean())
        res["flows"][name] = r
        samples[name] = x
        log(f"flow {name}: {json.dumps({k: round(v, 3) for k, v in r.items()})}")

    noise = Binary(DIM).noise(n, gen)
    long_steps = cfg["eval"]["long_chain_steps"]
    chain = refine(energy, noise, [*steps, long_steps], gen)
    res["dmala_from_noise"] = {f"dmala{k}_mmd": mmd_e4(x, test) for k, (x, _) in chain.items()}
    res["dmala_from_noise"].update({f"dmala{k}_accept": a for k, (_, a) in chain.items()})
    with torch.no_grad():
        res["dmala_from_noise"].update(
            {f"dmala{k}_energy_mean": float(energy(x).mean()) for k, (x, _) in chain.items()})
    samples[f"noise + {max(steps)} DMALA"] = chain[max(steps)][0]
    samples[f"noise + {long_steps} DMALA"] = chain[long_steps][0]
    log(f"DMALA from noise: {json.dumps({k: round(v, 3) for k, v in res['dmala_from_noise'].items()})}")
    return res, samples


FONT = 13  # points; the figure is 8 in wide at 100 dpi, shown at about its pixel size
N_SHOWN = 12  # samples of each sampler kept in the JSON (as 64-character bit strings) and drawn


def figure_samples(res: dict, samples: dict, n: int = N_SHOWN) -> dict:
    """The first ``n`` samples of each sampler as '0'/'1' strings (row-major 8 x 8), with the
    sampler's MMD x 1e-4 to the held-out images from ``res`` (None for the held-out images)."""
    steps = sorted(int(k[5:-4]) for k in res["dmala_from_noise"] if k.endswith("_mmd"))

    def score(name: str) -> float | None:
        if name == "held-out data":
            return None
        if name == "factorised q":
            return res["factorized_proposal_mmd"]
        base, _, extra = name.partition(" + ")
        k = extra.split()[0] if extra else None
        if base == "noise":
            return res["dmala_from_noise"][f"dmala{k}_mmd"]
        row = res["flows"][base]
        return row[f"dmala{k}_mmd"] if k else row["mmd"]

    assert steps, "no DMALA results"
    return {name: {"images": ["".join(str(int(v)) for v in x.flatten().tolist())
                              for x in samples[name][:n].round().long()],
                   "mmd": score(name)} for name in samples}


def _order(names) -> list[str]:
    order = ["held-out data", "from data", "data-free, uniform q", "data-free, fitted q",
             *[k for k in names if "+" in k and not k.startswith("noise")],
             *[k for k in names if k.startswith("noise")], "factorised q"]
    return [k for k in order if k in names]


def _title(name: str) -> str:
    if name == "held-out data":
        return "held-out images"
    if name == "factorised q":
        return "factorised q fitted to pixel marginals"
    base, _, extra = name.partition(" + ")
    base = {"from data": "flow trained on data", "noise": "uniform noise",
            "data-free, uniform q": "data-free flow, uniform q",
            "data-free, fitted q": "data-free flow, fitted q"}.get(base, base)
    return f"{base} + {extra}" if extra else base


def plot(payload: dict, path: Path, rows: int = 2, cols: int = 6) -> None:
    """Each sampler's first ``rows * cols`` samples as one tiled panel (two panels a row,
    8 in wide, a colour bar saying what black means) titled with the sampler's MMD, then a bar
    chart of every sampler's MMD against the held-out images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT,
                         "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1})
    shown, res, cfg = payload["samples"], payload["results"], payload["config"]
    names = _order(list(shown))
    ncol = 2
    nrow = -(-len(names) // ncol)
    fig = plt.figure(figsize=(8.0, 2.1 * nrow + 4.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.1 * nrow + 0.8, 3.8])
    grid = top.add_gridspec(nrow, ncol)
    cmap = ListedColormap(["white", "black"])
    cmap.set_bad("#b0b0b0")  # grey gaps between the images
    n_tiles = rows * cols
    for i, name in enumerate(names):
        ax = top.add_subplot(grid[i // ncol, i % ncol])
        tile = np.full((rows * 9 - 1, cols * 9 - 1), np.nan)
        for j, bits in enumerate(shown[name]["images"][:n_tiles]):
            r, c = divmod(j, cols)
            tile[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = np.array([int(b) for b in bits],
                                                              dtype=float).reshape(8, 8)
        im = ax.imshow(tile, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        mmd_value = shown[name]["mmd"]
        ax.set_title(_title(name).replace("\n", " ")
                     + ("\n(what the MMD compares to)" if mmd_value is None else f"\nMMD {mmd_value:.1f}"))
        ax.set_xticks([])
        ax.set_yticks([])
        cb = top.colorbar(im, ax=ax, fraction=0.05, pad=0.02, ticks=[0.25, 0.75], aspect=10)
        cb.ax.set_yticklabels(["0", "1"])
        cb.set_label("pixel", fontsize=FONT - 1)
        cb.ax.tick_params(labelsize=FONT - 1, length=0)
    ax = bottom.add_subplot()
    scored = [n for n in names if shown[n]["mmd"] is not None]
    ax.barh(range(len(scored)), [shown[n]["mmd"] for n in scored],
            color=["C1" if "+" in n else "C0" for n in scored])
    ax.set_yticks(range(len(scored)), [_title(n) for n in scored],
                  fontsize=FONT - 1)
    ax.invert_yaxis()
    ax.set_xscale("log")
    floor = res["train_vs_test_mmd"]
    ax.axvline(floor, color="k", ls="--", lw=1.5)
    ax.set_xlabel(f"MMD x 1e-4 to held-out images (log scale)\ndashed: train images ({floor:.1f})")
    ax.set_title("MMD, lower is better (orange: after DMALA)")
    e = cfg["energy"]
    top.suptitle(f"Binarized 8x8 digits: {min(n_tiles, N_SHOWN)} of {res['mmd_samples']:,} "
                 "samples per sampler (black: pixel 1)\n"
                 f"energy: ED-Bern, {e['iterations']:,} steps; MMD x 1e-4, kernel "
                 "exp(-0.1 Hamming)", fontsize=FONT)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts (< 1 min)")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw the figure from the results JSON, without training")
    add_output_arguments(ap)
    args = ap.parse_args()
    suffix = "_quick" if args.quick else ""
    folder = output_dir(args)
    out = folder / "results" / f"discrete_flow_digits{suffix}.json"
    fig = folder / "figures" / f"discrete_flow_digits{suffix}.png"
    if args.plot_only:
        payload = json.loads(out.read_text())
        if "samples" not in payload:
            raise SystemExit(f"{out} holds no samples (written before they were stored); "
                             "re-run without --plot-only")
        plot(payload, fig)
        report_written(fig)
        return
    torch.set_num_threads(1)
    cfg = load_example_settings(args.config)
    if args.quick:
        cfg["energy"].update(iterations=30, hidden=[64, 64])
        cfg["flow"].update(fit_steps=20, hidden=[64, 64], proposal_batch=128)
        cfg["eval"].update(samples=300, long_chain_steps=60)
    start = time.perf_counter()
    res, samples = run(cfg, print)
    payload = {"config": cfg, "quick": args.quick, "results": res,
               "seconds": time.perf_counter() - start,
               "samples": figure_samples(res, samples)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    plot(payload, fig)
    report_written(out, fig)
    print(f"took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
