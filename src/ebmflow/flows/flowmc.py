r"""FlowMC (Gabrie, Rotskoff, Vanden-Eijnden 2022): local MCMC plus independent flow proposals.

One round on $B$ persistent chains:

1. local: ``n_local`` steps of a continuous ``MCMCSampler`` (default ``MALA``) on
   $p \propto \exp(-E)$;
2. global: ``n_global`` independent proposals $x' \sim q$ (the flow), each accepted per chain
   with

    $$
    \begin{aligned}
    \alpha &= \min\big(1, \exp(f(x') - f(x) + \log q(x) - \log q(x'))\big), & f &= -E, \\
           &= \min\big(1, \exp(v(x) - v(x'))\big), & v &= E + \log q,
    \end{aligned}
    $$

    the Metropolis-Hastings ratio of an independence sampler; it leaves $p$ invariant for any
    $q$ with full support, and $\alpha = 1$ when $q = p$.

The proposals of an independence sampler do not depend on the chain, so all
$n_\mathrm{global} \cdot B$ of a round are drawn (and their $E$ and $\log q$ evaluated) in one
batched call before the $n_\mathrm{global}$ sequential accept/reject steps: the same Markov
chain as drawing them one at a time, with a few large tensor operations instead of many small
ones. The energy of the chains after the local steps is taken from the local kernel's cache
(MALA, HMC) rather than recomputed.

During training the flow is fitted to the chains by maximum likelihood (forward KL,
``update``), with its own optimiser and schedule, so global moves jump between modes that
local moves cannot connect and rebalance their weights. The training set is either the
current chain states (default) or, as in flowMC, a buffer of chain history: the last
``history`` snapshots of every chain, resampled to ``train_examples`` points and fitted for
``flow_epochs`` epochs per ``update`` (``FlowMC.flowmc_schedule`` builds flowMC's settings).

Compiled rounds (``compile=True`` or ``"auto"``): the local steps run through the local
kernel's compiled executor (``MCMCSampler(compile=...)``), and each chunk of global moves
(the proposals of one flow call, ``proposal_batch_size``) is one ``torch.compile``'d function:
flow pass, energies, $\log q$, the sequential accept/reject steps. The uniforms and the flow's
base noise are drawn before the chunk through ``ebmflow.samplers.rng`` in the eager order
(same calls, same sizes) and handed in as a ``NoiseTape``, so the compiled chains are the
eager chains for the same generator, up to float rounding.

Step-size conventions: flowMC's MALA proposal is
$x' = x + \frac{\Delta t^2}{2} \nabla \log p(x) + \Delta t\, \xi$; ours is
$x' = x - \eta \nabla E(x) + \sqrt{2 \eta}\, \xi$, so $\eta = \Delta t^2 / 2$ (flowMC's
$\Delta t = 0.1$ is $\eta = 0.005$, the default here).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._optim import default_adam
from ..energy.base import EnergyModel
from ..samplers import MALA, rng
from ..samplers.base import MCMCSampler, Sampler
from ..samplers.compiled import CompiledBlock, compile_available, predraw, warn_fallback
from ..spaces import Continuous, check_same_device
from .base import Flow

__all__ = ["FlowMC"]


_COMPILE_AFTER = 2000  # compile="auto": global moves per chain made eagerly before compiling
_MAX_BLOCKS = 8  # compiled chunks of global moves kept (per energy / shape / chunk size)
_MAX_LOCAL_BLOCK = 16  # largest local block FlowMC sets (graph_steps = n_local - 1)


def _default_local_kernel() -> MCMCSampler:
    r"""MALA(step_size=0.005, n_warmup=100): flowMC's $\Delta t = 0.1$
    ($\eta = \Delta t^2 / 2$), adapted toward acceptance 0.574 during the 100 steps after every
    flow fit (``retune_local``)."""
    return MALA(step_size=0.005, n_warmup=100)


def _as_flow(flow: Any) -> Flow:
    """``flow`` itself if it is a ``Flow``; a zuko ``LazyDistribution`` wrapped in
    ``ZukoFlow``; otherwise a ValueError."""
    if isinstance(flow, Flow):
        return flow
    if type(flow).__module__.split(".")[0] == "zuko":
        from .zuko_adapter import ZukoFlow

        return ZukoFlow(flow)
    raise ValueError(
        f"flow must be an ebmflow.flows.Flow (RealNVP, ContinuousFlow or a subclass) or a zuko "
        f"flow (zuko.lazy.LazyDistribution, wrapped by ebmflow.flows.ZukoFlow), got "
        f"{type(flow).__name__}"
    )


def check_exact_log_prob_kind(flow: Flow) -> None:
    """ValueError (naming the fix) if ``flow.exact_log_prob`` is False (a Hutchinson trace)."""
    if not getattr(flow, "exact_log_prob", True):
        raise ValueError(
            f"FlowMC needs an exact log q for its Metropolis-Hastings proposals, but "
            f"{flow!r} estimates the trace stochastically (Hutchinson; ContinuousFlow uses it "
            f"for trace='auto' above 8 dimensions); build it with "
            f"ContinuousFlow(dim, trace='exact') (D backward passes per ODE evaluation)"
        )


def _make_optimizer(
    optimizer: str | Callable[[Any], torch.optim.Optimizer], params: list[Tensor], lr: float
) -> torch.optim.Optimizer:
    if callable(optimizer):
        return optimizer(params)
    if optimizer == "adam":
        return default_adam(params, lr)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(
        f"optimizer must be 'adam', 'adamw' or a callable params -> Optimizer, got {optimizer!r}"
    )


def check_exact_log_prob(flow: Flow, n: int = 256, tol: float = 1e-3,
                         generator: torch.Generator | None = None) -> float:
    r"""Refuse a flow whose $\log q$ is not exact enough for a Metropolis-Hastings proposal.

    An independence-MH step is invariant only if $\log q(x')$ of a proposal (from the sampling
    pass) and $\log q(x)$ of the current state (from ``log_prob``) are the same function.
    Flows that report ``exact_log_prob = False`` (a ``ContinuousFlow`` with a Hutchinson
    trace) are refused; for flows with a numerical inverse (``ContinuousFlow``) $n$ samples
    are drawn and the largest
    $\lvert \log q_{\text{sample}}(x) - \log q_{\text{log\_prob}}(x) \rvert$ (sampling pass
    against ``log_prob``) must be $\le$ ``tol`` nats.

    Returns that largest gap (0.0 for flows with an analytic inverse); raises ``ValueError``
    naming the fix otherwise (one host read).
    """
    check_exact_log_prob_kind(flow)
    if not getattr(flow, "numerical_inverse", False):
        return 0.0
    with torch.no_grad():
        x, logq_sample = flow.sample_and_log_prob(n, generator)
        gap = float((logq_sample - flow.log_prob(x)).abs().nan_to_num(math.inf).max())
    if not gap <= tol:
        raise ValueError(
            f"the forward and inverse ODE solves of {type(flow).__name__} disagree by {gap:.3g} "
            f"nats in log q (tolerance {tol:g}): the independence proposals would not keep "
            f"the target invariant; solve more accurately, e.g. more ode_steps (now "
            f"{getattr(flow, 'ode_steps', '?')}) or method='dopri5' with atol=rtol=1e-7, or "
            f"raise FlowMC(logq_tol=...)"
        )
    return gap


class FlowMC(Sampler):
    r"""Flow-assisted MCMC with persistent chains and an adaptive flow proposal.

    Args:
        flow: any ``Flow`` (``RealNVP``, ``ContinuousFlow`` with ``trace="exact"``, a
            ``ZukoFlow``, or a subclass providing ``sample_and_log_prob`` and ``log_prob``)
            or a zuko flow (wrapped in ``ZukoFlow``), with ``flow.dim == energy.space.dim``.
            Its $\log q$ must be exact (see ``check_exact_log_prob``): a Hutchinson trace is
            refused with a ``ValueError``.
        local: the local kernel, a continuous ``MCMCSampler`` (default ``MALA(step_size=0.005,
            n_warmup=100)``, flowMC's $\Delta t = 0.1$ as $\eta = \Delta t^2 / 2$).
        n_local: local steps per round (default 10).
        n_global: independent flow proposals per round (default 10).
        n_rounds: rounds per ``sample`` call (default 1).
        n_chains: number of persistent chains (default: the ``n`` of the first ``sample``
            call, or the size of the first ``data`` given to ``update``).
        lr: learning rate of the default optimiser of the flow (default 1e-3).
        flow_steps: optimiser steps per ``update`` call when ``flow_epochs`` is None
            (default 1).
        flow_batch_size: states per flow step (default: the whole training set).
        flow_loss: "ml" (maximum likelihood, $-\operatorname{mean} \log q(x)$; default) or
            "flow_matching" (for flows with ``flow_matching_loss``, e.g. ``ContinuousFlow``).
        optimizer: "adam" (default, ``default_adam``), "adamw" (flowMC's ``AdamW(lr)``) or
            a callable ``params -> torch.optim.Optimizer``.
        scheduler: ``optimizer -> LRScheduler`` stepped after each flow step (default none).
        max_grad_norm: global-norm gradient clipping of the flow (default 10; flowMC: 1;
            None disables).
        adapt_steps: after this many flow steps the flow is frozen (default None).
        train_updates: after this many ``update`` calls that fitted the flow it is frozen
            (flowMC's number of training loops; default None: keeps adapting, as EBM
            training needs).
        history: snapshots of every chain kept as training data (default 0: the current
            states only). A snapshot is taken after the local steps and after the global
            moves of every round, so ``history=100`` holds the last 50 rounds.
        train_examples: points drawn with replacement from the history per ``update``
            (flowMC: 10,000; default None: the whole history once).
        flow_epochs: if set, every ``update`` makes this many passes over the training set
            in minibatches of ``flow_batch_size`` (flowMC's ``n_epochs``) instead of
            ``flow_steps`` steps.
        retune_local: restart the local kernel's step-size adaptation (kernels with
            ``reset_adaptation`` and ``n_warmup > 0``, e.g. MALA, HMC) at every ``update``
            that fits the flow, so the step size follows an energy that is being trained;
            once the flow is frozen the kernel stops adapting and is exact (default True).
        logq_tol: largest
            $\lvert \log q_{\text{sample}}(x) - \log q_{\text{log\_prob}}(x) \rvert$ (nats)
            accepted for flows with a numerical inverse (``ContinuousFlow``), checked at the
            first ``sample`` and at every health check (default 1e-3).
        check_every: health check every this many ``update`` calls (default 25; 0 disables): one
            host read of the flow loss, the chains' spread and their farthest excursion; a
            ``RuntimeWarning`` is issued when the flow loss explodes (more than 10 nats per
            coordinate above its best), the chains collapse (spread below 2% of the first
            check's) or run away (farthest excursion 50 times the first check's).
        init: initial chain states when neither ``x0`` nor ``data`` was given: "noise" (the
            space's $\mathcal{N}(0, I)$, default) or "flow" (flow samples).
        check_finite: raise ``ValueError`` at the end of a ``sample`` call (one host sync) if
            the flow produced non-finite log-densities (default True); when False such
            proposals are rejected and counted in ``stats["flow_nonfinite"]``.
        proposal_batch_size: most flow proposals drawn and evaluated in one call during the
            global moves (default 4096; None: all $n_\mathrm{global} \cdot B$ at once). At least $B$
            (one proposal per chain) are drawn per call.

    After ``sample``: ``stats["local_accept"]`` (mean acceptance of the local kernel; 1 for
    kernels that report none, such as ULA), ``stats["global_accept"]`` (mean acceptance of
    the flow proposals), ``stats["flow_nonfinite"]``; ``chain_stats["global_accept"]`` is the
    per-chain rate ``(B,)``. ``stats["flow_loss"]`` is the loss of the last ``update``. All
    0-d tensors.

    Persistent state (``state_dict``): the chains, the history, the flow, the local kernel,
    and (as extra state) the flow optimiser, scheduler and counters.
    """

    syncs_gradients = True  # update() calls sync_gradients before its optimiser step

    def __init__(
        self,
        flow: Flow,
        local: MCMCSampler | None = None,
        *,
        n_local: int = 10,
        n_global: int = 10,
        n_rounds: int = 1,
        n_chains: int | None = None,
        lr: float = 1e-3,
        flow_steps: int = 1,
        flow_batch_size: int | None = None,
        flow_loss: str = "ml",
        optimizer: str | Callable[[Any], torch.optim.Optimizer] = "adam",
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        max_grad_norm: float | None = 10.0,
        adapt_steps: int | None = None,
        train_updates: int | None = None,
        history: int = 0,
        train_examples: int | None = None,
        flow_epochs: int | None = None,
        retune_local: bool = True,
        logq_tol: float = 1e-3,
        check_every: int = 25,
        init: str = "noise",
        check_finite: bool = True,
        proposal_batch_size: int | None = 4096,
        compile: bool | str = False,
    ):
        super().__init__()
        flow = _as_flow(flow)
        check_exact_log_prob_kind(flow)
        local = _default_local_kernel() if local is None else local
        if not isinstance(local, MCMCSampler):
            raise ValueError(
                f"local must be a continuous MCMCSampler (e.g. MALA(), Langevin()), got "
                f"{type(local).__name__}"
            )
        for name, val, low in (("n_local", n_local, 0), ("n_global", n_global, 0),
                               ("n_rounds", n_rounds, 1), ("flow_steps", flow_steps, 0),
                               ("history", history, 0), ("check_every", check_every, 0)):
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
        for name, val in (("n_chains", n_chains), ("train_examples", train_examples),
                          ("flow_epochs", flow_epochs), ("train_updates", train_updates),
                          ("flow_batch_size", flow_batch_size), ("adapt_steps", adapt_steps)):
            low = 0 if name in ("train_updates", "adapt_steps") else 1  # 0: frozen at once
            if val is not None and (not isinstance(val, int) or isinstance(val, bool)
                                    or val < low):
                kind = "a positive int" if low else "an int >= 0"
                raise ValueError(f"{name} must be {kind} or None, got {val!r}")
        if flow_loss not in ("ml", "flow_matching"):
            raise ValueError(f"flow_loss must be 'ml' or 'flow_matching', got {flow_loss!r}")
        if flow_loss == "flow_matching" and not hasattr(flow, "flow_matching_loss"):
            raise ValueError(
                f"flow_loss='flow_matching' needs a flow with flow_matching_loss (e.g. "
                f"ContinuousFlow); {type(flow).__name__} has none, use flow_loss='ml'"
            )
        if proposal_batch_size is not None and (
            not isinstance(proposal_batch_size, int) or isinstance(proposal_batch_size, bool)
            or proposal_batch_size < 1
        ):
            raise ValueError(
                f"proposal_batch_size must be a positive int or None, got {proposal_batch_size!r}"
            )
        if init not in ("noise", "flow"):
            raise ValueError(f"init must be 'noise' or 'flow', got {init!r}")
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        if not (isinstance(logq_tol, (int, float)) and logq_tol > 0):
            raise ValueError(f"logq_tol must be a positive number (nats), got {logq_tol!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.flow = flow
        self.local = local
        self.n_local, self.n_global, self.n_rounds = n_local, n_global, n_rounds
        self.n_chains = n_chains
        self.flow_steps = flow_steps
        self.flow_batch_size = flow_batch_size
        self.flow_loss = flow_loss
        self.max_grad_norm = max_grad_norm
        self.adapt_steps = adapt_steps
        self.train_updates = train_updates
        self.history = history
        self.train_examples = train_examples
        self.flow_epochs = flow_epochs
        self.retune_local = retune_local
        self.logq_tol = float(logq_tol)
        self.check_every = check_every
        self.init = init
        self.check_finite = check_finite
        self.proposal_batch_size = proposal_batch_size
        params = [p for p in flow.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(optimizer, params, lr) if params else None
        self.scheduler = scheduler(self.optimizer) if (scheduler and self.optimizer) else None
        self.n_flow_updates = 0  # optimiser steps
        self.n_fits = 0  # update calls that fitted the flow
        self.register_buffer("chains", torch.empty(0))
        self.register_buffer("history_states", torch.empty(0))
        self._hist_pos = 0
        self._hist_len = 0
        self._flow_checked = False
        self._warned_tilt = False
        self._n_calls = 0
        self._health_ref: tuple[float, float] | None = None
        self._best_loss = math.inf
        self.chain_stats: dict[str, Tensor] = {}
        # compiled rounds
        self.compile = compile
        #: ``compile="auto"``: global moves per chain made eagerly before compiling
        self.compile_after = _COMPILE_AFTER
        self._compile_backend: Any = "inductor"
        self._blocks: dict[tuple, CompiledBlock] = {}
        self._flow_specs: dict[tuple, list[rng.Draw]] = {}
        self._compile_failed: str | None = None
        self._auto_moves = 0
        # compile=True asks the local kernel to compile too, unless it was told not to (its
        # default "auto" compiles CPU chains after compile_after steps anyway)
        if compile is True and local.compile == "auto":
            local.compile = True
            if local.graph_steps is None and 2 <= n_local - 1 <= _MAX_LOCAL_BLOCK:
                # the first run records its draws in one eager step: K = n_local - 1 keeps
                # one block size (one compilation) for that run and the later ones
                local.graph_steps = n_local - 1

    def __getstate__(self) -> dict[str, Any]:
        """Pickling leaves out the compiled global moves (a cache rebuilt on use); the local
        kernel drops its own."""
        state = dict(super().__getstate__())
        state.update(_blocks={}, _flow_specs={})
        return state

    @property
    def compile_backend(self) -> Any:
        """``torch.compile`` backend of the compiled global moves and of the local kernel
        ("inductor" by default; "eager" / "aot_eager" or a callable for tests)."""
        return self._compile_backend

    @compile_backend.setter
    def compile_backend(self, backend: Any) -> None:
        self._compile_backend = backend
        self.local.compile_backend = backend
        self._blocks = {}

    @property
    def compile_seconds(self) -> float | None:
        """Wall time of the first call of every compiled chunk of global moves (tracing,
        compiling, one run) plus the local kernel's ``compile_seconds``; None before any
        compiled round."""
        times = [b.compile_seconds for b in self._blocks.values()
                 if b.compile_seconds is not None]
        local = self.local.compile_seconds
        if local is not None:
            times.append(local)
        return sum(times) if times else None

    @classmethod
    def flowmc_schedule(
        cls,
        flow: Flow,
        local: MCMCSampler | None = None,
        *,
        n_epochs: int = 5,
        history: int = 100,
        train_examples: int = 10_000,
        batch_size: int = 10_000,
        lr: float = 1e-3,
        train_updates: int | None = None,
        **kwargs: Any,
    ) -> FlowMC:
        """FlowMC with flowMC's flow-training schedule: every ``update`` resamples
        ``train_examples`` points from the last ``history`` snapshots of every chain and
        fits them for ``n_epochs`` epochs (minibatches of ``batch_size``) with AdamW(lr) and
        global-norm clipping 1.0; after ``train_updates`` fits (flowMC's training loops) the
        flow is frozen for production. Other arguments as for ``FlowMC``."""
        kwargs.setdefault("max_grad_norm", 1.0)
        kwargs.setdefault("optimizer", "adamw")
        return cls(flow, local, lr=lr, history=history, train_examples=train_examples,
                   flow_epochs=n_epochs, flow_batch_size=batch_size,
                   train_updates=train_updates, **kwargs)

    @property
    def frozen(self) -> bool:
        """True once ``adapt_steps`` flow steps or ``train_updates`` fits have been made."""
        return ((self.adapt_steps is not None and self.n_flow_updates >= self.adapt_steps)
                or (self.train_updates is not None and self.n_fits >= self.train_updates))

    # -- checks ------------------------------------------------------------------------
    def supports(self, energy: EnergyModel) -> bool:
        return isinstance(energy.space, Continuous)

    def _check_energy(self, energy: EnergyModel) -> None:
        if isinstance(energy, EnergyModel) and not isinstance(energy.space, Continuous):
            raise ValueError(
                f"FlowMC samples continuous states but the energy's space is {energy.space!r}; "
                "use a discrete sampler (Gibbs, GibbsWithGradients, DiscreteLangevin)"
            )
        super()._check_energy(energy)  # an EnergyModel this sampler supports (Sampler's check)
        if energy.space.dim != self.flow.dim:
            raise ValueError(
                f"the flow has dim={self.flow.dim} but the energy's space {energy.space!r} has "
                f"{energy.space.dim} coordinates; build the flow with dim={energy.space.dim}"
            )
        ref = energy.reference_tensor()
        flow_ref = self.flow._reference_tensor()
        if ref is not None and flow_ref is not None:
            check_same_device(flow_ref, ref.device, "the flow")

    # -- sampling ----------------------------------------------------------------------
    def _init_chains(
        self, energy: EnergyModel, n: int, generator: torch.Generator | None
    ) -> Tensor:
        if self.init == "flow":
            with torch.no_grad():
                x, _ = self.flow.sample_and_log_prob(n, generator)
            return x.reshape(n, *energy.space.shape)
        return self._initial_states(energy, n, None, generator)

    def sample(
        self,
        energy: EnergyModel,
        n: int | None = None,
        *,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        n_rounds: int | None = None,
    ) -> Tensor:
        """Run ``n_rounds`` rounds (default ``self.n_rounds``) on the chains; return $n$ states.

        Chains: ``x0`` if given (it becomes the persistent state), else the persistent chains
        (created at the first call: ``n_chains`` or ``n`` of them, see ``init``). Returns all
        chain states ``(B, *event)`` when ``n`` is None or $n = B$, else $n$ of them chosen at
        random without replacement. Detached.
        """
        self._check_energy(energy)
        if not self._flow_checked:
            self._check_flow()
        if x0 is not None:
            x = self._initial_states(energy, n, x0, generator)
        else:
            if self.chains.numel() == 0:
                size = self.n_chains or n
                if size is None:
                    raise ValueError("pass n (number of states) or x0, or set n_chains")
                self.chains = self._init_chains(energy, size, generator)
            x = self.chains
            if n is not None and n > x.shape[0]:
                raise ValueError(
                    f"n={n} but FlowMC keeps {x.shape[0]} persistent chains; pass "
                    f"n <= {x.shape[0]} or build FlowMC(n_chains={n})"
                )
        rounds = self.n_rounds if n_rounds is None else n_rounds
        x = self._run_rounds(energy, x.detach(), rounds, generator)
        self.chains = x
        if n is None or n == x.shape[0]:
            return x
        idx = torch.randperm(x.shape[0], generator=generator, device=x.device)[:n]
        return x[idx]

    def _check_flow(self) -> None:
        """``check_exact_log_prob`` with a private generator (the caller's random stream is
        not touched)."""
        ref = self.flow._reference_tensor()
        device = ref.device if ref is not None else torch.device("cpu")
        gen = torch.Generator(device=device).manual_seed(0)
        check_exact_log_prob(self.flow, tol=self.logq_tol, generator=gen)
        self._flow_checked = True

    def _record(self, x: Tensor) -> None:
        """Write the chain states into the history ring buffer ``(history, B, D)``."""
        if self.history == 0:
            return
        flat = x.reshape(x.shape[0], -1)
        buf = self.history_states
        if buf.dim() != 3 or buf.shape[1:] != flat.shape or buf.device != flat.device:
            self.history_states = torch.empty((self.history, *flat.shape), device=flat.device,
                                              dtype=flat.dtype)
            self._hist_pos = self._hist_len = 0
        self.history_states[self._hist_pos].copy_(flat)
        self._hist_pos = (self._hist_pos + 1) % self.history
        self._hist_len = min(self._hist_len + 1, self.history)

    @torch.no_grad()
    def _run_rounds(
        self, energy: EnergyModel, x: Tensor, rounds: int, generator: torch.Generator | None
    ) -> Tensor:
        b = x.shape[0]
        # running sums start as None (no tensor op for the common single round)
        local_acc: Tensor | None = None
        global_acc: Tensor | None = None
        bad_flow: Tensor | None = None
        for _ in range(rounds):
            e_x = None
            if self.n_local > 0:
                x = self.local.run(energy, x, self.n_local, generator=generator)
                rate = self.local.stats.get("accept_rate")
                rate = rate.float() if rate is not None else torch.ones((), device=x.device)
                local_acc = rate if local_acc is None else local_acc + rate
                e_x = self._cached_energy(x)
                self._record(x)
            if self.n_global > 0:
                x, acc, bad = self._global_moves(energy, x, e_x, generator)
                global_acc = acc if global_acc is None else global_acc + acc
                bad_flow = bad if bad_flow is None else bad_flow | bad
                self._record(x)
        if bad_flow is None:
            bad_flow = torch.zeros((), dtype=torch.bool, device=x.device)
        if self.check_finite and bool(bad_flow):
            raise ValueError(
                f"the flow {type(self.flow).__name__} returned non-finite log-densities "
                "(NaN/inf in log q); check its parameters (e.g. a diverged fit: lower lr, "
                "clip gradients) or pass check_finite=False to reject such proposals"
            )
        per_chain = (global_acc / (rounds * self.n_global) if global_acc is not None
                     else torch.zeros(b, device=x.device))
        self.chain_stats = {"global_accept": per_chain}
        kept = {"flow_loss": self.stats["flow_loss"]} if "flow_loss" in self.stats else {}
        self.stats = {
            **kept,
            "local_accept": (local_acc / rounds if local_acc is not None
                             else torch.zeros((), device=x.device)),
            "global_accept": per_chain.mean(),
            "flow_nonfinite": bad_flow.float(),
        }
        return x

    def _cached_energy(self, x: Tensor) -> Tensor | None:
        """$E(x)$ ``(B,)`` cached by the local kernel's last run when it ended at ``x`` (MALA,
        HMC cache it in their chain state), else None."""
        state = self.local.last_state
        if state is None or state.x is not x or state.energy is None:
            return None
        e = state.energy
        return e if e.shape == (x.shape[0],) else None

    def _global_moves(
        self,
        energy: EnergyModel,
        x: Tensor,
        e_x: Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        r"""``n_global`` independence-MH moves; returns ($x$, accepted count ``(B,)``, any
        non-finite $q$).

        ``e_x``: $E(x)$ ``(B,)`` if known (else computed). With $v = E + \log q$, proposal $k$
        is accepted on chain $b$ when $\log u_{kb} < v(x_b) - v(x'_{kb})$, i.e.
        $\log u_{kb} + v(x'_{kb}) < v(x_b)$. Random numbers, in this order: the uniforms $u$
        ``(n_global, B)`` (one call), then the flow's base noise of each chunk of $k$ moves
        ($kB$ proposals per flow call, ``proposal_batch_size``). A proposal with a non-finite
        state or $\log q$ gets $v = +\infty$ (never accepted); a NaN energy gives a NaN
        comparison (never accepted).
        """
        b = x.shape[0]
        per_call = self.n_global
        if self.proposal_batch_size is not None:
            per_call = max(1, min(per_call, self.proposal_batch_size // b))
        chunks = [(k0, min(per_call, self.n_global - k0))
                  for k0 in range(0, self.n_global, per_call)]
        flat: dict[str, Tensor] = {"x": x} if e_x is None else {"x": x, "e": e_x}
        if self._use_compiled(x):
            out = self._compiled_moves(energy, flat, chunks, generator)
            if out is not None:
                return out["x"], out["acc"], out["bad"]
        flat = self._global_init(energy, flat)
        log_u = rng.rand((self.n_global, b), generator, x.device, x.dtype).log_()
        for k0, k in chunks:
            flat = self._global_chunk(energy, flat, log_u[k0:k0 + k], generator, k)
        return flat["x"], flat["acc"], flat["bad"]

    def _global_init(self, energy: EnergyModel, flat: dict[str, Tensor]) -> dict[str, Tensor]:
        r"""$v(x) = E(x) + \log q(x)$ of the chains ``x`` ($E$ from ``flat["e"]`` when cached),
        zero acceptance counts, and whether $\log q(x)$ is non-finite anywhere (0-d bool)."""
        x = flat["x"]
        b = x.shape[0]
        e_x = flat["e"] if "e" in flat else energy(x)
        logq_x = self.flow.log_prob(x.reshape(b, -1))
        return {"x": x, "v": e_x + logq_x, "acc": torch.zeros(b, device=x.device, dtype=x.dtype),
                "bad": ~torch.isfinite(logq_x).all()}

    def _global_chunk(
        self,
        energy: EnergyModel,
        flat: dict[str, Tensor],
        log_u: Tensor,
        generator: rng.Rng,
        k: int,
    ) -> dict[str, Tensor]:
        r"""$k$ sequential independence-MH moves from $kB$ proposals of one flow call: move $j$
        accepts proposal $x'_j$ on a chain when $\log u_j + v(x'_j) < v(x)$, $v = E + \log q$
        (i.e. $\log u_j < f(x'_j) - f(x) + \log q(x) - \log q(x'_j)$, $f = -E$).

        ``log_u``: ``(k, B)`` log-uniforms; ``generator``: the flow's base draw (a
        ``torch.Generator`` or a tape of pre-drawn noise). Pure tensor code, no host sync:
        run eagerly or as a compiled chunk. Only $v$ and the index of the last accepted
        proposal per chain are tracked through the $k$ steps; the states are gathered once,
        $O(BD)$ not $O(kBD)$.
        """
        x, v_x, n_acc = flat["x"], flat["v"], flat["acc"]
        b, event = x.shape[0], x.shape[1:]
        xp, logq_p = self.flow.sample_and_log_prob(k * b, generator)  # (k b, D), (k b,)
        finite = torch.isfinite(logq_p) & torch.isfinite(xp).all(1)
        bad = flat["bad"] | ~finite.all()
        xp = xp.reshape(k * b, *event)
        v_p = torch.where(finite, energy(xp) + logq_p, torch.inf).view(k, b)
        key = log_u + v_p  # accept proposal j iff key[j] < v(x)
        mask_shape = (b,) + (1,) * len(event)
        if k == 1:
            accept = key[0] < v_x
            return {"x": torch.where(accept.view(mask_shape), xp, x),
                    "v": torch.where(accept, v_p[0], v_x), "acc": n_acc + accept, "bad": bad}
        last = torch.full((b,), -1, dtype=torch.long, device=x.device)
        count = torch.zeros_like(last)
        for j in range(k):
            accept = key[j] < v_x
            v_x = torch.where(accept, v_p[j], v_x)
            last = torch.where(accept, j, last)
            count = count + accept
        rows = torch.arange(b, device=x.device)
        moved = (last >= 0).view(mask_shape)
        x = torch.where(moved, xp.reshape(k, b, *event)[last.clamp(min=0), rows], x)
        return {"x": x, "v": v_x, "acc": n_acc + count, "bad": bad}

    # -- compiled global moves ---------------------------------------------------------
    def _use_compiled(self, x: Tensor) -> bool:
        """Whether this round's global moves go through compiled chunks (``compile`` True,
        or "auto" once ``compile_after`` moves were made)."""
        mode = self.compile
        if mode is False or self._compile_failed is not None:
            return False
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        if mode == "auto":
            self._auto_moves += self.n_global
            if self._auto_moves < self.compile_after:
                return False
        if getattr(self.flow, "numerical_inverse", False):
            return self._fail(f"{type(self.flow).__name__} solves an ODE (torchdiffeq), which "
                              "is not compiled")
        ok, why = compile_available()
        return ok or self._fail(why)

    def _fail(self, why: str) -> bool:
        self._compile_failed = why
        warn_fallback(type(self).__name__, why)
        return False

    def _flow_spec(self, n: int, x: Tensor) -> list[rng.Draw] | None:
        """The draws of ``flow.sample_and_log_prob(n, ...)`` (kind, shape, dtype), recorded
        once per size on a private generator (the caller's stream is not touched); None
        (after a ``CompileFallbackWarning``) if the flow does not draw through
        ``ebmflow.samplers.rng``."""
        key = (id(self.flow), n, x.dtype, str(x.device))
        spec = self._flow_specs.get(key)
        if spec is None:
            rec = rng.RecordingTape(torch.Generator(device=x.device).manual_seed(0))
            try:
                self.flow.sample_and_log_prob(n, rec)
            except TypeError as err:  # torch.randn(generator=<tape>) in a user's flow
                self._fail(f"{type(self.flow).__name__}.sample_and_log_prob draws random "
                           f"numbers without ebmflow.samplers.rng ({err})")
                return None
            spec = self._flow_specs[key] = list(rec.spec)
        return spec

    def _compiled_moves(
        self,
        energy: EnergyModel,
        flat: dict[str, Tensor],
        chunks: list[tuple[int, int]],
        generator: torch.Generator | None,
    ) -> dict[str, Tensor] | None:
        """The global moves as compiled chunks, or None (nothing drawn, nothing moved) when
        the flow cannot take pre-drawn noise. All of the round's noise is pre-drawn in the
        eager order: $u$ ``(n_global, B)``, then each chunk's base noise."""
        x = flat["x"]
        b = x.shape[0]
        specs = []
        for _, k in chunks:
            spec = self._flow_spec(k * b, x)
            if spec is None:
                return None
            specs.append(spec)
        u_draw = rng.Draw("rand", (self.n_global, b), x.dtype, x.device)
        full = [u_draw] + [d for spec in specs for d in spec]
        draws = [d[0] for d in predraw(full, 1, rng.real_generator(generator))]
        log_u, pos = draws[0].log_(), 1
        for (k0, k), spec in zip(chunks, specs):
            mine = draws[pos:pos + len(spec)]
            pos += len(spec)
            block = None if self._compile_failed else self._block(energy, flat, k, spec)
            if block is not None:
                try:
                    flat = block(energy, flat, [log_u[None, k0:k0 + k]] + [d[None] for d in mine])
                    continue
                except Exception as err:  # noqa: BLE001 - any compile failure falls back
                    if block.calls > 0:
                        raise
                    self._blocks = {}
                    self._fail(f"torch.compile failed: {type(err).__name__}: {err}")
            # fallback after a failed compile: the same moves eagerly, from the drawn noise
            if "v" not in flat:
                flat = self._global_init(energy, flat)
            flat = self._global_chunk(energy, flat, log_u[k0:k0 + k], rng.NoiseTape(mine), k)
        return flat

    def _block(self, energy: EnergyModel, flat: dict[str, Tensor], k: int,
               spec: list[rng.Draw]) -> CompiledBlock:
        """The compiled chunk of $k$ moves for this energy, flow, carry layout and noise."""
        # Python attributes the chunk reads (a temperature, a coupling's scale bound) are
        # guarded by dynamo itself: a change recompiles this chunk, it needs no key of its own
        carry = tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in flat.items())
        key = (id(energy), id(self.flow), carry, k, tuple(spec), energy.training,
               self.flow.training)
        block = self._blocks.get(key)
        if block is not None:
            return block

        def advance(e: EnergyModel, state: dict[str, Tensor],
                    tape: rng.NoiseTape) -> dict[str, Tensor]:
            log_u = tape.next()
            if "v" not in state:
                state = self._global_init(e, state)
            return self._global_chunk(e, state, log_u, tape, k)

        x = flat["x"]
        u_draw = rng.Draw("rand", (k, x.shape[0]), x.dtype, x.device)  # log-uniforms, first
        block = CompiledBlock(advance, 1, [u_draw, *spec], key, backend=self._compile_backend)
        if len(self._blocks) >= _MAX_BLOCKS:
            self._blocks.pop(next(iter(self._blocks)))
        self._blocks[key] = block
        return block

    # -- adaptation --------------------------------------------------------------------
    def update(
        self,
        energy: EnergyModel,
        data: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        r"""Fit the flow to the chains by maximum likelihood (``flow_loss="ml"``; the forward
        KL to the chains),

        $$L(\phi) = -\operatorname{mean}_b \log q_\phi(x_b),$$

        or by flow matching. The training set is the current chain states, or with
        ``history > 0`` the stored snapshots of every chain, resampled to ``train_examples``
        points; it is fitted for ``flow_steps`` steps or ``flow_epochs`` epochs. If no chains
        exist yet and ``data`` is given, the chains start at a copy of the data (so the first
        fit models the data). Returns (and stores in ``stats``) ``{"flow_loss": 0-d tensor}``
        (loss of the last step), or ``{}`` when nothing was fitted (no chains, frozen flow,
        ``flow_steps=0``).
        """
        self._check_energy(energy)
        if self.chains.numel() == 0:
            if data is None:
                return {}
            ref = energy.reference_tensor()
            self.chains = energy.space.validate(
                data, "data", device=ref.device if ref is not None else None
            ).detach().clone()
        self._n_calls += 1
        due = self.check_every and (self._n_calls == 1 or self._n_calls % self.check_every == 0)
        if self.optimizer is None or self.frozen or (
            self.flow_epochs is None and self.flow_steps == 0
        ):
            if due:  # the chains are still watched when the flow is frozen
                self.check_health()
            return {}
        self._warn_tilt_feedback(energy)
        train = self._training_set(generator)
        n = train.shape[0]
        size = min(self.flow_batch_size or n, n)
        if self.flow_epochs is not None:
            batches: list[Tensor | None] = []
            for _ in range(self.flow_epochs):
                perm = torch.randperm(n, generator=generator, device=train.device)
                batches += [perm[i:i + size] for i in range(0, n, size)]
        else:
            batches = [None] * self.flow_steps
        loss = torch.zeros((), device=train.device)
        for idx in batches:
            if idx is None:
                idx = (torch.randperm(n, generator=generator, device=train.device)[:size]
                       if size < n else None)
            batch = train if idx is None else train[idx]
            if self.flow_loss == "ml":
                loss = self.flow.nll(batch)
            else:
                loss = self.flow.flow_matching_loss(batch, generator=generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.sync_gradients(self.flow.parameters())  # data parallel: one step on all ranks
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.flow.parameters(), self.max_grad_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.n_flow_updates += 1
        self.n_fits += 1
        if self.retune_local:
            self._retune_local()
        out = {"flow_loss": loss.detach()}
        self.stats = {**self.stats, **out}
        if due:
            self.check_health(out["flow_loss"])
        return out

    def _training_set(self, generator: torch.Generator | None) -> Tensor:
        """The chain states (history > 0: the stored snapshots) ``(N, D)``, resampled with
        replacement to ``train_examples`` points when that is set."""
        if self.history > 0 and self._hist_len > 0:
            pool = self.history_states[: self._hist_len].reshape(-1, self.flow.dim)
        else:
            pool = self.chains.reshape(self.chains.shape[0], -1)
        if self.train_examples is None:
            return pool
        idx = torch.randint(0, pool.shape[0], (self.train_examples,), generator=generator,
                            device=pool.device)
        return pool[idx]

    def _retune_local(self) -> None:
        """Restart the local kernel's step-size adaptation (from its current step size)."""
        reset = getattr(self.local, "reset_adaptation", None)
        if reset is not None and getattr(self.local, "n_warmup", 0) > 0:
            reset()

    def _warn_tilt_feedback(self, energy: EnergyModel) -> None:
        tilt_flow = getattr(energy, "flow", None)
        if self._warned_tilt:
            return
        if tilt_flow is not None and (tilt_flow is self.flow
                                      or tilt_flow is getattr(self.flow, "flow", None)):
            warnings.warn(
                "FlowMC is fitting the flow to the chains of an energy tilted by that same "
                "flow (TiltedEnergy): each fit absorbs the tilt into q and feeds it back, and "
                "the model drifts or collapses; fit the flow to the data first "
                "(flow.fit(data)) and freeze it (FlowMC(..., flow_steps=0))",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_tilt = True

    def check_health(self, flow_loss: Tensor | None = None) -> dict[str, float]:
        r"""One host read: the flow loss, the chains' spread (mean over coordinates of the
        standard deviation over chains) and their farthest excursion from the chains'
        median. Warns (``RuntimeWarning``) on an exploding flow loss (non-finite, or more than
        10 nats per coordinate above its best so far), collapsed chains (spread below 2% of
        the first check's; not checked for a single chain) or runaway chains (excursion above 50 times the first check's),
        and re-checks the flow's $\log q$ (``check_exact_log_prob``). Called by ``update`` every
        ``check_every`` calls (also when the flow is frozen); returns the three numbers
        (an empty dict before the chains exist)."""
        if self.chains.numel() == 0:  # no chains yet: nothing to check
            return {}
        x = self.chains.reshape(self.chains.shape[0], -1)
        spread = x.std(0).mean() if x.shape[0] > 1 else torch.zeros((), device=x.device)
        far = (x - x.median(0).values).abs().max()
        loss = flow_loss if flow_loss is not None else torch.zeros((), device=x.device)
        loss_v, spread_v, far_v = torch.stack([loss.float(), spread.float(), far.float()]).tolist()
        if self._health_ref is None:
            self._health_ref = (max(spread_v, 1e-12), max(far_v, 1e-12))
        ref_spread, ref_far = self._health_ref
        d = self.flow.dim
        if flow_loss is not None:
            if not math.isfinite(loss_v) or loss_v > self._best_loss + 10 * d:
                warnings.warn(
                    f"FlowMC: the flow loss exploded ({loss_v:.4g}, best so far "
                    f"{self._best_loss:.4g}); the flow or the chains diverged. Lower the flow "
                    f"lr, clip harder (max_grad_norm=1.0), or freeze a flow fitted to the "
                    f"data (flow_steps=0)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if math.isfinite(loss_v):
                self._best_loss = min(self._best_loss, loss_v)
        if x.shape[0] > 1 and spread_v < 0.02 * ref_spread:  # one chain has no spread
            warnings.warn(
                f"FlowMC: the chains collapsed (spread {spread_v:.3g}, first check "
                f"{ref_spread:.3g}); the energy or the flow concentrated on one point. Check "
                f"the energy's training (lower its lr, add the CD regulariser alpha) and do "
                f"not fit a flow to the chains of an energy tilted by it",
                RuntimeWarning,
                stacklevel=3,
            )
        if far_v > 50 * ref_far:
            warnings.warn(
                f"FlowMC: the chains ran away (farthest {far_v:.3g} from their median, first "
                f"check {ref_far:.3g}); the energy is not confining or the local step is too "
                f"large. Add the CD regulariser alpha, lower the energy's lr or the local "
                f"step size",
                RuntimeWarning,
                stacklevel=3,
            )
        if getattr(self.flow, "numerical_inverse", False):
            self._check_flow()
        return {"flow_loss": loss_v, "spread": spread_v, "farthest": far_v}

    def reset(self) -> None:
        """Forget the persistent chains and their history (the next ``sample``
        re-initialises them)."""
        self.chains = torch.empty(0, device=self.chains.device)
        self.history_states = torch.empty(0, device=self.history_states.device)
        self._hist_pos = self._hist_len = 0

    # -- checkpoints -------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "n_flow_updates": self.n_flow_updates,
            "n_fits": self.n_fits,
            "history": (self._hist_pos, self._hist_len),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.n_flow_updates = int(state.get("n_flow_updates", 0))
        self.n_fits = int(state.get("n_fits", 0))
        self._hist_pos, self._hist_len = state.get("history", (0, 0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "chains"
        if key in state_dict:
            # the number of chains is only known once they exist: take the saved shape
            self.chains = torch.empty_like(state_dict[key], device=self.chains.device)
        key = prefix + "history_states"
        if key in state_dict:
            self.history_states = torch.empty_like(state_dict[key],
                                                   device=self.history_states.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"n_local={self.n_local}, n_global={self.n_global}, n_rounds={self.n_rounds}, "
                f"flow_loss={self.flow_loss!r}")
