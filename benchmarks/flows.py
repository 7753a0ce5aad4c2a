"""Speed of ebmflow.flows: flow proposals per second, flowMC rounds per second, and the time
to reach a mode-weight error in the 2:1 example (flowMC vs PCD, from the example's results).

Each library timing is compared with a plain hand-written PyTorch loop doing the same math
(same weights), measured in the same run.

    python benchmarks/flows.py [--quick] [--device cuda]

Prints a table and writes benchmarks/results/flows.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ebmflow.energy import GaussianMixtureEnergy
from ebmflow.flows import ContinuousFlow, FlowMC, RealNVP
from ebmflow.samplers import MALA

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _mlp(x, linears):
    for i, lin in enumerate(linears):
        x = F.linear(x, lin.weight, lin.bias)
        if i < len(linears) - 1:
            x = F.silu(x)
    return x


def plain_realnvp_sample(flow: RealNVP, n: int, gen):
    """Hand-written: z ~ N(0, I), couplings x = z exp(s) + t, affine output, log q."""
    d = flow.dim
    z = torch.randn(n, d, generator=gen, device=flow.loc.device)
    x, logdet = z, torch.zeros(n, device=z.device)
    for layer in flow.layers:
        m = layer.mask
        linears = [mod for mod in layer.net if isinstance(mod, torch.nn.Linear)]
        s, t = _mlp(x * m, linears).chunk(2, -1)
        s = layer.scale_bound * torch.tanh(s / layer.scale_bound) * (1 - m)
        x = x * torch.exp(s) + t * (1 - m)
        logdet = logdet + s.sum(-1)
    x = flow.loc + torch.exp(flow.log_scale) * x
    logdet = logdet + flow.log_scale.sum()
    log_q = -0.5 * z.pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi) - logdet
    return x, log_q


def plain_flowmc_round(target, flow, x, eta, n_local, n_global, gen):
    """Hand-written MALA steps plus independent flow proposals (same math as FlowMC)."""
    def e_and_g(y):
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            e = -target.log_prob(y)
            (g,) = torch.autograd.grad(e.sum(), y)
        return e.detach(), g

    e, g = e_and_g(x)
    for _ in range(n_local):
        xi = torch.randn(x.shape, generator=gen, device=x.device)
        prop = x - eta * g + math.sqrt(2 * eta) * xi
        ep, gp = e_and_g(prop)
        log_rev = -((x - prop + eta * gp) ** 2).sum(-1) / (4 * eta)
        log_alpha = e - ep + log_rev + 0.5 * (xi ** 2).sum(-1)
        acc = torch.rand(x.shape[0], generator=gen, device=x.device).log() < log_alpha
        x = torch.where(acc[:, None], prop, x)
        e = torch.where(acc, ep, e)
        g = torch.where(acc[:, None], gp, g)
    with torch.no_grad():
        f_x = -e
        logq_x = flow.log_prob(x)
        for _ in range(n_global):
            xp, lqp = plain_realnvp_sample(flow, x.shape[0], gen)
            fp = target.log_prob(xp)
            acc = torch.rand(x.shape[0], generator=gen, device=x.device).log() < (
                fp - f_x + logq_x - lqp)
            x = torch.where(acc[:, None], xp, x)
            f_x = torch.where(acc, fp, f_x)
            logq_x = torch.where(acc, lqp, logq_x)
    return x


def time_to_error(results_path: Path, threshold: float) -> dict:
    """First training time after which |w_heavy - 2/3| stays below ``threshold``."""
    if not results_path.exists():
        return {}
    runs = json.loads(results_path.read_text())["runs"]
    out = {}
    for method, r in runs.items():
        errs = [abs(w - 2 / 3) for w in r["heavy"]]
        t = None
        for i in range(len(errs)):
            if all(e < threshold for e in errs[i:]):
                t = r["times"][i]
                break
        out[method] = t
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    repeats = 5 if args.quick else 20
    chains = [256, 1024] if args.quick else [256, 1024, 4096]
    rows = []
    target = GaussianMixtureEnergy.two_modes().to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    flow = RealNVP(2, n_layers=4, hidden=(32, 32)).to(device)
    with torch.no_grad():  # a non-trivial flow
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cnf = ContinuousFlow(2, hidden=(32, 32), n_steps=8).to(device)
    for n in chains:
        with torch.no_grad():
            t_lib = timeit(lambda n=n: flow.sample_and_log_prob(n, gen), device, repeats)
            t_ref = timeit(lambda n=n: plain_realnvp_sample(flow, n, gen), device, repeats)
        rows.append({"what": "RealNVP proposals/s", "chains": n, "ebmflow": n / t_lib,
                     "plain": n / t_ref, "ratio": t_ref / t_lib})
        with torch.no_grad():
            t_cnf = timeit(lambda n=n: cnf.sample_and_log_prob(n, gen), device, max(2, repeats // 4))
        rows.append({"what": "CNF proposals/s (rk4x8, exact trace)", "chains": n,
                     "ebmflow": n / t_cnf, "plain": None, "ratio": None})
        sampler = FlowMC(flow, MALA(0.3), n_local=10, n_global=10, flow_steps=0, n_chains=n)
        sampler.sample(target, generator=gen)
        x0 = sampler.chains.clone()
        t_lib = timeit(lambda s=sampler: s.sample(target, generator=gen), device, repeats)
        t_ref = timeit(lambda x0=x0: plain_flowmc_round(target, flow, x0, 0.3, 10, 10, gen),
                       device, repeats)
        rows.append({"what": "flowMC rounds/s (10 MALA + 10 global)", "chains": n,
                     "ebmflow": 1 / t_lib, "plain": 1 / t_ref, "ratio": t_ref / t_lib})
    tte = time_to_error(ROOT / "docs" / "results" / "flowmc_two_modes.json", 0.05)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'},"
          f" {torch.get_num_threads()} threads)")
    print(f"{'what':42s} {'chains':>7s} {'ebmflow':>12s} {'plain':>12s} {'plain/ebmflow time':>18s}")
    for r in rows:
        plain = f"{r['plain']:12.1f}" if r["plain"] is not None else f"{'-':>12s}"
        ratio = f"{r['ratio']:18.2f}" if r["ratio"] is not None else f"{'-':>18s}"
        print(f"{r['what']:42s} {r['chains']:7d} {r['ebmflow']:12.1f} {plain} {ratio}")
    if tte:
        print("time (s of training) until |w_heavy - 2/3| stays < 0.05 in the 2:1 example "
              "(from docs/results/flowmc_two_modes.json; None = never):")
        for m, t in tte.items():
            print(f"  {m:14s} {t}")
    out = ROOT / "benchmarks" / "results" / "flows.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "quick": args.quick, "rows": rows,
                               "time_to_error_0.05": tte}, indent=2))


if __name__ == "__main__":
    main()
