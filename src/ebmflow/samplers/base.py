"""Sampler bases: ``Sampler`` (anything that draws states) and ``MCMCSampler`` (a Markov kernel).

Energies are arguments, not members: ``sampler.sample(energy, n)`` works with any
``EnergyModel`` of a matching space, including EMA copies and tilted energies.

Subclassing ``MCMCSampler`` takes one method:

    class RandomWalkMH(MCMCSampler):
        def __init__(self, step_size=0.5, **kw):
            super().__init__(**kw)
            self.step_size = step_size

        def step(self, energy, x, generator=None):
            prop = x + self.step_size * rng.randn(x.shape, generator, x.device, x.dtype)
            log_alpha = energy(x) - energy(prop)           # f(x') - f(x), f = -E
            u = rng.rand(x.shape[:1], generator, x.device, x.dtype)
            accept = u.log() < log_alpha
            x = torch.where(accept[:, None], prop, x)
            return x, {"accept_rate": accept.float()}      # per-chain info is averaged by run()

(``rng`` is ``ebmflow.samplers.rng``: it draws like ``torch.randn`` / ``torch.rand``, and lets
the compiled executor hand in pre-drawn noise.) ``run`` then gives the loop, the averaged diagnostics (``sampler.stats``), non-finite
detection, a progress bar and the fast path (``cuda_graph=True``: K steps recorded once as a
CUDA graph and replayed; see ``MCMCSampler``). Samplers that cache the energy and gradient of
the current state between steps (MALA, HMC) override ``init_state`` and ``transition`` instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import _capture
from ..energy.base import EnergyModel
from ..spaces import Categorical, Continuous, check_same_device
from ._compiled import CompiledBlock
from ._fast import GraphRunner
from .chain import (  # noqa: F401 - re-exported: samplers import the helpers from here
    _NEVER,
    _NO_BAR,
    ChainState,
    NonFiniteError,
    StepInfo,
    _Carry,
    _check_finite_start,
    _energy_grad_rows,
    _raise_if_bad,
    _reduce_info,
    _row_sums,
    _where_state,
)
from .executors import (
    _COMPILE_BLOCK,
    auto_layout,
    auto_measured_slower,
    run_compiled,
    run_eager,
    run_graphed,
    use_compiled,
)

__all__ = ["Sampler", "MCMCSampler", "ChainState", "NonFiniteError", "StepInfo"]

_COMPILE_AFTER = 2000  # compile="auto": steps run eagerly before compiling


class Sampler(nn.Module):
    """Anything that draws states for an energy.

    ``sample(energy, n, x0=None, generator=None) -> (n, *event)`` draws states;
    ``update(energy, data=None) -> dict`` lets a learned sampler (a flow, a discrete flow,
    a replay buffer) adapt once per training step; plain MCMC returns ``{}``.
    After each call, ``self.stats`` holds that call's diagnostics as 0-d tensors
    (no host synchronisation: convert with ``float()`` only when logging).
    """

    #: True for learned samplers whose ``update`` calls ``sync_gradients`` between backward
    #: and the optimiser step (the Trainer then averages their gradients across processes
    #: instead of their parameters after separate steps)
    syncs_gradients: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, Tensor] = {}
        #: set by the Trainer under data parallelism: all-reduces (averages) the gradients of
        #: the given parameters across processes
        self.grad_sync: Callable[[list[Tensor]], None] | None = None

    def sync_gradients(self, params: Iterable[Tensor]) -> None:
        """Average the gradients of ``params`` across processes when a data-parallel Trainer
        asked for it (``grad_sync``); a no-op otherwise. Learned samplers call it after
        ``backward()`` and before their optimiser step, so every process takes the same step."""
        if self.grad_sync is not None:  # every rank passes the same tensors, in order
            self.grad_sync(list(params))

    def sample(
        self,
        energy: EnergyModel,
        n: int | None = None,
        *,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``n`` states ``(n, *event)`` of ``energy.space`` (or continue from ``x0``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample()")

    def update(self, energy: EnergyModel, data: Tensor | None = None) -> dict[str, Tensor]:
        """Adapt a learned sampler; returns stats. Default: nothing to learn, ``{}``."""
        return {}

    def supports(self, energy: EnergyModel) -> bool:
        """Whether this sampler can draw states of ``energy.space`` (override to restrict)."""
        return True

    def _check_energy(self, energy: EnergyModel) -> None:
        if not isinstance(energy, EnergyModel):
            raise ValueError(
                f"energy must be an ebmflow EnergyModel, got {type(energy).__name__}; "
                "subclass ebmflow.energy.EnergyModel and implement energy()"
            )
        if not self.supports(energy):
            raise ValueError(
                f"{type(self).__name__} cannot sample {energy.space!r}; samplers for this "
                f"space: {', '.join(_samplers_for(energy.space))}"
            )

    def _initial_states(
        self,
        energy: EnergyModel,
        n: int | None,
        x0: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """x0 if given (validated against the energy's space), else ``n`` draws of its noise."""
        self._check_energy(energy)
        ref = energy.reference_tensor()
        device = ref.device if ref is not None else None
        if x0 is not None:
            if n is not None and x0.shape[0] != n:
                raise ValueError(f"n={n} but x0 has {x0.shape[0]} states; pass one of them")
            return energy.space.validate(x0, "x0", device=device)
        if n is None:
            raise ValueError("pass n (number of states) or x0 (initial states)")
        if generator is not None and device is not None and generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the energy is on {device}; create it "
                f"with torch.Generator(device='{device}')"
            )
        return energy.space.noise(n, generator=generator, device=device)


def _samplers_for(space: Any) -> list[str]:
    """Names of ebmflow's samplers that can draw states of ``space``."""
    from ..spaces import Binary, Continuous

    if isinstance(space, Continuous):
        return ["Langevin", "MALA", "HMC", "FlowMC (ebmflow.flows)"]
    if isinstance(space, (Binary, Categorical)):
        return ["Gibbs", "GibbsWithGradients", "DiscreteLangevin",
                "DiscreteFlowSampler (ebmflow.discrete_flows)"]
    return ["none built in: subclass ebmflow.samplers.MCMCSampler"]


class MCMCSampler(Sampler):
    """A Markov kernel that keeps the target p ∝ exp(-E) invariant (or approximately, for ULA).

    Subclasses implement ``step(energy, x, generator) -> x'`` or ``-> (x', info)``, where
    ``info`` maps names to 0-d or per-chain ``(B,)`` tensors (e.g. ``accept_rate``); or, to
    cache the energy and gradient between steps, ``init_state`` and ``transition``.
    ``run``, ``sample``, the diagnostics and the fast path then come for free.

    Args:
        n_steps: default number of steps of ``sample``/``run`` (default 10).
        on_nonfinite: "raise" (default): ``run`` raises ``NonFiniteError`` naming the first
            step and the chains where a state (or its cached energy / gradient) became
            NaN/inf; "reset": such a move is undone (the chain keeps its previous state) and
            counted in ``stats["nonfinite"]``.
        progress: show a tqdm progress bar in ``run``.
        cuda_graph: fast path for CUDA states (default False). The first run for a given
            (energy, batch shape, hyper-parameters) records ``graph_steps`` steps as one CUDA
            graph on static buffers (after two warm-up steps on copies, with the RNG state
            restored so the chains are unchanged); every run then replays it
            ``n_steps // graph_steps`` times and does the remainder eagerly. No host
            synchronisation or allocation happens inside the replayed steps. The chains are
            the same as the eager loop's for the same seed (Philox offsets are replayed in
            the same order). Requirements on ``transition``: no ``.item()`` / ``bool(tensor)``,
            no Python-side state changes (they would happen once, at capture), hyper-parameters
            read from public scalar attributes (they are part of the cache key) or from
            tensors in ``ChainState.extra``. Parameters of the energy may be updated in place
            (optimiser steps) between runs; moving them (``.to()``) triggers a new capture.
            Ignored (eager loop) for CPU states or when an outer CUDA graph is being captured.
        graph_steps: K, steps per recorded CUDA graph or compiled block (default None: 32
            for CUDA graphs, 8 for compiled blocks, whose compile time grows with K; fewer
            when ``n_steps`` is smaller).
        compile: the compiled executor (CPU and CUDA): ``True`` runs every ``run`` of two or
            more steps as blocks of K steps, each one ``torch.compile``'d function (fused
            kernels, no per-op dispatch; gradients of a user's ``energy`` by
            ``torch.func.grad_and_value`` inside the block). Random numbers are drawn from
            ``generator`` just before each block in the eager order, so the chains are the
            eager chains to float rounding. ``"auto"`` (default) compiles CPU chains once the
            sampler has run ``compile_after`` steps (default 2000) eagerly, i.e. when it is
            used for long enough to amortise compiling, and on discrete states goes back to
            eager for good where the compiled steps, timed over 4 or more blocks, take more
            than 1.1x the last eager run's time per step (CUDA chains stay eager: not measured
            yet; ``compile=True`` opts in, ``cuda_graph=True`` is the measured-later CUDA
            path); ``False`` never compiles. Compiling takes
            seconds to minutes the first time (``compile_seconds`` reports it) and much less
            when inductor's on-disk cache holds the kernels. A transition that cannot be
            compiled falls back to eager with a ``CompileFallbackWarning`` naming why. The
            block is specialised on the carry's shapes, K and the sampler's scalar
            hyper-parameters; the number of steps, the states' and the parameters' values do
            not cause recompilation. Transitions must draw random numbers through
            ``ebmflow.samplers.rng`` (``rng.randn(shape, generator, device, dtype)`` etc.).
    """

    #: True when ``transition`` never moves a chain from a finite state (x, cached E and
    #: gradient) to a non-finite one, e.g. Metropolis-Hastings kernels that reject every
    #: non-finite proposal. ``run`` in "raise" mode then checks the initial state only (a
    #: non-finite start stays put and is reported at step 0) instead of every step.
    _keeps_finite: bool = False

    def __init__(
        self,
        n_steps: int = 10,
        on_nonfinite: str = "raise",
        progress: bool = False,
        *,
        cuda_graph: bool = False,
        graph_steps: int | None = None,
        compile: bool | str = "auto",
    ):
        super().__init__()
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        if on_nonfinite not in ("raise", "reset"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'reset', got {on_nonfinite!r}")
        if graph_steps is not None and (not isinstance(graph_steps, int)
                                        or isinstance(graph_steps, bool) or graph_steps < 1):
            raise ValueError(f"graph_steps must be a positive int or None, got {graph_steps!r}")
        self.n_steps = n_steps
        self.on_nonfinite = on_nonfinite
        self.progress = progress
        self.cuda_graph = bool(cuda_graph)
        self.graph_steps = graph_steps
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        self.compile = compile
        self.compile_after = _COMPILE_AFTER
        #: ``torch.compile`` backend of compiled blocks ("inductor"; "eager" / "aot_eager" or a
        #: callable for debugging and tests)
        self.compile_backend: Any = "inductor"
        self._compile_seconds: float | None = None
        self.chain_stats: dict[str, Tensor] = {}
        self.last_state: ChainState | None = None
        self._graph: GraphRunner | None = None
        self._compiled: dict[tuple, CompiledBlock] = {}
        # per chain-state layout: what a transition draws, and its step-info layout
        self._draw_specs: dict[tuple, tuple[list, list]] = {}
        self._compile_failed: str | None = None
        self._row_major_blocks = False  # the energy failed on chains-innermost states
        self._auto_steps = 0
        # compile="auto" on discrete states: the last eager run's seconds per step, per
        # layout (``executors.auto_layout``), the layouts whose compiled steps measured
        # slower (they run eagerly from then on), and the block the last compiled run used
        self._auto_eager_seconds: dict[tuple, float] = {}
        self._auto_slower: set[tuple] = set()
        self._last_block: CompiledBlock | None = None

    # -- subclass surface --------------------------------------------------------------
    def step(
        self, energy: EnergyModel, x: Tensor, generator: torch.Generator | None = None
    ) -> Tensor | tuple[Tensor, StepInfo]:
        """One transition x -> x'. Return x' or (x', info)."""
        if type(self).transition is MCMCSampler.transition:
            raise NotImplementedError(
                f"{type(self).__name__} must implement step() (or init_state/transition)"
            )
        state, info = self.transition(energy, self.init_state(energy, x), generator)
        return state.x, info

    def init_state(self, energy: EnergyModel, x: Tensor) -> ChainState:
        """Build the chain state for ``x`` (default: just x; MALA/HMC add E and grad)."""
        return ChainState(x)

    def transition(
        self, energy: EnergyModel, state: ChainState, generator: torch.Generator | None = None
    ) -> tuple[ChainState, StepInfo]:
        """One transition on a ``ChainState``; default wraps ``step``."""
        out = self.step(energy, state.x, generator)
        x, info = out if isinstance(out, tuple) else (out, {})
        return ChainState(x), info

    def end_run(self, energy: EnergyModel, state: ChainState) -> None:
        """Hook called once after ``run`` with the final state (default: nothing).

        Adaptive samplers store what they learned here (MALA/HMC: the adapted step size) and
        may add entries to ``self.stats``.
        """

    def _finite_rows(self, state: ChainState) -> Tensor:
        """Per chain ``(B,)``: a value that is finite iff the chain's state is (default: the sum
        of x, the cached energy and the cached gradient). Samplers whose states cannot become
        non-finite in some field override it to skip that field."""
        return _row_sums(state)

    # -- provided ----------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        energy: EnergyModel,
        x0: Tensor,
        n_steps: int | None = None,
        *,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
    ) -> Tensor:
        """Run ``n_steps`` transitions from ``x0``; returns the final states (detached).

        Diagnostics (means over steps of what each step reported, plus ``nonfinite``, the
        number of undone non-finite moves, or in "raise" mode the number of chains that went
        non-finite, which is 0 unless an outer CUDA-graph capture prevented raising) are left
        in ``self.stats`` as 0-d tensors, per-chain means in ``self.chain_stats`` as ``(B,)``
        tensors, and the final ``ChainState`` in ``self.last_state``.

        Chains always run in the states' own precision: under ``torch.autocast`` (e.g. a loss
        computed with mixed precision, which calls its sampler) autocast is switched off for
        the run, because Metropolis-Hastings corrections computed from bfloat16 energies are
        no longer exact (rounding of E ~ 50 alone rejects about 1% of exact moves).
        """
        if isinstance(x0, Tensor) and torch.is_autocast_enabled(x0.device.type):
            with torch.autocast(x0.device.type, enabled=False):
                return self.run(energy, x0, n_steps, generator=generator, progress=progress)
        n_steps = self.n_steps if n_steps is None else n_steps
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        self._check_energy(energy)
        _check_shape(energy, x0, type(self).__name__)
        ref = energy.reference_tensor()
        if ref is not None:  # once per run; the steps skip the per-call device check
            check_same_device(x0, ref.device, "x0")
            if x0.is_floating_point() and ref.is_floating_point() and x0.dtype != ref.dtype:
                raise ValueError(
                    f"x0 has dtype {x0.dtype} but the energy's parameters are {ref.dtype}; "
                    f"cast one of them, e.g. x0.to({ref.dtype})"
                )
        capturing = _capture.capturing(x0)
        if (x0.is_floating_point() and not x0.is_cuda and not capturing
                and not math.isfinite(float(x0.sum()))):
            _check_finite_start(x0, None)  # CPU: one read; CUDA states are checked on failure
        state = self.init_state(energy, x0.detach())
        show = self.progress if progress is None else progress
        bar = (tqdm(total=n_steps, desc=type(self).__name__, leave=False) if show
               else _NO_BAR)
        graphed = self.cuda_graph and x0.is_cuda and not capturing and n_steps > 0
        # "auto" compares compiled and eager speed on discrete states, where the two give
        # the same chains exactly
        timed = (self.compile == "auto" and not capturing and x0.device.type == "cpu"
                 and not isinstance(energy.space, Continuous))
        layout = auto_layout(energy, x0) if timed else None
        if not hasattr(self, "_auto_slower"):  # a sampler pickled by an earlier version
            self._auto_eager_seconds, self._auto_slower, self._last_block = {}, set(), None
        compiled = (not graphed and not capturing and n_steps > 1
                    and layout not in self._auto_slower and use_compiled(self, x0, n_steps))
        eager = self.on_nonfinite == "raise" and not compiled and not capturing
        if eager and not graphed:  # bookkeeping tensors are made only when needed
            carry = _Carry(state, {}, None, None, 0)  # type: ignore[arg-type]
        else:
            carry = _Carry(
                state,
                {},
                torch.full((x0.shape[0],), _NEVER, dtype=torch.long, device=x0.device),
                torch.zeros((), device=x0.device),
                0,  # a Python int in the eager loop (no op per step); a tensor in graphs
            )
        done = 0
        t0 = time.perf_counter()
        if graphed:
            carry, done = run_graphed(self, energy, carry, n_steps, generator, bar)
        elif compiled:
            self._last_block = None
            carry, done = run_compiled(self, energy, carry, n_steps, generator, bar)
        if eager:
            carry = run_eager(self, energy, carry, n_steps - done, done, generator, bar)
        else:
            for _ in range(n_steps - done):
                carry = self._advance(energy, carry, generator)
                bar.update(1)
        bar.close()
        if layout is not None and not compiled and n_steps > 0:
            self._auto_eager_seconds[layout] = (time.perf_counter() - t0) / n_steps
        elif layout is not None and compiled and auto_measured_slower(self, layout):
            self._auto_slower.add(layout)
        first_bad = carry.first_bad  # None: every state was finite (eager loop on CPU)
        if self.on_nonfinite == "raise" and n_steps > 0 and not capturing and first_bad is not None:
            _raise_if_bad(first_bad, type(self).__name__, x0)
        denom = max(n_steps, 1)
        self.chain_stats = {k: v / denom for k, v in carry.acc.items() if v.dim() > 0}
        self.stats = {k: (v / denom).mean() for k, v in carry.acc.items()}
        if self.on_nonfinite == "reset":
            self.stats["nonfinite"] = carry.n_reset
        elif first_bad is None:
            self.stats["nonfinite"] = torch.zeros((), device=x0.device)
        else:
            self.stats["nonfinite"] = (first_bad < _NEVER).sum().float()
        self.last_state = carry.state
        self.end_run(energy, carry.state)
        return carry.state.x

    def sample(
        self,
        energy: EnergyModel,
        n: int | None = None,
        *,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        n_steps: int | None = None,
    ) -> Tensor:
        """Run ``n_steps`` (default ``self.n_steps``) from ``x0`` or from the space's noise."""
        x = self._initial_states(energy, n, x0, generator)
        return self.run(energy, x, n_steps, generator=generator)

    def clear_graphs(self) -> None:
        """Drop the recorded CUDA graph and its memory pool (the next run records again)."""
        self._graph = None
        self._compiled = {}
        self._draw_specs = {}
        self._last_block = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``torch.save(sampler)``, ``copy.deepcopy``) leaves out the compiled blocks
        and the recorded CUDA graph: caches that cannot be pickled and are rebuilt on use."""
        state = dict(super().__getstate__())
        state.update(_graph=None, _compiled={}, _draw_specs={}, _last_block=None,
                     _auto_eager_seconds={}, _auto_slower=set())  # keyed by id(energy)
        return state

    # -- internals ---------------------------------------------------------------------
    def _advance(
        self, energy: EnergyModel, carry: _Carry, generator: torch.Generator | None
    ) -> _Carry:
        """One step of the chain loop: transition, non-finite handling, info accumulation.

        A pure function of tensors (no host synchronisation), so it can be recorded in a
        CUDA graph or compiled.
        """
        old = carry.state
        new, info = self.transition(energy, old, generator)
        finite = self._finite_rows(new).mul(0) == 0  # 0 * NaN/inf = NaN != 0; cheaper than isfinite
        first_bad, n_reset = carry.first_bad, carry.n_reset
        if self.on_nonfinite == "reset":
            new = _where_state(~finite, old, new)
            n_reset = n_reset + (finite.shape[0] - finite.sum())
        else:  # first_bad holds _NEVER until a chain's first non-finite step
            first_bad = torch.where(finite, first_bad, first_bad.clamp(max=carry.t))
        acc = dict(carry.acc)
        _reduce_info(acc, info)
        return _Carry(new, acc, first_bad, n_reset, carry.t + 1)

    @property
    def compile_seconds(self) -> float | None:
        """Wall time of the first block of the last compiled block used (tracing, compiling
        and one run of K steps), or None before any compiled run. Near zero when inductor's
        on-disk cache already held the kernels."""
        return self._compile_seconds

    def _compile_block_steps(self) -> int:
        """Default K of a compiled block (``graph_steps=None``): about eight energy-and-gradient
        evaluations per block; compile time grows with the unrolled graph, the speed-up does
        not. Samplers with several evaluations per step (HMC, Gibbs sweeps) override it."""
        return _COMPILE_BLOCK


def _check_shape(energy: EnergyModel, x: Tensor, name: str) -> None:
    """Shape check of chain states (no value reads, so no host synchronisation)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x0 must be a torch.Tensor, got {type(x).__name__}")
    space = energy.space
    event = tuple(x.shape[1:])
    ok = x.dim() >= 1 and x.shape[0] > 0 and event == tuple(space.shape)
    if isinstance(space, Categorical) and event == (space.num_dims, space.num_classes):
        ok = x.shape[0] > 0
    if not ok:
        raise ValueError(
            f"{name}: x0 has shape {tuple(x.shape)} but the energy's space {space!r} expects "
            f"(B, {', '.join(str(s) for s in space.shape)}) with B >= 1; batch dimension first"
        )


