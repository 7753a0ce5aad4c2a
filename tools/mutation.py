"""Mutation testing of one ebmflow package with mutmut 3, reports under runs/mutation/<package>/.

Usage (from the repository root, with the ``dev`` extra installed)::

    python tools/mutation.py --package losses
    python tools/mutation.py --package samplers --max-minutes 40
    python tools/mutation.py --package losses --report-only   # re-read an earlier run
    python tools/mutation.py --package flows --resume         # finish a run --max-minutes stopped
    python tools/mutation.py --package flows --rerun-survivors  # after writing tests from them

The tool never touches tracked files: it lays a scratch copy of ``src/``, ``tests/`` and a
generated ``pyproject.toml`` (the repository's pytest settings plus a ``[tool.mutmut]`` table
for the chosen package) in ``runs/mutation/<package>/work/`` and runs ``mutmut run`` there,
so mutmut's ``mutants/`` folder is ``runs/mutation/<package>/work/mutants/``. Each mutant
is tested only with the package's own test files (``PACKAGES`` below) that cover the
mutated function; mutmut caps every mutant's test run at
``(baseline duration + timeout_constant) * timeout_multiplier`` seconds and the whole run is
capped by ``--max-minutes``. At most two mutmut workers run at a time (``--max-children 1``:
one).

Reports: ``summary.json`` (counts and score), ``survivors.md`` (the diff of every surviving
mutant) and ``mutmut.log`` (mutmut's own output).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
ROOT = Path(__file__).resolve().parents[1]

# Package -> the test files (and extra pytest arguments) that exercise it.
PACKAGES: dict[str, list[str]] = {
    "losses": [
        "tests/test_energy_discrepancy.py",
        "tests/test_contrastive_divergence.py",
        "tests/test_perturbations.py",
        "tests/test_perturbations_distribution.py",
        "tests/test_score_matching.py",
        "tests/test_losses_inputs.py",
        "tests/test_mutants_losses.py",
    ],
    "samplers": [
        "tests/test_samplers_*.py",
        "tests/test_sampler_base.py",
        "tests/test_invariance_all_samplers.py",
        "tests/test_compiled.py",
        "tests/test_mutants_samplers.py",
    ],
    # test_ctmc_compiled.py is left out: its compiled-equals-eager checks see a mutant on
    # both sides and recompile for every mutant (seconds each).
    "discrete_flows": [
        "tests/test_discrete_flows_*.py",
        "tests/test_recipe_bootstrap_weights.py",
        "tests/test_properties.py",
        "tests/test_reliability_inputs.py",
        "tests/test_reliability_numerics.py",
        "tests/test_reliability_determinism.py",
        "tests/test_names.py",
        "tests/test_mutants_discrete_flows.py",
    ],
    # test_flowmc_compiled.py is left out for the same reason (5-8 s per compiled case);
    # tests/test_mutants_flows.py checks the compiled rounds once, cheaply.
    "flows": [
        "tests/test_flows.py",
        "tests/test_flowmc.py",
        "tests/test_flows_zuko.py",
        "tests/test_tilted.py",
        "tests/test_reliability_inputs.py",
        "tests/test_reliability_numerics.py",
        "tests/test_reliability_determinism.py",
        "tests/test_names.py",
        "tests/test_mutants_flows.py",
    ],
    "training": [
        "tests/test_trainer.py",
        "tests/test_checkpoint.py",
        "tests/test_trainer_fast_samplers.py",
        "tests/test_reliability_interrupt.py",
        "tests/test_reliability_numerics.py",
        "tests/test_reliability_inputs.py",
        "tests/test_newcomer_training.py",
        "tests/test_cli.py",
        "tests/test_distributed.py",
        "tests/test_gpu_fixes.py",
        "tests/test_mutants_training.py",
    ],
}

# Package -> tests left out of mutation runs. mutmut runs pytest several times in one
# process (stats, clean run, then forks per mutant), so a test must pass on a second run in
# the same interpreter: the first counts torch.compile graphs (mutmut's trampolines add
# graphs and recompilations of their own), the second parametrises with sampler objects
# created at import, whose warm-up adaptation the first run used up. Tests that check which
# file a warning names cannot run either: mutmut calls every function through a trampoline.
DESELECT: dict[str, list[str]] = {
    "samplers": [
        "tests/test_compiled.py::test_no_recompilation_when_steps_data_or_parameter_values_change",
        "tests/test_compiled.py::test_short_runs_compile_once",
        "tests/test_samplers_continuous.py::test_step_size_adaptation_reaches_target",
        # the warning names the first frame outside ebmflow and torch: mutmut's trampoline
        "tests/test_compiled.py::test_fallback_warning_points_at_the_callers_line",
    ],
    # tests that run ebmflow in subprocesses (which do not see mutmut's mutants) or take
    # 4-17 s each, for every mutant of the functions they cover
    "training": [
        "tests/test_reliability_interrupt.py::test_sigkill_during_checkpoint_write_of_ebmflow_train",
        "tests/test_distributed.py::test_two_gloo_processes_match_one_process_with_doubled_batch",
        "tests/test_cli.py::test_train_writes_the_main_job_files_with_finite_metrics",
        "tests/test_cli.py::test_existing_output_is_refused_resumed_or_overwritten",
        # reads the repository's examples/, which the scratch copy does not hold
        "tests/test_cli.py::test_every_cli_example_config_is_valid",
    ],
}

# mutmut status -> summary key (mutmut's own names, grouped)
STATUS_KEYS = ("killed", "survived", "timeout", "suspicious", "no tests", "skipped",
               "not checked", "segfault", "caught by type check", "check was interrupted by user")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_table(name: str, table: dict) -> str:
    lines = [f"[{name}]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def _test_files(package: str) -> list[str]:
    files: list[str] = []
    for pattern in PACKAGES[package]:
        matched = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))
        files += matched
    return files


def lay_out(package: str, work: Path, tests: list[str]) -> None:
    """Write the scratch tree: src/ and tests/ copies plus a package-specific pyproject."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "src", work / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    shutil.copytree(ROOT / "tests", work / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pytest_opts = project["tool"]["pytest"]["ini_options"]
    mutmut = dict(project["tool"].get("mutmut", {}))
    mutmut["source_paths"] = ["src/ebmflow"]
    mutmut["only_mutate"] = [f"src/ebmflow/{package}/*"]
    # "not slow" keeps the pytest default; -p no:cacheprovider keeps the copies clean.
    mutmut["pytest_add_cli_args_test_selection"] = tests
    mutmut.setdefault("pytest_add_cli_args", ["-p", "no:cacheprovider", "-m", "not slow"])
    for test in DESELECT.get(package, []):
        mutmut["pytest_add_cli_args"] = [*mutmut["pytest_add_cli_args"], "--deselect", test]
    (work / "pyproject.toml").write_text(
        _toml_table("tool.pytest.ini_options", pytest_opts) + "\n" + _toml_table("tool.mutmut", mutmut)
    )


def refresh_tests(work: Path) -> None:
    """Copy the repository's current src/ and tests/ over the scratch copy (for --resume,
    --rerun-survivors).

    mutmut regenerates the mutants of a source file newer than its mutated copy and forgets
    the results of the functions whose code changed (it keeps one hash per function), so
    those are tested again; results of unchanged functions are kept. The generated pyproject
    is left as it is: a changed test selection would make mutmut discard every earlier
    result. A test file new since the layout is therefore only run if its name was already
    in the selection (``tests/test_mutants_<package>.py`` always is).
    """
    for part in ("src", "tests"):
        shutil.copytree(ROOT / part, work / part, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def run_mutmut(work: Path, max_children: int, max_minutes: float, log: Path,
               names: list[str] | None = None) -> int:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())",
           "run", "--max-children", str(max_children), *(names or [])]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=work, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max_minutes * 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            fh.write(f"\n[mutation.py] stopped after {max_minutes} min (--max-minutes)\n")
            return 124


def _mutmut(work: Path, *args: str) -> str:
    cmd = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())", *args]
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    return out.stdout


_DIFFS = """
import json, sys
from mutmut.__main__ import find_mutant
from mutmut.mutation.diff_apply import get_diff_for_mutant
print(json.dumps({n: get_diff_for_mutant(n, path=find_mutant(n).path) for n in json.load(sys.stdin)}))
"""


def _diffs(work: Path, names: list[str]) -> dict[str, str]:
    """mutant name -> its diff (what ``mutmut show`` prints), in one process."""
    if not names:
        return {}
    out = subprocess.run([sys.executable, "-c", _DIFFS], cwd=work, input=json.dumps(names),
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def _statuses(work: Path) -> dict[str, str]:
    """mutant name -> mutmut status, from ``mutmut results --all true``."""
    listing = _mutmut(work, "results", "--all", "true")
    statuses: dict[str, str] = {}
    for line in listing.splitlines():
        m = re.match(r"\s*(\S+__mutmut_\d+):\s*(.+?)\s*$", line)
        if m:
            statuses[m.group(1)] = m.group(2)
    return statuses


def report(package: str, out_dir: Path) -> dict:
    work = out_dir / "work"
    statuses = _statuses(work)
    counts = {key: 0 for key in STATUS_KEYS}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    survivors = sorted(name for name, s in statuses.items() if s == "survived")
    equivalent = _equivalent(package)
    generated = len(statuses)
    judged = [name for name in survivors if name in equivalent]
    denominator = generated - len(judged)
    summary = {
        "package": package,
        "generated": generated,
        **{k.replace(" ", "_"): v for k, v in counts.items() if v},
        "equivalent": len(judged),
        "score": round(counts["killed"] / denominator, 4) if denominator else None,
        "score_counting_timeouts_as_killed": (
            round((counts["killed"] + counts["timeout"]) / denominator, 4) if denominator else None
        ),
        "survivors_not_judged_equivalent": [n for n in survivors if n not in equivalent],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    parts = [f"# Surviving mutants of ebmflow.{package}\n"]
    diffs = _diffs(work, survivors)
    for name in survivors:
        tag = f" (equivalent: {equivalent[name]})" if name in equivalent else ""
        parts.append(f"## {name}{tag}\n\n```diff\n{diffs[name].strip()}\n```\n")
    (out_dir / "survivors.md").write_text("\n".join(parts))
    return summary


def _equivalent(package: str) -> dict[str, str]:
    """Mutants judged equivalent, read from tools/mutation_equivalent.json."""
    path = ROOT / "tools" / "mutation_equivalent.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get(package, {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True, choices=sorted(PACKAGES))
    parser.add_argument("--tests", nargs="*", help="override the package's test files")
    parser.add_argument("--max-children", type=int, default=2, help="mutmut workers (at most 2)")
    parser.add_argument("--max-minutes", type=float, default=45.0, help="wall-clock cap of the run")
    parser.add_argument("--report-only", action="store_true", help="only re-read an earlier run")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an earlier run: test the mutants it did not reach "
                           "(with the current tests/)")
    mode.add_argument("--rerun-survivors", action="store_true",
                      help="re-test the earlier run's survivors not judged equivalent, and "
                           "its mutants without a covering test, with the current tests/")
    args = parser.parse_args(argv)
    out_dir = ROOT / "runs" / "mutation" / args.package
    work = out_dir / "work"
    rc = 0
    children = min(max(args.max_children, 1), 2)
    if args.resume or args.rerun_survivors:
        if not (work / "mutants").is_dir():
            parser.error(f"no earlier run in {work}")
        refresh_tests(work)
        names: list[str] = []
        if args.rerun_survivors:
            # survivors not judged equivalent, and mutants no test covered (tests added since
            # may cover them: mutmut collects coverage of new tests before it runs)
            names = report(args.package, out_dir)["survivors_not_judged_equivalent"]
            names += sorted(n for n, s in _statuses(work).items() if s == "no tests")
            if not names:
                print("no survivors to re-run")
        log = out_dir / ("mutmut-rerun.log" if args.rerun_survivors else "mutmut-resume.log")
        if names or args.resume:
            rc = run_mutmut(work, children, args.max_minutes, log, names)
            print(f"mutmut exited with {rc}; log: {log}")
    elif not args.report_only:
        tests = args.tests or _test_files(args.package)
        lay_out(args.package, work, tests)
        rc = run_mutmut(work, children, args.max_minutes, out_dir / "mutmut.log")
        print(f"mutmut exited with {rc}; log: {out_dir / 'mutmut.log'}")
    summary = report(args.package, out_dir)
    print(json.dumps({k: v for k, v in summary.items() if k != "survivors_not_judged_equivalent"},
                     indent=2))
    print(f"{len(summary['survivors_not_judged_equivalent'])} survivors not judged equivalent; "
          f"diffs in {out_dir / 'survivors.md'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
