"""Compile warm-up of one compiled sampler in fresh processes: cold inductor cache, then warm.

Runs ``MALA(compile=True)`` on a 2-D Gaussian mixture (256 chains, 100 steps) in a child
process twice with the same inductor cache folder: the first child compiles from nothing,
the second finds the kernels in the on-disk cache. Prints both ``compile_seconds`` (the
first compiled block: tracing, compiling, one run) and writes
runs/benchmarks/compile_warmup.json (``--update-reference``: benchmarks/results/).

    python benchmarks/compile_warmup.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, math, time, torch
torch.set_num_threads(1)
t0 = time.perf_counter()
from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy
from ebmflow.samplers import MALA
from ebmflow.spaces import Continuous
k = 8
a = torch.arange(k) * (2 * math.pi / k)
target = GaussianMixtureEnergy(4 * torch.stack([a.cos(), a.sin()], 1), torch.full((k, 2), 0.5))
if "{energy}" == "mlp":
    torch.manual_seed(0)
    target = MLPEnergy(Continuous(2), hidden=(128, 128))
s = MALA(0.01, compile=True)
s.run(target, torch.randn(256, 2), 100)
print(json.dumps({{"compile_seconds": s.compile_seconds,
                  "process_seconds": time.perf_counter() - t0}}))
"""


def child(cache: str, energy: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", CHILD.format(energy=energy)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.path.dirname(__file__))
    from _output import add_output_arguments, output_path, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    rows = []
    for energy in ("mixture", "mlp"):
        with tempfile.TemporaryDirectory() as cache:
            cold, warm = child(cache, energy), child(cache, energy)
        rows.append({"sampler": "MALA", "energy": energy, "cold": cold, "warm": warm})
        print(f"MALA on {energy}: compile {cold['compile_seconds']:.1f} s with an empty cache, "
              f"{warm['compile_seconds']:.1f} s with the cache filled "
              f"(whole process {cold['process_seconds']:.1f} / {warm['process_seconds']:.1f} s)")
    write_json(output_path(args, "compile_warmup"), {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
