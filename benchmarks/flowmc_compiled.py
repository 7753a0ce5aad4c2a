"""FlowMC rounds per second, eager against compiled (``FlowMC(compile=True)``, inductor), CPU.

Targets: the 2-D two-mode mixture (``GaussianMixtureEnergy.two_modes(dim=2)``, modes at
-/+ 4 e_1, weights 2:1) and its 16-D version; 256 and 4096 chains. One round = ``n_local``
MALA steps + ``n_global`` flow proposals (``RealNVP(D, n_layers=4, hidden=(32, 32))``, frozen:
this measures sampling, not flow fitting). The eager and the compiled sampler share the flow
and run in one process, one thread (``torch.set_num_threads(1)``), alternating eager and
compiled timings ``--reps`` times (median reported). The compiled sampler's first call
(tracing, inductor's C++ code generation and compilation, one round) is reported apart as the
compile time; by default inductor compiles into a fresh cache folder (a cold compile; pass
``--warm-cache`` to use the default on-disk cache). ``agree`` is the fraction of chains
whose compiled state equals the eager state (same generator, |diff| < 1e-4) after the timed
rounds of one paired run: the compiled chains are the eager chains up to float rounding.

    python benchmarks/flowmc_compiled.py [--quick] [--out PATH] [--update-reference]

Writes runs/benchmarks/flowmc_compiled.json by default.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv:  # before torch reads inductor's configuration
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-flowmc-")

import torch  # noqa: E402
from _output import add_output_arguments, output_path, write_json  # noqa: E402

from ebmflow.energy import GaussianMixtureEnergy  # noqa: E402
from ebmflow.flows import FlowMC, RealNVP  # noqa: E402
from ebmflow.samplers import MALA  # noqa: E402

TARGETS = {"two_modes_2d": 2, "mixture_16d": 16}


def _sampler(flow: RealNVP, compiled: bool, n_local: int, n_global: int) -> FlowMC:
    s = FlowMC(flow, MALA(step_size=0.005), n_local=n_local, n_global=n_global,
               flow_steps=0, compile=compiled)
    s.compile_backend = "inductor"
    return s


def _timed(s: FlowMC, target, x0, rounds: int, seed: int) -> tuple[float, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    x = s.sample(target, x0=x0, generator=gen, n_rounds=rounds)
    return time.perf_counter() - t0, x


def bench(name: str, dim: int, chains: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    target = GaussianMixtureEnergy.two_modes(dim=dim, separation=8.0, scale=1.0)
    flow = RealNVP(dim, n_layers=4, hidden=(32, 32), scale=2.0)
    x0 = target.sample(chains, torch.Generator().manual_seed(1))
    eager = _sampler(flow, False, args.n_local, args.n_global)
    comp = _sampler(flow, True, args.n_local, args.n_global)
    t_one, _ = _timed(eager, target, x0, 1, 0)  # warm-up; sizes the timed runs
    t_one, _ = _timed(eager, target, x0, 1, 0)
    rounds = max(2, math.ceil(args.seconds / max(t_one, 1e-6)))
    t_first, _ = _timed(comp, target, x0, 1, 0)  # trace + compile + one round
    compile_s = comp.compile_seconds
    t_e, t_c = [], []
    agree = None
    for rep in range(args.reps):
        te, xe = _timed(eager, target, x0, rounds, rep)
        tc, xc = _timed(comp, target, x0, rounds, rep)
        t_e.append(te)
        t_c.append(tc)
        if agree is None:
            agree = float(((xc - xe).abs() < 1e-4).all(1).float().mean())
    rps_e = rounds / statistics.median(t_e)
    rps_c = rounds / statistics.median(t_c)
    return {
        "target": name, "dim": dim, "chains": chains, "rounds_per_rep": rounds,
        "reps": args.reps,
        "eager_rounds_per_s": rps_e, "compiled_rounds_per_s": rps_c,
        "speedup": rps_c / rps_e,
        "eager_round_ms_all": [1e3 * t / rounds for t in t_e],
        "compiled_round_ms_all": [1e3 * t / rounds for t in t_c],
        "first_compiled_call_s": t_first, "compile_s": compile_s,
        "compiled_chunks": len(comp._blocks),
        "agree": agree,
        "global_accept": float(comp.stats["global_accept"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--n-local", type=int, default=10)
    parser.add_argument("--n-global", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5, help="alternating timings (>= 5)")
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="eager time per timing (sets the rounds per timing)")
    parser.add_argument("--quick", action="store_true", help="256 chains, 2-D only")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use inductor's default on-disk cache (default: a fresh one)")
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.chains, args.targets, args.seconds = [256], ["two_modes_2d"], 0.2
    torch.set_num_threads(1)
    rows = []
    print(f"{'target':<14}{'chains':>7}{'eager r/s':>11}{'compiled r/s':>14}{'speedup':>9}"
          f"{'compile s':>11}{'agree':>7}", flush=True)
    for name in args.targets:
        for chains in args.chains:
            r = bench(name, TARGETS[name], chains, args)
            rows.append(r)
            print(f"{name:<14}{chains:>7}{r['eager_rounds_per_s']:>11.1f}"
                  f"{r['compiled_rounds_per_s']:>14.1f}{r['speedup']:>8.2f}x"
                  f"{r['compile_s']:>11.1f}{r['agree']:>7.3f}", flush=True)
    write_json(output_path(args, "flowmc_compiled"), {
        "benchmark": "flowmc_compiled",
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "threads": 1,
        "n_local": args.n_local, "n_global": args.n_global,
        "flow": "RealNVP(n_layers=4, hidden=(32, 32)), frozen",
        "local": "MALA(step_size=0.005)",
        "cold_compile": not args.warm_cache,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
