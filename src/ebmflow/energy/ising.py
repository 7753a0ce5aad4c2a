r"""Ising model on $\{0, 1\}^D$ with exact enumeration for small $D$."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..spaces import Binary
from . import _gemm as gemm
from .base import EnergyModel

__all__ = ["IsingEnergy", "lattice_adjacency", "enumerate_binary"]

MAX_ENUMERATION_DIM = 20


def lattice_adjacency(side: int, periodic: bool = True) -> Tensor:
    r"""0/1 adjacency matrix ``(side^2, side^2)`` of a square 4-neighbour lattice.

    Site $(r, c)$ has index $r \cdot \text{side} + c$; ``periodic`` wraps the edges (a torus).
    """
    if side < 2:
        raise ValueError(f"side must be >= 2, got {side}")
    idx = torch.arange(side * side).reshape(side, side)
    a = torch.zeros(side * side, side * side)
    for dim in (0, 1):
        nbr = torch.roll(idx, -1, dims=dim)
        src, dst = idx, nbr
        if not periodic:
            keep = [slice(None), slice(None)]
            keep[dim] = slice(0, side - 1)
            src, dst = idx[tuple(keep)], nbr[tuple(keep)]
        a[src.flatten(), dst.flatten()] = 1.0
        a[dst.flatten(), src.flatten()] = 1.0
    return a


def enumerate_binary(dim: int, device: torch.device | str | None = None) -> Tensor:
    r"""All $2^{\text{dim}}$ binary states as float ``(2^dim, dim)``, in lexicographic order."""
    if dim > MAX_ENUMERATION_DIM:
        raise ValueError(
            f"exact enumeration of {dim} binary dims (2^{dim} states) is too large; "
            f"max is {MAX_ENUMERATION_DIM}"
        )
    codes = torch.arange(2**dim, device=device)
    shifts = torch.arange(dim - 1, -1, -1, device=device)
    return ((codes[:, None] >> shifts) & 1).float()


def _symmetrise_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """Keep a loaded $J$ symmetric with zero diagonal (a fixed $J$ is used as stored)."""
    with torch.no_grad():
        a = module._coupling
        j = 0.5 * (a + a.T)
        a.copy_(j - torch.diag_embed(torch.diagonal(j)))


class IsingEnergy(EnergyModel):
    r"""Ising model $p(x) \propto \exp(s^\top J s + b^\top s)$, $s = 2x - 1 \in \{-1, 1\}^D$,
    $x \in \{0, 1\}^D$.

    $E(x) = -(s^\top J s + b^\top s)$. $J$ is symmetric with zero diagonal (the convention of
    the GWG and energy-discrepancy papers: $p(s) \propto \exp(s^\top J s)$).

    Args:
        coupling: ``(D, D)`` symmetric coupling matrix $J$ (symmetrised, diagonal zeroed).
        bias: ``(D,)`` field $b$ (default 0).
        learnable: make $J$ and $b$ trainable parameters ($J$ kept symmetric by construction).

    For $D \le 20$, ``log_partition()``, ``log_prob``, ``probabilities()`` and exact
    ``sample(n, generator=)`` enumerate all $2^D$ states.
    """

    def __init__(self, coupling: Tensor, bias: Tensor | None = None, learnable: bool = False):
        coupling = torch.as_tensor(coupling, dtype=torch.get_default_dtype())
        if coupling.dim() != 2 or coupling.shape[0] != coupling.shape[1]:
            raise ValueError(f"coupling must be a square (D, D) matrix, got {tuple(coupling.shape)}")
        d = coupling.shape[0]
        super().__init__(Binary(d))
        coupling = 0.5 * (coupling + coupling.T)
        coupling = coupling - torch.diag(torch.diag(coupling))
        bias = torch.zeros(d) if bias is None else torch.as_tensor(bias, dtype=coupling.dtype)
        if bias.shape != (d,):
            raise ValueError(f"bias must have shape (D,)=({d},), got {tuple(bias.shape)}")
        if not (bool(torch.isfinite(coupling).all()) and bool(torch.isfinite(bias).all())):
            raise ValueError("coupling and bias must be finite, got NaN/inf entries")
        if learnable:
            self._coupling = nn.Parameter(coupling.clone())
            self.bias = nn.Parameter(bias.clone())
        else:
            self.register_buffer("_coupling", coupling.clone())
            self.register_buffer("bias", bias.clone())
        self.register_load_state_dict_post_hook(_symmetrise_after_load)

    @property
    def coupling(self) -> Tensor:
        r"""Symmetric, zero-diagonal $J$, ``(D, D)``.

        A learnable $J$ is symmetrised on every call, $J = (A + A^\top) / 2$ with the diagonal
        zeroed, so that its gradient stays in the symmetric zero-diagonal subspace; a fixed $J$
        is stored that way (at construction and after ``load_state_dict``) and returned as is.
        """
        if not self._coupling.requires_grad:
            return self._coupling
        j = 0.5 * (self._coupling + self._coupling.T)
        return j - torch.diag_embed(torch.diagonal(j))

    @classmethod
    def lattice(cls, side: int, sigma: float, periodic: bool = True, bias: float = 0.0,
                learnable: bool = False) -> IsingEnergy:
        r"""Square ``side x side`` lattice with $J = \sigma \cdot \text{adjacency}$
        ($D = \text{side}^2$)."""
        a = lattice_adjacency(side, periodic)
        return cls(sigma * a, torch.full((side * side,), float(bias)), learnable=learnable)

    def energy(self, x: Tensor) -> Tensor:
        s = 2.0 * x - 1.0
        return -((gemm.linear(s, self.coupling) * s).sum(-1) + s @ self.bias)

    def energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""$(E(x), \partial E / \partial x)$ of shapes ``(B,)`` and ``(B, D)`` for float bits
        ``x`` ``(B, D)``, in closed form, one matrix product for both (no autograd):

        $$
        s = 2x - 1, \qquad E = -(s^\top J s + b^\top s), \qquad
        \frac{\partial E}{\partial x} = 2 \frac{\partial E}{\partial s} = -2 (2 J s + b)
        $$

        ($J$ symmetric, so $s J = s J^\top$; on CPU the product runs on oneDNN, measured at
        1,153 against 2,573 microseconds for MKL with 128 chains at $D = 1024$). Detached; no
        parameter ``.grad`` is written.
        """
        if (type(self).energy is not IsingEnergy.energy
                or not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() == 2)):
            return super().energy_and_grad(x)  # a subclass's energy, or the checked path
        with torch.no_grad():
            s = 2.0 * x - 1.0
            try:
                js = gemm.linear(s, self.coupling)
            except RuntimeError:
                return super().energy_and_grad(x)  # device / dtype diagnosis
            e = torch.sum(js * s, dim=-1).add_(s @ self.bias).neg_()
            g = torch.add(self.bias, js, alpha=2.0).mul_(-2.0)
        return e, g

    def conditional_energies(
        self, x: Tensor, index: Tensor, energy_x: Tensor | None = None
    ) -> Tensor:
        r"""Energies of both values of bit ``index[b]`` of every chain, ``(B, 2)``, from the
        local field ($O(D)$ per chain; no energy evaluation when ``energy_x`` is given):

        $$
        \begin{aligned}
        f_b &= \sum_j J_{ij} s_j \quad (J_{ii} = 0), &
        E(s_i = v) &= C_b - v \, (2 f_b + b_i), \\
        C_b &= E(x_b) + s_i \, (2 f_b + b_i), &
        v &\in \{-1, +1\} \text{ for } x_i \in \{0, 1\}.
        \end{aligned}
        $$
        """
        if type(self).energy is not IsingEnergy.energy:
            return super().conditional_energies(x, index, energy_x)
        s = 2.0 * x - 1.0
        field = torch.sum(self.coupling[index] * s, dim=1)  # (J s)_i, (B,)
        local = torch.add(self.bias[index], field, alpha=2.0)  # 2 f + b_i
        s_i = s.gather(1, index[:, None]).squeeze(1)
        e_x = self(x) if energy_x is None else energy_x
        c = torch.addcmul(e_x, s_i, local)
        return torch.stack([c + local, c - local], dim=1)

    def _check_enumerable(self) -> None:
        if self.space.dim > MAX_ENUMERATION_DIM:
            raise ValueError(
                f"exact computations need D <= {MAX_ENUMERATION_DIM}, this model has D = "
                f"{self.space.dim}; use MCMC instead"
            )

    @torch.no_grad()
    def states(self) -> Tensor:
        """All $2^D$ states, ``(2^D, D)``."""
        self._check_enumerable()
        return enumerate_binary(self.space.dim, device=self.bias.device).to(self.bias.dtype)

    @torch.no_grad()
    def log_partition(self) -> Tensor:
        r"""Exact $\log Z = \log \sum_x \exp(-E(x))$ (0-d tensor)."""
        return torch.logsumexp(-self.energy(self.states()), dim=0)

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Exact normalised $\log p(x)$, ``(B,)`` ($D \le 20$)."""
        return -self.energy(x) - self.log_partition()

    @torch.no_grad()
    def probabilities(self) -> Tensor:
        """Exact probabilities of ``states()``, ``(2^D,)``, summing to 1."""
        return torch.softmax(-self.energy(self.states()), dim=0)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        r"""Exact samples ``(n, D)`` by enumeration ($D \le 20$)."""
        n = self.space.check_n(n)
        probs = self.probabilities()
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
        return self.states()[idx]

    def __repr__(self) -> str:
        return f"IsingEnergy(D={self.space.dim}, |J|_max={self.coupling.abs().max().item():.3g})"
