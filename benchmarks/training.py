"""Training-step speed: iterations per second of whole training steps, Trainer vs plain loop.

Workloads (2-D data, MLPEnergy with 3 hidden layers of 128, SiLU, Adam lr 1e-3):

* ``ed``: energy discrepancy, Gaussian perturbation t = 1, M = 4, w = 1; batch 128 and 4096;
* ``cd10``: contrastive divergence (alpha = 0.1), 10 Langevin steps (eta = 1e-3) from the data
  batch; batch 128.

Each is timed as

* ``plain``: a hand-written PyTorch loop doing the same math eagerly (random batch from a
  data tensor, loss, backward, Adam step with the same fused Adam kernel as the Trainer,
  ``ebmflow._optim.default_adam``);
* ``plain+graph`` (CUDA only): the same plain step captured as ONE CUDA graph and replayed;
* ``loop``: a hand-written loop calling the library's loss and sampler (separates the
  Trainer's own overhead from the losses' and samplers');
* ``trainer``: ``ebmflow.training.Trainer`` default (eager) mode with the library's loss and
  sampler (logging every 100 steps, progress bar off);
* ``trainer+fast`` (CUDA only): ``Trainer(fast=True)``, the whole step captured as a CUDA
  graph (falls back to eager, and says so, when a loss or sampler cannot be captured).

Ratios are to ``plain`` from the same run (and ``fast/graph`` to ``plain+graph``). Reported
number: median of ``--repeats`` timings (variants alternate within each repeat), of wall time
and of this thread's CPU time (robust to other jobs on a shared machine). Prints a table and writes
runs/benchmarks/training.json (``--update-reference``: benchmarks/results/training.json).

    python benchmarks/training.py --quick          # CPU, < 1 minute
    python benchmarks/training.py                  # CPU and, when present, CUDA
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
import warnings

import torch
from _output import add_output_arguments, output_path, write_json
from torch import nn

from ebmflow._optim import default_adam
from ebmflow.energy import MLPEnergy
from ebmflow.losses import ContrastiveDivergence, EnergyDiscrepancy, GaussianPerturbation
from ebmflow.samplers import Langevin
from ebmflow.spaces import Continuous
from ebmflow.training import Trainer

HIDDEN = (128, 128, 128)
M, T, ETA, CD_STEPS, ALPHA = 4, 1.0, 1e-3, 10, 0.1


def _net(device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = 2
    for h in HIDDEN:
        layers += [nn.Linear(width, h), nn.SiLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers).to(device)


# -- plain steps: the same math written the obvious way ---------------------------------------
def plain_ed_loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    y = x + math.sqrt(T) * torch.randn_like(x)
    neg = y[:, None, :] + math.sqrt(T) * torch.randn(b, M, 2, device=x.device)
    e = net(torch.cat([x, neg.reshape(b * M, 2)])).squeeze(-1)
    diff = e[:b, None] - e[b:].reshape(b, M)
    diff = torch.cat([torch.zeros(b, 1, device=x.device), diff], 1)  # log w = 0 for w = 1
    return torch.logsumexp(diff, 1).mean() - math.log(M)


def plain_cd_loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    xn = x.detach()
    for _ in range(CD_STEPS):
        xg = xn.requires_grad_(True)
        (g,) = torch.autograd.grad(net(xg).sum(), xg)
        xn = (xn.detach() - ETA * g + math.sqrt(2 * ETA) * torch.randn_like(xn)).detach()
    e = net(torch.cat([x, xn])).squeeze(-1)
    pos, neg = e[: x.shape[0]], e[x.shape[0]:]
    return pos.mean() - neg.mean() + ALPHA * (pos.square().mean() + neg.square().mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plain(kind: str, batch: int, data: torch.Tensor, n: int,
               graph: bool) -> tuple[float, float]:
    device = data.device
    net = _net(device)
    # the same optimiser kernel as the Trainer: fused Adam eagerly, capturable Adam in a graph
    opt = (torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True) if graph
           else default_adam(list(net.parameters()), 1e-3))
    loss_fn = plain_ed_loss if kind == "ed" else plain_cd_loss

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net, x).backward()
        opt.step()

    def batch_of() -> torch.Tensor:
        return data[torch.randint(0, data.shape[0], (batch,), device=device)]

    if graph:
        static = batch_of()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(static)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            loss_fn(net, static).backward()
            opt.step()

        def run() -> None:
            static.copy_(batch_of())
            g.replay()
    else:
        def run() -> None:
            step(batch_of())

    for _ in range(5):
        run()
    return _rate(run, n, device)


def _rate(run, n: int, device: torch.device) -> tuple[float, float]:
    """(it/s of wall time, it/s of this thread's CPU time) over ``n`` calls of ``run()``."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(n):
        run()
    _sync(device)
    return n / (time.perf_counter() - t0), n / max(time.thread_time() - c0, 1e-9)


def _library(kind: str, device: torch.device):
    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=HIDDEN, activation="silu").to(device)
    if kind == "ed":
        return energy, EnergyDiscrepancy(GaussianPerturbation(T), m=M), None
    return energy, ContrastiveDivergence(alpha=ALPHA, init="data"), Langevin(step_size=ETA, n_steps=CD_STEPS)


def time_library_loop(kind: str, batch: int, data: torch.Tensor, n: int) -> tuple[float, float]:
    device = data.device
    energy, loss, sampler = _library(kind, device)
    opt = default_adam(list(energy.parameters()), 1e-3)

    def run() -> None:
        x = data[torch.randint(0, data.shape[0], (batch,), device=device)]
        opt.zero_grad(set_to_none=True)
        loss(energy, x, sampler).loss.backward()
        opt.step()

    for _ in range(5):
        run()
    return _rate(run, n, device)


def time_trainer(kind: str, batch: int, data: torch.Tensor, n: int,
                 fast: bool) -> tuple[tuple[float, float], bool]:
    device = data.device
    energy, loss, sampler = _library(kind, device)
    trainer = Trainer(energy, loss, sampler=sampler, device=device, fast=fast, progress=False,
                      log_every=100, seed=0, threads=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(data, steps=10, batch_size=batch)  # warm-up (and capture in fast mode)
    fell_back = any("could not be captured" in str(w.message) for w in caught)
    wall, cpu = _rate(lambda: trainer.fit(data, steps=10 + n, batch_size=batch), 1, device)
    return (wall * n, cpu * n), fell_back  # one fit() call runs n steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU only, fewer steps (< 1 minute)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (3 with --quick)")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                        help="devices to time (default: CPU and, when present, CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.quick:
        devices.append(torch.device("cuda"))
    if args.device != "all":
        devices = [d for d in devices if d.type == args.device]
    workloads = [("ed", 128), ("ed", 4096), ("cd10", 128)]
    rows = []
    for device in devices:
        cuda = device.type == "cuda"
        gen = torch.Generator().manual_seed(0)
        data = (torch.randn(65536, 2, generator=gen) * 2.0).to(device)
        for kind, batch in workloads:
            if cuda:
                n = 300 if kind == "ed" else 100
            else:
                n = ((8 if batch > 1024 else 30 if kind == "cd10" else 100) if args.quick
                     else (100 if batch > 1024 or kind == "cd10" else 400))
            runs: dict[str, list[tuple[float, float]]] = {}
            notes = []
            variants = ["plain", "loop", "trainer"] + (["plain+graph", "trainer+fast"] if cuda else [])
            for _ in range(args.repeats):
                for v in variants:
                    if v == "loop":
                        r = time_library_loop(kind, batch, data, n)
                    elif v.startswith("plain"):
                        r = time_plain(kind, batch, data, n, graph=v == "plain+graph")
                    else:
                        r, fell = time_trainer(kind, batch, data, n, fast=v == "trainer+fast")
                        if fell and "fast mode fell back to eager" not in notes:
                            notes.append("fast mode fell back to eager")
                    runs.setdefault(v, []).append(r)
            best = {v: statistics.median(w for w, _ in r) for v, r in runs.items()}
            cpu = {v: statistics.median(c for _, c in r) for v, r in runs.items()}
            row = {"device": device.type, "workload": kind, "batch": batch, "it_per_s": best,
                   "cpu_it_per_s": cpu,
                   "trainer_vs_plain": best["trainer"] / best["plain"],
                   "trainer_vs_loop": best["trainer"] / best["loop"],
                   "loop_vs_plain": best["loop"] / best["plain"],
                   "cpu_trainer_vs_plain": cpu["trainer"] / cpu["plain"],
                   "cpu_loop_vs_plain": cpu["loop"] / cpu["plain"], "notes": notes}
            if cuda:
                row["fast_vs_graph"] = best["trainer+fast"] / best["plain+graph"]
            rows.append(row)
            print(f"{device.type:5s} {kind:5s} B={batch:5d} " + "  ".join(
                f"{k}={v:8.1f}" for k, v in best.items()) + f"  trainer/plain={row['trainer_vs_plain']:.3f}  trainer/loop={row['trainer_vs_loop']:.3f}"
                + f"  CPU time: loop/plain={row['cpu_loop_vs_plain']:.3f} trainer/plain={row['cpu_trainer_vs_plain']:.3f}"
                + (f"  fast/graph={row['fast_vs_graph']:.3f}" if cuda else "") + (f"  ({'; '.join(notes)})" if notes else ""),
                flush=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(), "quick": args.quick,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "repeats": args.repeats, "hidden": HIDDEN, "m": M, "cd_steps": CD_STEPS}
    out = write_json(output_path(args, "training"), {"meta": meta, "rows": rows})
    print("\n| device | workload | batch | plain it/s | library loop it/s | Trainer it/s | Trainer / plain | Trainer / loop | CPU time: loop / plain | CPU time: Trainer / plain |"
          + (" graph it/s | fast it/s | fast / graph |" if any(r["device"] == "cuda" for r in rows) else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if any(r["device"] == "cuda" for r in rows) else ""))
    for r in rows:
        s = r["it_per_s"]
        line = (f"| {r['device']} | {r['workload']} | {r['batch']} | {s['plain']:.1f} | "
                f"{s['loop']:.1f} | {s['trainer']:.1f} | {r['trainer_vs_plain']:.2f} | "
                f"{r['trainer_vs_loop']:.2f} | {r['cpu_loop_vs_plain']:.2f} | "
                f"{r['cpu_trainer_vs_plain']:.2f} |")
        if r["device"] == "cuda":
            line += f" {s['plain+graph']:.1f} | {s['trainer+fast']:.1f} | {r['fast_vs_graph']:.2f} |"
        print(line)
    print(f"\nwrote {out}")  # again below the table


if __name__ == "__main__":
    main()
