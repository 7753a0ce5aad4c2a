"""Exact comparisons on small discrete spaces: enumeration, TV, KL and log Z.

State order. All functions use the lexicographic order of states x in {0, ..., K-1}^D with the
FIRST coordinate most significant:

    index(x) = sum_d x_d K^(D - 1 - d),

so for binary states the order is 00...0, 00...1, ..., 11...1 (the order of
``ebmflow.energy.enumerate_binary`` and ``IsingEnergy.states()``), and ``probs[index(x)]`` is
the exact probability of x. Binary states are float {0, 1} ``(n, D)``; categorical states are
long ``(n, D)`` in [0, K).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._checks import check_positive_int, check_samples

__all__ = [
    "enumerate_states",
    "state_index",
    "empirical_probs",
    "total_variation",
    "kl_divergence",
    "exact_log_partition",
    "exact_log_partition_binary",
]

MAX_STATES = 2**26


def enumerate_states(
    dim: int, num_classes: int = 2, device: torch.device | str | None = None
) -> Tensor:
    """All K^dim states in lexicographic order: float ``(2^dim, dim)`` for K = 2, else long."""
    _num_states(dim, num_classes)
    return _states_slice(0, num_classes**dim, dim, num_classes, device)


def state_index(samples: Tensor, num_classes: int = 2) -> Tensor:
    """Lexicographic index sum_d x_d K^(D-1-d) of each state, long ``(n,)`` (K^D < 2^62)."""
    x = _as_codes(samples, num_classes, "samples")
    _num_states(x.shape[1], num_classes, limit=2**62)
    powers = num_classes ** torch.arange(x.shape[1] - 1, -1, -1, device=x.device)
    return (x * powers).sum(-1)


def empirical_probs(samples: Tensor, num_classes: int = 2) -> Tensor:
    """Histogram of ``samples`` over all K^D states (lexicographic order), float ``(K^D,)``."""
    samples = check_samples(samples, "samples")
    s = _num_states(samples.reshape(samples.shape[0], -1).shape[1], num_classes)
    idx = state_index(samples, num_classes)
    return torch.bincount(idx, minlength=s).double() / idx.numel()


@torch.no_grad()
def total_variation(
    samples: Tensor,
    probs: Tensor,
    states: Tensor | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Total variation TV(p_hat, p) = 1/2 sum_s |p_hat(s) - p(s)| between the empirical law of
    ``samples`` and an exactly enumerated distribution ``probs``.

    Args:
        samples: ``(n, D)`` binary float {0, 1} or categorical long [0, K) states, n >= 1.
        probs: ``(S,)`` exact probabilities (non-negative, summing to 1 within 1e-3; they are
            renormalised). Without ``states``, S = K^D in lexicographic order (module doc).
        states: optional ``(S, D)`` states that ``probs`` refers to (any order, distinct).
            Samples outside them count as mass where p = 0.
        num_classes: K; default 2 for float samples, else inferred from S = K^D (or from the
            largest value when ``states`` is given).

    Returns:
        0-d float64 tensor in [0, 1]. For exact samples E[TV] ~ sum_s sqrt(p_s (1 - p_s) /
        (2 pi n)), i.e. it shrinks like 1 / sqrt(n) once every likely state is visited.
    """
    counts, outside, p = _counts_and_probs(samples, probs, states, num_classes)
    n = counts.sum() + outside
    return 0.5 * ((counts / n - p).abs().sum() + outside / n)


@torch.no_grad()
def kl_divergence(
    samples: Tensor,
    probs: Tensor,
    states: Tensor | None = None,
    num_classes: int | None = None,
    smoothing: float = 0.5,
) -> Tensor:
    """KL(p || p_hat) = sum_{s: p(s) > 0} p(s) log(p(s) / p_hat(s)) from the exact law p to the
    smoothed empirical law of ``samples``.

    p_hat(s) = (c_s + a) / (n + a S), c_s the count of state s among the n samples and
    a = ``smoothing`` (default 1/2, the Krichevsky-Trofimov estimator; a = 0 gives +inf as soon
    as a state with p > 0 is never visited). This direction penalises missed modes. Samples
    outside ``states`` (if given) count in n but in no c_s. Arguments as ``total_variation``.

    Returns:
        0-d float64 tensor >= 0 (up to the smoothing bias, which vanishes as n grows).
    """
    if not float(smoothing) >= 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
    counts, outside, p = _counts_and_probs(samples, probs, states, num_classes)
    n = counts.sum() + outside
    p_hat = (counts + smoothing) / (n + smoothing * counts.numel())
    pos = p > 0
    return (p[pos] * (p[pos].log() - p_hat[pos].log())).sum()


@torch.no_grad()
def exact_log_partition(
    energy: nn.Module,
    dim: int,
    num_classes: int = 2,
    chunk_size: int = 65536,
    device: torch.device | str | None = None,
) -> Tensor:
    """log Z = log sum_x exp(-E(x)) by enumerating all K^dim states in chunks.

    Args:
        energy: callable ``(B, dim) -> (B,)`` (an ``EnergyModel``); binary states are passed
            as float {0, 1}, categorical ones as long.
        dim: number of coordinates D (K^D <= 2^26 states).
        num_classes: K (2 = binary).
        chunk_size: states per energy call.
        device: where to enumerate; default the device of the energy's first parameter or
            buffer, else CPU.

    Returns:
        0-d float64 tensor.
    """
    s = _num_states(dim, num_classes)
    check_positive_int(chunk_size, "chunk_size")
    if device is None:
        ref = next(iter(list(energy.parameters()) + list(energy.buffers())), None)
        device = ref.device if ref is not None else torch.device("cpu")
    parts = []
    for start in range(0, s, chunk_size):
        x = _states_slice(start, min(start + chunk_size, s), dim, num_classes, device)
        parts.append(torch.logsumexp(-energy(x).double(), 0))
    return torch.logsumexp(torch.stack(parts), 0)


def exact_log_partition_binary(energy: nn.Module, dim: int, chunk_size: int = 65536) -> Tensor:
    """``exact_log_partition`` for binary states {0, 1}^dim."""
    return exact_log_partition(energy, dim, 2, chunk_size)


# -- helpers -----------------------------------------------------------------------------
def _num_states(dim: int, num_classes: int, limit: int = MAX_STATES) -> int:
    check_positive_int(dim, "dim")
    check_positive_int(num_classes, "num_classes", minimum=2)
    if dim * math.log2(num_classes) > math.log2(limit):
        raise ValueError(
            f"{num_classes}^{dim} states is too many to enumerate (limit {limit}); use a smaller "
            f"space or Monte Carlo estimates (e.g. ais_log_partition, mmd)"
        )
    return num_classes**dim


def _states_slice(start: int, stop: int, dim: int, k: int, device) -> Tensor:
    codes = torch.arange(start, stop, device=device)
    powers = k ** torch.arange(dim - 1, -1, -1, device=device)
    digits = torch.div(codes[:, None], powers, rounding_mode="floor") % k
    return digits.float() if k == 2 else digits


def _as_codes(samples: Tensor, k: int, name: str) -> Tensor:
    x = samples.reshape(samples.shape[0], -1)
    if x.is_floating_point():
        if k != 2 or bool(((x != 0) & (x != 1)).any()):
            raise ValueError(
                f"float {name} must be binary states in {{0, 1}} (num_classes=2); pass long class "
                f"indices for categorical states"
            )
        return x.long()
    if x.dtype == torch.bool:
        return x.long()
    if bool(((x < 0) | (x >= k)).any()):
        raise ValueError(f"{name} has values outside [0, {k}); check num_classes={k}")
    return x


def _infer_classes(x: Tensor, probs: Tensor, states: Tensor | None, k: int | None) -> int:
    if k is not None:
        return check_positive_int(k, "num_classes", minimum=2)
    if x.is_floating_point() or x.dtype == torch.bool:
        return 2
    if states is not None:
        return max(int(states.max()), int(x.max()), 1) + 1
    d, s = x.shape[1], probs.numel()
    k = round(s ** (1.0 / d))
    for cand in (k - 1, k, k + 1):
        if cand >= 2 and cand**d == s:
            return cand
    raise ValueError(
        f"probs has {s} entries, which is not K^D for D={d}; pass num_classes= or states="
    )


def _counts_and_probs(samples, probs, states, num_classes) -> tuple[Tensor, Tensor, Tensor]:
    """Counts ``(S,)`` aligned with ``probs``, the number of samples outside, and p ``(S,)``."""
    samples = check_samples(samples, "samples")
    x = samples.reshape(samples.shape[0], -1)
    if not isinstance(probs, Tensor) or probs.dim() != 1 or probs.numel() == 0:
        got = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a non-empty 1-d tensor (S,), got {got}")
    p = probs.double()
    if not bool(p.isfinite().all()) or bool((p < 0).any()):
        raise ValueError("probs must be finite and non-negative")
    total = float(p.sum())
    if abs(total - 1.0) > 1e-3:
        raise ValueError(f"probs must sum to 1 (got {total:.6g}); normalise it first")
    p = (p / total).to(x.device)
    k = _infer_classes(x, p, states, num_classes)
    if states is None:
        s = _num_states(x.shape[1], k, limit=2**62)
        if s != p.numel():
            raise ValueError(
                f"probs has {p.numel()} entries but {k}^{x.shape[1]} = {s} states exist for "
                f"samples of dim {x.shape[1]}; pass the full lexicographic table or states="
            )
        counts = torch.bincount(state_index(x, k), minlength=s).double()
        return counts, torch.zeros((), dtype=torch.float64, device=x.device), p
    if (
        not isinstance(states, Tensor)
        or states.dim() != 2
        or states.shape != (p.numel(), x.shape[1])
    ):
        got = tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__
        raise ValueError(
            f"states must have shape (S, D) = ({p.numel()}, {x.shape[1]}) to match probs and "
            f"samples, got {got}"
        )
    state_codes = state_index(states.to(x.device), k)
    sorted_codes, order = torch.sort(state_codes)
    if bool((sorted_codes[1:] == sorted_codes[:-1]).any()):
        raise ValueError("states contains duplicate rows; each state must appear once")
    codes = state_index(x, k)
    pos = torch.searchsorted(sorted_codes, codes).clamp_max(sorted_codes.numel() - 1)
    found = sorted_codes[pos] == codes
    counts_sorted = torch.bincount(pos[found], minlength=sorted_codes.numel()).double()
    counts = torch.empty_like(counts_sorted)
    counts[order] = counts_sorted
    return counts, (~found).sum().double(), p
