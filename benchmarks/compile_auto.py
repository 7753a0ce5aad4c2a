"""What ``compile="auto"`` chooses on discrete states, and what each choice costs.

GWG, DMALA and Gibbs on a 10 x 10 Ising model (``IsingEnergy.lattice(10, 0.2)``) at 128 and
4096 chains, each sampler with ``compile_after = 20``: one run of 10 steps (eager, timed),
then five runs of 40 steps from the state the last one left. "auto" compiles at the second
run; once 4 or more compiled blocks after the compiling one took more than 1.1x the eager
time per step, the energy and state shape run eagerly from then on. One process, one
thread, the process pinned to one core; milliseconds of wall time per run.

    python benchmarks/compile_auto.py        # about a minute with inductor's cache filled

Writes runs/benchmarks/compile_auto.json (``--update-reference``: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import platform
import time

from _output import add_output_arguments, output_path, write_json
from _timing import pin_one_core


def one(name: str, chains: int, runs: int = 6) -> dict:
    import torch

    from ebmflow.energy import IsingEnergy
    from ebmflow.samplers import DiscreteLangevin, Gibbs, GibbsWithGradients

    make = {"GWG": GibbsWithGradients, "DMALA": lambda: DiscreteLangevin(0.3, metropolis=True),
            "Gibbs": Gibbs}[name]
    energy = IsingEnergy.lattice(10, 0.2)
    sampler = make()
    sampler.compile_after = 20
    x = energy.space.noise(chains, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    ms = []
    for r in range(runs):
        t0 = time.perf_counter()
        x = sampler.run(energy, x, 10 if r == 0 else 40, generator=g)
        ms.append(round((time.perf_counter() - t0) * 1e3, 1))
    return {"sampler": name, "chains": chains, "back_to_eager": bool(sampler._auto_slower),
            "run_ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(ap)
    args = ap.parse_args()
    pin_one_core()
    import torch

    torch.set_num_threads(1)
    rows = [one(name, chains) for chains in (128, 4096) for name in ("GWG", "DMALA", "Gibbs")]
    print(f"{'sampler':7} {'chains':>6} | back to eager | ms per run (10 eager, then 5 x 40)")
    for r in rows:
        print(f"{r['sampler']:7} {r['chains']:6d} | {str(r['back_to_eager']):13} | "
              + " ".join(f"{m:8.1f}" for m in r["run_ms"]))
    write_json(output_path(args, "compile_auto"),
               {"torch": torch.__version__, "machine": platform.machine(), "threads": 1,
                "compile_after": 20, "rows": rows})


if __name__ == "__main__":
    main()
