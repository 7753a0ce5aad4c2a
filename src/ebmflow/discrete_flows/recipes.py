r"""Three ways to train an EBM with a discrete flow sampler (samplingEBMs report).

Each recipe is a ``Sampler`` wrapping a ``DiscreteFlowSampler``; paired with
``ContrastiveDivergence`` it is trained by the ordinary loop (the ``Trainer``'s, or
``ebm_step`` below): per step, ``sampler.update(energy, batch)``, then
``loss(energy, batch, sampler)`` (which calls ``sampler.sample``), then the optimiser step:

    flow = DiscreteFlowSampler(MLPVelocity(32, 2, schedule=path.schedule), path)
    sampler = FlowNegatives(flow, k=1)                       # or BootstrapFlow / BackAndForth
    loss = ContrastiveDivergence(alpha=0.1)
    for batch in data:
        ebm_step(energy, loss, sampler, batch, optimizer)

1. ``FlowNegatives`` (flow as negative sampler): ``update`` takes $k$ importance-weighted,
   data-free flow steps on the current energy ($x_1 \sim q$, $w \propto \exp(-E(x_1)) / q(x_1)$);
   ``sample`` returns flow samples, the CD negatives.
2. ``BootstrapFlow`` (bootstrapped proposal): ``sample`` refines flow samples by $n$
   ``DiscreteLangevin(metropolis=True)`` (DMALA) steps on $E_k$ and keeps them with $E_k(x)$;
   the next ``update`` (after the EBM step, energy $E_{k+1}$) reweights them by
   $w \propto \exp(-E_{k+1}(x) + E_k(x))$ and trains the flow on them.
3. ``BackAndForth``: ``update`` sends the data batch back to time $t^*$ along the path (each
   token masked with probability $1 - \kappa(t^*)$; for the mask source this is the exact
   backward process, whose velocity into $\mathrm{MASK}$, $\kappa'/\kappa$, needs no network),
   runs the flow forward to 1, accepts each proposal $x'$ with the Metropolis-Hastings
   probability on the energy and trains the flow, unweighted, on the accepted states.
   ``sample`` gives flow samples, or one back-and-forth MH move from ``x0``
   (``ContrastiveDivergence(init="data")``).

The back-and-forth MH move is exact for the Euler chain: from $x$, draw the mask set $M$
(kept coordinates agree with $x$), then a forward path $\tau$ ending in $x'$; the reverse move
from $x'$ re-uses $M$ and the unmasking times of $\tau$ with the values of $x$. With
$\pi = \exp(-E)$,

$$\log \alpha = E(x) - E(x') + \log P(\text{path to } x \mid x_{t^*}) -
\log P(\text{path to } x' \mid x_{t^*}),$$

the mask probabilities cancel (they depend only on $M$), and both path probabilities come from
the same Euler step probabilities (``CTMCSolver.trajectory_log_prob``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..energy.base import EnergyModel
from ..samplers.base import MCMCSampler, Sampler

if TYPE_CHECKING:  # type only: discrete_flows does not depend on losses (docs/design.md)
    from ..losses.base import EBMLoss
from .sampler import DiscreteFlowSampler, from_tokens, to_tokens
from .weights import importance_weights

__all__ = ["FlowNegatives", "BootstrapFlow", "BackAndForth", "ebm_step"]


def _check_flow(flow: DiscreteFlowSampler) -> DiscreteFlowSampler:
    if not isinstance(flow, DiscreteFlowSampler):
        raise ValueError(f"flow must be a DiscreteFlowSampler, got {type(flow).__name__}")
    return flow


def ebm_step(
    energy: EnergyModel,
    loss: EBMLoss,
    sampler: Sampler,
    batch: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One training step, the ``Trainer``'s loop body: the sampler adapts
    (``sampler.update(energy, batch)``), then one optimiser step on ``loss(energy, batch,
    sampler)``. Returns the loss's and the sampler's stats (0-d tensors)."""
    upd = sampler.update(energy, batch, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    out = loss(energy, batch, sampler, generator=generator)
    out.loss.backward()
    optimizer.step()
    return {**upd, **out.stats, "loss": out.loss.detach()}


class _FlowRecipe(Sampler):
    """Shared plumbing: wraps a ``DiscreteFlowSampler`` as ``self.flow``."""

    def __init__(self, flow: DiscreteFlowSampler):
        super().__init__()
        self.flow = _check_flow(flow)

    def supports(self, energy: EnergyModel) -> bool:
        return self.flow.supports(energy)


class FlowNegatives(_FlowRecipe):
    """Recipe 1: the flow as negative sampler for contrastive divergence.

    ``update(energy, data)`` ignores ``data`` and takes ``k`` data-free, importance-weighted
    flow steps on the current energy (proposal $q$ and batch size from the flow); ``sample``
    draws fresh flow samples (or re-noises ``x0`` to ``t0``, see
    ``DiscreteFlowSampler.sample``).

    Args:
        flow: the ``DiscreteFlowSampler``.
        k: flow updates per EBM step (default 1).
    """

    def __init__(self, flow: DiscreteFlowSampler, k: int = 1):
        super().__init__(flow)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k

    def update(self, energy, data=None, *, generator=None):
        stats: dict[str, Tensor] = {}
        for _ in range(self.k):
            stats = self.flow.update(energy, None, generator=generator)
        self.stats = stats
        return stats

    @torch.no_grad()
    def sample(self, energy, n=None, *, x0=None, generator=None):
        """Fresh flow samples ``(n, D)`` (or ``x0`` re-noised and run forward)."""
        return self.flow.sample(energy, n, x0=x0, generator=generator)


class BootstrapFlow(_FlowRecipe):
    r"""Recipe 2: flow samples refined by MCMC on $E_k$, reweighted to $E_{k+1}$, train the flow.

    ``sample(energy, n)``: $x$ drawn from the flow, then ``n_steps`` of ``mcmc`` (default
    ``DiscreteLangevin(metropolis=True)``, imported lazily) on the current energy $E_k$; keeps
    $x$ and $E_k(x)$. ``update(energy)`` (energy now $E_{k+1}$): $\log w = -E_{k+1}(x) + E_k(x)$,
    self-normalised; one weighted flow step on $x$. Before the first ``sample`` (nothing kept
    yet) ``update`` trains the flow on ``data`` if given, which warms it up.

    Args:
        flow: the ``DiscreteFlowSampler``.
        mcmc: an ``MCMCSampler`` for the refinement (default ``DiscreteLangevin(metropolis=True)``).
        n_steps: refinement steps (default 10, the report's toy setting).
    """

    def __init__(self, flow: DiscreteFlowSampler, mcmc: MCMCSampler | None = None, n_steps: int = 10):
        super().__init__(flow)
        if mcmc is None:
            from ..samplers import DiscreteLangevin

            mcmc = DiscreteLangevin(metropolis=True)
        if not isinstance(mcmc, MCMCSampler):
            raise ValueError(f"mcmc must be an MCMCSampler, got {type(mcmc).__name__}")
        if not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        self.mcmc = mcmc
        self.n_steps = n_steps
        self._kept: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def sample(self, energy, n=None, *, x0=None, generator=None):
        """Flow samples refined by ``n_steps`` of ``mcmc`` on $E_k$; keeps $(x, E_k(x))$."""
        x = self.flow.sample(energy, n, x0=x0, generator=generator)
        if self.n_steps > 0:
            x = self.mcmc.run(energy, x, self.n_steps, generator=generator)
        self._kept = (x, energy(x))
        self.stats = {f"mcmc_{k}": v for k, v in self.mcmc.stats.items()} if self.n_steps > 0 else {}
        return x

    def update(self, energy, data=None, *, generator=None):
        self.flow._check_energy(energy)
        if self._kept is None:
            stats = {}
            if data is not None:
                data = energy.space.validate(data, "data", device=self.flow._device())
                stats = self.flow.fit_step(to_tokens(data, energy.space), None, generator)
        else:
            x, e_old = self._kept
            with torch.no_grad():
                e_new = energy(x)
            w, wstats = importance_weights(e_new - e_old, torch.zeros_like(e_old))
            stats = {**self.flow.fit_step(to_tokens(x, energy.space), w, generator), **wstats}
        self.stats = {**self.stats, **stats}
        return stats


class BackAndForth(_FlowRecipe):
    r"""Recipe 3: data sent back to $t^*$, run forward by the flow, MH-accepted on the energy.

    ``update(energy, data)``: $x' = \mathrm{forward}(\mathrm{renoise}(\text{data}, t^*))$;
    accept with the exact MH probability (module docstring); the flow takes one unweighted
    step on the accepted states. ``sample(energy, n)``: fresh flow samples;
    ``sample(energy, x0=x)``: one back-and-forth MH move from $x$. Needs the mask source.

    Args:
        flow: the ``DiscreteFlowSampler`` (mask source).
        t_star: time $t^*$ the data is sent back to, in $(0, 1)$ (default 0.5; larger = smaller
            moves).
    Stats: ``accept_rate`` (mean MH acceptance), ``flow_loss``.
    """

    def __init__(self, flow: DiscreteFlowSampler, t_star: float = 0.5):
        super().__init__(flow)
        if flow.path.mask_token is None:
            raise ValueError(
                "BackAndForth needs the mask source (MixturePath(S, 'mask')): its backward "
                "process is analytic; the uniform source would need a learned backward velocity"
            )
        if not 0.0 < float(t_star) < 1.0:
            raise ValueError(f"t_star must lie in (0, 1), got {t_star!r}")
        self.t_star = float(t_star)

    @torch.no_grad()
    def mh_move(self, energy: EnergyModel, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One back-and-forth MH move from states ``x`` of the energy's space.

        Returns (x_new ``(B, *event)``, accepted bool ``(B,)``)."""
        flow = self.flow
        tokens = to_tokens(x, energy.space)
        out = flow.sample_tokens(tokens.shape[0], x1=tokens, t0=self.t_star, generator=generator,
                                 return_log_prob=True, return_trajectory=True)
        mask = flow.path.mask_token
        reverse = [torch.where(s == mask, s, tokens) for s in out.trajectory]
        log_q_rev = flow.solver.trajectory_log_prob(flow.velocity, reverse, self.t_star)
        x_prop = from_tokens(out.x, energy.space)
        log_alpha = energy(x) - energy(x_prop) + log_q_rev - out.log_prob
        u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device)
        accept = u.log() < log_alpha
        shape = (-1,) + (1,) * (x.dim() - 1)
        return torch.where(accept.reshape(shape), x_prop, x), accept

    def update(self, energy, data=None, *, generator=None):
        self.flow._check_energy(energy)
        if data is None:
            raise ValueError("BackAndForth.update needs a data batch to send back and forth")
        data = energy.space.validate(data, "data", device=self.flow._device())
        x_acc, accept = self.mh_move(energy, data, generator)
        stats = {**self.flow.fit_step(to_tokens(x_acc, energy.space), None, generator),
                 "accept_rate": accept.float().mean()}
        self.stats = stats
        return stats

    @torch.no_grad()
    def sample(self, energy, n=None, *, x0=None, generator=None):
        """Fresh flow samples ``(n, D)``; with ``x0``, one back-and-forth MH move from it."""
        if x0 is None:
            return self.flow.sample(energy, n, generator=generator)
        x0 = energy.space.validate(x0, "x0", device=self.flow._device())
        x, accept = self.mh_move(energy, x0, generator)
        self.stats = {**self.stats, "accept_rate": accept.float().mean()}
        return x
