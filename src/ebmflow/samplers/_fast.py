"""Fast path of ``MCMCSampler.run``: K chain steps recorded once as a CUDA graph, then replayed.

The chain loop carries a fixed set of tensors (states, cached energy and gradient, sampler
extras, running sums of diagnostics, non-finite bookkeeping, the step counter). Recording:

1. two warm-up steps on copies of the carry, on a side stream (lazy cuBLAS / autograd
   initialisation must not happen during capture), with the RNG state saved before and
   restored after, so the warm-up changes neither the chains nor the random stream;
2. K steps captured with ``torch.cuda.graph`` on static copies of the carry; the K-th step's
   outputs are copied back into the static inputs, so one replay advances the chains K steps.
   Intermediate tensors live in the graph's private memory pool: no allocation per step;
3. replay: copy the carry into the static inputs, replay n // K times, copy the outputs out.

Random numbers: the default CUDA generator is registered with every graph; a user CUDA
generator is registered with ``CUDAGraph.register_generator_state``. Each replay advances the
generator's Philox offset exactly as K eager steps would, so graph and eager chains agree.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._warnings import user_stacklevel
from ..energy.base import EnergyModel, functional_energy_and_grad
from .rng import generator_state, restore_generator_state

__all__ = ["GraphRunner", "flatten_carry", "unflatten_carry", "carry_spec", "graph_key"]

_WARMUP_STEPS = 2
# public attributes that record results of runs, not settings (``last_state`` is None before
# the first run only: keying on it would record every graph twice)
_RUN_RESULTS = frozenset({"last_state", "compile_after"})
_BASE_EAG = EnergyModel.energy_and_grad
_BASE_FORWARD = EnergyModel.forward


def flatten_carry(carry: Any) -> dict[str, Tensor]:
    """The carry's tensors by name (``x``, ``energy``, ``grad``, ``extra/*``, ``acc/*``...)."""
    s = carry.state
    flat: dict[str, Tensor] = {"x": s.x}
    if s.energy is not None:
        flat["energy"] = s.energy
    if s.grad is not None:
        flat["grad"] = s.grad
    for k, v in s.extra.items():
        flat["extra/" + k] = v
    for k, v in carry.acc.items():
        flat["acc/" + k] = v
    flat["first_bad"] = carry.first_bad
    flat["n_reset"] = carry.n_reset
    flat["t"] = carry.t
    return flat


def unflatten_carry(flat: dict[str, Tensor], carry_cls: type, state_cls: type) -> Any:
    extra = {k[6:]: v for k, v in flat.items() if k.startswith("extra/")}
    acc = {k[4:]: v for k, v in flat.items() if k.startswith("acc/")}
    state = state_cls(flat["x"], flat.get("energy"), flat.get("grad"), extra)
    return carry_cls(state, acc, flat["first_bad"], flat["n_reset"], flat["t"])


def carry_spec(flat: dict[str, Tensor]) -> tuple:
    """Names, shapes, dtypes and devices (what a recorded graph depends on)."""
    return tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in flat.items())


def _hyperparameters(obj: Any, baked: bool = True) -> tuple:
    """Public scalar attributes, plus (``baked``) the private ones a class lists in
    ``_graph_baked`` (Python values its transition reads, e.g. a fixed step size)."""
    out = []
    baked = getattr(obj, "_graph_baked", ()) if baked else ()
    for k, v in sorted(vars(obj).items()):
        if (k.startswith("_") and k not in baked) or k in _RUN_RESULTS:
            continue
        if isinstance(v, (bool, int, float, str, type(None))):
            out.append((k, v))
    return tuple(out)


def graph_key(sampler: Any, energy: torch.nn.Module, spec: tuple, k: int,
              generator: torch.Generator | None) -> tuple:
    """Everything a recording bakes in: energy identity, parameter addresses, training mode,
    shapes, K, the sampler's public scalar hyper-parameters and the generator."""
    tensors = [*energy.parameters(), *energy.buffers()]
    addresses = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors)
    return (
        id(energy), energy.training, addresses, spec, k, _hyperparameters(sampler),
        energy_attributes(energy), id(generator) if generator is not None else None,
    )


def energy_attributes(energy: torch.nn.Module) -> tuple:
    """Python scalar attributes of the energy and its submodules (a temperature, a flag...):
    a recorded graph or compiled block reads them once, so a change must mean a new one.
    Values that change from run to run belong in buffers instead."""
    return tuple((name, _hyperparameters(m)) for name, m in energy.named_modules())


def _acc_spec(flat: dict[str, Tensor]) -> tuple:
    return tuple(x for x in carry_spec(flat) if not x[0].startswith("acc/"))


class GraphRunner:
    """A K-step CUDA graph with its static carry buffers.

    It keeps the generator it was recorded with: the graph advances that generator's state,
    and holding it means its ``id`` (part of the key) cannot be reused by a new generator,
    which must get a graph of its own.
    """

    def __init__(self, key: tuple, graph: Any, static: dict[str, Tensor], k: int,
                 generator: torch.Generator | None = None):
        self.key = key
        self.graph = graph
        self.static = static
        self.k = k
        self.generator = generator

    @classmethod
    def record(cls, key: tuple, advance: Callable[[Any], Any], carry: Any, k: int,
               generator: torch.Generator | None) -> GraphRunner | None:
        """Warm up and record ``k`` calls of ``advance``; None (with a warning) on failure."""
        carry_cls, state_cls = type(carry), type(carry.state)
        device = carry.state.x.device
        flat0 = flatten_carry(carry)
        rng = generator_state(generator, device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                c = unflatten_carry({n: v.clone() for n, v in flat0.items()}, carry_cls, state_cls)
                for _ in range(_WARMUP_STEPS):
                    c = advance(c)
            torch.cuda.current_stream(device).wait_stream(side)
            warm = flatten_carry(c)
        finally:
            restore_generator_state(generator, device, rng)
        # the recorded loop starts with zeroed running sums of the step info
        static = {n: v.clone() for n, v in flat0.items()}
        for n, v in warm.items():
            if n.startswith("acc/"):
                static[n] = torch.zeros_like(v)
        if _acc_spec(warm) != _acc_spec(static) or set(warm) != set(static):
            warnings.warn(
                "cuda_graph: the chain state changes structure between steps (init_state and "
                "transition return different fields or shapes); running eagerly instead",
                stacklevel=user_stacklevel(),
            )
            return None
        graph = torch.cuda.CUDAGraph()
        try:
            if generator is not None:  # (older torch has no register_generator_state)
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph):
                c = unflatten_carry(dict(static), carry_cls, state_cls)
                for _ in range(k):
                    c = advance(c)
                out = flatten_carry(c)
                for n, v in static.items():
                    if out[n] is not v:
                        v.copy_(out[n])
        except Exception as err:  # capture of an uncapturable step: fall back, say why
            warnings.warn(
                f"cuda_graph: recording the chain loop failed ({type(err).__name__}: {err}); "
                "running eagerly instead (remove host synchronisation such as .item() or "
                "bool(tensor) from the sampler's transition)",
                stacklevel=user_stacklevel(),
            )
            restore_generator_state(generator, device, rng)
            return None
        restore_generator_state(generator, device, rng)
        return cls(key, graph, static, k, generator)

    def replay(self, flat: dict[str, Tensor], times: int, bar: Any) -> dict[str, Tensor]:
        """Load ``flat`` into the static inputs, replay ``times`` times, return copies."""
        static = self.static
        for n, v in static.items():
            src = flat.get(n)
            if src is None:  # running sums absent before the first step
                v.zero_()
            else:
                v.copy_(src)
        for _ in range(times):
            self.graph.replay()
            bar.update(self.k)
        return {n: v.clone() for n, v in static.items()}


def energy_and_grad(energy: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """``energy.energy_and_grad(x)`` with the per-call device check skipped (the sampler checks
    the chain states once per run), for energies that do not override it or ``forward``.

    Returns detached E(x) ``(B,)`` and dE/dx (shape of x); no parameter ``.grad`` is written.
    """
    cls = type(energy)
    if cls.energy_and_grad is not _BASE_EAG or cls.forward is not _BASE_FORWARD:
        return energy.energy_and_grad(x)
    if torch.compiler.is_compiling():  # one traced forward-and-backward graph
        return functional_energy_and_grad(energy, x)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        try:
            e = energy.energy(xg)
        except RuntimeError:
            return energy.energy_and_grad(x)  # the checked path diagnoses device / dtype
        if not isinstance(e, Tensor) or e.dim() != 1 or e.shape[0] != x.shape[0]:
            e = energy(xg)  # the checked path raises the informative error
        (g,) = torch.autograd.grad(e.sum(), xg)
    return e.detach(), g
