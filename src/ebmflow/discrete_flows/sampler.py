r"""``DiscreteFlowSampler``: a velocity model, a mixture path and a CTMC solver as a ``Sampler``.

``sample(energy, n)`` simulates the CTMC from the source to $t = 1$ and returns states in the
energy's convention (float $\{0, 1\}$ for ``Binary``, long for ``Categorical``).

``update(energy, data)`` takes one (or ``updates_per_call``) optimiser step(s) of the flow.
What it learns is set by ``fit_to``:

* ``"energy"`` (default; the flow is a sampler of the energy, as every learned ``Sampler``):
  data-free, $x_1 \sim q$ (the proposal), importance weights
  $\log w = -E(x_1)/T - \log q(x_1)$, self-normalised to mean 1 and detached, then weighted
  regression. A data batch passed by a training loop is not used: a flow fitted to the data
  would hand contrastive divergence negatives distributed like the data, whose gradient
  vanishes whatever the energy.
* ``"data"``: unweighted regression on $x_1 = \text{data}$ when a batch is given (data-free
  without one): the flow as a model of the data.

Data-free updates return the effective sample size $(\sum w)^2 / \sum w^2$ and weight
statistics (0-d tensors); ``LowESSWarning`` is raised when $\text{ESS} / B$ falls below
``ess_threshold``. Value checks (NaN / $-\infty$ energies, $\log q = -\infty$, the ESS
warning) read tensors on the host: every update on the CPU (free there), on an accelerator at
the first update and then every ``check_every`` updates (one synchronisation per
``check_every``; the flags and the minimum ESS fraction are accumulated on the device in
between).
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
from torch import Tensor, nn

from .._optim import default_adam
from .._warnings import user_stacklevel
from ..energy.base import EnergyModel
from ..samplers.base import Sampler
from ..spaces import Binary, Categorical, Space
from .losses import posterior_loss, velocity_regression_loss
from .models import VelocityModel
from .path import MixturePath
from .proposals import FactorizedProposal
from .solver import CTMCSolver, SolverOutput
from .weights import LowESSWarning, importance_weights

__all__ = ["DiscreteFlowSampler", "Proposal", "to_tokens", "from_tokens"]

_OBJECTIVES = ("velocity", "posterior")
_FIT_TO = ("energy", "data")


class Proposal(Protocol):
    """What data-free training needs from a proposal $q$."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


def to_tokens(x: Tensor, space: Space) -> Tensor:
    r"""Energy-space states -> long tokens ``(B, D)`` (float $\{0, 1\}$ bits become 0/1)."""
    if isinstance(space, Binary):
        return x.long()
    if isinstance(space, Categorical):
        return space.from_one_hot(x) if space.is_one_hot(x) else x
    raise ValueError(f"discrete flows need a Binary or Categorical space, got {space!r}")


def from_tokens(tokens: Tensor, space: Space) -> Tensor:
    """Long tokens -> the energy's convention (float bits for ``Binary``)."""
    return tokens.float() if isinstance(space, Binary) else tokens


class DiscreteFlowSampler(Sampler):
    r"""A discrete flow used as a (learned) sampler of an energy on $\{0, \dots, S-1\}^D$.

    Args:
        model: the ``VelocityModel`` (its output is the velocity for objective "velocity",
            posterior logits of $x_1$ for objective "posterior").
        path: default ``MixturePath(model.num_classes, "mask")``.
        solver: default ``CTMCSolver(path, dt=0.05)`` (jump "exact").
        objective: "velocity" (velocity regression, default) or "posterior" (cross-entropy).
        fit_to: what ``update`` trains the flow on: "energy" (default; data-free, importance
            weighted, any data batch unused) or "data" (the batch, when one is given).
        scale_by_rate: velocity objective only: the velocity is
            $u = \kappa'(t) / (1 - \kappa(t)) \cdot \mathrm{model}(x_t, t)$, so the network
            learns a bounded quantity although $u$ grows like $1/(1 - t)$. Default None: on
            unless the model scales by a schedule itself (``MLPVelocity(schedule=...)``).
        proposal: $q$ for data-free training (default uniform on $\{0, \dots, S-1\}^D$); a
            ``FactorizedProposal`` or any object with ``sample(n, generator)`` and ``log_prob``.
        temperature: $T$ of the target $p \propto \exp(-E/T)$ (default 1).
        batch_size: proposal draws per data-free update (default 128).
        lr: Adam learning rate (default 3e-3) of the optimiser made here, unless ``optimizer``
            (built on ``model.parameters()``) is given.
        updates_per_call: optimiser steps per ``update`` (default 1).
        ess_threshold: warn when $\text{ESS} / B <$ this (default 0.05); 0 disables the warning.
        check_weights: check energies and $\log q$ for NaN / $-\infty$ on proposals, and the ESS
            against ``ess_threshold`` (default True).
        check_every: on an accelerator, read those checks every this many data-free updates
            (default 100; the first update is always read). On the CPU every update is read.
        grad_clip: max gradient norm (default None).
    """

    syncs_gradients = True  # update() calls sync_gradients before its optimiser step

    def __init__(
        self,
        model: VelocityModel,
        path: MixturePath | None = None,
        solver: CTMCSolver | None = None,
        *,
        objective: str = "velocity",
        fit_to: str = "energy",
        scale_by_rate: bool | None = None,
        proposal: Proposal | None = None,
        temperature: float = 1.0,
        batch_size: int = 128,
        lr: float = 3e-3,
        optimizer: torch.optim.Optimizer | None = None,
        updates_per_call: int = 1,
        ess_threshold: float = 0.05,
        check_weights: bool = True,
        check_every: int = 100,
        grad_clip: float | None = None,
    ):
        super().__init__()
        if not isinstance(model, VelocityModel):
            raise ValueError(f"model must be a VelocityModel (e.g. MLPVelocity), got {type(model).__name__}")
        if objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
        self.model = model
        self.path = path if path is not None else MixturePath(model.num_classes, "mask")
        if self.path.num_classes != model.num_classes:
            raise ValueError(
                f"path has {self.path.num_classes} classes but the model {model.num_classes}; "
                "make them equal"
            )
        self.solver = solver if solver is not None else CTMCSolver(self.path)
        if self.solver.path is not self.path:
            raise ValueError("solver must be built on the same path object: CTMCSolver(path, h)")
        self.objective = objective
        if fit_to not in _FIT_TO:
            raise ValueError(
                f"fit_to must be one of {_FIT_TO}, got {fit_to!r}: \"energy\" trains the flow as a "
                "sampler of the energy, \"data\" on the data batches given to update"
            )
        self.fit_to = fit_to
        own_scale = getattr(model, "schedule", None) is not None
        if scale_by_rate is None:
            scale_by_rate = objective == "velocity" and not own_scale
        if scale_by_rate and objective != "velocity":
            raise ValueError("scale_by_rate applies to objective='velocity' only (posterior logits "
                             "are turned into a velocity by the path); pass scale_by_rate=False")
        if scale_by_rate and own_scale:
            raise ValueError("the model already multiplies its output by its schedule's rate; pass "
                             "scale_by_rate=False (or build the model without schedule=)")
        self.scale_by_rate = bool(scale_by_rate)
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        self.check_every = check_every
        self._monitor: dict[str, Tensor] = {}
        self._free_updates = 0
        proposal = proposal if proposal is not None else FactorizedProposal.uniform(model.dim, model.num_classes)
        if isinstance(proposal, nn.Module):
            self.proposal = proposal
        else:
            self._proposal = proposal
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(updates_per_call, int) or updates_per_call < 1:
            raise ValueError(f"updates_per_call must be a positive int, got {updates_per_call!r}")
        self.temperature = float(temperature)
        self.batch_size = batch_size
        self.updates_per_call = updates_per_call
        self.ess_threshold = float(ess_threshold)
        self.check_weights = check_weights
        self.grad_clip = grad_clip
        self.optimizer = optimizer if optimizer is not None else default_adam(model.parameters(), lr)

    # -- helpers ---------------------------------------------------------------------------
    def get_proposal(self) -> Proposal:
        """The proposal $q$ used by data-free updates."""
        return self.proposal if "proposal" in self._modules else self._proposal

    def set_proposal(self, proposal: Proposal) -> None:
        """Replace $q$ (e.g. by ``FactorizedProposal.fit(data, S)``)."""
        if isinstance(proposal, nn.Module):
            self.proposal = proposal
        else:
            self._modules.pop("proposal", None)
            self._proposal = proposal

    def supports(self, energy: EnergyModel) -> bool:
        space = energy.space
        return (
            isinstance(space, (Binary, Categorical))
            and space.dim == self.model.dim
            and space.num_classes == self.model.num_classes
        )

    def _check_energy(self, energy: EnergyModel) -> None:
        # Sampler's check (an EnergyModel this sampler supports), with the hint that fits a
        # discrete space of the wrong size
        if isinstance(energy, EnergyModel) and isinstance(energy.space, (Binary, Categorical)) \
                and not self.supports(energy):
            raise ValueError(
                f"DiscreteFlowSampler over {self.model.dim} coordinates with "
                f"{self.model.num_classes} classes cannot sample {energy.space!r}; build the "
                "model with the energy's dim and num_classes (Binary: 2)"
            )
        super()._check_energy(energy)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def velocity(self, x_t: Tensor, t: Tensor) -> Tensor:
        r"""The generating velocity $u(j \mid x_t)$ ``(B, D, S)`` used by the solver."""
        out = self.model(x_t, t)
        if self.objective == "posterior":
            return self.path._posterior_to_velocity(out, x_t, t)
        return self._scaled(out, t)

    def _scaled(self, out: Tensor, t: Tensor) -> Tensor:
        if not self.scale_by_rate:
            return out
        return out * self.path.schedule.rate(t)[:, None, None].to(out.dtype)

    def renoise(self, x1: Tensor, t0: float, generator: torch.Generator | None = None) -> Tensor:
        r"""Send tokens $x_1$ (``x1``) back to time $t_0$ (``t0``) along the path:
        $x_{t_0} \sim p_{t_0}(\cdot \mid x_1)$.

        For the mask source this is the exact backward process of the marginal path (each
        token is masked with probability $1 - \kappa(t_0)$; the backward velocity into
        $\mathrm{MASK}$, $\kappa'/\kappa$, does not depend on the other tokens), so no backward
        network is needed.
        """
        t = torch.full((x1.shape[0],), float(t0), device=x1.device)
        return self.path.sample(x1, t, generator, check=False)

    # -- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(
        self,
        n: int,
        *,
        x1: Tensor | None = None,
        t0: float = 0.0,
        generator: torch.Generator | None = None,
        return_log_prob: bool = False,
        return_trajectory: bool = False,
    ) -> SolverOutput:
        """Tokens from the flow: from the source (``x1`` None) or from ``x1`` re-noised to
        ``t0``."""
        if x1 is None:
            if t0 != 0.0:
                raise ValueError(f"t0={t0} > 0 needs states to re-noise; pass x1= (or x0= to sample)")
            x_init = self.path.sample_source(n, self.model.dim, generator, self._device())
        else:
            x_init = self.renoise(x1, t0, generator)
        return self.solver.sample(
            self.velocity, x_init, t0, generator=generator, return_log_prob=return_log_prob,
            return_trajectory=return_trajectory,
        )

    @torch.no_grad()
    def sample(
        self,
        energy: EnergyModel,
        n: int | None = None,
        *,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        t0: float = 0.0,
    ) -> Tensor:
        """Draw ``n`` states of ``energy.space`` (float bits for Binary, long for Categorical).

        With ``x0`` (states of the energy's space), each is re-noised to time ``t0`` along the
        path and simulated forward again ($t_0 = 0$: independent fresh samples; $t_0$ close to 1:
        small local moves). The energy is only used for its space here.
        """
        self._check_energy(energy)
        x1 = None
        if x0 is not None:
            x0 = energy.space.validate(x0, "x0", device=self._device())
            if n is not None and x0.shape[0] != n:
                raise ValueError(f"n={n} but x0 has {x0.shape[0]} states; pass one of them")
            n = x0.shape[0]
            x1 = to_tokens(x0, energy.space)
        elif n is None:
            raise ValueError("pass n (number of states) or x0 (states to re-noise)")
        n = energy.space.check_n(n)
        out = self.sample_tokens(n, x1=x1, t0=t0, generator=generator)
        return from_tokens(out.x, energy.space)

    # -- training --------------------------------------------------------------------------
    def loss(self, x1: Tensor, weights: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        r"""The flow's training loss on tokens $x_1$ ``(B, D)``: $t \sim U[0, 1)$,
        $x_t \sim p_t(\cdot \mid x_1)$."""
        b = x1.shape[0]
        t = torch.rand(b, generator=generator, device=x1.device) * (1.0 - 1e-3)
        x_t = self.path.sample(x1, t, generator, check=False)
        out = self.model(x_t, t)
        if self.objective == "posterior":
            return posterior_loss(out, x_t, x1, t, self.path, weights)
        return velocity_regression_loss(self._scaled(out, t), x_t, x1, t, self.path, weights)

    def fit_step(self, x1: Tensor, weights: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One optimiser step on tokens $x_1$ ``(B, D)`` with optional weights ``(B,)`` (mean 1)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x1, weights, generator)
        loss.backward()
        self.sync_gradients(self.model.parameters())  # data parallel: one step on all ranks
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return {"flow_loss": loss.detach()}

    @torch.no_grad()
    def weighted_proposals(
        self, energy: EnergyModel, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        r"""Draw $x_1 \sim q$ ``(n, D)`` tokens with self-normalised weights ``(n,)`` and stats."""
        proposal = self.get_proposal()
        x1 = proposal.sample(n, generator=generator)
        log_q = proposal.log_prob(x1)
        e = energy(from_tokens(x1, energy.space))
        w, stats = importance_weights(e, log_q, self.temperature)
        if self.check_weights:
            self._check(e, log_q, stats["ess_fraction"])
        return x1, w, stats

    def _check(self, e: Tensor, log_q: Tensor, ess_fraction: Tensor) -> None:
        """Value checks of one data-free update, read on the host only when it costs no
        synchronisation (CPU) or when due (first update, then every ``check_every``)."""
        flags = _weight_flags(e, log_q)
        self._free_updates += 1
        if e.device.type == "cpu":
            if bool(flags.any()):
                _check_weights(e, log_q)
            self._warn_low_ess(float(ess_fraction), 1)
            return
        mon = self._monitor
        mon["flags"] = flags if "flags" not in mon else mon["flags"] | flags
        frac = ess_fraction.detach().reshape(1).float()
        mon["ess_min"] = frac if "ess_min" not in mon else torch.minimum(mon["ess_min"], frac)
        if self._free_updates != 1 and self._free_updates % self.check_every != 0:
            return
        *bad, ess_min = torch.cat([mon.pop("flags").float(), mon.pop("ess_min")]).tolist()
        if any(bad):
            _check_weights(e, log_q)  # the current batch: a detailed message when it is this one
            raise ValueError(
                "the energy returned NaN or -inf, or the proposal's log q was -inf where the "
                f"energy is finite, on proposal states within the last {self.check_every} "
                "data-free updates; check the energy and give the proposal full support"
            )
        self._warn_low_ess(ess_min, self.check_every)

    def _warn_low_ess(self, frac: float, window: int) -> None:
        if self.ess_threshold > 0 and frac < self.ess_threshold:
            when = "" if window == 1 else f" (lowest of the last {window} updates)"
            warnings.warn(
                f"importance-weight ESS collapsed to {frac:.3g} of the batch{when} (< "
                f"ess_threshold={self.ess_threshold}); use a proposal closer to the "
                "target (FactorizedProposal.fit(data), a higher temperature) or a "
                "larger batch_size",
                LowESSWarning,
                stacklevel=user_stacklevel(),
            )

    def update(
        self,
        energy: EnergyModel,
        data: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Train the flow from the energy alone by importance weighting proposals, or (with
        ``fit_to="data"`` and a batch) on ``data``, unweighted. Returns (and keeps in
        ``self.stats``) ``flow_loss`` and, data-free, ``ess``, ``ess_fraction``,
        ``weight_max``, ``log_weight_std`` (0-d tensors)."""
        self._check_energy(energy)
        stats: dict[str, Tensor] = {}
        if data is not None and self.fit_to == "data":
            data = energy.space.validate(data, "data", device=self._device())
            x1 = to_tokens(data, energy.space)
            for _ in range(self.updates_per_call):
                stats = self.fit_step(x1, None, generator)
        else:
            for _ in range(self.updates_per_call):
                x1, w, wstats = self.weighted_proposals(energy, self.batch_size, generator)
                stats = {**self.fit_step(x1, w, generator), **wstats}
        self.stats = stats
        return stats


def _weight_flags(e: Tensor, log_q: Tensor) -> Tensor:
    r"""Bool ``(3,)`` on the energies' device: [NaN or $-\infty$ energy, $\log q = -\infty$
    where the energy is finite, every log-weight $-\infty$]; computed without reading values."""
    nan = (torch.isnan(e) | (e == float("-inf"))).any()
    support = (torch.isfinite(e) & ~torch.isfinite(log_q)).any()
    all_inf = ~torch.isfinite(-e - log_q).any()
    return torch.stack([nan, support, all_inf])


def _check_weights(e: Tensor, log_q: Tensor) -> None:
    if bool(torch.isnan(e).any() | (e == float("-inf")).any()):
        raise ValueError("the energy returned NaN or -inf on proposal states; check the energy model")
    bad = torch.isfinite(e) & ~torch.isfinite(log_q)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"the proposal's log q is {log_q[i].item()} at a state it sampled (index {i}) where the "
            f"energy is finite ({e[i].item():.4g}); importance weights are undefined. Give the "
            "proposal full support (e.g. FactorizedProposal.fit(..., smoothing=1.0))"
        )
    if not bool(torch.isfinite(-e - log_q).any()):
        raise ValueError("every importance log-weight is -inf (all energies +inf); check the energy")
