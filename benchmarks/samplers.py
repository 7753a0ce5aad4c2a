"""Sampler speed: steps per second of Langevin, MALA and HMC on an MLP energy.

Energy: MLPEnergy, 3 hidden layers of 256, SiLU. Grid: D in {2, 64, 784}, chains B in
{1024, 65536} (``--quick``: D in {2, 64}, B = 256, fewer steps, for CPU). For each sampler:

* ``plain``: a hand-written PyTorch loop doing the same update (autograd gradient, eager);
* ``ours``: ``ebmflow.samplers`` eager (``cuda_graph=False``);
* ``ours+graph`` (CUDA only): ``cuda_graph=True`` (K = ``--graph-steps`` steps per replay);
* ``torchebm`` (Langevin only, when torchebm is installed): its LangevinDynamics.

Ratios are to ``plain`` from the same run (medians of ``--repeats`` interleaved timings), both
of wall time and of this thread's CPU time (robust to other jobs on a shared machine). HMC counts one HMC transition (L = 5 leapfrog
steps) as a step. Prints a table and writes runs/benchmarks/samplers.json (``--update-reference``: benchmarks/results/samplers.json).

    python benchmarks/samplers.py --quick          # CPU, < 1 minute
    python benchmarks/samplers.py                  # full grid (use a GPU)
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
from _output import add_output_arguments, output_path, write_json

from ebmflow.energy import MLPEnergy
from ebmflow.samplers import HMC, MALA, Langevin
from ebmflow.spaces import Continuous

ETA, HMC_EPS, HMC_L = 1e-3, 1e-2, 5


# -- plain loops: the same math, written the obvious way -------------------------------------
def _grad(net, x):
    xg = x.detach().requires_grad_(True)
    e = net(xg).squeeze(-1)
    (g,) = torch.autograd.grad(e.sum(), xg)
    return e.detach(), g


def plain_langevin(net, x, n, gen):
    for _ in range(n):
        _, g = _grad(net, x)
        x = x - ETA * g + math.sqrt(2 * ETA) * torch.randn(x.shape, generator=gen, device=x.device)
    return x


def plain_mala(net, x, n, gen):
    e, g = _grad(net, x)
    for _ in range(n):
        xi = torch.randn(x.shape, generator=gen, device=x.device)
        y = x - ETA * g + math.sqrt(2 * ETA) * xi
        ey, gy = _grad(net, y)
        log_a = e - ey - ((x - y + ETA * gy) ** 2).sum(1) / (4 * ETA) + 0.5 * (xi**2).sum(1)
        acc = torch.rand(x.shape[0], generator=gen, device=x.device).log() < log_a
        x = torch.where(acc[:, None], y, x)
        e = torch.where(acc, ey, e)
        g = torch.where(acc[:, None], gy, g)
    return x


def plain_hmc(net, x, n, gen):
    e, g = _grad(net, x)
    for _ in range(n):
        p = torch.randn(x.shape, generator=gen, device=x.device)
        h0 = e + 0.5 * (p**2).sum(1)
        y, pn = x, p - 0.5 * HMC_EPS * g
        for i in range(HMC_L):
            y = y + HMC_EPS * pn
            ey, gy = _grad(net, y)
            pn = pn - (0.5 if i == HMC_L - 1 else 1.0) * HMC_EPS * gy
        acc = torch.rand(x.shape[0], generator=gen, device=x.device).log() < h0 - ey - 0.5 * (pn**2).sum(1)
        x = torch.where(acc[:, None], y, x)
        e = torch.where(acc, ey, e)
        g = torch.where(acc[:, None], gy, g)
    return x


PLAIN = {"Langevin": plain_langevin, "MALA": plain_mala, "HMC": plain_hmc}


def make_ours(name, graph, k):
    kw = {"cuda_graph": graph, "graph_steps": k}
    if name == "Langevin":
        return Langevin(ETA, **kw)
    if name == "MALA":
        return MALA(ETA, **kw)
    return HMC(HMC_EPS, n_leapfrog=HMC_L, **kw)


def torchebm_runner(energy, step_size: float = ETA):
    """torchebm's LangevinDynamics when installed (API of 0.8.x), else None: ``run(x, n,
    gen)``. Its update is x - step grad E + sqrt(2 step) * noise_scale * xi, so
    ``noise_scale=1`` is ULA with step size ``step_size`` (the same chain as ours)."""
    try:
        import torchebm  # noqa: F401
        from torchebm.core import BaseModel
        from torchebm.samplers import LangevinDynamics
    except Exception:
        return None

    class Wrapped(BaseModel):
        def __init__(self):
            super().__init__()
            self.inner = energy

        def forward(self, x):
            return self.inner(x)

    try:
        sampler = LangevinDynamics(model=Wrapped(), step_size=step_size, noise_scale=1.0)
    except Exception:
        return None

    def run(x, n, gen):
        return sampler.sample(x=x, n_steps=n)

    return run


def timed(fn, device):
    """(wall seconds, thread CPU seconds) of one call of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.thread_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.thread_time() - c


def timed_interleaved(fns, device, repeats):
    """Median (wall, CPU) seconds per variant; variants alternate within each repeat, so a
    slow phase of a shared machine hits all of them alike. CPU time (this thread only) is
    what the work itself costs, whatever else runs on the machine. A variant that raises is
    skipped (reported)."""
    times = {k: [] for k in fns}
    for k, fn in list(fns.items()):  # warm-up (and CUDA-graph recording)
        try:
            fn()
        except Exception as err:
            print(f"{k} skipped: {type(err).__name__}: {err}")
            del times[k]
    for _ in range(repeats):
        for k in times:
            times[k].append(timed(fns[k], device))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CPU grid (< 1 minute)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="chain steps per timed run")
    ap.add_argument("--graph-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=None, help="default 15 (--quick) / 5")
    ap.add_argument("--dims", type=int, nargs="*", default=None, help="override the D grid")
    ap.add_argument("--batches", type=int, nargs="*", default=None, help="override the B grid")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --quick)")
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    dims, batches = ((2, 64), (256,)) if args.quick else ((2, 64, 784), (1024, 65536))
    dims, batches = args.dims or dims, args.batches or batches
    repeats = args.repeats or (15 if args.quick else 5)
    steps = args.steps or (20 if args.quick else 100)
    rows = []
    for d in dims:
        for b in batches:
            torch.manual_seed(0)
            energy = MLPEnergy(Continuous(d), hidden=(256, 256, 256)).to(device)
            x0 = torch.randn(b, d, device=device)
            for name in ("Langevin", "MALA", "HMC"):
                n = max(2, steps // HMC_L) if name == "HMC" else steps
                gen = torch.Generator(device=device).manual_seed(0)
                fns = {"plain": lambda f=PLAIN[name], e=energy, x=x0, n=n, g=gen: f(e.net, x, n, g)}
                s = make_ours(name, False, args.graph_steps)
                fns["ours"] = lambda s=s, e=energy, x=x0, n=n, g=gen: s.run(e, x, n, generator=g)
                if device.type == "cuda":
                    sg = make_ours(name, True, min(args.graph_steps, n))
                    fns["ours+graph"] = lambda s=sg, e=energy, x=x0, n=n, g=gen: s.run(e, x, n, generator=g)
                tebm = torchebm_runner(energy) if name == "Langevin" else None
                if tebm is not None:
                    fns["torchebm"] = lambda t=tebm, x=x0, n=n, g=gen: t(x, n, g)
                res = timed_interleaved(fns, device, repeats)
                for variant, (sec, cpu) in res.items():
                    rows.append({"sampler": name, "D": d, "B": b, "variant": variant, "steps": n,
                                 "seconds": sec, "cpu_seconds": cpu, "steps_per_s": n / sec,
                                 "ratio_vs_plain": res["plain"][0] / sec,
                                 "cpu_ratio_vs_plain": res["plain"][1] / cpu})
    header = (f"{'sampler':9} {'D':>4} {'B':>6} {'variant':11} {'steps/s':>10} {'x plain':>8} "
              f"{'x plain (CPU time)':>18}")
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['sampler']:9} {r['D']:>4} {r['B']:>6} {r['variant']:11} "
              f"{r['steps_per_s']:>10.1f} {r['ratio_vs_plain']:>8.2f} {r['cpu_ratio_vs_plain']:>18.2f}")
    meta = {"device": str(device), "torch": torch.__version__, "quick": args.quick,
            "threads": torch.get_num_threads(), "eta": ETA, "hmc_eps": HMC_EPS, "hmc_L": HMC_L,
            "graph_steps": args.graph_steps, "repeats": repeats, "statistic": "median"}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    write_json(output_path(args, "samplers"), {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
