"""Compiled executor of ``MCMCSampler.run``: K chain steps as one ``torch.compile``'d function.

The chain loop carries a fixed set of tensors (see ``_fast.flatten_carry``). A block is

    carry_{t+K} = advance(... advance(carry_t, noise_t) ..., noise_{t+K-1})

unrolled into one graph by ``torch.compile`` (inductor: fused kernels, no per-op dispatch, no
autograd tape; gradients inside come from ``torch.func.grad_and_value``). Randomness cannot be
drawn inside the block from a ``torch.Generator``, so it is drawn just before each block
(``rng.Draw.fill``: the same calls, sizes and order as the eager loop, hence the same numbers)
and handed to the transitions through ``rng.NoiseTape``. The compiled chains are therefore the
eager chains for the same generator, up to float rounding of the fused arithmetic.

The compiled function is cached on the sampler and specialised on the carry's shapes and
dtypes, K and the sampler's Python hyper-parameters; parameter *values* of the energy, the
chains' values and the number of steps of a run do not trigger a recompilation (the
remainder ``n_steps % K`` runs eagerly). Inductor caches the generated kernels on disk (see
``docs/samplers-continuous.md``, "Compiled chains"), so a new process compiles faster.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._warnings import user_stacklevel
from .rng import Draw, NoiseTape

__all__ = ["CompiledBlock", "CompileFallbackWarning", "NoiseBlock", "predraw", "compile_available",
           "whole_block_fill_is_exact", "chains_innermost", "chains_outermost"]

# How inductor builds a block (``benchmarks/bounds.py``: one process, alternating, one core;
# 256 chains of the 2-D mixture, microseconds per step):
# * ``size_asserts``: its runtime size and stride asserts re-check, at every call, what
#   dynamo's guards already guarantee for a block's inputs (static shapes and strides); the
#   outputs of opaque operators are as their fake implementations say (ebmflow's own are
#   tested). Skipping them: HMC 91.8 -> 86.4, MALA 20.3 -> 19.4.
# * ``cpp_wrapper``: the code around the kernels (buffer allocation, kernel calls) in C++
#   instead of Python, the largest per-call cost of small blocks: HMC 86.4 -> 77.3, MALA
#   19.4 -> 17.8; the same chains; the compile time (``benchmarks/compile_warmup.py``) did
#   not change.
INDUCTOR_OPTIONS = {"size_asserts": False, "cpp_wrapper": True}
# * ``memory_planning`` (one pooled allocation for a block's intermediate buffers instead of
#   one each; every buffer of a small state is a few hundred bytes and allocating it costs
#   more than computing it), for chain states of at most ``POOLED_STATE_MAX`` numbers in all:
#   HMC 79.8 -> 70.4 and MALA 17.8 -> 16.5 at 256 chains, HMC 119.3 -> 110.4 at 512. Larger
#   states may lose: HMC on 4096 chains of the mixture 565 -> 582, and in another run of the
#   same script 601 -> 795 (and at 1024 chains 204 -> 220, where this run gained, 189 -> 178):
#   how a pool of a few MB is allocated and returned depends on the allocator's history.
POOLED_STATE_MAX = 1024


def inductor_options(backend: Any, device: torch.device,
                     state_numel: int | None = None) -> dict[str, Any] | None:
    """The ``options`` of ``torch.compile`` for a block: ``INDUCTOR_OPTIONS`` for inductor on
    the CPU, where they were measured, with ``memory_planning`` for chain states of at most
    ``POOLED_STATE_MAX`` numbers (``state_numel``: all chains together); inductor's defaults on
    other devices (GPU: not yet measured) and None for other backends (which take no
    options)."""
    if backend != "inductor":
        return None
    if device.type != "cpu":
        return {}
    options = dict(INDUCTOR_OPTIONS)
    if state_numel is not None and state_numel <= POOLED_STATE_MAX:
        options["memory_planning"] = True
    return options


# states of at most this many numbers per chain run with the chain axis innermost in memory
INNERMOST_MAX = 8


def compile_available() -> tuple[bool, str]:
    """Whether ``torch.compile`` can run here, and why not."""
    import importlib.util

    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"

    if importlib.util.find_spec("torch._dynamo") is None:  # pragma: no cover
        return False, "torch._dynamo is missing from this torch build"
    return True, ""


class NoiseBlock:
    """``(K, *shape)`` buffers for K steps of pre-drawn noise, one per entry of ``spec``, and
    the calls that refill them in the eager order (step 0's draws, then step 1's, ...).

    The per-step views and their bound fill methods are built once, so refilling costs one
    Python call per draw (the compiled executor refills a block's noise before every call:
    for Gibbs, 16 draws per block of 8 steps). ``whole=True`` (only where
    ``whole_block_fill_is_exact`` says so) fills the single draw's K steps with one call.
    ``out``: buffers to reuse (shapes ``(K, *shape)``)."""

    def __init__(self, spec: list[Draw], k: int, whole: bool = False,
                 out: list[Tensor] | None = None):
        if out is None:
            out = [torch.empty((k, *d.shape), dtype=d.dtype, device=d.device) for d in spec]
        self.buffers = out
        if whole:
            self._fills = [spec[0].filler(out[0])]
        else:
            self._fills = [d.filler(buf[j]) for j in range(k) for d, buf in zip(spec, out)]

    def refill(self, generator: torch.Generator | None) -> list[Tensor]:
        """Draw the block's noise from ``generator``; returns the buffers."""
        for fill in self._fills:
            fill(generator=generator)
        return self.buffers


def predraw(spec: list[Draw], k: int, generator: torch.Generator | None,
            out: list[Tensor] | None = None, whole: bool = False) -> list[Tensor]:
    """K steps of draws ``(K, *shape)`` per entry of ``spec``, filled in the eager order
    (``NoiseBlock`` once)."""
    return NoiseBlock(spec, k, whole, out).refill(generator)


def whole_block_fill_is_exact(spec: list[Draw], k: int) -> bool:
    """Whether one draw of shape ``(K, *shape)`` gives the same numbers as K draws of
    ``shape`` in a row, for a step with a single random draw on the CPU.

    torch's CPU generators fill a tensor in order, so this often holds (uniform draws; normal
    draws whose size is a multiple of 16, where the vectorised Box-Muller path leaves no
    tail); it is checked here on a scratch generator rather than assumed, so a torch version
    that draws differently keeps the step-by-step fill. Saves K - 1 calls per block."""
    if len(spec) != 1 or k < 2 or spec[0].device.type != "cpu":
        return False
    d = spec[0]
    scratch = torch.Generator()
    whole = torch.empty((k, *d.shape), dtype=d.dtype)
    d.fill(whole, scratch.manual_seed(20240611))
    steps = torch.empty_like(whole)
    scratch.manual_seed(20240611)
    for j in range(k):
        d.fill(steps[j], scratch)
    return bool(torch.equal(whole, steps))


def chains_innermost(flat: dict[str, Tensor], n_chains: int) -> dict[str, Tensor]:
    """The carry with every ``(B, D)`` tensor of a small state (``1 < D <= INNERMOST_MAX``,
    ``D < B``) stored chain axis innermost: same shape and values, strides ``(1, B)``.

    Generated CPU kernels vectorise along the innermost axis of memory. For a 2-D state laid
    out ``(B, D)`` that axis is D, so a 16-lane vector holds 2 useful numbers and the loops
    over ``x[:, j]`` fall back to strided or scalar code; with the chain axis innermost every
    vector holds 16 chains (HMC on the 8-component 2-D mixture, 256 chains: 1.6x the steps/s
    of the row-major block). Ops that respect strides (elementwise, reductions, matrix
    products) see the same tensor; ``view`` would not, hence 2-D states only."""
    out = {}
    for name, v in flat.items():
        if v.dim() == 2 and v.shape[0] == n_chains and 1 < v.shape[1] <= INNERMOST_MAX \
                and v.shape[1] < n_chains:
            v = v.t().contiguous().t()
        out[name] = v
    return out


def chains_outermost(flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """The carry back in the usual row-major layout (what ``chains_innermost`` undid)."""
    return {name: v.contiguous() for name, v in flat.items()}


class CompiledBlock:
    """``K`` calls of ``advance(energy, flat_carry, tape) -> flat_carry`` compiled as one
    (the carry holds the chain state as ``flat_carry["x"]``).

    Attributes:
        k: steps per block.
        compile_seconds: wall time of the first call (tracing + compiling + running once).
        calls: number of blocks run.
        noise: the pre-drawn noise buffers the executor refills before each call (or None).
        whole_draws: whether ``predraw`` may fill each draw's K steps with one call.
    """

    def __init__(self, advance: Callable[[Any, dict[str, Tensor], NoiseTape], dict[str, Tensor]],
                 k: int, spec: list[Draw], key: tuple, backend: Any = "inductor"):
        self.k = k
        self.spec = spec
        self.key = key
        self.compile_seconds: float | None = None
        self.calls = 0
        # wall time of the calls after the compiling one (compile="auto" compares it)
        self.timed_calls = 0
        self.timed_seconds = 0.0
        self.noise: NoiseBlock | None = None  # the executor's noise buffers for this block
        self.whole_draws = whole_block_fill_is_exact(spec, k)
        n_draws = len(spec)

        def block(energy: Any, flat: dict[str, Tensor], draws: list[Tensor]) -> dict[str, Tensor]:
            for j in range(k):
                tape = NoiseTape([draws[i][j] for i in range(n_draws)])
                flat = advance(energy, flat, tape)
            return flat

        # a code object of its own: dynamo keeps one cache (and one recompile limit) per code
        # object, and every block of every sampler would otherwise share this one
        block.__code__ = block.__code__.replace()
        self._block, self._backend = block, backend
        self._fn: Callable[..., dict[str, Tensor]] | None = None  # at the first call (device)

    def __call__(self, energy: Any, flat: dict[str, Tensor], draws: list[Tensor]) -> dict[str, Tensor]:
        if self._fn is None:
            state = flat["x"]  # every carry holds the chain state as "x"
            self._fn = torch.compile(
                self._block, dynamic=False, backend=self._backend,
                options=inductor_options(self._backend, state.device, state.numel()))
        if self.compile_seconds is None:
            t0 = time.perf_counter()
            out = self._fn(energy, flat, draws)
            self.compile_seconds = time.perf_counter() - t0
        else:
            out = self._fn(energy, flat, draws)
        self.calls += 1
        return out


class CompileFallbackWarning(UserWarning):
    """A sampler asked to compile runs eagerly instead (the message says why)."""


def warn_fallback(name: str, why: str) -> None:
    """Warn once that sampler ``name`` runs eagerly instead of compiled, and ``why``."""
    warnings.warn(
        f"{name}: compiled chains are not available ({why}); running eagerly. Pass "
        "compile=False to silence this warning.",
        CompileFallbackWarning,
        stacklevel=user_stacklevel(),
    )
