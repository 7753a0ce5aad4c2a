"""The ``ebmflow`` command: ``train``, ``sample``, ``evaluate`` and ``bench``.

``ebmflow train`` trains an energy on a built-in 2-D toy data set (no download) and writes
``metrics.json``, ``samples.png``, ``energy.png``, ``checkpoint.pt`` and ``log.jsonl`` into the
output folder. Settings come from defaults, then ``--config FILE.toml``, then flags.
Errors print one line (``ebmflow: error: ...``) and exit non-zero; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

OUTPUT_FILES = ("metrics.json", "samples.png", "energy.png", "checkpoint.pt", "log.jsonl")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file {str(path)!r} does not exist")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise CLIError(f"config file {str(path)!r} is not valid TOML: {err}") from None


def _load_toml(path: str) -> dict[str, Any]:
    return _train_settings(_read_toml(path), path)


def load_example_settings(path: str | Path) -> dict[str, Any]:
    """The ``[example]`` table of a config file: an example script's own settings.

    Every file in ``examples/configs/`` holds ``[train]`` (what ``ebmflow train --config`` runs)
    and ``[example]`` (what the script of the same name reads); see docs/cli.md. Raises
    ``SystemExit`` with one line when the file is missing, is not TOML or has no ``[example]``.
    """
    try:
        raw = _read_toml(path)
    except CLIError as err:
        raise SystemExit(str(err)) from None
    table = raw.get("example")
    if not isinstance(table, dict):
        raise SystemExit(f"{path}: no [example] table with this script's settings (docs/cli.md)")
    return table


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def _train_settings(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """The ``ebmflow train`` settings of a parsed TOML file.

    Settings sit under ``[train]`` (or, for short files, at the top level). ``[example]`` and
    its sub-tables (``[example.<part>]``) belong to the example scripts and are ignored here;
    any other table, and any key that is not a setting, is an error (nothing is silently
    dropped).
    """
    from .training.registry import RunConfig

    tables = sorted(k for k, v in raw.items() if _is_table(v) and k not in ("train", "example"))
    if tables:
        raise CLIError(
            f"config file {path!r} has unknown table(s) {', '.join(f'[{t}]' for t in tables)}; "
            "`ebmflow train` reads [train] (settings) and ignores [example] (example scripts)"
        )
    train = raw.get("train", {})
    if not isinstance(train, dict):
        raise CLIError(f"config file {path!r}: 'train' must be a table [train], got {train!r}")
    values = {k.replace("-", "_"): v for k, v in train.items()}
    top = {k.replace("-", "_"): v for k, v in raw.items() if not _is_table(v)}
    known = set(RunConfig.keys())
    for where, keys in (("[train]", values), ("the top level", top)):
        unknown = sorted(set(keys) - known)
        if unknown:
            raise CLIError(
                f"config file {path!r}: unknown key(s) {', '.join(unknown)} in {where}; valid "
                f"keys: {', '.join(sorted(known))} (example-script settings go under [example])"
            )
    values.update(top)
    return values


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .training.registry import ENCODINGS, LOSSES, SAMPLERS

    p.add_argument("--config", help="TOML file with any of the settings below (flags override it)")
    p.add_argument("--data", help="toy data set (default 8gaussians); see --list")
    p.add_argument("--encoding", help=f"none (2-D continuous, default) or gray (32-bit binary); {ENCODINGS}")
    p.add_argument("--loss", help=f"one of {', '.join(LOSSES)} (default ed)")
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default mala / gibbs for binary)")
    p.add_argument("--steps", type=int, help="optimiser steps (default 6000, about a minute on a laptop CPU)")
    p.add_argument("--batch", type=int, help="batch size (default 128)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    p.add_argument("--hidden", type=lambda s: [int(h) for h in s.split(",")],
                   help="hidden widths of the MLP energy, e.g. 128,128,128")
    p.add_argument("--ema", type=float, help="EMA decay of the evaluated energy (default 0.99)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default 1: small models run fastest single-threaded, "
                        "and many times slower multi-threaded on busy cores)")
    p.add_argument("--sampler-steps", dest="sampler_steps", type=int,
                   help="MCMC steps per training step for cd/pcd (default 10)")
    p.add_argument("--eval-steps", dest="eval_steps", type=int,
                   help="MCMC steps for evaluation samples (default 300)")
    p.add_argument("--eval-samples", dest="eval_samples", type=int,
                   help="number of evaluation samples (default 2000)")
    p.add_argument("--out", default=None, help="output folder (default runs/<data>-<loss>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only errors")
    p.add_argument("--list", action="store_true", help="list data sets, losses and samplers and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebmflow",
        description="Train, sample and evaluate energy-based models on built-in toy data.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,evaluate,bench}")
    train = sub.add_parser("train", help="train an energy and write metrics, figures and a checkpoint")
    _add_train_args(train)
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    sample = sub.add_parser("sample", help="draw samples from a trained checkpoint")
    sample.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run")
    sample.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    sample.add_argument("--steps", type=int, help="MCMC steps (default: the run's eval_steps)")
    sample.add_argument("--out", help="output file: .pt, .csv or .png (default <run>/samples.pt)")
    sample.add_argument("--seed", type=int, default=1)
    sample.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    ev = sub.add_parser("evaluate", help="MMD, NLL and mode weights of a trained checkpoint")
    ev.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run")
    ev.add_argument("--n", type=int, help="number of samples (default: the run's eval_samples)")
    ev.add_argument("--out", help="also write the metrics to this JSON file")
    ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    bench = sub.add_parser("bench", help="run benchmarks/*.py and print their tables")
    bench.add_argument("--path", help="the benchmarks folder (default: found from the repository)")
    bench.add_argument("--full", action="store_true", help="full runs instead of --quick")
    bench.add_argument("--only", nargs="*", help="names of benchmarks to run (default all)")
    bench.add_argument("--update-reference", dest="update_reference", action="store_true",
                       help="write the reference results in benchmarks/results/ (default: "
                            "runs/benchmarks/, which git ignores)")
    bench.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(_subparsers={"train": train, "sample": sample, "evaluate": ev, "bench": bench})
    return parser


# -- train ------------------------------------------------------------------------------------
def _resolve_config(args: argparse.Namespace) -> Any:
    from .training.registry import RunConfig, check_config

    values: dict[str, Any] = {}
    if args.config:
        values.update(_load_toml(args.config))
    for key in RunConfig.keys():
        flag = getattr(args, key, None)
        if flag is not None:
            values[key] = flag
    cfg = RunConfig.from_dict(values, source=args.config or "flags")
    return check_config(cfg)


def _prepare_out(args: argparse.Namespace, cfg: Any) -> tuple[Path, bool]:
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.data}-{cfg.loss}"
    if out.exists() and not out.is_dir():
        raise CLIError(f"output path {str(out)!r} exists and is not a folder")
    exists = out.is_dir() and any(out.iterdir())
    if exists and args.overwrite and args.resume:
        raise CLIError("pass --overwrite or --resume, not both")
    if exists and args.overwrite:
        for name in (*OUTPUT_FILES, "config.toml", "tensorboard"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return out, False
    if exists and args.resume:
        if not (out / "checkpoint.pt").is_file():
            raise CLIError(f"--resume: {str(out)!r} has no checkpoint.pt to continue from")
        return out, True
    if exists:
        raise CLIError(
            f"output folder {str(out)!r} already exists; pass --resume to continue that run or "
            "--overwrite to replace it (or choose another --out)"
        )
    if args.resume:
        raise CLIError(f"--resume: output folder {str(out)!r} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    return out, False


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _config_from_checkpoint_resume(out: Path, cfg: Any) -> Any:
    """On --resume, the saved run's settings win except for ``steps`` (to extend a run)."""
    from .training.checkpoint import load_checkpoint
    from .training.registry import RunConfig, check_config

    saved = load_checkpoint(out / "checkpoint.pt").get("config") or {}
    if not saved:
        return cfg
    merged = RunConfig.from_dict(saved, source=str(out / "checkpoint.pt"))
    merged.steps = cfg.steps
    return check_config(merged)


def cmd_train(args: argparse.Namespace) -> int:
    if args.list:
        return _list_components()
    cfg = _resolve_config(args)
    out, resume = _prepare_out(args, cfg)
    if resume:
        cfg = _config_from_checkpoint_resume(out, cfg)
    import torch

    from .training import Trainer
    from .training.baselines import baseline_warning, trivial_baseline
    from .training.evaluation import draw_samples, evaluate_model, write_figures
    from .training.registry import (
        build_data,
        build_energy,
        build_eval_sampler,
        build_loss,
        build_sampler,
    )

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    train, test, train2d, test2d = build_data(cfg)
    energy = build_energy(cfg)
    loss = build_loss(cfg)
    sampler = build_sampler(cfg)
    trainer = Trainer(
        energy, loss, sampler=sampler, lr=cfg.lr, ema=cfg.ema, grad_clip=cfg.grad_clip,
        device=cfg.device, amp=cfg.amp, compile=cfg.compile, fast=cfg.fast, out_dir=out,
        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, quiet=args.quiet,
        seed=cfg.seed, config=cfg.to_dict(),
    )
    t0 = time.perf_counter()
    trainer.fit(train, steps=cfg.steps, batch_size=cfg.batch, resume=resume)
    train_seconds = time.perf_counter() - t0
    eval_energy = trainer.eval_energy
    sampler_eval = build_eval_sampler(cfg, trainer.sampler).to(trainer.device)
    t1 = time.perf_counter()
    samples = draw_samples(cfg, eval_energy, sampler_eval, train2d, cfg.eval_samples)
    metrics: dict[str, Any] = {"steps": trainer.step}
    metrics.update(evaluate_model(cfg, eval_energy, samples, test, test2d))
    metrics.update(trivial_baseline(cfg.encoding, train, test, train2d, test2d))
    metrics["train_seconds"] = round(train_seconds, 2)
    metrics["eval_seconds"] = round(time.perf_counter() - t1, 2)
    last = next((r for r in reversed(trainer.history) if "loss" in r), {})
    if "loss" in last:
        metrics["final_loss"] = last["loss"]
    acc = sampler_eval.stats.get("accept_rate") if hasattr(sampler_eval, "stats") else None
    if acc is not None:
        metrics["eval_accept_rate"] = float(acc)
    metrics["config"] = {k: v for k, v in cfg.to_dict().items() if v is not None}
    _write_json(out / "metrics.json", metrics)
    write_figures(cfg, eval_energy, samples, test2d, out)
    if not args.quiet:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float) and k in ("mmd", "nll", "nll_baseline", "nll_true", "mode_tv"))
        print(f"trained {cfg.loss} on {cfg.data} for {trainer.step} steps in {train_seconds:.1f}s: "
              f"{shown} (baseline: {metrics['baseline']})\nwrote {', '.join(OUTPUT_FILES)} to {out}")
    warning = baseline_warning(metrics)
    if warning is not None:
        print(f"ebmflow: warning: {warning}", file=sys.stderr)
    return 0


def _list_components() -> int:
    from .training.registry import ENCODINGS, LOSSES, SAMPLERS, dataset_names

    print("data sets: " + ", ".join(dataset_names()))
    print("encodings: " + ", ".join(ENCODINGS))
    print("losses:    " + ", ".join(f"{k} ({v})" for k, v in LOSSES.items()))
    print("samplers:  " + ", ".join(SAMPLERS))
    return 0


# -- sample / evaluate --------------------------------------------------------------------------
def _load_run(checkpoint: str) -> tuple[Any, Any, Any]:
    """Config, energy (EMA weights when saved) and the trained sampler of a checkpoint."""
    from .training.checkpoint import load_checkpoint, load_module_state
    from .training.loading import load_energy
    from .training.registry import RunConfig, build_energy, build_sampler, check_config

    ckpt = load_checkpoint(checkpoint)
    if not ckpt.get("config"):
        raise CLIError(f"{checkpoint!r} has no run settings (was it written by `ebmflow train`?)")
    cfg = check_config(RunConfig.from_dict(ckpt["config"], source=checkpoint))
    cfg.device = "cpu"
    if cfg.threads:
        import torch

        torch.set_num_threads(int(cfg.threads))
    energy = load_energy(checkpoint, energy=build_energy(cfg))
    sampler = build_sampler(cfg)
    if sampler is not None and ckpt.get("sampler"):
        load_module_state(sampler, ckpt["sampler"], "sampler")
    return cfg, energy, sampler


def _run_data(cfg: Any) -> tuple[Any, Any, Any, Any]:
    from .training.registry import build_data

    return build_data(cfg)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .training.evaluation import draw_samples, to_points
    from .training.registry import build_eval_sampler

    if args.n < 1:
        raise CLIError(f"--n must be a positive integer, got {args.n}")
    cfg, energy, sampler = _load_run(args.checkpoint)
    if args.steps is not None:
        cfg.eval_steps = args.steps
    _, _, train2d, test2d = _run_data(cfg)
    x = draw_samples(cfg, energy, build_eval_sampler(cfg, sampler), train2d, args.n, seed=args.seed)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "samples.pt"
    if out.suffix == ".pt":
        torch.save(x.cpu(), out)
    elif out.suffix == ".csv":
        import numpy as np

        np.savetxt(out, x.cpu().numpy(), delimiter=",", fmt="%.6g")
    elif out.suffix == ".png":
        from .training.plots import plot_samples

        plot_samples(to_points(cfg, x), out, data=test2d[: args.n])
    else:
        raise CLIError(f"--out must end in .pt, .csv or .png, got {str(out)!r}")
    print(f"wrote {x.shape[0]} samples of shape {tuple(x.shape[1:])} to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .training.baselines import trivial_baseline
    from .training.evaluation import draw_samples, evaluate_model
    from .training.registry import build_eval_sampler

    cfg, energy, sampler = _load_run(args.checkpoint)
    train, test, train2d, test2d = _run_data(cfg)
    n = args.n or cfg.eval_samples
    samples = draw_samples(cfg, energy, build_eval_sampler(cfg, sampler), train2d, n)
    metrics = evaluate_model(cfg, energy, samples, test, test2d)
    metrics.update(trivial_baseline(cfg.encoding, train, test, train2d, test2d))
    text = json.dumps(_rounded(metrics), indent=2)
    print(text)
    if args.out:
        _write_json(Path(args.out), metrics)
        print(f"wrote {args.out}")
    return 0


def _rounded(obj: Any, digits: int = 4) -> Any:
    """``obj`` with every float rounded to ``digits`` significant digits (for printing)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


# -- bench -----------------------------------------------------------------------------------
def find_benchmarks(path: str | None) -> Path:
    """The benchmarks folder: ``path``, else ``./benchmarks`` or the repository's (editable
    installs) next to ``src/``."""
    if path is not None:
        p = Path(path)
        if not (p / "run_all.py").is_file():
            raise CLIError(f"--path {path!r} has no run_all.py; point it at the repository's benchmarks/")
        return p
    candidates = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
    for c in candidates:
        if (c / "run_all.py").is_file():
            return c
    raise CLIError(
        "benchmarks/ not found (it lives in the source repository, not in the installed package); "
        "run from a clone of the repository or pass --path /path/to/ebmflow/benchmarks"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    folder = find_benchmarks(args.path)
    cmd = [sys.executable, str(folder / "run_all.py")]
    if not args.full:
        cmd.append("--quick")
    if args.only:
        cmd += ["--only", *args.only]
    if args.update_reference:
        cmd.append("--update-reference")
    return subprocess.call(cmd)


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ebmflow`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # an unknown flag: show the usage of the command it was given to
        sub = args._subparsers.get(args.command) if args.command else None
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("ebmflow: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line unless --debug
        if args.debug:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        ours = type(err).__module__.startswith("ebmflow")
        if not (ours or isinstance(err, (ValueError, FileNotFoundError, FloatingPointError))):
            msg = f"{type(err).__name__}: {msg}"
        print(f"ebmflow: error: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        usage = isinstance(err, (CLIError, ValueError)) or (ours and not isinstance(err, FloatingPointError))
        return 2 if usage else 1


if __name__ == "__main__":
    sys.exit(main())
