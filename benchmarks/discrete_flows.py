"""Discrete flow speed: CTMC sampling and velocity-regression training against plain loops.

Model: ``MLPVelocity`` (2 hidden layers of 256, embedding 8, SiLU, rate-scaled output), mask
source, linear schedule. Measured:

* ``sample``: samples/s of ``CTMCSolver.sample`` (D in {32, 784}, 20 and 100 Euler steps,
  B in {1024, 16384}); ``plain`` is a hand-written loop doing the same Euler step (same
  network, masked rows, clamped off-diagonal, stay probability, MASK removed at the last
  step, ``torch.multinomial`` draw).
* ``--compiled``: the sampling rows only, with ``ours+compiled`` beside them
  (``CTMCSolver(..., compile=True)``: every Euler step but the last in compiled blocks; the
  compile time of the warm-up call is reported apart), written to
  ``discrete_flows_compiled.json``.
* ``train``: velocity-regression steps/s (batch 128 and 1024, D in {32, 784}); ``plain``
  writes the same loss by hand ((1 - t) u_theta - (delta_x1 - delta_xt) on masked rows).

Ratios are ours / plain from the same run (interleaved, median of ``--repeats``), of wall time
and of this thread's CPU time (robust to other jobs on a shared machine). On CPU the
largest configurations are skipped (marked in the JSON). Prints a table and writes
runs/benchmarks/discrete_flows.json (``--update-reference``: the committed
benchmarks/results/discrete_flows.json; ``--out PATH``) and prints where.

    python benchmarks/discrete_flows.py --quick    # CPU, < 1 minute
    python benchmarks/discrete_flows.py            # full grid (CUDA when available)
    python benchmarks/discrete_flows.py --cpu --all --repeats 2   # every row on CPU (~15 min)
    python benchmarks/discrete_flows.py --cpu --compiled --grid 32   # compiled CTMC sampling, D = 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch
from _output import add_output_arguments, output_path, write_json
from torch.nn import functional as F

from ebmflow.discrete_flows import CTMCSolver, DiscreteFlowSampler, MixturePath, MLPVelocity

HIDDEN = (256, 256)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device):
    """(wall seconds, this thread's CPU seconds) of one call."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.thread_time() - c0


def _interleaved(ours, plain, device, repeats, *more):
    """Median (wall, CPU) seconds of plain, ours and any ``more`` functions, alternating
    within each repeat."""
    fns = [plain, ours, *more]
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(_time(fn, device))
    return tuple((statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
                 for ts in times)


@torch.no_grad()
def plain_sample(model, b, d, n_steps, gen, device):
    """The Euler CTMC loop written directly (mask source, S = 2, MASK = 2)."""
    x = torch.full((b, d), 2, dtype=torch.long, device=device)
    h = 1.0 / n_steps
    for k in range(n_steps):
        t = torch.full((b,), k * h, device=device)
        u = model(x, t)  # (B, D, 2)
        masked = (x == 2).unsqueeze(-1)
        off = (u * h).clamp(0, 1) * masked
        stay = (1 - off.sum(-1, keepdim=True)).clamp_min(0)
        if k == n_steps - 1:
            stay = torch.zeros_like(stay)
            off = torch.where(off.sum(-1, keepdim=True) > 0, off, torch.full_like(off, 0.5))
        probs = torch.cat([off, stay], -1)
        probs = torch.where(masked, probs, F.one_hot(x, 3).float())
        x = torch.multinomial(probs.reshape(-1, 3), 1, generator=gen).reshape(b, d)
    return x


def plain_train_step(model, opt, x1, gen):
    b = x1.shape[0]
    t = torch.rand(b, generator=gen, device=x1.device) * 0.999
    keep = torch.rand(x1.shape, generator=gen, device=x1.device) < t[:, None]
    x_t = torch.where(keep, x1, torch.full_like(x1, 2))
    u = model(x_t, t)
    target = F.one_hot(x1, 2).float()
    masked = (x_t == 2).unsqueeze(-1).float()
    loss = (((1 - t)[:, None, None] * u - target).pow(2) * masked).sum((1, 2)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _repeat(n, fn, *args):
    for _ in range(n):
        fn(*args)


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    cpu = device.type == "cpu"
    rows = []
    if args.quick:
        sample_grid = [(32, 20, 1024)]
        train_grid = [(32, 128)]
    else:
        sample_grid = [(d, n, b) for d in (32, 784) for n in (20, 100) for b in (1024, 16384)]
        train_grid = [(d, b) for d in (32, 784) for b in (128, 1024)]
    if args.grid:
        sample_grid = [row for row in sample_grid if row[0] in args.grid]
    if args.compiled:
        train_grid = []
    path = MixturePath(2, "mask")
    for d, n_steps, b in sample_grid:
        if cpu and not args.quick and not args.all and b * d * n_steps > 784 * 1024 * 20:
            rows.append({"kind": "sample", "D": d, "steps": n_steps, "B": b, "skipped": "too slow on CPU"})
            continue
        model = MLPVelocity(d, 2, hidden=HIDDEN, schedule=path.schedule).to(device)
        torch.nn.init.normal_(model.net[-1].weight, std=0.01)
        sampler = DiscreteFlowSampler(model, path, CTMCSolver(path, 1.0 / n_steps))
        ours = partial(sampler.sample_tokens, b, generator=gen)
        plain = partial(plain_sample, model, b, d, n_steps, gen, device)
        ours(), plain()  # warm-up
        more, compile_s = [], None
        if args.compiled:
            compiled = DiscreteFlowSampler(model, path,
                                           CTMCSolver(path, 1.0 / n_steps, compile=True))
            more = [partial(compiled.sample_tokens, b, generator=gen)]
            t0 = time.perf_counter()
            more[0]()  # warm-up: tracing and compiling
            compile_s = time.perf_counter() - t0
        (tp, cp), (to, co), *rest = _interleaved(ours, plain, device, args.repeats, *more)
        row = {"kind": "sample", "D": d, "steps": n_steps, "B": b,
               "plain_per_s": b / tp, "ours_per_s": b / to, "ratio": tp / to,
               "cpu_ratio": cp / co}
        if rest:
            (tc, cc), = rest
            row.update({"compiled_per_s": b / tc, "compiled_ratio": tp / tc,
                        "compiled_cpu_ratio": cp / cc, "compiled_vs_eager_cpu": co / cc,
                        "compile_s": round(compile_s, 1)})
        rows.append(row)
    for d, b in train_grid:
        model = MLPVelocity(d, 2, hidden=HIDDEN, schedule=path.schedule).to(device)
        sampler = DiscreteFlowSampler(model, path, lr=1e-4)
        plain_model = MLPVelocity(d, 2, hidden=HIDDEN, schedule=path.schedule).to(device)
        opt = torch.optim.Adam(plain_model.parameters(), lr=1e-4)
        x1 = torch.randint(0, 2, (b, d), generator=gen, device=device)
        n = 5 if args.quick else 20

        ours = partial(_repeat, n, sampler.fit_step, x1, None, gen)
        plain = partial(_repeat, n, plain_train_step, plain_model, opt, x1, gen)

        ours(), plain()
        (tp, cp), (to, co) = _interleaved(ours, plain, device, args.repeats)
        rows.append({"kind": "train", "D": d, "B": b, "plain_steps_per_s": n / tp,
                     "ours_steps_per_s": n / to, "ratio": tp / to, "cpu_ratio": cp / co})
    return device, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small CPU run (< 1 minute)")
    ap.add_argument("--cpu", action="store_true", help="force CPU")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--all", action="store_true",
                    help="CPU: also the largest sampling rows (minutes per timing)")
    ap.add_argument("--compiled", action="store_true",
                    help="sampling rows only, with compiled CTMC sampling beside them")
    ap.add_argument("--grid", type=int, nargs="*", default=None,
                    help="only these D of the sampling grid (e.g. --grid 32)")
    add_output_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, rows = run(args)
    print(f"device: {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}")
    print(f"{'kind':6} {'D':>4} {'steps':>5} {'B':>6} {'plain/s':>12} {'ours/s':>12} {'ours/plain':>10}"
          f" {'(CPU time)':>10}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['kind']:6} {r['D']:>4} {r.get('steps', ''):>5} {r['B']:>6}  skipped ({r['skipped']})")
        elif r["kind"] == "sample":
            print(f"sample {r['D']:>4} {r['steps']:>5} {r['B']:>6} {r['plain_per_s']:>12.0f} {r['ours_per_s']:>12.0f} {r['ratio']:>10.2f} {r['cpu_ratio']:>10.2f}")
            if "compiled_per_s" in r:
                print(f"  compiled {r['compiled_per_s']:>12.0f}/s: x plain {r['compiled_ratio']:.2f} "
                      f"(CPU time {r['compiled_cpu_ratio']:.2f}), x eager (CPU time) "
                      f"{r['compiled_vs_eager_cpu']:.2f}, compile {r['compile_s']} s")
        else:
            print(f"train  {r['D']:>4} {'':>5} {r['B']:>6} {r['plain_steps_per_s']:>12.1f} {r['ours_steps_per_s']:>12.1f} {r['ratio']:>10.2f} {r['cpu_ratio']:>10.2f}")
    write_json(output_path(args, "discrete_flows_compiled" if args.compiled else "discrete_flows"),
               {"device": str(device), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "quick": args.quick, "rows": rows})


if __name__ == "__main__":
    main()
