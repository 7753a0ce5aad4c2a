"""ebmflow's FlowMC against the reference flowMC (JAX, 0.6.x) on fixed targets.

Targets: two Gaussian modes at -4 e_1 and +4 e_1 (unit scale) with weights 2:1, in D = 2
(the 2:1 example) and D = 16 (a high-dimensional mixture). All chains start in the heavy
mode, so only global (flow) moves can give the light mode its third of the mass.

Both samplers run the same schedule: ``loops`` training loops of (n_local MALA steps,
flow training for n_epochs epochs on up to 10,000 points from the chain history, n_global
flow proposals), then ``production`` loops with the flow frozen. flowMC: the
``RQSpline_MALA_Bundle`` (rational-quadratic spline flow, MALA with dt = 0.1 adapted).
ebmflow: ``FlowMC.flowmc_schedule`` with a ``RealNVP`` and the default MALA (eta = dt^2 / 2
= 0.005, retuned after every fit). Error = |fraction of production samples with x_1 < 0 -
2/3|. For each budget in ``--loops`` the wall time (including JAX compilation for flowMC)
and the error are reported; "time to error" is the smallest wall time whose error is below
``--threshold``.

    python benchmarks/flowmc_reference.py [--quick] [--update-reference]

Writes runs/benchmarks/flowmc_reference.json (``--update-reference``: the committed
benchmarks/results/flowmc_reference.json; ``--out PATH``) and prints where.
Needs the ``bench`` extra (``pip install ebmflow[bench]``); without flowMC/JAX only the
ebmflow rows are run and the script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from _output import add_output_arguments, output_path, write_json

from ebmflow.energy import GaussianMixtureEnergy
from ebmflow.flows import FlowMC, RealNVP

ROOT = Path(__file__).resolve().parents[1]
TRUTH = 2 / 3


def _target(dim: int) -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy.two_modes(dim=dim, separation=8.0, scale=1.0)


def run_ebmflow(dim: int, loops: int, cfg: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    target = _target(dim)
    flow = RealNVP(dim, n_layers=4, hidden=(32, 32))
    sampler = FlowMC.flowmc_schedule(flow, n_local=cfg["n_local"], n_global=cfg["n_global"],
                                     n_epochs=cfg["n_epochs"], train_updates=loops,
                                     batch_size=cfg["batch_size"])
    x0 = torch.zeros(cfg["n_chains"], dim)
    x0[:, 0] = -4.0
    x0 += torch.randn(x0.shape, generator=gen)
    t0 = time.perf_counter()
    sampler.sample(target, x0=x0, generator=gen)
    for _ in range(loops):
        sampler.update(target, generator=gen)
        sampler.sample(target, generator=gen)
    heavy = []
    for _ in range(cfg["production"]):
        heavy.append((sampler.sample(target, generator=gen)[:, 0] < 0).float().mean())
    err = abs(float(torch.stack(heavy).mean()) - TRUTH)
    return {"seconds": time.perf_counter() - t0, "error": err,
            "global_accept": float(sampler.stats["global_accept"]),
            "local_accept": float(sampler.stats["local_accept"])}


def run_flowmc(dim: int, loops: int, cfg: dict, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flowMC.resource_strategy_bundle.RQSpline_MALA import RQSpline_MALA_Bundle
    from flowMC.Sampler import Sampler

    mu = jnp.zeros(dim).at[0].set(4.0)
    log_w = jnp.log(jnp.array([2 / 3, 1 / 3]))

    def logpdf(x, data):
        a = -0.5 * jnp.sum((x + mu) ** 2)
        b = -0.5 * jnp.sum((x - mu) ** 2)
        return jnp.logaddexp(a + log_w[0], b + log_w[1])

    key = jax.random.PRNGKey(seed)
    key, k_init, k_bundle = jax.random.split(key, 3)
    n = cfg["n_chains"]
    x0 = jax.random.normal(k_init, (n, dim)) - mu
    bundle = RQSpline_MALA_Bundle(
        k_bundle, n, dim, logpdf, cfg["n_local"], cfg["n_global"], loops, cfg["production"],
        cfg["n_epochs"], batch_size=cfg["batch_size"], n_max_examples=10_000,
        history_window=100,
    )
    t0 = time.perf_counter()
    sampler = Sampler(n_dim=dim, n_chains=n, rng_key=key, resource_strategy_bundles=bundle,
                      outdir=str(ROOT / "runs" / "flowmc_reference_jax"),
                      checkpoint_interval=0)
    sampler.sample(x0, {})
    pos = sampler.resources["positions_production"].data
    pos.block_until_ready()
    seconds = time.perf_counter() - t0
    err = abs(float((pos[..., 0] < 0).mean()) - TRUTH)
    acc = sampler.resources["global_accs_production"].data
    acc = acc[jnp.isfinite(acc)]  # unfilled slots of the buffer are -inf
    return {"seconds": seconds, "error": err, "global_accept": float(acc.mean())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2-D only, small budgets")
    parser.add_argument("--loops", type=int, nargs="+", default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    parser.add_argument("--update-docs", dest="update_reference", action="store_true",
                        help=argparse.SUPPRESS)  # the former name of --update-reference
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                          "intra_op_parallelism_threads=1")
    cfg = {"n_chains": 256, "n_local": 10, "n_global": 10, "n_epochs": 5,
           "batch_size": 10_000, "production": 10}
    loops = args.loops or ([3, 6] if args.quick else [5, 10, 20])
    dims = args.dims or ([2] if args.quick else [2, 16])
    try:
        import flowMC  # noqa: F401
        import jax  # noqa: F401

        have_ref = True
    except ImportError:
        have_ref = False
        print("flowMC/JAX not installed (pip install ebmflow[bench]): skipping the reference "
              "rows, running ebmflow only")
    rows = []
    for dim in dims:
        for lib in ("ebmflow", "flowMC") if have_ref else ("ebmflow",):
            for n_loops in loops:
                fn = run_ebmflow if lib == "ebmflow" else run_flowmc
                r = fn(dim, n_loops, cfg, args.seed)
                rows.append({"dim": dim, "lib": lib, "loops": n_loops, **r})
                print(json.dumps(rows[-1]))
    summary = []
    print(f"\n| D | library | loops | wall s | error | global accept | "
          f"time to error < {args.threshold} |")
    print("|---|---|---|---|---|---|---|")
    for dim in dims:
        for lib in ("ebmflow", "flowMC"):
            sel = [r for r in rows if r["dim"] == dim and r["lib"] == lib]
            if not sel:
                continue
            ok = [r["seconds"] for r in sel if r["error"] < args.threshold]
            tte = min(ok) if ok else None
            summary.append({"dim": dim, "lib": lib, "time_to_error": tte,
                            "final_error": sel[-1]["error"]})
            for r in sel:
                print(f"| {dim} | {lib} | {r['loops']} | {r['seconds']:.1f} | {r['error']:.3f} | "
                      f"{r['global_accept']:.2f} | {'' if tte is None else f'{tte:.1f} s'} |")
    payload = {"config": cfg, "threshold": args.threshold, "seed": args.seed,
               "torch_threads": 1, "rows": rows, "summary": summary,
               "reference_available": have_ref}
    write_json(output_path(args, "flowmc_reference"), payload)
    return payload


if __name__ == "__main__":
    main()
