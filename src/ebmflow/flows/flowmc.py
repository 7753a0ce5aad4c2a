"""FlowMC (Gabrie, Rotskoff, Vanden-Eijnden 2022): local MCMC plus independent flow proposals.

One round on B persistent chains:

1. local: ``n_local`` steps of a continuous ``MCMCSampler`` (default ``MALA``) on p ∝ exp(-E);
2. global: ``n_global`` independent proposals x' ~ q (the flow), each accepted per chain with

       alpha = min(1, exp(f(x') - f(x) + log q(x) - log q(x'))),   f = -E,
             = min(1, exp(v(x) - v(x'))),                          v = E + log q,

   the Metropolis-Hastings ratio of an independence sampler; it leaves p invariant for any
   q with full support, and alpha = 1 when q = p.

The proposals of an independence sampler do not depend on the chain, so all n_global * B of
a round are drawn (and their E and log q evaluated) in one batched call before the
n_global sequential accept/reject steps: the same Markov chain as drawing them one at a
time, with a few large tensor operations instead of many small ones. The energy of the
chains after the local steps is taken from the local kernel's cache (MALA, HMC) rather than
recomputed.

During training the flow is fitted to the chains by maximum likelihood (forward KL on the
current chain states, ``update``), with its own optimiser and schedule, so global moves jump
between modes that local moves cannot connect and rebalance their weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._optim import default_adam
from ..energy.base import EnergyModel
from ..samplers import MALA
from ..samplers.base import MCMCSampler, Sampler
from ..spaces import Continuous, check_same_device
from .base import Flow

__all__ = ["FlowMC"]


def _default_local_kernel() -> MCMCSampler:
    """MALA(step_size=0.1, n_warmup=200): adapts its step size during its first 200 steps."""
    return MALA(step_size=0.1, n_warmup=200)


class FlowMC(Sampler):
    """Flow-assisted MCMC with persistent chains and an adaptive flow proposal.

    Args:
        flow: any ``Flow`` (``RealNVP``, ``ContinuousFlow`` or a subclass providing
            ``sample_and_log_prob`` and ``log_prob``) with ``flow.dim == energy.space.dim``.
        local: the local kernel, a continuous ``MCMCSampler`` (default ``MALA(step_size=0.1,
            n_warmup=200)``). When the energy is being trained, keep the local kernel's step
            size adapting (a large ``n_warmup``): a step size adapted while the energy is still
            flat grows huge, local acceptance then drops to ~0 and only the flow moves the
            chains (seen in the 2:1 experiment, docs/results-flowmc.md).
        n_local: local steps per round (default 10).
        n_global: independent flow proposals per round (default 10).
        n_rounds: rounds per ``sample`` call (default 1).
        n_chains: number of persistent chains (default: the ``n`` of the first ``sample``
            call, or the size of the first ``data`` given to ``update``).
        lr: learning rate of the default Adam optimiser of the flow (default 1e-3).
        flow_steps: optimiser steps per ``update`` call (default 1).
        flow_batch_size: chain states per flow step (default: all chains).
        flow_loss: "ml" (maximum likelihood, -mean log q(x); default) or "flow_matching"
            (for flows with ``flow_matching_loss``, e.g. ``ContinuousFlow``).
        optimizer: ``params -> torch.optim.Optimizer`` (default Adam(lr)).
        scheduler: ``optimizer -> LRScheduler`` stepped after each flow step (default none).
        max_grad_norm: gradient clipping of the flow (default 10; None disables).
        adapt_steps: after this many flow steps the flow is frozen (default None: keeps
            adapting).
        init: initial chain states when neither ``x0`` nor ``data`` was given: "noise" (the
            space's N(0, I), default) or "flow" (flow samples).
        check_finite: raise ``ValueError`` at the end of a ``sample`` call (one host sync) if
            the flow produced non-finite log-densities (default True); when False such
            proposals are rejected and counted in ``stats["flow_nonfinite"]``.
        proposal_batch_size: most flow proposals drawn and evaluated in one call during the
            global moves (default 4096: large enough to amortise the per-call cost of small
            states, small enough to stay in CPU cache; None: all n_global * B at once). At
            least B (one proposal per chain) are drawn per call.

    After ``sample``: ``stats["local_accept"]`` (mean acceptance of the local kernel; 1 for
    kernels that report none, such as ULA), ``stats["global_accept"]`` (mean acceptance of
    the flow proposals), ``stats["flow_nonfinite"]``; ``chain_stats["global_accept"]`` is the
    per-chain rate ``(B,)``. ``stats["flow_loss"]`` is the loss of the last ``update``. All
    0-d tensors.

    Persistent state (``state_dict``): the chains, the flow, the local kernel, and (as extra
    state) the flow optimiser, scheduler and step counter.
    """

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
        optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        max_grad_norm: float | None = 10.0,
        adapt_steps: int | None = None,
        init: str = "noise",
        check_finite: bool = True,
        proposal_batch_size: int | None = 4096,
    ):
        super().__init__()
        if not isinstance(flow, Flow):
            raise ValueError(
                f"flow must be an ebmflow.flows.Flow (RealNVP, ContinuousFlow or a subclass), "
                f"got {type(flow).__name__}"
            )
        local = _default_local_kernel() if local is None else local
        if not isinstance(local, MCMCSampler):
            raise ValueError(
                f"local must be a continuous MCMCSampler (e.g. MALA(), Langevin()), got "
                f"{type(local).__name__}"
            )
        for name, val, low in (("n_local", n_local, 0), ("n_global", n_global, 0),
                               ("n_rounds", n_rounds, 1), ("flow_steps", flow_steps, 0)):
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
        if n_chains is not None and (not isinstance(n_chains, int) or n_chains < 1):
            raise ValueError(f"n_chains must be a positive int or None, got {n_chains!r}")
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
        self.flow = flow
        self.local = local
        self.n_local, self.n_global, self.n_rounds = n_local, n_global, n_rounds
        self.n_chains = n_chains
        self.flow_steps = flow_steps
        self.flow_batch_size = flow_batch_size
        self.flow_loss = flow_loss
        self.max_grad_norm = max_grad_norm
        self.adapt_steps = adapt_steps
        self.init = init
        self.check_finite = check_finite
        self.proposal_batch_size = proposal_batch_size
        params = [p for p in flow.parameters() if p.requires_grad]
        self.optimizer = (
            (optimizer(params) if optimizer is not None else default_adam(params, lr))
            if params else None
        )
        self.scheduler = scheduler(self.optimizer) if (scheduler and self.optimizer) else None
        self.n_flow_updates = 0
        self.register_buffer("chains", torch.empty(0))
        self.chain_stats: dict[str, Tensor] = {}

    # -- checks ------------------------------------------------------------------------
    def supports(self, energy: EnergyModel) -> bool:
        return isinstance(energy.space, Continuous)

    def _check_energy(self, energy: EnergyModel) -> None:
        if not isinstance(energy, EnergyModel):
            raise ValueError(f"energy must be an ebmflow EnergyModel, got {type(energy).__name__}")
        if not isinstance(energy.space, Continuous):
            raise ValueError(
                f"FlowMC samples continuous states but the energy's space is {energy.space!r}; "
                "use a discrete sampler (Gibbs, GibbsWithGradients, DiscreteLangevin)"
            )
        if energy.space.dim != self.flow.dim:
            raise ValueError(
                f"the flow has dim={self.flow.dim} but the energy's space {energy.space!r} has "
                f"{energy.space.dim} coordinates; build the flow with dim={energy.space.dim}"
            )
        ref = energy._reference_tensor()
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
        """Run ``n_rounds`` rounds (default ``self.n_rounds``) on the chains; return n states.

        Chains: ``x0`` if given (it becomes the persistent state), else the persistent chains
        (created at the first call: ``n_chains`` or ``n`` of them, see ``init``). Returns all
        chain states ``(B, *event)`` when n is None or n == B, else n of them chosen at random
        without replacement. Detached.
        """
        self._check_energy(energy)
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
            if self.n_global > 0:
                x, acc, bad = self._global_moves(energy, x, e_x, generator)
                global_acc = acc if global_acc is None else global_acc + acc
                bad_flow = bad if bad_flow is None else bad_flow | bad
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
        """E(x) ``(B,)`` cached by the local kernel's last run when it ended at ``x`` (MALA,
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
        """n_global independence-MH moves; returns (x, accepted count (B,), any non-finite q).

        ``e_x``: E(x) ``(B,)`` if known (else computed). With v = E + log q, proposal k is
        accepted on chain b when log u_kb < v(x_b) - v(x'_kb), i.e. log u_kb + v(x'_kb) <
        v(x_b); the left side is computed for all proposals at once. A proposal with a
        non-finite state or log q gets v = +inf (never accepted); a NaN energy gives a NaN
        comparison (never accepted).
        """
        b, event = x.shape[0], x.shape[1:]
        if e_x is None:
            e_x = energy(x)
        logq_x = self.flow.log_prob(x.reshape(b, -1))
        v_x = e_x + logq_x
        finite_masks = [torch.isfinite(logq_x)]
        # uniforms first (one call), then the proposals in as few flow calls as allowed
        log_u = torch.rand(self.n_global, b, generator=generator, device=x.device,
                           dtype=x.dtype).log_()
        per_call = self.n_global
        if self.proposal_batch_size is not None:
            per_call = max(1, min(per_call, self.proposal_batch_size // b))
        n_acc = torch.zeros(b, device=x.device, dtype=x.dtype)
        mask_shape = (b,) + (1,) * len(event)
        for k0 in range(0, self.n_global, per_call):
            k = min(per_call, self.n_global - k0)
            xp, logq_p = self.flow.sample_and_log_prob(k * b, generator)  # (k b, D), (k b,)
            finite = torch.isfinite(logq_p) & torch.isfinite(xp).all(1)
            finite_masks.append(finite)
            xp = xp.reshape(k * b, *event)
            v_p = torch.where(finite, energy(xp) + logq_p, torch.inf).view(k, b)
            key = log_u[k0:k0 + k].add_(v_p)  # accept proposal j iff key[j] < v(x)
            if k == 1:
                accept = key[0] < v_x
                x = torch.where(accept.view(mask_shape), xp, x)
                v_x = torch.where(accept, v_p[0], v_x)
                n_acc.add_(accept)
                continue
            # the sequential accept/reject steps only track v and the index of the last
            # accepted proposal per chain; the states are gathered once, O(B D) not O(k B D)
            accepted = torch.empty((k, b), dtype=torch.bool, device=x.device)
            last = torch.full((b,), -1, dtype=torch.long, device=x.device)
            for j in range(k):
                accept = torch.lt(key[j], v_x, out=accepted[j])
                v_x = torch.where(accept, v_p[j], v_x)
                last.masked_fill_(accept, j)
            rows = torch.arange(b, device=x.device)
            moved = (last >= 0).view(mask_shape)
            x = torch.where(moved, xp.reshape(k, b, *event)[last.clamp_(min=0), rows], x)
            n_acc.add_(accepted.sum(0))
        bad = ~torch.cat(finite_masks).all()
        return x, n_acc, bad

    # -- adaptation --------------------------------------------------------------------
    def update(
        self,
        energy: EnergyModel,
        data: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Fit the flow to the current chain states: ``flow_steps`` optimiser steps on

            L(phi) = -mean_b log q_phi(x_b)       (flow_loss="ml"; forward KL to the chains)

        or on the flow-matching loss. If no chains exist yet and ``data`` is given, the
        chains start at a copy of the data (so the first fit models the data). Returns (and
        stores in ``stats``) ``{"flow_loss": 0-d tensor}``, or ``{}`` when nothing was fitted
        (no chains, frozen flow, ``flow_steps=0``).
        """
        self._check_energy(energy)
        if self.chains.numel() == 0:
            if data is None:
                return {}
            ref = energy._reference_tensor()
            self.chains = energy.space.validate(
                data, "data", device=ref.device if ref is not None else None
            ).detach().clone()
        frozen = self.adapt_steps is not None and self.n_flow_updates >= self.adapt_steps
        if self.optimizer is None or self.flow_steps == 0 or frozen:
            return {}
        states = self.chains.reshape(self.chains.shape[0], -1)
        size = min(self.flow_batch_size or states.shape[0], states.shape[0])
        loss = torch.zeros((), device=states.device)
        for _ in range(self.flow_steps):
            if size < states.shape[0]:
                idx = torch.randperm(states.shape[0], generator=generator, device=states.device)
                batch = states[idx[:size]]
            else:
                batch = states
            if self.flow_loss == "ml":
                loss = self.flow.nll(batch)
            else:
                loss = self.flow.flow_matching_loss(batch, generator=generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.flow.parameters(), self.max_grad_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.n_flow_updates += 1
        out = {"flow_loss": loss.detach()}
        self.stats = {**self.stats, **out}
        return out

    def reset(self) -> None:
        """Forget the persistent chains (the next ``sample`` re-initialises them)."""
        self.chains = torch.empty(0, device=self.chains.device)

    # -- checkpoints -------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "n_flow_updates": self.n_flow_updates,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.n_flow_updates = int(state.get("n_flow_updates", 0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "chains"
        if key in state_dict:
            # the number of chains is only known once they exist: take the saved shape
            self.chains = torch.empty_like(state_dict[key], device=self.chains.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"n_local={self.n_local}, n_global={self.n_global}, n_rounds={self.n_rounds}, "
                f"flow_loss={self.flow_loss!r}")
