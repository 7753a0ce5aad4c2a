"""Gibbs sampling with exact single-coordinate conditionals (no gradient needed)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid

from ..energy.base import EnergyModel
from ..spaces import Binary
from . import rng
from ._discrete import _read_values, check_discrete_states, is_discrete_space
from .base import ChainState, MCMCSampler, StepInfo

__all__ = ["Gibbs"]


class Gibbs(MCMCSampler):
    r"""Gibbs sampler for ``Binary`` and ``Categorical`` spaces.

    One coordinate update resamples $x_i$ from its exact conditional

    $$p(x_i = k \mid x_{-i}) \propto \exp f(x \text{ with } x_i = k), \qquad f = -E,$$

    for every chain at once, from ``energy.conditional_energies``: by default the K - 1
    alternative values of the chosen coordinate of every chain are evaluated in one batched
    energy call on ``(B * (K - 1), D)`` states, and E(x) of the current state is cached in the
    chain state, so a binary update costs one energy evaluation per chain; energies with a
    local formula (``IsingEnergy``: O(D) per chain) override that method and skip the energy
    call. The energy only has to be evaluable, never differentiable.

    Args:
        sweep: False (default): random scan, one step updates one uniformly chosen
            coordinate per chain (chains choose independently). True: systematic scan, one
            step updates coordinates 0, 1, ..., D-1 in order (D updates per step).
        n_steps: default number of steps of ``sample``/``run`` (default 10).
        on_nonfinite: "raise" (default) or "reset"; see ``MCMCSampler``.
        progress: show a progress bar in ``run`` (default False).
        cuda_graph: record K steps as one CUDA graph for CUDA states (default False); see ``MCMCSampler``.
        graph_steps: K, steps per CUDA graph or compiled block (default None: 32 for graphs;
            8 random-scan steps or one sweep per compiled block).
        compile: the compiled executor: "auto" (default: CPU chains compile after 2000 steps), True or False; see ``MCMCSampler``.

    Step info (per chain ``(B,)``): ``flips`` (number of coordinates whose value changed in
    the step); ``stats`` / ``chain_stats`` also hold ``accept_rate`` = 1 (Gibbs moves are
    never rejected).
    """

    def __init__(self, sweep: bool = False, n_steps: int = 10, on_nonfinite: str = "raise",
                 progress: bool = False, *, cuda_graph: bool = False, graph_steps: int | None = None,
                 compile: bool | str = "auto"):
        super().__init__(n_steps=n_steps, on_nonfinite=on_nonfinite, progress=progress,
                         cuda_graph=cuda_graph, graph_steps=graph_steps, compile=compile)
        self.sweep = bool(sweep)

    def supports(self, energy: EnergyModel) -> bool:
        return is_discrete_space(energy.space)

    def extra_repr(self) -> str:
        return f"sweep={self.sweep}"

    # -- exact conditionals --------------------------------------------------------------
    @torch.no_grad()
    def _relative_logits(
        self, energy: EnergyModel, x: Tensor, index: Tensor, energy_x: Tensor
    ) -> Tensor:
        r"""Logits $f(x \text{ with } x_i = (x_i + j) \bmod K)$ for $j = 0, \dots, K-1$, shape
        ``(B, K)``.

        ``index`` ``(B,)`` is the coordinate of each chain; $j = 0$ is the current value, whose
        energy ``energy_x`` ``(B,)`` is reused. The energies come from
        ``energy.conditional_energies`` (one batched call on the $K - 1$ alternatives by
        default, a local formula where the energy has one).
        """
        k = energy.space.num_classes
        e_cond = energy.conditional_energies(x, index, energy_x)  # (B, K), by value
        current = x.gather(1, index[:, None]).long()
        return -e_cond.gather(1, (current + torch.arange(k, device=x.device)) % k)

    @torch.no_grad()
    def conditional_log_probs(self, energy: EnergyModel, x: Tensor, index: int | Tensor) -> Tensor:
        r"""Exact $\log p(x_i = k \mid x_{-i})$ for $k = 0, \dots, K-1$, shape ``(B, K)``.

        ``index`` is one coordinate for all chains or a long ``(B,)`` tensor of coordinates.
        """
        index = torch.as_tensor(index, device=x.device, dtype=torch.long).expand(x.shape[0])
        rel = self._relative_logits(energy, x, index, energy(x))
        k = rel.shape[1]
        current = x.gather(1, index[:, None]).long()
        # relative position j holds value (x_i + j) mod K, so value v sits at j = (v - x_i) mod K
        pos = (torch.arange(k, device=x.device) - current) % k
        return torch.log_softmax(rel.gather(1, pos), dim=1)

    # -- transition ----------------------------------------------------------------------
    def init_state(self, energy: EnergyModel, x: Tensor) -> ChainState:
        check_discrete_states(type(self).__name__, energy, x, _read_values(self, x))
        with torch.no_grad():
            return ChainState(x, energy=energy(x))

    def _update(
        self, energy: EnergyModel, x: Tensor, e: Tensor, index: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Resample coordinate ``index`` ``(B,)`` of every chain; returns (x', E(x'), changed)."""
        k = energy.space.num_classes
        logits = self._relative_logits(energy, x, index, e)
        j = rng.categorical_sample(logits, generator)  # (B,) relative move; 0 = keep
        current = x.gather(1, index[:, None]).long()
        new_value = (current + j[:, None]) % k
        x = x.scatter(1, index[:, None], new_value.to(x.dtype))
        rel = -logits.gather(1, j[:, None]).squeeze(1)
        return x, rel, j != 0

    def transition(
        self, energy: EnergyModel, state: ChainState, generator: torch.Generator | None = None
    ) -> tuple[ChainState, StepInfo]:
        if torch.is_grad_enabled():  # run() is already under no_grad: no context per step
            with torch.no_grad():
                return self.transition(energy, state, generator)
        x = state.x
        e = state.energy if state.energy is not None else energy(x)
        batch, dim = x.shape
        binary = isinstance(energy.space, Binary) and not energy.has_local_conditionals
        if self.sweep:
            flips = torch.zeros(batch, device=x.device, dtype=e.dtype)
            for i in range(dim):
                if binary:  # one flip candidate: a Bernoulli draw
                    index = torch.full((batch, 1), i, device=x.device, dtype=torch.long)
                    x, e, changed = self._update_binary(energy, x, e, index, generator)
                else:
                    index = torch.full((batch,), i, device=x.device, dtype=torch.long)
                    x, e, changed = self._update(energy, x, e, index, generator)
                flips = flips + changed.to(e.dtype)
        elif binary:
            index = rng.randint(0, dim, (batch, 1), generator, x.device)
            x, e, flips = self._update_binary(energy, x, e, index, generator)
        else:
            index = rng.randint(0, dim, (batch,), generator, x.device)
            x, e, changed = self._update(energy, x, e, index, generator)
            flips = changed.to(e.dtype)
        return ChainState(x, energy=e), {"flips": flips}

    def _compile_block_steps(self) -> int:
        return 1 if self.sweep else 8  # a sweep is D conditional updates already

    def end_run(self, energy: EnergyModel, state: ChainState) -> None:
        """Gibbs moves are never rejected: ``accept_rate`` is 1 (set here, not summed per
        step)."""
        ones = torch.ones(state.x.shape[0], device=state.x.device)
        self.chain_stats["accept_rate"] = ones
        self.stats["accept_rate"] = ones.mean()

    def _update_binary(
        self, energy: EnergyModel, x: Tensor, e: Tensor, index: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Binary random scan: flip bit ``index`` ``(B, 1)`` with its exact conditional
        probability p(flip) = sigmoid(E(x) - E(x')) (x' = x with the bit flipped); returns
        (x', E(x'), flips as 0/1 floats). A NaN/inf E(x') that is not +inf is taken (so
        ``run`` reports it), as the general K-value path does.

        The candidate x' is the only ``(B, D)`` copy made: the rejected flips are undone in it
        in place (one ``(B, 1)`` scatter), instead of selecting rows of x or x' (a second
        ``(B, D)`` pass). The energy must not keep a reference to its input (none of
        ebmflow's do).
        """
        bit = x.gather(1, index)
        flipped = 1.0 - bit
        y = x.scatter(1, index, flipped)
        e_y = energy(y)
        log_u = rng.rand(e.shape, generator, x.device, e.dtype).log_()
        keep = log_u >= logsigmoid(e - e_y)  # False (flip) when the right side is NaN
        y.scatter_(1, index, torch.where(keep[:, None], bit, flipped))
        flips = keep.logical_not().to(e.dtype)
        return y, torch.where(keep, e, e_y), flips

    def _finite_rows(self, state: ChainState) -> Tensor:
        # states are built from valid discrete values: only the cached energy can be NaN/inf
        assert state.energy is not None
        return state.energy
