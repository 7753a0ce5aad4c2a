"""The measurements behind the compiled executor's design choices and the speed bounds in the docs.

One CPU thread, median of ``--repeats`` timings of ``--calls`` calls each:

* ``mask store``: a compiled ``u.log() < c`` over 128 x 100 entries, stored as bool against
  the same comparison stored as 0/1 floats (why DMALA keeps its flip mask as floats inside
  compiled blocks, ``samplers/_discrete.stored_mask``);
* ``oneDNN product call``: a 128 x 256 x 256 product through ``ebmflow::onednn_linear`` (a
  plain ``torch.library`` operator, ``energy/_gemm.py``), the same product through a
  ``torch.library.custom_op`` wrapper, and the direct oneDNN call;
* ``narrow product``: the input gradient of an MLP on 2-D data, $G W_1$ with $G$ (B, 256) and
  $W_1$ (256, 2), through ``F.linear`` (MKL) against ``energy/_gemm.py``'s $(W x^\top)^\top$
  with the weight made contiguous, and with its transposed view (why ``_narrow`` copies it);
* ``Ising field``: the local field $s J$ of ``IsingEnergy`` for 128 chains at D = 100 and
  D = 1024, ``s @ J`` (MKL) against ``energy/_gemm.linear`` (oneDNN);
* ``inductor options``: compiled MALA and HMC (10 leapfrog steps) on the 2-D mixture at 256
  chains, blocks built with inductor's defaults, without its size asserts, with
  ``samplers/_compiled.INDUCTOR_OPTIONS`` (also its C++ wrapper), and as ebmflow builds them
  (``_compiled.inductor_options``: for this small state also inductor's memory planning),
  alternating in one process;
* ``memory planning``: the same samplers at 256 to 4096 chains, blocks with
  ``INDUCTOR_OPTIONS`` with and without inductor's memory planning (why it is used only for
  chain states of at most ``_compiled.POOLED_STATE_MAX`` numbers);
* ``training step profile``: torch's profiler on the plain loops of ``benchmarks/training.py``
  (ED at batch 128, CD-10): the share of matrix products (``mm``, ``addmm``) and of SiLU
  forward and backward in the step; ``1 / share`` bounds the speed-up of any loop that runs
  the same products at the same speed;
* ``MLP evaluation``: one closed-form ``energy_and_grad`` of the 2-128-128-128-1 MLP energy
  at 128 chains (a CD-10 step makes ten of them).

    python benchmarks/bounds.py            # a few minutes (compiled blocks compile)

Writes runs/benchmarks/bounds.json (``--update-reference``: benchmarks/results/bounds.json).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from _output import add_output_arguments, output_path, write_json
from _timing import alternating_medians


def _per_call_us(fn, calls: int, repeats: int) -> float:
    return alternating_medians({"fn": fn}, calls, repeats)["fn"] * 1e6


def mask_store(calls: int, repeats: int) -> dict:
    u = torch.rand(128, 100, generator=torch.Generator().manual_seed(0))
    as_bool = torch.compile(lambda v: v.log() < -0.5)
    as_float = torch.compile(lambda v: (v.log() < -0.5).float())
    return {"bool_us": _per_call_us(lambda: as_bool(u), calls, repeats),
            "float_us": _per_call_us(lambda: as_float(u), calls, repeats)}


def product_call(calls: int, repeats: int) -> dict:
    from ebmflow.energy import _gemm

    if _gemm._opaque is None:
        return {"skipped": "no oneDNN linear in this torch build"}
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(128, 256, generator=g), torch.randn(256, 256, generator=g),
               torch.randn(256, generator=g))

    @torch.library.custom_op("ebmflow_bench::linear", mutates_args=())
    def wrapped(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _gemm._onednn(x, w, b)

    return {"library_op_us": _per_call_us(lambda: _gemm._opaque(x, w, b), calls, repeats),
            "custom_op_us": _per_call_us(lambda: wrapped(x, w, b), calls, repeats),
            "direct_us": _per_call_us(lambda: _gemm._onednn(x, w, b), calls, repeats)}


def narrow_product(calls: int, repeats: int) -> dict:
    import torch.nn.functional as F

    from ebmflow.energy import _gemm

    out = {}
    for b in (256, 4096):
        g = torch.Generator().manual_seed(0)
        grad, w1 = torch.randn(b, 256, generator=g), torch.randn(256, 2, generator=g)
        n = max(calls // 16, 10) if b > 256 else calls
        ways = {"f_linear_us": lambda gr=grad, w=w1: F.linear(gr, w.t()),
                "narrow_us": lambda gr=grad, w=w1: _gemm._narrow(gr, w.t(), None),
                "narrow_view_weight_us": lambda gr=grad, w=w1: torch.mm(w.t(), gr.t()).t()}
        out[str(b)] = {k: _per_call_us(f, n, repeats) for k, f in ways.items()}
    return out


def ising_field(calls: int, repeats: int) -> dict:
    from ebmflow.energy import _gemm

    out = {}
    for d in (100, 1024):
        g = torch.Generator().manual_seed(0)
        s = 2 * torch.randint(0, 2, (128, d), generator=g).float() - 1
        j = torch.randn(d, d, generator=g)
        j = j + j.t()
        n = max(calls // 32, 10) if d > 100 else calls
        out[str(d)] = {"matmul_us": _per_call_us(lambda s=s, j=j: s @ j, n, repeats),
                       "gemm_linear_us": _per_call_us(lambda s=s, j=j: _gemm.linear(s, j), n,
                                                      repeats)}
    return out


def _mixture():
    import math

    from ebmflow.energy import GaussianMixtureEnergy

    k = 8
    a = torch.arange(k) * (2 * math.pi / k)
    return GaussianMixtureEnergy(4 * torch.stack([a.cos(), a.sin()], 1), torch.full((k, 2), 0.5))


def _time_variants(make, variants: dict, target, x0, repeats: int, steps: int) -> dict:
    """Median microseconds per step of compiled samplers whose blocks are built with each
    variant's inductor options (``_compiled.inductor_options`` replaced while building),
    alternating in this process."""
    import ebmflow.samplers._compiled as compiled

    kept = compiled.inductor_options
    samplers = {}
    try:
        for variant, options in variants.items():
            if options is not None:  # None: ebmflow's own choice
                compiled.inductor_options = lambda *a, o=options: dict(o)
            samplers[variant] = make()
            samplers[variant].run(target, x0, steps)  # builds (and compiles) the blocks
            compiled.inductor_options = kept
    finally:
        compiled.inductor_options = kept
    runs = {v: lambda s=s: s.run(target, x0, steps, generator=torch.Generator().manual_seed(0))
            for v, s in samplers.items()}
    return {f"{v}_us_per_step": sec / steps * 1e6
            for v, sec in alternating_medians(runs, 1, repeats).items()}


def inductor_options(repeats: int, steps: int = 200) -> dict:
    import ebmflow.samplers._compiled as compiled
    from ebmflow.samplers import HMC, MALA

    target = _mixture()
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    variants = {"defaults": {}, "no_size_asserts": {"size_asserts": False},
                "cpp_wrapper": dict(compiled.INDUCTOR_OPTIONS), "ebmflow": None}
    return {name: _time_variants(make, variants, target, x0, repeats, steps)
            for name, make in (("mala", lambda: MALA(0.01, compile=True)),
                               ("hmc", lambda: HMC(0.01, n_leapfrog=10, compile=True)))}


def memory_planning(repeats: int) -> dict:
    """Compiled HMC (10 leapfrog steps) and MALA on the 2-D mixture, blocks with
    ``INDUCTOR_OPTIONS`` alone and with inductor's memory planning, by number of chains."""
    import ebmflow.samplers._compiled as compiled
    from ebmflow.samplers import HMC, MALA

    target = _mixture()
    base = dict(compiled.INDUCTOR_OPTIONS)
    variants = {"separate": base, "pooled": {**base, "memory_planning": True}}
    out: dict = {}
    for name, make, sizes in (("hmc", lambda: HMC(0.01, n_leapfrog=10, compile=True),
                               (256, 512, 1024, 4096)),
                              ("mala", lambda: MALA(0.01, compile=True), (256, 1024, 4096))):
        for b in sizes:
            x0 = torch.randn(b, 2, generator=torch.Generator().manual_seed(1))
            steps = max(16, 200 * 256 // b // 8 * 8)  # about the same time per run
            out[f"{name}_{b}"] = _time_variants(make, variants, target, x0, repeats, steps)
    return out


def _plain_step(kind: str, data: torch.Tensor):
    """One plain training step of ``benchmarks/training.py`` (ED or CD-10, batch 128)."""
    import training as T

    from ebmflow._optim import default_adam

    net = T._net(torch.device("cpu"))
    opt = default_adam(list(net.parameters()), 1e-3)
    loss_fn = T.plain_ed_loss if kind == "ed" else T.plain_cd_loss

    def step() -> None:
        x = data[torch.randint(0, data.shape[0], (128,))]
        opt.zero_grad(set_to_none=True)
        loss_fn(net, x).backward()
        opt.step()

    return step


def _self_time_shares(step, steps: int) -> dict[str, float]:
    """Each operator's share of the profiled self CPU time of ``steps`` calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    return {k: v / total for k, v in self_us.items()}


def training_profile(steps: int) -> dict:
    data = torch.randn(10000, 2, generator=torch.Generator().manual_seed(0))
    out = {}
    for kind in ("ed", "cd10"):
        step = _plain_step(kind, data)
        for _ in range(10):
            step()
        t0 = time.thread_time()
        for _ in range(steps):
            step()
        ms = (time.thread_time() - t0) / steps * 1e3
        shares = _self_time_shares(step, steps)
        products = shares.get("aten::mm", 0.0) + shares.get("aten::addmm", 0.0)
        silu = shares.get("aten::silu", 0.0) + shares.get("aten::silu_backward", 0.0)
        out[kind] = {"step_ms": ms, "products_share": products, "silu_share": silu,
                     "bound_x_plain": 1.0 / products}
    return out


def mlp_evaluation(calls: int, repeats: int) -> dict:
    from ebmflow.energy import MLPEnergy
    from ebmflow.spaces import Continuous

    torch.manual_seed(0)
    energy = MLPEnergy(Continuous(2), hidden=(128, 128, 128), activation="silu")
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(1))
    return {"energy_and_grad_us": _per_call_us(lambda: energy.energy_and_grad(x), calls, repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="training steps per timing")
    add_output_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"mask_store": mask_store(args.calls, args.repeats),
           "onednn_product_call": product_call(args.calls, args.repeats),
           "narrow_product": narrow_product(args.calls, args.repeats),
           "ising_field": ising_field(args.calls, args.repeats),
           "inductor_options": inductor_options(max(args.repeats, 7)),
           "memory_planning": memory_planning(max(args.repeats, 7)),
           "training_profile": training_profile(args.steps),
           "mlp_evaluation": mlp_evaluation(args.calls, args.repeats)}
    m, p = res["mask_store"], res["onednn_product_call"]
    print(f"mask store (128 x 100, compiled): bool {m['bool_us']:.1f} us, float {m['float_us']:.1f} us")
    if "skipped" not in p:
        print(f"128 x 256 x 256 product call: library op {p['library_op_us']:.1f} us, custom_op "
              f"{p['custom_op_us']:.1f} us, direct oneDNN {p['direct_us']:.1f} us")
    for b, r in res["narrow_product"].items():
        print(f"({b}, 256) x (256, 2) product: F.linear {r['f_linear_us']:.1f} us, (W x^T)^T "
              f"{r['narrow_us']:.1f} us ({r['narrow_view_weight_us']:.1f} us with W's view)")
    for d, r in res["ising_field"].items():
        print(f"Ising field, 128 chains, D = {d}: s @ J {r['matmul_us']:.1f} us, "
              f"gemm.linear {r['gemm_linear_us']:.1f} us")
    for name, r in res["inductor_options"].items():
        print(f"compiled {name}, mixture, 256 chains (us/step): inductor defaults "
              f"{r['defaults_us_per_step']:.1f}, no size asserts {r['no_size_asserts_us_per_step']:.1f}, "
              f"and C++ wrapper {r['cpp_wrapper_us_per_step']:.1f}, ebmflow's choice (also "
              f"memory planning) {r['ebmflow_us_per_step']:.1f}")
    for key, r in res["memory_planning"].items():
        name, b = key.split("_")
        print(f"compiled {name}, mixture, {b} chains (us/step): buffers allocated one by one "
              f"{r['separate_us_per_step']:.1f}, pooled (memory planning) "
              f"{r['pooled_us_per_step']:.1f}")
    for kind, r in res["training_profile"].items():
        print(f"plain {kind} step: {r['step_ms']:.2f} ms, products {100 * r['products_share']:.0f}%, "
              f"SiLU {100 * r['silu_share']:.0f}%, bound {r['bound_x_plain']:.2f}x the plain loop")
    print(f"MLP 2-128-128-128-1 energy_and_grad at 128 chains: "
          f"{res['mlp_evaluation']['energy_and_grad_us']:.0f} us")
    res["meta"] = {"torch": torch.__version__, "threads": 1, "machine": platform.machine(),
                   "calls": args.calls, "repeats": args.repeats, "steps": args.steps}
    write_json(output_path(args, "bounds"), res)


if __name__ == "__main__":
    main()
