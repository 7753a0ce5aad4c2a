"""Discrete sampler speed: GWG, DULA, DMALA and Gibbs against plain PyTorch loops.

Targets: a binary ``MLPEnergy`` on D = 784 bits (3 hidden layers of 256, SiLU) and a 32 x 32
periodic lattice ``IsingEnergy`` (D = 1024, sigma = 0.2); chains B in {128, 4096}
(``--quick``: B = 128 only, few steps, for CPU). For each sampler:

* ``plain``: a hand-written PyTorch loop doing the same update on the same energy function
  (autograd gradient, eager, cached E and gradient of the current state where ours caches).
  On the Ising target the plain Gibbs loops use the local field (O(D) per coordinate), as
  ours does there; the gradient samplers' plain loops take the autograd gradient of the
  energy while ours uses the closed form ``energy_and_grad`` (both O(D^2));
* ``ours``: ``ebmflow.samplers`` eager (``cuda_graph=False``);
* ``ours+graph`` (CUDA only): ``cuda_graph=True`` (``--graph-steps`` steps per replay);
* with ``--compiled``: ``ours+compiled`` (``compile=True``) and ``1 eval/step``, the same
  number of energy evaluations alone (``energy_and_grad`` for the gradient samplers,
  ``energy`` for Gibbs; not for Gibbs on the Ising model, which needs none). Its ratio to
  ``plain`` bounds what any implementation evaluating the energy once per step could gain
  over the plain loop on this machine.

Samplers: ``GWG`` (GibbsWithGradients, one proposed flip + MH per step), ``DULA`` and
``DMALA`` (step size 0.1; all coordinates proposed in parallel each step), ``Gibbs`` (random
scan: one coordinate per chain per step) and ``Gibbs-sweep`` (systematic: D coordinate updates
per step). ``sweeps/s`` counts D single-coordinate updates as one sweep: a GWG or random-scan
Gibbs step is 1/D sweep, a DULA/DMALA or Gibbs-sweep step is one sweep. Ratios are to
``plain`` from the same run (variants interleaved, median of ``--repeats``), of wall time and
of this thread's CPU time (robust to other jobs on a shared machine). Prints a table and
writes runs/benchmarks/discrete_samplers.json (``--update-reference``: benchmarks/results/discrete_samplers.json).

    python benchmarks/discrete_samplers.py --quick     # CPU, about a minute on an idle core
    python benchmarks/discrete_samplers.py             # full grid (use a GPU)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from _output import add_output_arguments, output_path, write_json
from torch.nn.functional import logsigmoid

from ebmflow.energy import IsingEnergy, MLPEnergy
from ebmflow.samplers import DiscreteLangevin, Gibbs, GibbsWithGradients
from ebmflow.spaces import Binary

ALPHA = 0.1


# -- plain loops: the same math, written the obvious way -------------------------------------
def _grad(f, x):
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        e = f(xg)
        (g,) = torch.autograd.grad(e.sum(), xg)
    return e.detach(), g


def plain_gwg(f, x, n, gen):
    e, g = _grad(f, x)
    for _ in range(n):
        lq = torch.log_softmax(-(1 - 2 * x) * g / 2, 1)
        u = torch.rand(lq.shape, generator=gen, device=x.device)
        i = (lq - torch.log(-torch.log(u))).argmax(1, keepdim=True)
        y = x.scatter(1, i, 1 - x.gather(1, i))
        ey, gy = _grad(f, y)
        lq_rev = torch.log_softmax(-(1 - 2 * y) * gy / 2, 1)
        log_a = e - ey + lq_rev.gather(1, i)[:, 0] - lq.gather(1, i)[:, 0]
        acc = torch.rand(x.shape[0], generator=gen, device=x.device).log() < log_a
        x = torch.where(acc[:, None], y, x)
        e = torch.where(acc, ey, e)
        g = torch.where(acc[:, None], gy, g)
    return x


def _plain_dlangevin(f, x, n, gen, metropolis):
    e, g = _grad(f, x)
    for _ in range(n):
        logit = -(1 - 2 * x) * g / 2 - 1 / (2 * ALPHA)
        flip = torch.rand(x.shape, generator=gen, device=x.device).log() < logsigmoid(logit)
        y = torch.where(flip, 1 - x, x)
        ey, gy = _grad(f, y)
        if metropolis:
            logit_r = -(1 - 2 * y) * gy / 2 - 1 / (2 * ALPHA)
            fwd = torch.where(flip, logsigmoid(logit), logsigmoid(-logit)).sum(1)
            rev = torch.where(flip, logsigmoid(logit_r), logsigmoid(-logit_r)).sum(1)
            log_a = e - ey + rev - fwd
            acc = torch.rand(x.shape[0], generator=gen, device=x.device).log() < log_a
            x = torch.where(acc[:, None], y, x)
            e = torch.where(acc, ey, e)
            g = torch.where(acc[:, None], gy, g)
        else:
            x, e, g = y, ey, gy
    return x


def plain_dula(f, x, n, gen):
    return _plain_dlangevin(f, x, n, gen, False)


def plain_dmala(f, x, n, gen):
    return _plain_dlangevin(f, x, n, gen, True)


def _plain_gibbs_update(f, x, e, i, gen):
    """Resample bit i (B, 1) of every chain from its exact conditional (E(x) cached)."""
    y = x.scatter(1, i, 1 - x.gather(1, i))
    ey = f(y)
    flip = torch.rand(x.shape[0], generator=gen, device=x.device).log() < logsigmoid(e - ey)
    return torch.where(flip[:, None], y, x), torch.where(flip, ey, e)


@torch.no_grad()
def plain_gibbs(f, x, n, gen):
    e = f(x)
    for _ in range(n):
        i = torch.randint(0, x.shape[1], (x.shape[0], 1), generator=gen, device=x.device)
        x, e = _plain_gibbs_update(f, x, e, i, gen)
    return x


@torch.no_grad()
def plain_gibbs_sweep(f, x, n, gen):
    e = f(x)
    for _ in range(n):
        for j in range(x.shape[1]):
            i = torch.full((x.shape[0], 1), j, device=x.device, dtype=torch.long)
            x, e = _plain_gibbs_update(f, x, e, i, gen)
    return x


def _plain_ising_gibbs_update(coupling, bias, x, i, gen):
    """Resample bit i (B, 1) from its exact conditional by the local field: with s = 2x - 1
    and E = -(s^T J s + b^T s), flipping s_i changes E by 2 s_i (2 (J s)_i + b_i), O(D)."""
    s = 2.0 * x - 1.0
    s_i = s.gather(1, i).squeeze(1)
    field = (coupling[i.squeeze(1)] * s).sum(1)
    delta = 2.0 * s_i * (2.0 * field + bias[i.squeeze(1)])  # E(flip_i x) - E(x)
    flip = torch.rand(x.shape[0], generator=gen, device=x.device).log() < logsigmoid(-delta)
    return torch.where(flip[:, None], x.scatter(1, i, 1 - x.gather(1, i)), x)


@torch.no_grad()
def plain_gibbs_ising(energy, x, n, gen):
    coupling, bias = energy.coupling, energy.bias
    for _ in range(n):
        i = torch.randint(0, x.shape[1], (x.shape[0], 1), generator=gen, device=x.device)
        x = _plain_ising_gibbs_update(coupling, bias, x, i, gen)
    return x


@torch.no_grad()
def plain_gibbs_sweep_ising(energy, x, n, gen):
    coupling, bias = energy.coupling, energy.bias
    for _ in range(n):
        for j in range(x.shape[1]):
            i = torch.full((x.shape[0], 1), j, device=x.device, dtype=torch.long)
            x = _plain_ising_gibbs_update(coupling, bias, x, i, gen)
    return x


# plain Gibbs on the Ising target uses the local field too, as ebmflow's Gibbs does there
PLAIN_ISING = {"Gibbs": plain_gibbs_ising, "Gibbs-sweep": plain_gibbs_sweep_ising}
PLAIN = {"GWG": plain_gwg, "DULA": plain_dula, "DMALA": plain_dmala, "Gibbs": plain_gibbs,
         "Gibbs-sweep": plain_gibbs_sweep}
SWEEPS_PER_STEP = {"GWG": "1/D", "DULA": 1, "DMALA": 1, "Gibbs": "1/D", "Gibbs-sweep": 1}


def evaluations(energy, x, n: int, grad: bool) -> None:
    """``n`` evaluations of the energy (and its gradient) at ``x``: the work that a sampler
    doing one evaluation per step cannot avoid. Its steps/s over the plain loop's bounds the
    speed-up of any such implementation, however little else it does."""
    for _ in range(n):
        if grad:
            energy.energy_and_grad(x)
        else:
            with torch.no_grad():
                energy.energy(x)


def make_ours(name: str, graph: bool, k: int | None, compiled: bool = False):
    kw = {"cuda_graph": graph, "graph_steps": k, "compile": compiled}
    if name == "GWG":
        return GibbsWithGradients(**kw)
    if name in ("DULA", "DMALA"):
        return DiscreteLangevin(ALPHA, metropolis=name == "DMALA", **kw)
    return Gibbs(sweep=name == "Gibbs-sweep", **kw)


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, thread CPU seconds) of one call of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.thread_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.thread_time() - c


WARMUP: dict[str, float] = {}  # warm-up seconds of the last timed_interleaved call


def timed_interleaved(fns: dict, device, repeats: int) -> dict:
    """Median (wall, CPU) seconds per variant; variants alternate within each repeat (fair on
    a shared machine; CPU time of this thread is robust to other jobs). A variant that fails
    in warm-up is skipped and reported."""
    times: dict = {}
    for k, fn in fns.items():
        try:
            t0 = time.perf_counter()
            fn()  # warm-up (CUDA-graph recording, compiling)
            WARMUP[k] = time.perf_counter() - t0
            times[k] = []
        except Exception as err:  # noqa: BLE001
            print(f"{k} skipped: {type(err).__name__}: {err}")
    for _ in range(repeats):
        for k in times:
            times[k].append(timed(fns[k], device))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for k, v in times.items()}


def targets(device, small: bool = False):
    torch.manual_seed(0)
    if small:  # the compiled executor's targets: small states, per-step overhead dominates
        return {"MLP-32": MLPEnergy(Binary(32), hidden=(256, 256)).to(device),
                "Ising-10x10": IsingEnergy.lattice(10, 0.2).to(device)}
    mlp = MLPEnergy(Binary(784), hidden=(256, 256, 256)).to(device)
    ising = IsingEnergy.lattice(32, 0.2).to(device)
    return {"MLP-784": mlp, "Ising-32x32": ising}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, B = 128, few steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed run (not sweeps)")
    ap.add_argument("--graph-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 with --quick)")
    ap.add_argument("--samplers", nargs="*", default=None, choices=list(PLAIN),
                    help="default: all (--quick: all but Gibbs-sweep, D energy calls per step)")
    ap.add_argument("--compiled", action="store_true",
                    help="also time compile=True (blocks of compiled steps; warm-up apart) "
                         "and the energy evaluations alone")
    ap.add_argument("--small", action="store_true",
                    help="targets MLP on 32 bits (2 x 256) and a 10 x 10 Ising model")
    ap.add_argument("--batches", type=int, nargs="*", default=None, help="override B")
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    batches = tuple(args.batches) if args.batches else ((128,) if args.quick else (128, 4096))
    steps = args.steps or (15 if args.quick else 200)
    samplers = args.samplers or [k for k in PLAIN if not (args.quick and k == "Gibbs-sweep")]
    repeats = args.repeats or 5
    rows = []
    for tname, energy in targets(device, args.small).items():
        d = energy.space.dim
        for b in batches:
            gen0 = torch.Generator(device=device).manual_seed(0)
            x0 = energy.space.noise(b, generator=gen0, device=device)
            for name in samplers:
                n = 1 if name == "Gibbs-sweep" else steps
                gen = torch.Generator(device=device).manual_seed(0)
                f = energy.energy
                fns = {"plain": lambda p=PLAIN[name], f=f, x=x0, n=n, g=gen: p(f, x, n, g)}
                if isinstance(energy, IsingEnergy) and name in PLAIN_ISING:
                    fns["plain"] = (lambda p=PLAIN_ISING[name], e=energy, x=x0, n=n, g=gen:
                                    p(e, x, n, g))
                s = make_ours(name, False, args.graph_steps)
                fns["ours"] = lambda s=s, e=energy, x=x0, n=n, g=gen: s.run(e, x, n, generator=g)
                if args.compiled:
                    sc = make_ours(name, False, None, compiled=True)
                    fns["ours+compiled"] = (lambda s=sc, e=energy, x=x0, n=n, g=gen:
                                            s.run(e, x, n, generator=g))
                    if not (isinstance(energy, IsingEnergy) and name in PLAIN_ISING):
                        # (Gibbs on the Ising model uses the local field, no evaluation)
                        fns["1 eval/step"] = (lambda e=energy, x=x0, n=n, gr=name != "Gibbs":
                                              evaluations(e, x, n, gr))
                if device.type == "cuda" and name != "Gibbs-sweep":
                    sg = make_ours(name, True, min(args.graph_steps, n))
                    fns["ours+graph"] = (lambda s=sg, e=energy, x=x0, n=n, g=gen:
                                         s.run(e, x, n, generator=g))
                res = timed_interleaved(fns, device, repeats)
                for variant, (sec, cpu) in res.items():
                    sweeps = n if SWEEPS_PER_STEP[name] == 1 else n / d
                    rows.append({"target": tname, "sampler": name, "D": d, "B": b,
                                 "variant": variant, "steps": n, "seconds": sec,
                                 "cpu_seconds": cpu, "steps_per_s": n / sec,
                                 "sweeps_per_s": sweeps / sec,
                                 "warmup_s": round(WARMUP.get(variant, 0.0), 2),
                                 "ratio_vs_plain": res["plain"][0] / sec,
                                 "cpu_ratio_vs_plain": res["plain"][1] / cpu})
                print(".", end="", flush=True)
    print()
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else platform.processor() or "cpu")
    print(f"device: {device} ({dev_name}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    header = (f"{'target':12} {'sampler':11} {'B':>5} {'variant':11} {'steps/s':>9} "
              f"{'sweeps/s':>9} {'x plain':>8} {'x plain (CPU)':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['target']:12} {r['sampler']:11} {r['B']:>5} {r['variant']:11} "
              f"{r['steps_per_s']:>9.1f} {r['sweeps_per_s']:>9.3f} {r['ratio_vs_plain']:>8.2f} "
              f"{r['cpu_ratio_vs_plain']:>13.2f}")
    meta = {"device": str(device), "device_name": dev_name, "torch": torch.__version__,
            "quick": args.quick, "threads": torch.get_num_threads(), "alpha": ALPHA,
            "graph_steps": args.graph_steps, "repeats": repeats,
            "command": " ".join(["python", "benchmarks/discrete_samplers.py", *sys.argv[1:]])}
    name = "discrete_samplers_compiled" if args.compiled and args.small else "discrete_samplers"
    write_json(output_path(args, name), {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
