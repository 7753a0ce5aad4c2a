"""Shared pieces of the discrete samplers: space checks, relaxed gradients and categorical draws.

Notation (as in DESIGN.md): f(x) = -E(x) is the unnormalised log-density. A binary state is a
float ``(B, D)`` in {0, 1}; a categorical state is long ``(B, D)`` in [0, K) whose relaxation is
the one-hot float ``(B, D, K)``. Gradients are always taken with respect to the relaxed state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _capture
from ..energy.base import EnergyModel
from ..spaces import Binary, Categorical, Space
from . import rng
from ._fast import energy_and_grad
from .base import ChainState, MCMCSampler, StepInfo, _energy_grad_rows

__all__ = [
    "is_discrete_space",
    "check_discrete_states",
    "relax",
    "relaxed_energy_and_grad",
    "flip_gain",
    "half_flip_gain",
    "gumbel_argmax",
    "float_dtype",
    "log_uniform",
    "mh_select",
    "GradientDiscreteSampler",
]


def is_discrete_space(space: Space) -> bool:
    """True for ``Binary`` and ``Categorical`` spaces (the ones discrete samplers handle)."""
    return isinstance(space, (Binary, Categorical))


def check_discrete_states(sampler: str, energy: EnergyModel, x: Tensor,
                          values: bool = True) -> None:
    """Validate ``x`` against the energy's discrete space (reads values: once per run).

    Raises ``ValueError`` for a non-discrete space, a wrong dtype (e.g. float states for a
    categorical space) or values outside {0, 1} / [0, K). The value check (a host read) is
    skipped with ``values=False`` and while a CUDA graph is being captured, where reading
    values is not allowed.
    """
    if not isinstance(energy, EnergyModel):
        raise ValueError(
            f"energy must be an ebmflow EnergyModel, got {type(energy).__name__}; subclass "
            "ebmflow.energy.EnergyModel and implement energy()"
        )
    if not is_discrete_space(energy.space):
        raise ValueError(
            f"{sampler} samples Binary or Categorical spaces, got {energy.space!r}; use "
            "Langevin, MALA or HMC for continuous states"
        )
    if not values:
        if x.dtype != (torch.long if isinstance(energy.space, Categorical) else x.dtype) or (
                not isinstance(energy.space, Categorical) and not x.is_floating_point()):
            energy.space.validate(x, "x0")  # a dtype error needs no value read
        return
    if _capture.capturing(x) or _valid_fast(energy.space, x):
        return
    energy.space.validate(x, "x0")  # raises the informative error


def _valid_fast(space: Space, x: Tensor) -> bool:
    """A quick test that ``x`` holds valid states of ``space`` (one or two passes over x
    instead of four); False sends the caller to ``space.validate`` for the full check."""
    if x.dim() != 2 or x.shape[0] == 0 or tuple(x.shape[1:]) != tuple(space.shape):
        return False
    if isinstance(space, Categorical):
        if x.dtype != torch.long:
            return False
        lo, hi = torch.aminmax(x)
        return bool(lo >= 0) and bool(hi < space.num_classes)
    if not x.is_floating_point():
        return False
    # x - x^2 = x (1 - x) is 0 exactly for x in {0, 1}; NaN / inf give NaN (non-zero)
    return not bool(torch.count_nonzero(torch.addcmul(x, x, x, value=-1)))


def float_dtype(energy: EnergyModel) -> torch.dtype:
    """Floating dtype of the energy's parameters (float32 when it has none)."""
    ref = energy.reference_tensor()
    if ref is not None and ref.is_floating_point():
        return ref.dtype
    return torch.get_default_dtype()


def relax(space: Space, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The state in which gradients are taken: the bits ``(B, D)`` for ``Binary``, the one-hot
    float ``(B, D, K)`` for ``Categorical``."""
    if isinstance(space, Categorical):
        return space.one_hot(x, dtype=dtype)
    return x


def relaxed_energy_and_grad(
    sampler: str, energy: EnergyModel, x: Tensor, check: bool = False
) -> tuple[Tensor, Tensor]:
    """E(x) ``(B,)`` and dE/dx_relaxed (``(B, D)`` binary, ``(B, D, K)`` categorical), detached.

    A gradient-free energy (output not connected to the input in the autograd graph) raises a
    ``ValueError`` that points to ``Gibbs``. With ``check=True`` (once per run, outside graph
    capture) an energy whose gradient is exactly zero at every state of the batch while its
    values differ between states (a piecewise-constant energy, e.g. one that rounds its input)
    is rejected too.
    """
    space = energy.space
    xr = space.one_hot(x, dtype=float_dtype(energy)) if isinstance(space, Categorical) else x
    try:
        e, g = energy_and_grad(energy, xr)
    except RuntimeError as err:
        msg = str(err)
        if "does not require grad" in msg or "not have been used in the graph" in msg:
            raise ValueError(
                f"{sampler} needs the gradient of the energy with respect to the state, but "
                f"{type(energy).__name__}.energy is not differentiable in its input (autograd: "
                f"{msg.splitlines()[0]}); use ebmflow.samplers.Gibbs, which needs no gradient"
            ) from err
        raise
    if check and not _capture.capturing(x) and e.shape[0] > 1:
        flat_grad = bool((g == 0).all())
        varies = bool((e != e[0]).any())
        if flat_grad and varies:
            raise ValueError(
                f"{sampler}: the gradient of {type(energy).__name__}.energy is zero at every "
                "state of the batch although the energies differ, so it carries no information "
                "about which coordinates to change (a piecewise-constant energy?); use "
                "ebmflow.samplers.Gibbs, which needs no gradient"
            )
    return e, g


def flip_gain(space: Space, xr: Tensor, grad_energy: Tensor) -> Tensor:
    r"""First-order estimate of $f(x') - f(x)$ for every single-coordinate move, $f = -E$.

    Binary: $d_i = (1 - 2 x_i)\, \nabla f(x)_i$, shape ``(B, D)`` (the move flips bit $i$).
    Categorical: $d_{i,k} = \nabla f_{i,k} - \langle x_i, \nabla f_i \rangle$, shape ``(B, D, K)``
    (the move sets $x_i = k$; the current value has $d = 0$).
    """
    if isinstance(space, Categorical):
        grad_f = -grad_energy
        return grad_f - (xr * grad_f).sum(-1, keepdim=True)
    return (2.0 * xr - 1.0) * grad_energy  # (1 - 2 x_i) * (-grad E)_i


def half_flip_gain(xr: Tensor, grad_energy: Tensor) -> Tensor:
    r"""Binary ``flip_gain / 2`` in two ops: $d_i / 2 = (x_i - \tfrac12)\, \nabla E(x)_i$
    ``(B, D)``."""
    return (xr - 0.5).mul_(grad_energy)


def stored_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean ``(B, D)`` mask that several kernels read, as 0/1 of ``dtype`` inside a
    compiled block (unchanged when eager; readers call ``.bool()``).

    Inductor's CPU kernels write bool tensors one element at a time: a compiled
    ``u.log() < c`` over 128 x 100 entries took 115 microseconds against 14 for the same
    comparison stored as floats (``benchmarks/bounds.py``; torch 2.13, AVX-512). DMALA keeps
    its ``(B, D)`` flip mask this way."""
    return mask.to(dtype) if torch.compiler.is_compiling() else mask


def gumbel_argmax(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Former name of ``rng.categorical_sample(logits, generator)`` (kept for callers)."""
    return rng.categorical_sample(logits, generator)


def log_uniform(batch: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""$\log u$ with $u \sim U(0, 1)$, shape ``(batch,)`` (for Metropolis-Hastings tests)."""
    u = rng.rand((batch,), generator, like.device, like.dtype)
    return torch.log(u)


def mh_select(
    x: Tensor, e: Tensor, g: Tensor, x_new: Tensor, e_new: Tensor, g_new: Tensor,
    log_q_fwd: Tensor, log_q_rev: Tensor, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Metropolis-Hastings choice between current and proposed chains (no host sync).

    $\log \alpha = f(x') - f(x) + \log q(x \mid x') - \log q(x' \mid x)$, with $f = -E$; accept
    where $\log u < \log \alpha$. A NaN $\log \alpha$ (NaN energy or gradient at the proposal) compares
    False, so the proposal is rejected, and it is flagged in ``nonfinite``.

    Returns ``(x, e, g, accepted, nonfinite)``, the last two float ``(B,)`` in {0, 1}.
    """
    log_alpha = (e - e_new).add_(log_q_rev).sub_(log_q_fwd)
    nonfinite = torch.sub(log_alpha, log_alpha).ne_(0).to(e.dtype)
    accept = log_uniform(x.shape[0], log_alpha, generator) < log_alpha
    a = accept[:, None]
    x = torch.where(a, x_new, x)
    e = torch.where(accept, e_new, e)
    g = torch.where(a[..., None] if g.dim() == 3 else a, g_new, g)
    return x, e, g, accept.to(e.dtype), nonfinite


def _read_values(sampler: MCMCSampler, x: Tensor) -> bool:
    """Whether this run may read state values for its input checks: always for CPU states;
    for CUDA states only at the sampler's first run (a host synchronisation per run would
    stall training loops, and later runs start from states the sampler produced or the
    replay buffer drew from the space's noise)."""
    if not x.is_cuda:
        return True
    first = not getattr(sampler, "_values_checked", False)
    sampler._values_checked = True  # type: ignore[attr-defined]
    return first


class GradientDiscreteSampler(MCMCSampler):
    """Shared base of the gradient-informed discrete samplers (GWG, DULA/DMALA).

    Caches E(x) and the relaxed gradient dE/dx in the ``ChainState`` (one energy-and-gradient
    evaluation per step), restricts itself to ``Binary``/``Categorical`` spaces, and checks
    only the cached energy and gradient for NaN/inf (the states are valid by construction).
    Subclasses set ``self.check_gradient`` and implement
    ``_propose_and_accept(energy, x, e, g, generator) -> (ChainState, info)``, which receives
    the current states with their cached E ``(B,)`` and gradient (``x.shape``, or one-hot
    ``(B, D, K)``) and runs without autograd.
    """

    check_gradient: bool = True

    def supports(self, energy: EnergyModel) -> bool:
        return is_discrete_space(energy.space)

    def init_state(self, energy: EnergyModel, x: Tensor) -> ChainState:
        name = type(self).__name__
        values = _read_values(self, x)
        check_discrete_states(name, energy, x, values)
        e, g = relaxed_energy_and_grad(name, energy, x, check=self.check_gradient and values)
        return ChainState(x, energy=e, grad=g)

    def transition(
        self, energy: EnergyModel, state: ChainState, generator: torch.Generator | None = None
    ) -> tuple[ChainState, StepInfo]:
        if torch.is_grad_enabled():  # run() is already under no_grad: no context per step
            with torch.no_grad():
                return self.transition(energy, state, generator)
        x, e, g = state.x, state.energy, state.grad
        if e is None or g is None:
            e, g = relaxed_energy_and_grad(type(self).__name__, energy, x)
        return self._propose_and_accept(energy, x, e, g, generator)

    def _propose_and_accept(
        self, energy: EnergyModel, x: Tensor, e: Tensor, g: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[ChainState, StepInfo]:
        raise NotImplementedError(f"{type(self).__name__} must implement _propose_and_accept")

    def _finite_rows(self, state: ChainState) -> Tensor:
        return _energy_grad_rows(state)
