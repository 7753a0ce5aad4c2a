"""Chain executors: the ways ``MCMCSampler.run`` advances a batch of chains.

``run`` is the one chain driver: it builds the carry, then hands the steps to executors in
order, each returning ``(carry, steps done)``, and the eager executor finishes what is left:

* ``run_graphed`` (CUDA states, ``cuda_graph=True``): K steps recorded once as a CUDA graph,
  replayed (``_fast.GraphRunner``);
* ``run_compiled`` (``compile=True`` / "auto"): blocks of K steps, each one ``torch.compile``'d
  function, noise pre-drawn in the eager order (``_compiled.CompiledBlock``, ``rng``);
* ``run_eager``: the step-by-step loop of "raise" mode, with in-place sums and a non-finite
  check per block of steps. (The generic ``MCMCSampler._advance`` loop serves "reset" mode and
  outer graph captures.)

All three give the same chains for the same generator (up to float rounding when compiled).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..energy.base import EnergyModel
from ._compiled import (
    CompiledBlock,
    NoiseBlock,
    chains_innermost,
    chains_outermost,
    compile_available,
    warn_fallback,
)
from ._fast import (
    GraphRunner,
    _hyperparameters,
    carry_spec,
    energy_attributes,
    flatten_carry,
    graph_key,
    unflatten_carry,
)
from .chain import ChainState, _accumulate, _Carry, _fold_bad, _row_sums
from .rng import RecordingTape, generator_state, real_generator, restore_generator_state

if TYPE_CHECKING:
    from .base import MCMCSampler

__all__ = ["run_eager", "run_compiled", "run_graphed", "use_compiled"]

_CHECK_BLOCK = 32  # steps per non-finite check in the eager "raise" loop
_GRAPH_BLOCK = 32  # default steps per recorded CUDA graph
_COMPILE_BLOCK = 8  # default steps per compiled block (compile time grows with it)
_MAX_BLOCKS = 4  # compiled blocks kept per sampler (one per energy / shape / K)



def run_eager(
    sampler: MCMCSampler,
    energy: EnergyModel,
    carry: _Carry,
    n: int,
    t0: int,
    generator: torch.Generator | None,
    bar: Any,
) -> _Carry:
    """The eager chain loop of "raise" mode (``n`` steps after ``t0`` done ones).

    Same chains, diagnostics and non-finite reports as ``n`` calls of ``_advance``, with
    less work per step: step info is summed in place, and the per-chain non-finite
    values (``_finite_rows``) are folded into ``first_bad`` once per block of
    ``_CHECK_BLOCK`` steps (a handful of ops per block instead of per step; on CPU one
    host read of the block's sum, and the exact per-step fold only when it is NaN/inf).
    Samplers with ``_keeps_finite`` only have their initial state checked. No host
    synchronisation for CUDA states.
    """
    state, acc, first_bad = carry.state, carry.acc, carry.first_bad
    if n <= 0:
        return carry
    rows_of = None if sampler._keeps_finite else sampler._finite_rows
    if rows_of is None and t0 == 0:  # a non-finite start is stuck there: step 0
        first_bad = _fold_bad(first_bad, _row_sums(state).unsqueeze(0), 0)
    transition = sampler.transition
    # per-step values are copied into one preallocated buffer: no small tensor stays alive
    # across steps (that would fragment the CPU heap under the energy's large buffers)
    buf: Tensor | None = None
    j, start = 0, t0
    for i in range(t0, t0 + n):
        state, info = transition(energy, state, generator)
        if info:
            _accumulate(acc, info)
        del info
        if rows_of is not None:
            rows = rows_of(state)
            if buf is None:
                buf = rows.new_empty((min(n, _CHECK_BLOCK), rows.shape[0]))
            buf[j].copy_(rows)
            del rows
            j += 1
            if j == buf.shape[0]:
                first_bad = _fold_bad(first_bad, buf, start)
                j, start = 0, i + 1
        bar.update(1)
    if j:
        first_bad = _fold_bad(first_bad, buf[:j], start)  # type: ignore[index]
    return _Carry(state, acc, first_bad, carry.n_reset, t0 + n)


def use_compiled(sampler: MCMCSampler, x0: Tensor, n_steps: int) -> bool:
    """Whether this run goes through the compiled executor (``compile`` True, or "auto"
    once the sampler has run enough steps to amortise compiling)."""
    mode = sampler.compile
    if mode is False or sampler._compile_failed is not None:
        return False
    if mode == "auto":
        if x0.device.type != "cpu":  # measured on CPU only: elsewhere compile=True opts in
            return False
        sampler._auto_steps += n_steps
        if sampler._auto_steps < sampler.compile_after:
            return False
    ok, why = compile_available()
    if not ok:
        sampler._compile_failed = why
        warn_fallback(type(sampler).__name__, why)
        return False
    return True


_AUTO_TIMED_CALLS = 4  # compiled block calls (after the compiling one) timed before deciding
_AUTO_SLOWER = 1.1  # "auto" goes back to eager when compiled steps take this much longer


def auto_layout(energy: EnergyModel, x0: Tensor) -> tuple:
    """What "auto"'s speed comparison is kept per: the energy and the state's shape/dtype."""
    return (id(energy), tuple(x0.shape), x0.dtype)


def auto_measured_slower(sampler: MCMCSampler, layout: tuple) -> bool:
    r"""After a compiled run under ``compile="auto"`` on a discrete state space: whether the
    compiled steps, timed over at least ``_AUTO_TIMED_CALLS`` block calls after the one that
    compiled, took more than ``_AUTO_SLOWER`` times the last eager run's time per step of
    the same layout. Discrete compiled chains equal the eager ones exactly, so going back to
    eager changes the speed only."""
    block = sampler._last_block
    eager = sampler._auto_eager_seconds.get(layout)
    if block is None or eager is None or block.timed_calls < _AUTO_TIMED_CALLS:
        return False
    return block.timed_seconds / (block.timed_calls * block.k) > _AUTO_SLOWER * eager


def run_compiled(
    sampler: MCMCSampler,
    energy: EnergyModel,
    carry: _Carry,
    n_steps: int,
    generator: torch.Generator | None,
    bar: Any,
) -> tuple[_Carry, int]:
    """Run blocks of K compiled steps; returns (carry, steps done).

    The first run for a chain-state layout runs step 0 eagerly with a ``RecordingTape``
    (it learns what the transition draws and which step info it reports); later runs of
    that layout start compiled at step 0, with the running sums laid out as zeros. Each
    block gets its K steps of noise pre-drawn from ``generator`` in the eager order. The
    remainder (< K steps) is left to the eager loop.
    """
    device = carry.state.x.device  # run() gives this executor the non-finite bookkeeping
    carry.t = torch.as_tensor(carry.t, dtype=torch.long, device=device)
    hyper = (_hyperparameters(sampler, baked=False), energy_attributes(energy))
    start_key = (id(energy), carry_spec(flatten_carry(carry)), hyper)
    known = sampler._draw_specs.get(start_key)
    if known is not None:  # a run like this one recorded its draws: no eager first step
        spec, acc_layout = known
        carry.acc = {name: torch.zeros(shape, dtype=dtype, device=device)
                     for name, shape, dtype in acc_layout}
        done = 0
    else:
        rec = RecordingTape(generator)
        try:
            carry = sampler._advance(energy, carry, rec)
        except TypeError as err:  # e.g. torch.randn(generator=<tape>) in a user's step()
            sampler._compile_failed = (
                f"{type(sampler).__name__}.step draws random numbers without "
                f"ebmflow.samplers.rng ({err})")
            warn_fallback(type(sampler).__name__, sampler._compile_failed)
            carry.t = 0
            return carry, 0
        spec, done = rec.spec, 1
        sampler._draw_specs[start_key] = (
            spec, [(name, tuple(v.shape), v.dtype) for name, v in carry.acc.items()])
        bar.update(1)
    # a fixed K (never derived from n_steps): runs of any length share one compiled block;
    # a run with fewer than K steps left stays eager
    k = sampler.graph_steps or sampler._compile_block_steps()
    blocks = (n_steps - done) // k
    if blocks == 0:
        return carry, done
    flat = flatten_carry(carry)
    n_chains = carry.state.x.shape[0]
    innermost = chains_innermost(flat, n_chains)
    relaid = any(innermost[n] is not v for n, v in flat.items())
    # small states run chains innermost; an energy that cannot take that layout (a view of
    # the state, say) fails at its first block, and the sampler retries row-major once
    layouts = ([innermost, flat] if relaid and not getattr(sampler, "_row_major_blocks", False)
               else [flat])
    why = ""
    for given in layouts:
        out = _run_blocks(sampler, energy, given, k, spec, hyper, blocks, generator, bar,
                          given is not flat)
        if isinstance(out, dict):
            return unflatten_carry(chains_outermost(out), _Carry, ChainState), done + blocks * k
        why = out
        if given is not flat:
            sampler._row_major_blocks = True
    sampler._compile_failed = why
    warn_fallback(type(sampler).__name__, why)
    return unflatten_carry(flat, _Carry, ChainState), done


def _run_blocks(
    sampler: MCMCSampler,
    energy: EnergyModel,
    flat: dict[str, Tensor],
    k: int,
    spec: list,
    hyper: tuple,
    blocks: int,
    generator: torch.Generator | None,
    bar: Any,
    innermost: bool,
) -> dict[str, Tensor] | str:
    """``blocks`` compiled blocks from the carry ``flat``; the carry after them, or why the
    block failed at its first call (then nothing was run and no noise was drawn)."""
    device = flat["x"].device
    key = (id(energy), carry_spec(flat), k, tuple(spec), innermost, *hyper)
    block = sampler._compiled.get(key)
    if block is None:
        block = _new_block(sampler, energy, k, spec, key, innermost)
    if block.noise is None:  # buffers and fill calls kept with the block, across runs
        block.noise = NoiseBlock(spec, k, block.whole_draws)
    real = real_generator(generator)
    # a first call may fail to compile: its noise is then handed back to the generator, so
    # a retry or the eager fallback continues the same chains as an eager run
    before = generator_state(real, device) if block.calls == 0 else None
    for _ in range(blocks):
        t0 = time.perf_counter() if block.calls > 0 else None  # the compiling call apart
        draws = block.noise.refill(real)
        try:
            flat = block(energy, flat, draws)
        except Exception as err:  # noqa: BLE001 - any compile failure falls back
            if block.calls > 0:
                raise
            restore_generator_state(real, device, before)
            sampler._compiled.pop(key, None)
            return f"torch.compile failed: {type(err).__name__}: {err}"
        if t0 is not None:
            block.timed_calls += 1
            block.timed_seconds += time.perf_counter() - t0
        bar.update(k)
    sampler._compile_seconds = block.compile_seconds
    sampler._last_block = block
    return flat


def _new_block(sampler: MCMCSampler, energy: EnergyModel, k: int, spec: list, key: tuple,
               innermost: bool) -> CompiledBlock:
    """A compiled K-step block for ``key`` (a few are kept: e.g. a live and an EMA energy)."""

    def advance(e: EnergyModel, flat: dict[str, Tensor], tape: Any) -> dict[str, Tensor]:
        c = sampler._advance(e, unflatten_carry(flat, _Carry, ChainState), tape)
        out = flatten_carry(c)
        # each step hands on the layout it was given (a row-major gradient of a chains-
        # innermost state is transposed here), so every block call sees the same strides
        return chains_innermost(out, c.state.x.shape[0]) if innermost else out

    block = CompiledBlock(advance, k, list(spec), key, backend=sampler.compile_backend)
    if len(sampler._compiled) >= _MAX_BLOCKS:
        sampler._compiled.pop(next(iter(sampler._compiled)))
    sampler._compiled[key] = block
    return block


def run_graphed(
    sampler: MCMCSampler,
    energy: EnergyModel,
    carry: _Carry,
    n_steps: int,
    generator: torch.Generator | None,
    bar: Any,
) -> tuple[_Carry, int]:
    """Replay a recorded K-step CUDA graph ``n_steps // K`` times; returns (carry, done)."""
    k = min(sampler.graph_steps or _GRAPH_BLOCK, n_steps)
    device = carry.first_bad.device
    carry.t = torch.as_tensor(carry.t, dtype=torch.long, device=device)
    flat = flatten_carry(carry)
    key = graph_key(sampler, energy, carry_spec(flat), k, generator)
    runner = sampler._graph
    if runner is None or runner.key != key:
        sampler._graph = None  # free the old pool before recording a new graph
        runner = GraphRunner.record(
            key, lambda c: sampler._advance(energy, c, generator), carry, k, generator
        )
        if runner is None:
            carry.t = 0
            return carry, 0
        sampler._graph = runner
    out = runner.replay(flat, n_steps // k, bar)
    return unflatten_carry(out, _Carry, ChainState), (n_steps // k) * k


