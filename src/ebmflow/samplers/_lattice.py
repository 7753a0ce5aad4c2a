"""Exact sampling of Ising models whose couplings only link neighbouring rows (transfer matrices).

Used to draw exact training data for lattice Ising experiments beyond the 2^20 states that full
enumeration allows (a 10 x 10 periodic lattice has 2^100 states but only 2^10 row states).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..energy.ising import IsingEnergy, enumerate_binary

__all__ = ["lattice_transfer_log_partition", "lattice_exact_sample"]

MAX_ROW_BITS = 12


def _row_terms(energy: IsingEnergy, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row-state bits ``(S, C)`` and log transfer matrices ``(R, S, S)`` in float64.

    With s = 2x - 1 split into R rows of C spins, log p(s) = sum_r [phi_r(s_r) + psi_r(s_r,
    s_{r+1 mod R})] with phi_r(a) = a^T J_rr a + b_r . a and psi_r(a, c) = 2 a^T J_{r,r+1} c.
    The log transfer matrix is L_r[a, c] = phi_r(a) + psi_r(a, c).
    """
    d = energy.space.dim
    if rows < 3 or d % rows:
        raise ValueError(f"rows must be >= 3 and divide D = {d}, got rows={rows}")
    cols = d // rows
    if cols > MAX_ROW_BITS:
        raise ValueError(f"rows of {cols} spins need 2^{cols} row states; max is {MAX_ROW_BITS} bits")
    j = energy.coupling.detach().double().reshape(rows, cols, rows, cols)
    b = energy.bias.detach().double().reshape(rows, cols)
    for r in range(rows):
        allowed = {r, (r + 1) % rows, (r - 1) % rows}
        for q in set(range(rows)) - allowed:
            if bool((j[r, :, q] != 0).any()):
                raise ValueError(
                    f"coupling links row {r} to row {q}; transfer matrices need couplings only "
                    "within a row and between neighbouring rows"
                )
    spins = 2.0 * enumerate_binary(cols, device=j.device).double() - 1.0  # (S, C)
    idx = torch.arange(rows, device=j.device)
    j_in = j[idx, :, idx]  # (R, C, C)
    j_next = j[idx, :, (idx + 1) % rows]  # (R, C, C)
    phi = torch.einsum("sc,rce,se->rs", spins, j_in, spins) + torch.einsum("sc,rc->rs", spins, b)
    psi = 2.0 * torch.einsum("sc,rce,te->rst", spins, j_next, spins)  # (R, S, S)
    return spins, phi[:, :, None] + psi, j


def _suffix_products(log_t: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Suffix products Q_r = T_r T_{r+1} ... T_{R-1} as scaled matrices and log scales."""
    rows, n_states, _ = log_t.shape
    shift = log_t.amax(dim=(1, 2))
    t = torch.exp(log_t - shift[:, None, None])
    prods = [torch.eye(n_states, dtype=t.dtype, device=t.device)]
    scales = [torch.zeros((), dtype=t.dtype, device=t.device)]
    for r in range(rows - 1, -1, -1):
        q = t[r] @ prods[0]
        m = q.abs().max()
        prods.insert(0, q / m)
        scales.insert(0, scales[0] + shift[r] + torch.log(m))
    return prods, scales


@torch.no_grad()
def lattice_transfer_log_partition(energy: IsingEnergy, rows: int) -> Tensor:
    """Exact log Z = log trace(T_0 ... T_{R-1}) of a row-structured Ising model (float64)."""
    _, log_t, _ = _row_terms(energy, rows)
    prods, scales = _suffix_products(log_t)
    return torch.log(torch.diagonal(prods[0]).sum()) + scales[0]


@torch.no_grad()
def lattice_exact_sample(
    energy: IsingEnergy, n: int, rows: int, generator: torch.Generator | None = None
) -> Tensor:
    """Exact samples ``(n, D)`` in {0, 1} of an Ising model with row-local couplings.

    The first row is drawn from its marginal p(s_0 = a) ∝ (T_0 ... T_{R-1})[a, a]; row r then
    from p(s_r = c | s_{r-1} = b, s_0 = a) ∝ T_{r-1}[b, c] (T_r ... T_{R-1})[c, a]. Rows have
    C = D / rows spins (at most 12), site (r, c) is coordinate r * C + c (``lattice`` order).
    """
    spins, log_t, _ = _row_terms(energy, rows)
    prods, _ = _suffix_products(log_t)
    shift = log_t.amax(dim=(1, 2))
    t = torch.exp(log_t - shift[:, None, None])
    device = log_t.device
    first = torch.diagonal(prods[0]).clamp_min(0)
    a = torch.multinomial(first, n, replacement=True, generator=generator)
    states = [a]
    prev = a
    for r in range(1, rows):
        w = t[r - 1][prev] * prods[r][:, a].T  # (n, S)
        prev = torch.multinomial(w.clamp_min(0), 1, generator=generator).squeeze(1)
        states.append(prev)
    codes = torch.stack(states, dim=1).to(device)  # (n, R)
    bits = (spins[codes] + 1.0) / 2.0  # (n, R, C)
    return bits.reshape(n, -1).to(energy.bias.dtype)
