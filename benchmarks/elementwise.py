"""What element-wise functions cost per number on the CPU, eager and compiled (inductor).

Why DULA and DMALA on binary states take no log-sigmoid per coordinate
(``samplers/discrete_langevin.py``): on the CPU this was written on, ``F.logsigmoid`` costs
several exponentials' time, in ATen's eager kernel and in inductor's generated code alike,
while the product form needs one exponential per coordinate. Each function runs on a
(8192, 100) float32 tensor (the proposals of 8192 chains on a 10 x 10 Ising model), eager and
through ``torch.compile`` (inductor, with ``samplers/_compiled.INDUCTOR_OPTIONS``), one
thread, the process pinned to one core where the OS allows it, the variants alternating,
median of ``--repeats`` timings of ``--calls`` calls each (thread CPU time); nanoseconds per
number.

    python benchmarks/elementwise.py       # about a minute (each function compiles)

Writes runs/benchmarks/elementwise.json (``--update-reference``:
benchmarks/results/elementwise.json).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
from _output import add_output_arguments, output_path, write_json
from _timing import add_timing_arguments, alternating_medians, pin_one_core, resolve_repeats

import ebmflow.samplers._compiled as compiled

FUNCTIONS = {
    "exp(x)": lambda x: torch.exp(x),
    "log(|x|)": lambda x: torch.log(x.abs()),
    "logsigmoid(x)": lambda x: torch.nn.functional.logsigmoid(x),
    "log1p(exp(-|x|))": lambda x: torch.log1p(torch.exp(-x.abs())),
    "exp(-|x|), the product form's one function": lambda x: torch.exp(-x.abs()),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_arguments(ap)
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    repeats = resolve_repeats(args)
    pin_one_core()
    torch.set_num_threads(1)
    x = 3 * torch.randn(8192, 100, generator=torch.Generator().manual_seed(0))
    rows = []
    print(f"{'function':44} | {'eager ns':>9} {'compiled ns':>11}")
    for name, fn in FUNCTIONS.items():
        variants = {"eager": fn, "compiled": torch.compile(fn, dynamic=False,
                                                           options=dict(compiled.INDUCTOR_OPTIONS))}
        sec = alternating_medians({k: lambda f=f: f(x) for k, f in variants.items()},
                                  args.calls, repeats)
        row = {"function": name, **{f"{k}_ns_per_number": round(s / x.numel() * 1e9, 3)
                                    for k, s in sec.items()}}
        rows.append(row)
        print(f"{name:44} | {row['eager_ns_per_number']:9.3f} {row['compiled_ns_per_number']:11.3f}",
              flush=True)
    meta = {"machine": platform.machine(), "processor": platform.processor(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "shape": [8192, 100],
            "calls": args.calls, "repeats": repeats,
            "command": " ".join(["python", "benchmarks/elementwise.py", *(argv or sys.argv[1:])])}
    write_json(output_path(args, "elementwise"), {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
