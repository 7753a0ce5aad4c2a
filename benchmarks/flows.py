"""Speed of ebmflow.flows: flow proposals per second, flowMC rounds per second, and how long
the 2:1 example takes to settle on the right mode weight (flowMC vs PCD vs ULA).

Each library timing is compared with a plain hand-written PyTorch loop doing the same math
(same weights), measured in the same run with the variants interleaved (median of
``--repeats``), both in wall time and in this thread's CPU time (robust to other jobs on a
shared machine; with one thread it is the work itself).

flowMC round = 10 MALA steps (fixed step 0.3) + 10 independence-MH flow proposals on the
2:1 mixture, RealNVP(4 layers, 32 x 32), B chains. Two pairs of variants:

* ``one call per proposal``: ``FlowMC(proposal_batch_size=B)`` vs the plain loop that draws
  one proposal per chain per flow call (the textbook loop);
* ``batched proposals``: ``FlowMC`` defaults (all proposals of a round drawn in calls of at
  most 4096 states, before the sequential accept/reject steps; exact, since the proposals
  do not depend on the chains) vs the plain loop written the same way;
* ``global moves only``: the same with no MALA steps (E(x) without gradient in both), which
  isolates FlowMC's own part from the local kernel (``benchmarks/samplers.py`` times MALA).

The plain loops count acceptances as FlowMC does (its ``stats``); the plain MALA does not
check for non-finite proposals (ebmflow's MALA does).

Settling of the 2:1 example (``docs/results/flowmc_two_modes.json``, written by
``examples/flowmc_two_modes.py``; 2000 iterations, checkpoints every 100): for each run, the
first checkpoint from which |w_heavy - 2/3| stays below the threshold at every later
checkpoint, counted only when that stretch covers at least the whole last quarter of
training ("never" otherwise; a last-moment dip below the threshold does not count), as
iterations and as training seconds (the example's clock, on the shared machine); plus the
mean and max of |w_heavy - 2/3| and the sd of w_heavy over the last quarter.

    python benchmarks/flows.py [--quick] [--threads 1] [--device cuda]

Prints tables and writes runs/benchmarks/flows.json (``--update-reference``: the committed
benchmarks/results/flows.json; ``--out PATH``) and prints where.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _output import add_output_arguments, output_path, write_json

from ebmflow.energy import GaussianMixtureEnergy
from ebmflow.flows import ContinuousFlow, FlowMC, RealNVP
from ebmflow.samplers import MALA

ROOT = Path(__file__).resolve().parents[1]
ETA, N_LOCAL, N_GLOBAL, MAX_BATCH = 0.3, 10, 10, 4096


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, float]:
    sync(device)
    t, c = time.perf_counter(), time.thread_time()
    fn()
    sync(device)
    return time.perf_counter() - t, time.thread_time() - c


def timed_interleaved(fns: dict, device, repeats: int) -> dict:
    """Median (wall, CPU) seconds per variant; the variants alternate within each repeat (in
    a rotating order), so a slow phase of a shared machine hits all of them alike."""
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times: dict = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            times[k].append(timed(fns[k], device))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for k, v in times.items()}


# -- plain loops: the same math, written by hand ------------------------------------------------
def _mlp(x, linears):
    for i, lin in enumerate(linears):
        x = F.linear(x, lin.weight, lin.bias)
        if i < len(linears) - 1:
            x = F.silu(x)
    return x


def _coupling_params(layer):
    linears = [mod for mod in layer.net if isinstance(mod, torch.nn.Linear)]
    return layer.mask, linears, layer.scale_bound


def plain_realnvp_sample(flow: RealNVP, n: int, gen):
    """z ~ N(0, I), couplings x = z exp(s) + t, affine output; log q = log N(z) - log det."""
    d = flow.dim
    z = torch.randn(n, d, generator=gen, device=flow.loc.device)
    x, logdet = z, torch.zeros(n, device=z.device)
    for layer in flow.layers:
        m, linears, b = _coupling_params(layer)
        s, t = _mlp(x * m, linears).chunk(2, -1)
        s = b * torch.tanh(s / b) * (1 - m)
        x = x * torch.exp(s) + t * (1 - m)
        logdet = logdet + s.sum(-1)
    x = flow.loc + torch.exp(flow.log_scale) * x
    logdet = logdet + flow.log_scale.sum()
    log_q = -0.5 * z.pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi) - logdet
    return x, log_q


def plain_realnvp_log_prob(flow: RealNVP, x):
    """Inverse pass: z = A^-1(x), then each coupling inverted; log q = log N(z) + log det."""
    d = flow.dim
    z = (x - flow.loc) * torch.exp(-flow.log_scale)
    logdet = -flow.log_scale.sum()
    for layer in reversed(flow.layers):
        m, linears, b = _coupling_params(layer)
        s, t = _mlp(z * m, linears).chunk(2, -1)
        s = b * torch.tanh(s / b) * (1 - m)
        z = (z - t * (1 - m)) * torch.exp(-s)
        logdet = logdet - s.sum(-1)
    return -0.5 * z.pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi) + logdet


def plain_flowmc_round(target, flow, x, eta, n_local, n_global, gen, per_call=1):
    """Hand-written MALA steps, then ``n_global`` independence-MH flow proposals per chain,
    drawn ``per_call`` per chain at a time (1: one flow call per proposal). Like FlowMC it
    also counts the local acceptances and the per-chain global acceptances; returns
    (states, local acceptance rate, per-chain global acceptance rate)."""

    def e_and_g(y):
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            e = -target.log_prob(y)
            (g,) = torch.autograd.grad(e.sum(), y)
        return e.detach(), g

    b = x.shape[0]
    if n_local > 0:
        e, g = e_and_g(x)
    else:
        with torch.no_grad():
            e = -target.log_prob(x)
    local_acc = torch.zeros(b, device=x.device)
    for _ in range(n_local):
        xi = torch.randn(x.shape, generator=gen, device=x.device)
        prop = x - eta * g + math.sqrt(2 * eta) * xi
        ep, gp = e_and_g(prop)
        log_rev = -((x - prop + eta * gp) ** 2).sum(-1) / (4 * eta)
        log_alpha = e - ep + log_rev + 0.5 * (xi ** 2).sum(-1)
        acc = torch.rand(b, generator=gen, device=x.device).log() < log_alpha
        x = torch.where(acc[:, None], prop, x)
        e = torch.where(acc, ep, e)
        g = torch.where(acc[:, None], gp, g)
        local_acc += acc
    global_acc = torch.zeros(b, device=x.device)
    with torch.no_grad():
        f_x = -e
        logq_x = plain_realnvp_log_prob(flow, x)
        for k0 in range(0, n_global, per_call):
            k = min(per_call, n_global - k0)
            xp, lqp = plain_realnvp_sample(flow, k * b, gen)
            fp = target.log_prob(xp)
            xp, lqp, fp = xp.view(k, b, -1), lqp.view(k, b), fp.view(k, b)
            for j in range(k):
                acc = torch.rand(b, generator=gen, device=x.device).log() < (
                    fp[j] - f_x + logq_x - lqp[j])
                x = torch.where(acc[:, None], xp[j], x)
                f_x = torch.where(acc, fp[j], f_x)
                logq_x = torch.where(acc, lqp[j], logq_x)
                global_acc += acc
    return x, local_acc.mean() / max(n_local, 1), global_acc / max(n_global, 1)


# -- settling of the 2:1 example -----------------------------------------------------------------
def settle_time(steps: list, times: list, errs: list, threshold: float) -> tuple:
    """(iteration, seconds) of the first checkpoint from which every error is below
    ``threshold``, if that stretch covers the whole last quarter of training; else (None,
    None)."""
    i = len(errs)
    while i > 0 and errs[i - 1] < threshold:
        i -= 1
    if i == len(errs) or steps[i] > 0.75 * steps[-1]:
        return None, None
    return steps[i], times[i]


def settling(results_path: Path, thresholds=(0.05, 0.1)) -> dict:
    """Per method (seeds pooled): settle iterations / seconds per seed at each threshold, and
    last-quarter mean and max of |w_heavy - truth| and sd of w_heavy, per seed."""
    if not results_path.exists():
        return {}
    payload = json.loads(results_path.read_text())
    truth = payload.get("truth", 2 / 3)
    out: dict = {}
    for key, r in payload["runs"].items():
        steps, times, heavy = r["steps"], r["times"], r["heavy"]
        if steps[-1] < r.get("iters", steps[-1]):
            continue  # unfinished run
        errs = [abs(w - truth) for w in heavy]
        entry = out.setdefault(key.split("/seed")[0], {"seeds": [], "train_s": []})
        entry["seeds"].append(r.get("seed"))
        entry["train_s"].append(times[-1])
        for thr in thresholds:
            it, sec = settle_time(steps, times, errs, thr)
            entry.setdefault(f"settle_iter_{thr}", []).append(it)
            entry.setdefault(f"settle_s_{thr}", []).append(sec)
        late = [i for i, s in enumerate(steps) if s >= 0.75 * steps[-1]]
        entry.setdefault("last_quarter_err_mean", []).append(
            statistics.fmean(errs[i] for i in late))
        entry.setdefault("last_quarter_err_max", []).append(max(errs[i] for i in late))
        entry.setdefault("last_quarter_w_sd", []).append(
            statistics.pstdev(heavy[i] for i in late))
    return out


def _fmt_settle(its: list, secs: list) -> str:
    parts = [("never" if i is None else f"{i} it/{s:.0f} s") for i, s in zip(its, secs)]
    return ", ".join(parts)


# -- main -----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, < 1 minute")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (--quick) / 25")
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    repeats = args.repeats or (7 if args.quick else 25)
    chains = [256, 1024] if args.quick else [256, 1024, 4096]
    rows = []
    target = GaussianMixtureEnergy.two_modes().to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    flow = RealNVP(2, n_layers=4, hidden=(32, 32)).to(device)
    with torch.no_grad():  # a non-trivial flow
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cnf = ContinuousFlow(2, hidden=(32, 32), ode_steps=8).to(device)

    def row(what, n, per, lib, ref):
        r = {"what": what, "chains": n, "ebmflow": per / lib[0], "ebmflow_cpu": per / lib[1],
             "plain": None, "plain_cpu": None, "ratio": None, "ratio_cpu": None}
        if ref is not None:
            r.update(plain=per / ref[0], plain_cpu=per / ref[1], ratio=ref[0] / lib[0],
                     ratio_cpu=ref[1] / lib[1])
        rows.append(r)

    for n in chains:
        with torch.no_grad():
            res = timed_interleaved({
                "lib": lambda n=n: flow.sample_and_log_prob(n, gen),
                "plain": lambda n=n: plain_realnvp_sample(flow, n, gen),
            }, device, repeats)
            row("RealNVP proposals/s", n, n, res["lib"], res["plain"])
            res = timed_interleaved({"lib": lambda n=n: cnf.sample_and_log_prob(n, gen)},
                                    device, max(2, repeats // 4))
            row("CNF proposals/s (rk4x8, exact trace)", n, n, res["lib"], None)
        seq = FlowMC(flow, MALA(ETA), n_local=N_LOCAL, n_global=N_GLOBAL, flow_steps=0,
                     n_chains=n, proposal_batch_size=n)
        bat = FlowMC(flow, MALA(ETA), n_local=N_LOCAL, n_global=N_GLOBAL, flow_steps=0,
                     n_chains=n)
        glo = FlowMC(flow, MALA(ETA), n_local=0, n_global=N_GLOBAL, flow_steps=0, n_chains=n)
        x0 = target.sample(n, gen)
        for s in (seq, bat, glo):
            s.sample(target, x0=x0.clone(), generator=gen)
        per_call = max(1, min(N_GLOBAL, MAX_BATCH // n))
        res = timed_interleaved({
            "lib_seq": lambda s=seq: s.sample(target, generator=gen),
            "plain_seq": lambda x0=x0: plain_flowmc_round(target, flow, x0, ETA, N_LOCAL,
                                                          N_GLOBAL, gen, 1),
            "lib_bat": lambda s=bat: s.sample(target, generator=gen),
            "plain_bat": lambda x0=x0, k=per_call: plain_flowmc_round(
                target, flow, x0, ETA, N_LOCAL, N_GLOBAL, gen, k),
            "lib_glo": lambda s=glo: s.sample(target, generator=gen),
            "plain_glo": lambda x0=x0, k=per_call: plain_flowmc_round(
                target, flow, x0, ETA, 0, N_GLOBAL, gen, k),
        }, device, repeats)
        row("flowMC rounds/s, one flow call per proposal", n, 1, res["lib_seq"],
            res["plain_seq"])
        row(f"flowMC rounds/s, batched proposals ({per_call} per call)", n, 1, res["lib_bat"],
            res["plain_bat"])
        rows[-1]["speedup_vs_plain_one_call"] = res["plain_seq"][0] / res["lib_bat"][0]
        rows[-1]["speedup_vs_plain_one_call_cpu"] = res["plain_seq"][1] / res["lib_bat"][1]
        row(f"flowMC global moves only/s ({per_call} per call)", n, 1, res["lib_glo"],
            res["plain_glo"])

    name = torch.cuda.get_device_name() if device.type == "cuda" else (
        platform.processor() or "cpu")
    print(f"device: {device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {repeats} repeats")
    print(f"{'what':48s} {'chains':>6s} {'ebmflow/s':>10s} {'plain/s':>10s} "
          f"{'ratio wall':>10s} {'ratio cpu':>10s}")
    for r in rows:
        plain = f"{r['plain']:10.1f}" if r["plain"] is not None else f"{'-':>10s}"
        rw = f"{r['ratio']:10.2f}" if r["ratio"] is not None else f"{'-':>10s}"
        rc = f"{r['ratio_cpu']:10.2f}" if r["ratio_cpu"] is not None else f"{'-':>10s}"
        print(f"{r['what']:48s} {r['chains']:6d} {r['ebmflow']:10.1f} {plain} {rw} {rc}")
    print("(ratio = plain time / ebmflow time: above 1, ebmflow is faster)")
    for r in rows:
        if "speedup_vs_plain_one_call" in r:
            print(f"flowMC (batched) vs plain one-call loop, {r['chains']} chains: "
                  f"{r['speedup_vs_plain_one_call']:.2f}x wall, "
                  f"{r['speedup_vs_plain_one_call_cpu']:.2f}x cpu")

    settle = settling(ROOT / "docs" / "results" / "flowmc_two_modes.json")
    if settle:
        print("\n2:1 example (docs/results/flowmc_two_modes.json): first checkpoint from which "
              "|w_heavy - 2/3| stays below the threshold to the end (covering >= the last "
              "quarter), per seed; last-quarter error mean / max and weight sd, per seed")
        for m, e in settle.items():
            print(f"  {m:16s} < 0.05: {_fmt_settle(e['settle_iter_0.05'], e['settle_s_0.05'])}"
                  f" | < 0.1: {_fmt_settle(e['settle_iter_0.1'], e['settle_s_0.1'])}")
            print(f"  {'':16s} last quarter: err mean "
                  + ", ".join(f"{v:.3f}" for v in e["last_quarter_err_mean"])
                  + "; err max " + ", ".join(f"{v:.3f}" for v in e["last_quarter_err_max"])
                  + "; w sd " + ", ".join(f"{v:.3f}" for v in e["last_quarter_w_sd"]))
    write_json(output_path(args, "flows"), {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "quick": args.quick, "repeats": repeats,
        "flowmc_round": {"n_local": N_LOCAL, "n_global": N_GLOBAL, "mala_step": ETA,
                         "proposal_batch_size": MAX_BATCH},
        "rows": rows, "settling_2to1": settle,
    })


if __name__ == "__main__":
    main()
