"""Random draws of sampler transitions, replaceable by pre-drawn noise.

Transitions draw their randomness through ``randn`` / ``rand`` / ``randint`` below instead of
calling ``torch.randn(..., generator=generator)`` directly. With a ``torch.Generator`` (or
None: the global generator) they draw as torch would. With a ``NoiseTape`` they return the
tape's next pre-drawn tensor instead: this is how the compiled executor runs K steps as one
compiled function without a generator inside it (``torch.compile`` cannot trace a
``torch.Generator``), while consuming the generator's stream exactly as K eager steps would.

How the tape is filled (``samplers/_compiled.py``):

1. the first step of a compiled run is eager, with a ``RecordingTape`` that draws from the
   real generator and records each draw's kind, shape, dtype and bounds (the *draw spec*);
2. before each block of K compiled steps, K x spec draws are made from the generator, in the
   order the eager loop makes them (same calls, same sizes: the same numbers), into
   ``(K, *shape)`` buffers;
3. the compiled block gives step k a ``NoiseTape`` of the k-th slices.

So the compiled chains equal the eager chains for the same generator, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

__all__ = ["NoiseTape", "RecordingTape", "Draw", "randn", "rand", "randint", "Rng",
           "categorical_sample", "randn_and_log_uniform"]


@dataclass(frozen=True)
class Draw:
    """One random draw of a transition: ``kind`` in {"randn", "rand", "randint"}."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    low: int = 0
    high: int = 0

    def fill(self, out: Tensor, generator: torch.Generator | None) -> Tensor:
        """Fill ``out`` (shape ``self.shape``) exactly as the eager draw would."""
        return self.filler(out)(generator=generator)

    def filler(self, out: Tensor) -> Callable[..., Tensor]:
        """``fill`` bound to ``out``: ``filler(out)(generator=g)`` draws as ``fill(out, g)``
        does, without the dispatch on ``kind`` (built once, called every block)."""
        if self.kind == "randn":
            return out.normal_
        if self.kind == "rand":
            return out.uniform_
        return partial(out.random_, self.low, self.high)


class NoiseTape:
    """Pre-drawn random tensors handed out in order (one step's draws)."""

    def __init__(self, draws: list[Tensor]):
        self.draws = draws
        self.i = 0

    def next(self) -> Tensor:
        """The next pre-drawn tensor (in the order the first step drew them)."""
        if self.i >= len(self.draws):
            raise RuntimeError(
                "the transition drew more random tensors than its first step did; a compiled "
                "block needs the same draws every step"
            )
        t = self.draws[self.i]
        self.i += 1
        return t


class RecordingTape:
    """Draws from ``generator`` like torch and records each draw's ``Draw`` spec."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self.spec: list[Draw] = []


Rng = torch.Generator | NoiseTape | RecordingTape | None


def _shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


def _draw(kind: str, shape: tuple[int, ...] | torch.Size, generator: Rng,
          device: torch.device, dtype: torch.dtype, low: int = 0, high: int = 0) -> Tensor:
    """The tape's next tensor, or a torch draw (recorded first by a ``RecordingTape``)."""
    if isinstance(generator, NoiseTape):
        return generator.next()
    if isinstance(generator, RecordingTape):
        generator.spec.append(Draw(kind, _shape(shape), dtype, torch.device(device), low, high))
        generator = generator.generator
    if kind == "randn":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if kind == "rand":
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return torch.randint(low, high, shape, generator=generator, device=device)


def randn(shape: tuple[int, ...] | torch.Size, generator: Rng, device: torch.device,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal draws of ``shape`` (``torch.randn`` or the tape's next tensor)."""
    return _draw("randn", shape, generator, device, dtype)


def rand(shape: tuple[int, ...] | torch.Size, generator: Rng, device: torch.device,
         dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform [0, 1) draws of ``shape`` (``torch.rand`` or the tape's next tensor)."""
    return _draw("rand", shape, generator, device, dtype)


def randn_and_log_uniform(shape: tuple[int, ...] | torch.Size, generator: Rng,
                          device: torch.device, dtype: torch.dtype = torch.float32
                          ) -> tuple[Tensor, Tensor]:
    r"""Standard normal draws of ``shape`` ``(B, *event)`` and $\log u$, $u \sim U(0, 1)$, per
    row ``(B,)``, from one draw of $B (n + 2)$ standard normals ($n$ the event size): the
    first $B n$ are the normals of ``shape`` (contiguous), the last $2 B$ give $\log u$.

    With $\zeta_1, \zeta_2$ two independent standard normals, $\zeta_1^2 + \zeta_2^2 \sim
    \chi^2_2$, so $(\zeta_1^2 + \zeta_2^2) / 2 \sim \operatorname{Exp}(1)$, the law of
    $-\log u$: $\log u = -(\zeta_1^2 + \zeta_2^2) / 2$ exactly in distribution. One draw per
    Metropolis-Hastings step instead of two halves the generator calls of MALA and HMC, and
    lets a compiled block draw its K steps' noise with one call."""
    shape = _shape(shape)
    b = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    z = randn((b * (n + 2),), generator, device, dtype)
    log_u = z[b * n:].view(2, b).square().sum(0).mul(-0.5)
    return z[:b * n].view(shape), log_u


def randint(low: int, high: int, shape: tuple[int, ...] | torch.Size, generator: Rng,
            device: torch.device) -> Tensor:
    """Integer draws in ``[low, high)`` of ``shape`` (``torch.randint`` or the tape's next)."""
    return _draw("randint", shape, generator, device, torch.long, low, high)


def categorical_sample(
    logits: Tensor | None = None,
    generator: Rng = None,
    *,
    probs: Tensor | None = None,
    cdf: Tensor | None = None,
) -> Tensor:
    r"""One draw per row of the last axis of a categorical distribution, through ``rand``
    (so a sampler transition's draw can be pre-drawn noise). Returns long indices of shape
    ``batch_shape = (...)`` for an input of shape ``(..., K)``. Give exactly one of:

    * ``logits``: draws from $\operatorname{softmax}(\text{logits})$ by Gumbel-max,
      $\arg\max_k (\ell_k - \log(-\log u_k))$ with $K$ uniforms per row; $-\infty$
      excludes a value; no normalisation and no host synchronisation (graph-capturable).
    * ``probs``: unnormalised probabilities $\ge 0$; inverse CDF with one uniform per row,
      $\#\{k : F_k \le u\, F_K\}$, $F$ the cumulative sums.
    * ``cdf``: precomputed cumulative sums whose last entry is 1 (e.g. a fixed transition
      matrix's rows); inverse CDF as for ``probs``.
    """
    given = [t for t in (logits, probs, cdf) if t is not None]
    if len(given) != 1:
        raise ValueError("pass exactly one of logits, probs, cdf")
    if logits is not None:
        u = rand(logits.shape, generator, logits.device, logits.dtype)
        tiny = torch.finfo(logits.dtype).tiny
        # Gumbel noise is -log(-log u); logits + gumbel = logits - log(-log u)
        neg_gumbel = u.clamp_min_(tiny).log_().neg_().log_()
        return (logits - neg_gumbel).argmax(-1)
    if probs is not None:
        cum = probs.cumsum(-1)
        u = rand(cum.shape[:-1] + (1,), generator, cum.device, cum.dtype) * cum[..., -1:]
    else:
        cum = cdf  # type: ignore[assignment]
        u = rand(cum.shape[:-1] + (1,), generator, cum.device, cum.dtype)
    return (cum <= u).sum(-1).clamp_max(cum.shape[-1] - 1)


def real_generator(generator: Rng) -> torch.Generator | None:
    """The torch generator behind ``generator`` (None for the global one or a tape)."""
    if isinstance(generator, RecordingTape):
        return generator.generator
    if isinstance(generator, NoiseTape):
        return None
    return generator


def generator_state(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The state of ``generator``, or (None) of the default generator of ``device`` (the CPU
    one or that CUDA device's): what a recording or a failed compile hands back after it."""
    if generator is not None:
        return generator.get_state()
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def restore_generator_state(generator: torch.Generator | None, device: torch.device,
                            state: Tensor) -> None:
    """Put back a state taken by ``generator_state`` for the same generator and device."""
    if generator is not None:
        generator.set_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
