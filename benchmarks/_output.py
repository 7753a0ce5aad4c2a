"""Where benchmark results go: ``runs/benchmarks/`` by default, the reference only on request.

``benchmarks/results/*.json`` are the committed reference numbers that the docs quote. A
benchmark run writes to ``runs/benchmarks/<name>.json`` (git ignores ``runs/``) unless it is
given ``--update-reference`` (then ``benchmarks/results/<name>.json``) or ``--out PATH``.
Every benchmark script uses::

    from _output import add_output_arguments, output_path, write_json

    add_output_arguments(parser)                    # --out, --update-reference
    write_json(output_path(args, "samplers"), obj)  # prints "wrote <path>"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "REFERENCE_DIR", "RUNS_DIR", "add_output_arguments", "output_path", "write_json"]

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = ROOT / "benchmarks" / "results"
RUNS_DIR = ROOT / "runs" / "benchmarks"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--out PATH`` and ``--update-reference`` to a benchmark's parser."""
    parser.add_argument("--out", default=None,
                        help="JSON file to write (default runs/benchmarks/<name>.json)")
    parser.add_argument("--update-reference", dest="update_reference", action="store_true",
                        help="write the committed reference benchmarks/results/<name>.json")


def output_path(args: argparse.Namespace, name: str) -> Path:
    """``--out`` when given, else the reference file with ``--update-reference``, else
    ``runs/benchmarks/<name>.json``."""
    if getattr(args, "out", None):
        return Path(args.out)
    folder = REFERENCE_DIR if getattr(args, "update_reference", False) else RUNS_DIR
    return folder / f"{name}.json"


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` (folders created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    try:
        shown = path.resolve().relative_to(ROOT)
    except ValueError:
        shown = path
    print(f"wrote {shown}", flush=True)
    return path
