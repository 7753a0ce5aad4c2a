"""Bring your own flow: a zuko flow (``zuko.lazy.LazyDistribution``) as an ebmflow ``Flow``.

A zuko flow is a module whose call ``flow()`` returns a distribution; for a normalizing flow
(``zuko.distributions.NormalizingFlow``) that distribution has a ``transform`` f mapping data
x to the base variable z = f(x) and a ``base`` density rho, with

    log q(x) = log rho(f(x)) + log|det df/dx (x)|,     x = f^{-1}(z),  z ~ rho.

``ZukoFlow`` exposes this through the ``Flow`` interface (``forward`` = f^{-1}, ``inverse`` = f,
``log_prob``, ``sample_and_log_prob``, ``nll``, ``fit``), so ``FlowMC``, ``TiltedEnergy``
(including its latent view) and ``Flow.fit`` take any zuko flow. zuko is an optional
dependency (``pip install ebmflow[zuko]``), imported only when a ``ZukoFlow`` is built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..samplers import rng
from .base import Flow

__all__ = ["ZukoFlow"]


def _import_zuko() -> Any:
    try:
        import zuko
    except ImportError:  # pragma: no cover - exercised only without zuko
        raise ImportError(
            "ZukoFlow needs zuko; install it with `pip install zuko` or `pip install "
            "ebmflow[zuko]`"
        ) from None
    return zuko


class ZukoFlow(Flow):
    """An unconditional zuko flow as a ``Flow`` on ``Continuous(dim)``.

    Args:
        flow: a ``zuko.lazy.LazyDistribution`` (e.g. ``zuko.flows.NSF(2, transforms=3)``);
            its parameters become this module's (``flow`` attribute).
        dim: number of coordinates (default: the event size of ``flow()``).

    ``log_prob(x)`` and ``sample_and_log_prob(n, generator)`` work for every zuko
    distribution; ``forward``/``inverse`` (used by ``TiltedEnergy.latent``) need a
    ``NormalizingFlow``. With a Gaussian base (the zuko default) the base noise is drawn through
    ``ebmflow.samplers.rng`` from ``generator`` (or a tape of pre-drawn noise: ``FlowMC``'s
    compiled global moves); for other bases, the global RNG is seeded from the generator.
    """

    def __init__(self, flow: nn.Module, dim: int | None = None):
        zuko = _import_zuko()
        if not isinstance(flow, zuko.lazy.LazyDistribution):
            raise ValueError(
                f"flow must be a zuko LazyDistribution (e.g. zuko.flows.NSF(dim)), got "
                f"{type(flow).__name__}; ebmflow flows need no adapter"
            )
        dist = flow()
        shape = tuple(dist.event_shape)
        if len(shape) != 1:
            raise ValueError(
                f"ZukoFlow needs a flow over vectors (event shape (D,)), got event shape {shape}"
            )
        if dim is not None and dim != shape[0]:
            raise ValueError(f"dim={dim} but the zuko flow's event shape is {shape}; pass "
                             f"dim={shape[0]} or omit it")
        super().__init__(shape[0])
        self.flow = flow

    # -- distribution view -------------------------------------------------------------
    def distribution(self) -> Any:
        """The zuko distribution ``flow()`` (rebuilt at each call: it follows the parameters)."""
        return self.flow()

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x), ``(B, D) -> (B,)``."""
        self._check_input(x, "x")
        return self.flow().log_prob(x)

    def base_log_prob(self, z: Tensor) -> Tensor:
        """log rho(z) of the zuko flow's base, ``(B,)``."""
        return self._transform_and_base()[1].log_prob(z)

    def base_sample(self, n: int, generator: rng.Rng = None) -> Tensor:
        """Standard normal noise eps ``(n, D)`` for a Gaussian base (the base draw is
        z = loc + scale * eps, made in ``sample_from_base``); drawn with
        ``ebmflow.samplers.rng``, so ``generator`` may be a tape of pre-drawn noise."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return self._gaussian_noise(self.flow(), n, generator)

    def sample_from_base(self, z: Tensor) -> tuple[Tensor, Tensor]:
        r"""$x = f^{-1}(z)$, $z = \mu + \sigma \odot \epsilon$, and
        $\log q(x) = \log \rho(z) - \log|\det \partial x / \partial z|$ for standard normal
        noise ``eps`` ``(n, D)`` (Gaussian bases only)."""
        transform, base = self._transform_and_base()
        return self._from_noise(transform, base, z)

    def sample_and_log_prob(
        self, n: int, generator: rng.Rng = None
    ) -> tuple[Tensor, Tensor]:
        """x ~ q and log q(x) in one pass: ``(n, D)``, ``(n,)`` (differentiable).

        With a Gaussian base the noise is drawn through ``ebmflow.samplers.rng`` from
        ``generator`` (a ``torch.Generator``, None for the global one, or a tape of pre-drawn
        noise). Other bases, and distributions without a transform (``zuko.mixtures.GMM``),
        sample with zuko under the global RNG, seeded from ``generator`` (a forked RNG: the
        global state is left as it was); they cannot take pre-drawn noise (``TypeError``).
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        dist = self.flow()
        transform, base = getattr(dist, "transform", None), getattr(dist, "base", None)
        if transform is not None and base is not None and _is_gaussian(base):
            return self._from_noise(transform, base, self._gaussian_noise(dist, n, generator))
        if generator is None:
            return _draw_with_log_prob(dist, n)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"a zuko flow with a {type(base).__name__} base samples with its own RNG and "
                f"cannot take pre-drawn noise"
            )
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        # manual_seed reseeds every device: fork the CUDA ones the flow or the generator use
        devices = {d for d in (generator.device, self._param_device()) if d.type == "cuda"}
        with torch.random.fork_rng(devices=list(devices)):
            torch.manual_seed(seed)
            return _draw_with_log_prob(dist, n)

    def _param_device(self) -> torch.device:
        """The device of the flow's parameters (CPU for a flow without any)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _gaussian_noise(self, dist: Any, n: int, generator: rng.Rng) -> Tensor:
        base = getattr(dist, "base", None)
        if getattr(dist, "transform", None) is None or base is None or not _is_gaussian(base):
            raise TypeError(
                f"{type(dist).__name__} has no Gaussian base: it cannot be sampled from "
                f"standard normal noise"
            )
        loc = base.mean
        if (isinstance(generator, torch.Generator) and generator.device != loc.device
                and generator.device.type != loc.device.type):
            raise ValueError(
                f"generator is on {generator.device} but the flow is on {loc.device}; "
                f"create it with torch.Generator(device='{loc.device}')"
            )
        return rng.randn((n, *loc.shape), generator, loc.device, loc.dtype)

    @staticmethod
    def _from_noise(transform: Any, base: Any, eps: Tensor) -> tuple[Tensor, Tensor]:
        if not _is_gaussian(base):
            raise TypeError(
                f"sample_from_base needs a Gaussian base, this flow's is {type(base).__name__}"
            )
        z = base.mean + base.stddev * eps
        x, ladj = transform.inv.call_and_ladj(z)
        return x, base.log_prob(z) - ladj

    # -- map view (NormalizingFlow) ----------------------------------------------------
    def _transform_and_base(self) -> tuple[Any, Any]:
        dist = self.flow()
        transform, base = getattr(dist, "transform", None), getattr(dist, "base", None)
        if transform is None or base is None:
            raise ValueError(
                f"the zuko distribution {type(dist).__name__} is not a NormalizingFlow (no "
                f"transform/base): only log_prob and sample_and_log_prob are available"
            )
        return transform, base

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """x = f^{-1}(z) and log|det dx/dz|: ``(B, D) -> ((B, D), (B,))``."""
        transform, _ = self._transform_and_base()
        return transform.inv.call_and_ladj(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z = f(x) and log|det dz/dx|: ``(B, D) -> ((B, D), (B,))``."""
        transform, _ = self._transform_and_base()
        return transform.call_and_ladj(x)



def _is_gaussian(base: Any) -> bool:
    """A diagonal Gaussian base (zuko's DiagNormal or torch Normal/Independent(Normal))."""
    inner = getattr(base, "base_dist", base)
    return isinstance(inner, torch.distributions.Normal)


def _draw_with_log_prob(dist: Any, n: int) -> tuple[Tensor, Tensor]:
    """``n`` draws and their log-density from any torch distribution zuko returns: its own
    ``rsample_and_log_prob`` (flows), else ``rsample`` or ``sample`` (mixtures such as
    ``zuko.mixtures.GMM`` cannot reparametrise) followed by ``log_prob``."""
    joint = getattr(dist, "rsample_and_log_prob", None)
    if joint is not None:
        return joint((n,))
    x = dist.rsample((n,)) if getattr(dist, "has_rsample", False) else dist.sample((n,))
    return x, dist.log_prob(x)
