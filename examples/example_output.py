"""Where the example scripts write: ``runs/examples/`` by default, the docs only on request.

``docs/results/*.json`` and ``docs/figures/*.png`` are the committed results that the docs
show. An example run writes ``runs/examples/results/<name>.json`` and
``runs/examples/figures/<name>.png`` (git ignores ``runs/``) unless it is given
``--update-docs`` (then ``docs/results/`` and ``docs/figures/``) or ``--out FOLDER``.
Every example script uses::

    from example_output import add_output_arguments, output_dir, report_written

    add_output_arguments(parser)          # --out, --update-docs
    out = output_dir(args)                # folder holding results/ and figures/
    report_written(json_path, png_path)   # prints "wrote ..." for each
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["ROOT", "DOCS_DIR", "RUNS_DIR", "add_output_arguments", "output_dir", "report_written"]

ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = ROOT / "docs"
RUNS_DIR = ROOT / "runs" / "examples"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--out FOLDER`` and ``--update-docs`` to an example's parser."""
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results/ and figures/ (default runs/examples)")
    parser.add_argument("--update-docs", dest="update_docs", action="store_true",
                        help="write the committed docs/results and docs/figures")


def output_dir(args: argparse.Namespace) -> Path:
    """``--out`` when given, else ``docs/`` with ``--update-docs``, else ``runs/examples``."""
    if getattr(args, "out", None):
        return Path(args.out)
    return DOCS_DIR if getattr(args, "update_docs", False) else RUNS_DIR


def report_written(*paths: Path) -> None:
    """Print where the run wrote its files (relative to the repository when inside it)."""
    for path in paths:
        try:
            shown = Path(path).resolve().relative_to(ROOT)
        except ValueError:
            shown = path
        print(f"wrote {shown}", flush=True)
