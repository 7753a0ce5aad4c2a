"""oneDNN against the BLAS behind ``F.linear`` for the matrix products of the MLP fast paths.

``energy/_gemm.linear`` runs float32 products of medium and large size on oneDNN's matrix
product instead of the BLAS library behind ``torch.nn.functional.linear`` (MKL in the CPU
wheels); this script measures both on the shapes the docs quote, $x W^\\top$ with ``x``
(rows, n_in) and ``W`` (n_out, n_in):

* (256, 256, 256): one hidden layer of the 2-256-256-256-1 MLP energy at 256 chains;
* (128, 784, 256) and (4096, 256, 256): the smallest and largest shapes the docs name;
* (256, 256, 256) with the weight's transposed view (the backward product $G W$).

One CPU thread (``torch.set_num_threads(1)``), the process pinned to one core where the OS
allows it, the two kernels alternating, median of ``--repeats`` timings of ``--calls`` calls
each (thread CPU time), after two warm-up calls. Both give the same products to float32
rounding (a different summation order); the largest difference is reported.

    python benchmarks/gemm.py              # about 20 seconds (--quick: 3 timings)

Writes runs/benchmarks/gemm.json (``--update-reference``: benchmarks/results/gemm.json).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
from _output import add_output_arguments, output_path, write_json
from _timing import add_timing_arguments, alternating_medians, pin_one_core, resolve_repeats

from ebmflow.energy import _gemm

SHAPES = [(256, 256, 256, False), (128, 784, 256, False), (4096, 256, 256, False),
          (256, 256, 256, True)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_arguments(ap)
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    resolve_repeats(args)
    if not _gemm._ONEDNN:
        raise SystemExit("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    pin_one_core()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'rows':>5} {'n_in':>5} {'n_out':>5} {'weight':>10} | {'BLAS us':>9} {'oneDNN us':>9}"
          f" {'BLAS / oneDNN':>13} | max |diff|")
    for m, k, n, transposed in SHAPES:
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(k, n, generator=gen).t() if transposed else torch.randn(n, k, generator=gen)
        with torch.no_grad():
            fns = {"blas": lambda x=x, w=w: torch.nn.functional.linear(x, w),
                   "onednn": lambda x=x, w=w: _gemm._onednn(x, w, None)}
            us = {name: round(sec * 1e6, 1) for name, sec in
                  alternating_medians(fns, args.calls, args.repeats).items()}
            diff = float((fns["blas"]() - fns["onednn"]()).abs().max())
        row = {"rows": m, "n_in": k, "n_out": n,
               "weight": "transposed view" if transposed else "contiguous",
               "blas_us": us["blas"], "onednn_us": us["onednn"],
               "blas_over_onednn": round(us["blas"] / us["onednn"], 2), "max_abs_diff": diff}
        rows.append(row)
        print(f"{m:>5} {k:>5} {n:>5} {row['weight'][:10]:>10} | {us['blas']:>9.1f} "
              f"{us['onednn']:>9.1f} {row['blas_over_onednn']:>13.2f} | {diff:.2e}", flush=True)
    meta = {"machine": platform.machine(), "processor": platform.processor(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "calls": args.calls, "repeats": args.repeats,
            "command": " ".join(["python", "benchmarks/gemm.py", *(argv or sys.argv[1:])])}
    write_json(output_path(args, "gemm"), {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
