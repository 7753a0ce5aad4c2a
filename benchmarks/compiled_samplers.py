"""Compiled chains against the plain loop, ebmflow eager, blackjax and torchebm (CPU).

Workloads (200 steps a run): ULA, MALA and HMC (10 leapfrog steps) on
* ``mixture``: an 8-component 2-D Gaussian mixture (ring of radius 4, scale 0.5), and
* ``mlp``: an MLP energy 2-256-256-256-1 with SiLU,
with 256 and 4096 chains. Implementations, all doing the same math:

* ``plain``: the obvious PyTorch loop (autograd gradient, eager);
* ``eager``: ebmflow's samplers with ``compile=False``;
* ``compiled``: ebmflow's samplers with ``compile=True`` (blocks of 8 compiled steps);
* ``blackjax``: blackjax 1.7 kernels (``mala``, ``hmc``; ULA as ``sgld`` with the exact
  gradient), ``jax.vmap`` over chains, ``jax.lax.scan`` over steps, ``jax.jit``;
* ``torchebm`` (ULA only): torchebm's ``LangevinDynamics`` with ``noise_scale=1`` (its noise
  is sqrt(2 step) * noise_scale * xi, so this is the same chain).

Timing: one process, implementations alternating within each repeat, median of ``--repeats``
(>= 5) runs after a warm-up run whose time is reported apart (compile / jit time). Ratios are
``steps/s of ebmflow compiled / steps/s of the other``, from process CPU time (robust to other
jobs on a shared machine; jax's work runs in its own threads) and from wall time.
``--threads 1`` (default) pins the process to one CPU core and torch and XLA to one thread
each (XLA's thread flags alone did not keep its work on one thread); ``--threads default``
leaves both at their defaults.

    python benchmarks/compiled_samplers.py --quick      # 256 chains, mixture + mlp
    python benchmarks/compiled_samplers.py              # 256 and 4096 chains

Writes runs/benchmarks/compiled_samplers.json (``--update-reference``:
benchmarks/results/compiled_samplers.json).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

STEPS, ETA, HMC_EPS, HMC_L = 200, 0.01, 0.05, 10


def _pin_threads(threads: str) -> None:
    """``"1"``: the whole process on one CPU core, and XLA asked for one thread (before jax
    is imported). XLA's flags alone left part of its work on other threads (its wall time
    below its CPU time), so the affinity makes "one thread" hold for every library."""
    if threads == "1":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false"
                                   + " intra_op_parallelism_threads=1").strip()
        from _timing import pin_one_core  # benchmarks/ is on sys.path (main)

        pin_one_core()


def _mixture_params():
    import torch

    k = 8
    angles = torch.arange(k) * (2 * math.pi / k)
    means = 4.0 * torch.stack([angles.cos(), angles.sin()], 1)
    return means, torch.full((k, 2), 0.5), torch.full((k,), 1.0 / k)


def make_torch_energy(kind: str):
    import torch

    from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy
    from ebmflow.spaces import Continuous

    if kind == "mixture":
        return GaussianMixtureEnergy(*_mixture_params())
    torch.manual_seed(0)
    return MLPEnergy(Continuous(2), hidden=(256, 256, 256), activation="silu")


# -- plain PyTorch loops ---------------------------------------------------------------------
def _grad(energy, x):
    import torch

    xg = x.detach().requires_grad_(True)
    e = energy.energy(xg)
    (g,) = torch.autograd.grad(e.sum(), xg)
    return e.detach(), g


def plain(sampler: str, energy, x, n, gen):
    import torch

    def randn(shape):
        return torch.randn(shape, generator=gen, device=x.device)

    if sampler == "ula":
        for _ in range(n):
            _, g = _grad(energy, x)
            x = x - ETA * g + math.sqrt(2 * ETA) * randn(x.shape)
        return x
    e, g = _grad(energy, x)
    for _ in range(n):
        if sampler == "mala":
            xi = randn(x.shape)
            y = x - ETA * g + math.sqrt(2 * ETA) * xi
            ey, gy = _grad(energy, y)
            log_a = (e - ey - ((x - y + ETA * gy) ** 2).sum(1) / (4 * ETA)
                     + 0.5 * (xi**2).sum(1))
        else:
            p = randn(x.shape)
            h0 = e + 0.5 * (p**2).sum(1)
            y, pn = x, p - 0.5 * HMC_EPS * g
            for i in range(HMC_L):
                y = y + HMC_EPS * pn
                ey, gy = _grad(energy, y)
                pn = pn - (0.5 if i == HMC_L - 1 else 1.0) * HMC_EPS * gy
            log_a = h0 - ey - 0.5 * (pn**2).sum(1)
        acc = torch.rand(x.shape[0], generator=gen, device=x.device).log() < log_a
        x = torch.where(acc[:, None], y, x)
        e = torch.where(acc, ey, e)
        g = torch.where(acc[:, None], gy, g)
    return x


def make_ours(sampler: str, compiled: bool, graph: bool = False):
    from ebmflow.samplers import HMC, MALA, Langevin

    kw = {"compile": compiled, "cuda_graph": graph}
    if sampler == "ula":
        return Langevin(ETA, **kw)
    if sampler == "mala":
        return MALA(ETA, **kw)
    return HMC(HMC_EPS, n_leapfrog=HMC_L, **kw)


# -- blackjax --------------------------------------------------------------------------------
def make_blackjax(sampler: str, kind: str, energy, n_chains: int):
    """A jitted ``run(key, x) -> x`` doing STEPS steps on ``n_chains`` chains, or None."""
    try:
        import blackjax
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    if kind == "mixture":
        means, scales, weights = (jnp.asarray(t.numpy()) for t in _mixture_params())

        def logdensity(x):
            z = (x[None, :] - means) / scales
            comp = (jnp.log(weights) - jnp.log(scales).sum(-1) - math.log(2 * math.pi)
                    - 0.5 * (z**2).sum(-1))
            return jax.scipy.special.logsumexp(comp)
    else:
        layers = [m for m in energy.net if hasattr(m, "weight")]
        params = [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy()))
                  for m in layers]

        def logdensity(x):
            h = x
            for w, b in params[:-1]:
                h = jax.nn.silu(h @ w.T + b)
            w, b = params[-1]
            return -(h @ w.T + b)[0]

    if sampler == "ula":
        kernel = blackjax.sgld.build_kernel()
        grad_fn = jax.grad(logdensity)

        def one(key, x):
            return kernel(key, x, lambda pos, _: grad_fn(pos), None, ETA)

        init = lambda x: x  # noqa: E731
        final = lambda s: s  # noqa: E731
    elif sampler == "mala":
        algo = blackjax.mala(logdensity, ETA)

        def one(key, s):
            return algo.step(key, s)[0]

        init, final = algo.init, (lambda s: s.position)
    else:
        algo = blackjax.hmc(logdensity, HMC_EPS, jnp.ones(2), HMC_L)

        def one(key, s):
            return algo.step(key, s)[0]

        init, final = algo.init, (lambda s: s.position)

    @jax.jit
    def run(key, x):
        state = jax.vmap(init)(x)

        def body(s, k):
            keys = jax.random.split(k, n_chains)
            return jax.vmap(one)(keys, s), None

        state, _ = jax.lax.scan(body, state, jax.random.split(key, STEPS))
        return final(state)

    def call(x_np, seed):
        out = run(jax.random.PRNGKey(seed), jnp.asarray(x_np))
        out.block_until_ready()
        return out

    return call


def make_torchebm(energy):
    """torchebm's LangevinDynamics with the same chain as ULA(ETA) (``samplers.py``), or
    None when torchebm is not installed."""
    from samplers import torchebm_runner

    run = torchebm_runner(energy, ETA)
    return None if run is None else (lambda x: run(x, STEPS, None))


def timed(fn, cuda: bool = False):
    import torch

    if cuda:
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c


def bench_row(sampler: str, kind: str, n_chains: int, repeats: int, device: str = "cpu") -> dict:
    import numpy as np
    import torch

    cuda = device.startswith("cuda")
    energy = make_torch_energy(kind).to(device)
    x0 = torch.randn(n_chains, 2, generator=torch.Generator().manual_seed(1)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    eager, comp = make_ours(sampler, False), make_ours(sampler, True)
    fns = {
        "plain": lambda: plain(sampler, energy, x0, STEPS, gen),
        "eager": lambda: eager.run(energy, x0, STEPS, generator=gen),
        "compiled": lambda: comp.run(energy, x0, STEPS, generator=gen),
    }
    if cuda:
        graph = make_ours(sampler, False, graph=True)
        fns["cuda_graph"] = lambda: graph.run(energy, x0, STEPS, generator=gen)
    bj = None if cuda else make_blackjax(sampler, kind, energy, n_chains)
    if bj is not None:
        x_np = np.asarray(x0.numpy())
        fns["blackjax"] = lambda: bj(x_np, 0)
    if sampler == "ula":
        te = make_torchebm(energy)
        if te is not None:
            fns["torchebm"] = lambda: te(x0)
    warm = {k: timed(f, cuda)[0] for k, f in fns.items()}  # compile / jit / first-call costs
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(timed(f, cuda))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in times.items()}
    row = {"sampler": sampler, "energy": kind, "chains": n_chains, "device": device,
           "warmup_s": {k: round(v, 2) for k, v in warm.items()},
           "steps_per_s_cpu": {k: round(STEPS / c, 1) for k, (_, c) in med.items()},
           "steps_per_s_wall": {k: round(STEPS / w, 1) for k, (w, _) in med.items()}}
    c_ours = med["compiled"][1]
    w_ours = med["compiled"][0]
    row["compiled_vs_cpu"] = {k: round(c / c_ours, 2) for k, (_, c) in med.items()
                              if k != "compiled"}
    row["compiled_vs_wall"] = {k: round(w / w_ours, 2) for k, (w, _) in med.items()
                               if k != "compiled"}
    return row


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.path.dirname(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 chains only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", choices=["1", "default"], default="1")
    parser.add_argument("--samplers", nargs="+", default=["ula", "mala", "hmc"], type=str.lower,
                        choices=["ula", "mala", "hmc"])
    parser.add_argument("--energies", nargs="+", default=["mixture", "mlp"], type=str.lower,
                        choices=["mixture", "mlp"])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--chains", type=int, nargs="+", default=None,
                        help="override the chain counts (default 256 4096; --quick: 256)")
    from _output import add_output_arguments, output_path, write_json

    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (medians of fewer runs are noise)")
    _pin_threads(args.threads)
    import torch

    if args.threads == "1":
        torch.set_num_threads(1)
    chains = args.chains or ([256] if args.quick else [256, 4096])
    rows = []
    head = (f"{'sampler':8} {'energy':8} {'B':>5} | {'compiled':>9} {'eager':>8} {'plain':>8} "
            f"{'blackjax':>9} | vs eager  vs plain  vs bjax | compile s")
    print(head)
    print("-" * len(head))
    for n in chains:
        for kind in args.energies:
            for s in args.samplers:
                r = bench_row(s, kind, n, args.repeats, args.device)
                rows.append(r)
                sp, vs = r["steps_per_s_cpu"], r["compiled_vs_cpu"]
                print(f"{s:8} {kind:8} {n:5d} | {sp['compiled']:9.0f} {sp['eager']:8.0f} "
                      f"{sp['plain']:8.0f} {sp.get('blackjax', float('nan')):9.0f} | "
                      f"{vs['eager']:8.2f} {vs['plain']:8.2f} {vs.get('blackjax', float('nan')):8.2f}"
                      f" | {r['warmup_s']['compiled']:.1f}", flush=True)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import blackjax
        import jax

        versions.update(blackjax=blackjax.__version__, jax=jax.__version__)
    except ImportError:
        pass
    name = "compiled_samplers" if args.device == "cpu" else "compiled_samplers_cuda"
    write_json(output_path(args, name), {
        "steps_per_run": STEPS, "threads": args.threads, "device": args.device, "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "versions": versions, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
