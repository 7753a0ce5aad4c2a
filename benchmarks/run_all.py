"""Run every benchmark in this folder and print a summary (``ebmflow bench`` calls this).

Each ``benchmarks/<name>.py`` prints its own table and writes ``runs/benchmarks/<name>.json``
(git ignores ``runs/``); with ``--update-reference`` it writes the committed reference
``benchmarks/results/<name>.json`` instead (see ``_output.py``). This script runs them one
after another (with ``--quick`` if asked), shows their output and ends with a one-line status
and the result file of each benchmark. Exit status: 0 when all succeeded, 1 otherwise.

    python benchmarks/run_all.py --quick
    python benchmarks/run_all.py --only training samplers --update-reference
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _output import REFERENCE_DIR, ROOT, RUNS_DIR

HERE = Path(__file__).resolve().parent


def discover() -> list[Path]:
    skip = {"run_all.py", "gpu_check.py"}  # gpu_check runs the others on a CUDA machine
    return sorted(p for p in HERE.glob("*.py") if p.name not in skip and not p.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run ebmflow's benchmarks.")
    parser.add_argument("--quick", action="store_true", help="pass --quick (CPU, about a minute each)")
    parser.add_argument("--only", nargs="*", help="benchmark names (file names without .py)")
    parser.add_argument("--update-reference", dest="update_reference", action="store_true",
                        help="write the committed reference results in benchmarks/results/")
    args = parser.parse_args(argv)
    scripts = discover()
    if args.only:
        names = {p.stem: p for p in scripts}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            print(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}", file=sys.stderr)
            return 2
        scripts = [names[n] for n in args.only]
    status = []
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        if args.update_reference:
            cmd.append("--update-reference")
        t0 = time.perf_counter()
        code = subprocess.call(cmd)
        status.append((script.stem, code, time.perf_counter() - t0))
    print("\n| benchmark | status | seconds | results |")
    print("|---|---|---|---|")
    folder = REFERENCE_DIR if args.update_reference else RUNS_DIR
    for name, code, sec in status:
        result = folder / f"{name}.json"
        print(f"| {name} | {'ok' if code == 0 else f'failed ({code})'} | {sec:.0f} | "
              f"{result.relative_to(ROOT) if result.exists() else '-'} |")
    print(f"\nresults are in {folder.relative_to(ROOT)}/"
          + ("" if args.update_reference else " (pass --update-reference to update benchmarks/results/)"))
    return 0 if all(code == 0 for _, code, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())
