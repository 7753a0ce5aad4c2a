"""Timing helpers of the micro-benchmarks: one CPU core, variants alternating, medians.

    from _timing import add_timing_arguments, alternating_medians, pin_one_core, resolve_repeats

    add_timing_arguments(parser)            # --calls, --repeats, --quick
    args = parser.parse_args(); resolve_repeats(args)
    pin_one_core()                          # before timing (no-op where the OS cannot)
    sec = alternating_medians({"a": f, "b": g}, args.calls, args.repeats)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

__all__ = ["add_timing_arguments", "alternating_medians", "pin_one_core", "resolve_repeats"]


def pin_one_core() -> None:
    """Run this process on one CPU core (the lowest it may use), so that "one thread" holds
    for every library it calls and a second core's load does not move the timings."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def add_timing_arguments(parser: argparse.ArgumentParser, repeats: int = 7) -> None:
    """``--calls`` (calls per timing, default 20), ``--repeats`` (timings per variant, default
    ``repeats``; 3 with ``--quick``) and ``--quick``. Read the count with ``args.repeats``
    after ``parser.parse_args`` and ``resolve_repeats(args)``."""
    parser.add_argument("--calls", type=int, default=20, help="calls per timing (default 20)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timings per variant (default {repeats}, 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="3 timings per variant")
    parser.set_defaults(default_repeats=repeats)


def resolve_repeats(args: argparse.Namespace) -> int:
    """The number of timings per variant that ``add_timing_arguments``' options ask for."""
    args.repeats = args.repeats or (3 if args.quick else args.default_repeats)
    return args.repeats


def alternating_medians(fns: dict[str, Callable[[], object]], calls: int, repeats: int) -> dict[str, float]:
    """Median thread CPU seconds per call of each function: two warm-up calls each, then
    ``repeats`` rounds in which every function is timed over ``calls`` calls in turn."""
    for fn in fns.values():
        fn()
        fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            runs[name].append((time.thread_time() - t0) / calls)
    return {name: statistics.median(v) for name, v in runs.items()}
