"""GPU acceptance check: every CUDA test and the GPU benchmarks in one command (< 8 minutes).

    python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU

Runs, each under its own time limit, and records exit codes, wall times and the last lines of
output in one JSON (runs/benchmarks/gpu_check.json, and $OUT/gpu_check.json when the
environment variable OUT names a folder):

1. ``nvidia-smi`` and torch's view of the devices;
2. every ``cuda``-marked test (CUDA graphs = eager chains for every sampler, compiled chains on
   CUDA, fast-mode training with CD/PCD, AMP exactness, AIS through graphs);
3. ``benchmarks/compiled_samplers.py --device cuda``: plain loop, eager, compiled and
   CUDA-graph chains (ULA / MALA / HMC on a mixture and an MLP);
4. ``benchmarks/samplers.py`` and ``benchmarks/discrete_samplers.py`` on CUDA (graph vs eager
   vs plain), and ``discrete_samplers.py --small --compiled`` (compiled GWG, DMALA and Gibbs
   on the 32-bit MLP and the 10 x 10 Ising model against the plain loop);
5. ``benchmarks/training.py`` (Trainer steps against the plain loop; fast mode on CUDA);
6. data-parallel training with NCCL on all visible GPUs (``torchrun`` + ``ebmflow train``).

Nothing here needs network access. A step that fails does not stop the others.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "benchmarks"


def run(name: str, cmd: list[str], limit: int, results: dict) -> None:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as err:
        rc = 124
        text = ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes)
                else (err.stdout or "")) + f"\n[timed out after {limit} s]"
    wall = round(time.perf_counter() - t0, 1)
    tail = "\n".join(text.strip().splitlines()[-40:])
    print(tail, flush=True)
    print(f"== {name}: exit {rc} in {wall} s", flush=True)
    results[name] = {"cmd": cmd, "exit": rc, "wall_s": wall, "tail": tail}


def main() -> int:
    import torch

    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    n_gpu = torch.cuda.device_count()
    results["devices"] = [torch.cuda.get_device_name(i) for i in range(n_gpu)]
    results["torch"] = torch.__version__
    if shutil.which("nvidia-smi"):
        run("nvidia-smi", ["nvidia-smi"], 30, results)
    py = sys.executable
    run("cuda tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:xdist", "-x",
                       "--timeout=600"] if _has_timeout_plugin() else
        [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:xdist"], 120, results)
    run("compiled samplers (cuda)", [py, "benchmarks/compiled_samplers.py", "--device", "cuda",
                                     "--chains", "256", "65536", "--repeats", "5",
                                     "--out", str(RUNS / "compiled_samplers_cuda.json")],
        120, results)
    run("samplers (cuda)", [py, "benchmarks/samplers.py", "--device", "cuda", "--repeats", "5",
                            "--out", str(RUNS / "samplers_cuda.json")], 60, results)
    run("discrete samplers (cuda)", [py, "benchmarks/discrete_samplers.py", "--device", "cuda",
                                     "--repeats", "5",
                                     "--out", str(RUNS / "discrete_samplers_cuda.json")],
        60, results)
    run("compiled discrete samplers (cuda)",
        [py, "benchmarks/discrete_samplers.py", "--device", "cuda", "--small", "--compiled",
         "--samplers", "GWG", "DMALA", "Gibbs", "--batches", "128", "4096", "--repeats", "5",
         "--out", str(RUNS / "discrete_samplers_compiled_cuda.json")], 90, results)
    run("training (cuda)", [py, "benchmarks/training.py", "--device", "cuda",
                            "--out", str(RUNS / "training_cuda.json")], 60, results)
    torchrun = shutil.which("torchrun")
    if torchrun and n_gpu >= 1:
        run(f"data parallel ({n_gpu} GPU, NCCL)",
            [torchrun, f"--nproc_per_node={n_gpu}", "-m", "ebmflow.cli", "train", "--steps", "300",
             "--device", "cuda", "--out", str(ROOT / "runs" / "gpu_check_ddp"), "--overwrite"],
            60, results)
    for name in ("compiled_samplers_cuda", "samplers_cuda", "discrete_samplers_cuda",
                 "discrete_samplers_compiled_cuda", "training_cuda"):
        f = RUNS / f"{name}.json"
        if f.exists():
            results[f"{name}.json"] = json.loads(f.read_text())
    RUNS.mkdir(parents=True, exist_ok=True)
    dest = RUNS / "gpu_check.json"
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {dest}")
    if os.environ.get("OUT"):
        shutil.copy(dest, Path(os.environ["OUT"]) / "gpu_check.json")
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("exit", 0) != 0]
    print("failed steps:", failed or "none")
    return 1 if failed else 0


def _has_timeout_plugin() -> bool:
    import importlib.util

    return importlib.util.find_spec("pytest_timeout") is not None


if __name__ == "__main__":
    raise SystemExit(main())
