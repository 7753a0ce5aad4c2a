r"""The ``Flow`` base class: an invertible map $T$ from a standard Gaussian base to data space.

A flow defines the density of $x = T(z)$, $z \sim \rho = \mathcal{N}(0, I_D)$, by the change
of variables

$$\log q(x) = \log \rho(T^{-1}(x)) + \log\big|\det \partial T^{-1} / \partial x\,(x)\big|
= \log \rho(z) - \log\big|\det \partial T / \partial z\,(z)\big|, \qquad z = T^{-1}(x).$$

Subclasses implement ``forward(z) -> (x, log|det dT/dz|)`` and ``inverse(x) -> (z,
log|det dT^{-1}/dx|)``; ``log_prob``, ``sample_and_log_prob`` (one pass, zuko-style),
``sample`` and ``nll`` then come for free. A flow that has an exact sampler and density but
no explicit map (a mixture, a tabulated proposal) may instead override ``log_prob`` and
``sample_and_log_prob`` directly; ``FlowMC`` only needs those two.

Sampling is split in two: ``base_sample(n, generator)`` draws the base noise $z$ through
``ebmflow.samplers.rng`` (so ``generator`` may also be a ``NoiseTape`` of pre-drawn noise, as
in ``FlowMC``'s compiled global moves), and ``sample_from_base(z)`` is the deterministic rest,
$x = T(z)$ with $\log q(x) = \log \rho(z) - \log|\det \partial T / \partial z|$.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .._optim import default_adam
from ..samplers import rng
from ..spaces import Continuous

__all__ = ["Flow", "standard_normal_log_prob"]


def renamed_keyword(where: str, old: str, old_value: Any, new: str, new_value: Any,
                    default: Any) -> Any:
    """The value of a renamed keyword: ``new_value``, else ``old_value`` (with a
    ``DeprecationWarning`` naming ``new``), else ``default``; both given is an error."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise ValueError(f"{where}: pass {new}= only ({old}= is its deprecated name)")
    warnings.warn(
        f"{where}({old}=...) is deprecated and will be removed in the next release; use "
        f"{new}=...",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def standard_normal_log_prob(z: Tensor) -> Tensor:
    r"""$\log \mathcal{N}(z; 0, I)$ summed over the event:
    $-\lVert z \rVert^2 / 2 - \tfrac{D}{2} \log(2 \pi)$, ``(B, D) -> (B,)``."""
    d = z.shape[-1]
    return -0.5 * z.pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi)


class Flow(nn.Module):
    """Base class of normalizing flows on ``Continuous(dim)``; base density N(0, I_dim).

    Args:
        dim: number of coordinates D (states are float ``(B, D)``).

    Attributes:
        dim: D.
        space: ``Continuous(D)``; a flow proposes states of an energy whose space has the
            same number of coordinates (``FlowMC`` and ``TiltedEnergy`` check this).
    """

    #: log_prob is the exact log-density of the sampler (False for stochastic estimates);
    #: FlowMC refuses flows without it
    exact_log_prob: bool = True
    #: the inverse is computed numerically (an ODE solve), so FlowMC checks that
    #: sample_and_log_prob and log_prob agree
    numerical_inverse: bool = False

    def __init__(self, dim: int):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.space = Continuous(dim)

    # -- to implement ------------------------------------------------------------------
    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        r"""$x = T(z)$ and $\log|\det \partial T / \partial z|$: ``(B, D) -> ((B, D), (B,))``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward(z) -> (x, logdet) or override "
            "sample_and_log_prob"
        )

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""$z = T^{-1}(x)$ and $\log|\det \partial T^{-1} / \partial x|$:
        ``(B, D) -> ((B, D), (B,))``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement inverse(x) -> (z, logdet) or override log_prob"
        )

    # -- provided ----------------------------------------------------------------------
    def base_log_prob(self, z: Tensor) -> Tensor:
        r"""$\log \rho(z) = \log \mathcal{N}(z; 0, I)$, ``(B,)``."""
        return standard_normal_log_prob(z)

    def base_sample(self, n: int, generator: rng.Rng = None) -> Tensor:
        r"""Base noise $z \sim \mathcal{N}(0, I)$: ``(n, D)`` on the flow's device and dtype.

        Drawn with ``ebmflow.samplers.rng.randn``: ``generator`` is a ``torch.Generator``
        (or None, the global one) or a tape of pre-drawn noise (``rng.NoiseTape``,
        ``rng.RecordingTape``)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        ref = self._reference_tensor()
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        if isinstance(generator, torch.Generator) and generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the flow is on {device}; create it "
                f"with torch.Generator(device='{device}')"
            )
        return rng.randn((n, self.dim), generator, device, dtype)

    def sample_from_base(self, z: Tensor) -> tuple[Tensor, Tensor]:
        r"""The deterministic part of sampling: $x = T(z)$ and
        $\log q(x) = \log \rho(z) - \log|\det \partial T / \partial z|$ for given base noise
        z ``(n, D)`` (from ``base_sample``). Returns ``(x (n, D), log_q (n,))``."""
        x, logdet = self(z)
        return x, self.base_log_prob(z) - logdet

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Exact $\log q(x) = \log \rho(z) + \log|\det \partial T^{-1} / \partial x|$,
        ``(B, D) -> (B,)``."""
        self._check_input(x, "x")
        z, logdet = self.inverse(x)
        return self.base_log_prob(z) + logdet

    def sample_and_log_prob(
        self, n: int, generator: rng.Rng = None
    ) -> tuple[Tensor, Tensor]:
        r"""One pass: $x = T(z)$, $z \sim \mathcal{N}(0, I)$, and
        $\log q(x) = \log \rho(z) - \log|\det \partial T / \partial z|$.

        Returns ``x`` ``(n, D)`` and ``log_q`` ``(n,)``; differentiable with respect to the
        flow's parameters unless called under ``torch.no_grad()``. ``generator``: see
        ``base_sample`` (a tape of pre-drawn noise is accepted).
        """
        return self.sample_from_base(self.base_sample(n, generator))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` states ``(n, D)`` of the flow, like ``Sampler.sample``; for their log-density
        too, call ``sample_and_log_prob`` (one pass). Up to ebmflow 0.1.0 this returned the
        pair ``(x, log_q)``."""
        return self.sample_and_log_prob(n, generator)[0]

    def nll(self, x: Tensor) -> Tensor:
        r"""Maximum-likelihood loss $-\operatorname{mean}_b \log q(x_b)$ (a 0-d tensor), the
        forward KL up to a constant when $x \sim p$."""
        return -self.log_prob(x).mean()

    def fit(
        self,
        data: Tensor,
        steps: int | None = None,
        *,
        lr: float = 1e-3,
        batch_size: int = 256,
        generator: torch.Generator | None = None,
        n_steps: int | None = None,
    ) -> Tensor:
        r"""Fit the flow to ``data`` ``(N, D)`` by maximum likelihood with Adam,
        $L(\phi) = -\operatorname{mean}_b \log q_\phi(x_b)$ over minibatches.

        ``steps``: optimiser steps (default 1000; as in ``Trainer.fit(data, steps)``). Formerly
        ``n_steps=`` (still accepted for one release, with a ``DeprecationWarning``).
        Minibatches are drawn uniformly with replacement. Returns the loss of every step
        ``(steps,)`` (detached; one host copy at the end, none inside the loop).
        """
        steps = renamed_keyword("Flow.fit", "n_steps", n_steps, "steps", steps, 1000)
        self._check_input(data, "data")
        opt = default_adam(self.parameters(), lr)
        losses = torch.zeros(steps, device=data.device)
        for i in range(steps):
            idx = torch.randint(0, data.shape[0], (min(batch_size, data.shape[0]),),
                                generator=generator, device=data.device)
            loss = self.nll(data[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[i] = loss.detach()
        return losses

    def _check_input(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must have shape (B, {self.dim}) for {type(self).__name__}(dim="
                f"{self.dim}), got {got}; flatten event dims with {name}.flatten(1)"
            )

    def _reference_tensor(self) -> Tensor | None:
        for p in self.parameters():
            return p
        for b in self.buffers():
            return b
        return None

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
