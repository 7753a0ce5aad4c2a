r"""Flow-tilted energies (Grenioux, Moulines, Gabrie): the EBM corrects a normalizing flow.

$$
p(x) \propto q_{\text{flow}}(x) \exp(-E_\theta(x)), \qquad
E_{\text{tilt}}(x) = E_\theta(x) - \log q_{\text{flow}}(x).
$$

With $E_\theta = 0$ the model is the flow itself; training moves $E_\theta$ only where the flow
is wrong. Independent flow proposals $x' \sim q$ then accept with
$\min\big(1, \exp(E_\theta(x) - E_\theta(x'))\big)$, which is near 1 when the correction is
small.

Pulled back through the flow's map $x = T(z)$ (neural transport), the tilted density becomes

$$
p_z(z) \propto \rho(z) \exp\big(-E_\theta(T(z))\big), \qquad
E_z(z) = E_\theta(T(z)) + \lVert z \rVert^2 / 2,
$$

close to the base Gaussian, where local MCMC mixes easily (``TiltedEnergy.latent()``).

The flow is duck-typed (this module does not import ``ebmflow.flows``): anything with
``log_prob(x) -> (B,)`` on flat states ``(B, D)``, and for the latent view a ``forward(z) ->
(x, log|det dT/dz|)`` (``__call__``). An integer ``dim`` attribute, when present, is checked.
A zuko flow (a module whose call ``flow()`` returns a distribution with ``log_prob``, e.g.
``zuko.flows.NSF``) is accepted as well: $\log q(x)$ = ``flow().log_prob(x)``, and the latent
view uses its ``transform`` ($x = f^{-1}(z)$).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from torch import Tensor, nn

from ..spaces import Continuous
from .base import EnergyModel

__all__ = ["TiltedEnergy", "LatentEnergy"]


class _LazyDensity(nn.Module):
    """A zuko-style lazy distribution (``module() -> distribution``) seen as a flow:
    ``log_prob(x) = module().log_prob(x)``, ``forward(z) = transform.inv.call_and_ladj(z)``."""

    def __init__(self, lazy: nn.Module, dim: int):
        super().__init__()
        self.lazy = lazy
        self.dim = dim

    def log_prob(self, x: Tensor) -> Tensor:
        return self.lazy().log_prob(x)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        transform = getattr(self.lazy(), "transform", None)
        if transform is None:
            raise ValueError(
                f"the latent view needs a normalizing flow with a transform; "
                f"{type(self.lazy).__name__}() has none"
            )
        return transform.inv.call_and_ladj(z)


def _as_density(flow: nn.Module) -> nn.Module:
    """``flow`` if it has ``log_prob``; a zuko-style lazy distribution wrapped in
    ``_LazyDensity``; otherwise a ValueError."""
    if not isinstance(flow, nn.Module):
        raise ValueError(
            f"flow must be an nn.Module with log_prob(x) -> (B,) or a zuko flow, got "
            f"{type(flow).__name__}"
        )
    if callable(getattr(flow, "log_prob", None)):
        return flow
    try:
        dist = flow()
    except TypeError:
        dist = None
    if dist is None or not callable(getattr(dist, "log_prob", None)):
        raise ValueError(
            f"flow must be an nn.Module with log_prob(x) -> (B,) or a zuko flow (flow() -> "
            f"distribution), got {type(flow).__name__}"
        )
    shape = tuple(getattr(dist, "event_shape", ()))
    return _LazyDensity(flow, shape[0] if len(shape) == 1 else -1)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into ``module``'s parameters (gradients w.r.t. inputs
    still flow)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class TiltedEnergy(EnergyModel):
    r"""$E_{\text{tilt}}(x) = E_\theta(x) - \log q_{\text{flow}}(x)$ on the energy's continuous
    space.

    Args:
        energy: the learned correction $E_\theta$ (an ``EnergyModel`` on a ``Continuous`` space).
        flow: a module with ``log_prob(x (B, D)) -> (B,)`` where $D$ = ``energy.space.dim``
            (e.g. ``ebmflow.flows.RealNVP``, ``ebmflow.flows.ZukoFlow``) or a zuko flow
            (``flow() -> distribution``); states of shape ``(B, *event)`` are flattened.
        learn_flow: if False (default) the flow's parameters get no gradient through this
            energy (the flow is fitted separately, e.g. by ``FlowMC.update``); gradients with
            respect to $x$ always include $-\nabla_x \log q$.

    Attributes:
        model: $E_\theta$.   flow: the flow.

    Caution: do not keep fitting the flow to the chains of the *tilted* model during training
    (what ``FlowMC.update`` does by default): the fitted flow then absorbs the tilt and feeds it
    back at every fit, and in our 2:1 experiment the model collapsed (heavy-mode weight 0.38).
    Fit the flow to the data first and freeze it, as in [`examples/flowmc_two_modes.py`](https://github.com/ebmflow/ebmflow/blob/main/examples/flowmc_two_modes.py).
    """

    def __init__(self, energy: EnergyModel, flow: nn.Module, learn_flow: bool = False):
        if not isinstance(energy, EnergyModel):
            raise ValueError(
                f"energy must be an ebmflow EnergyModel, got {type(energy).__name__}"
            )
        if not isinstance(energy.space, Continuous):
            raise ValueError(
                f"TiltedEnergy needs a continuous energy, got space {energy.space!r}; flows "
                "model real-valued states"
            )
        flow = _as_density(flow)
        dim = getattr(flow, "dim", None)
        if isinstance(dim, int) and dim != energy.space.dim:
            raise ValueError(
                f"flow has dim={dim} but the energy's space {energy.space!r} has "
                f"{energy.space.dim} coordinates; build the flow with dim={energy.space.dim}"
            )
        super().__init__(energy.space)
        self.model = energy
        self.flow = flow
        self.learn_flow = learn_flow

    def flow_log_prob(self, x: Tensor) -> Tensor:
        r"""$\log q_{\text{flow}}(x)$ on flattened states, ``(B,)``."""
        if self.learn_flow:
            return self.flow.log_prob(x.flatten(1))
        with _frozen(self.flow):
            return self.flow.log_prob(x.flatten(1))

    def energy(self, x: Tensor) -> Tensor:
        return self.model(x) - self.flow_log_prob(x)

    def latent(self) -> LatentEnergy:
        r"""The pulled-back energy $E_z(z) = E_\theta(T(z)) + \lVert z \rVert^2 / 2$ on
        ``Continuous(D)``."""
        return LatentEnergy(self)

    def push_forward(self, z: Tensor) -> Tensor:
        """$x = T(z)$ reshaped to the energy's event shape: ``(B, D) -> (B, *event)``."""
        x, _ = self.flow(z)
        return x.reshape(z.shape[0], *self.space.shape)

    def _reference_tensor(self) -> Tensor | None:
        ref = self.model._reference_tensor()
        if ref is not None:
            return ref
        return super()._reference_tensor()


class LatentEnergy(EnergyModel):
    r"""Energy of a ``TiltedEnergy`` pulled back through its flow's map $x = T(z)$:

    $$
    E_z(z) = E_{\text{tilt}}(T(z)) - \log \left|\det \frac{\partial T}{\partial z}\right|
    = E_\theta(T(z)) + \lVert z \rVert^2 / 2 + \text{const}.
    $$

    Sample $z$ with any continuous MCMC, then map with ``tilted.push_forward(z)``.
    """

    def __init__(self, tilted: TiltedEnergy):
        super().__init__(Continuous(tilted.space.dim))
        self.tilted = tilted

    def energy(self, z: Tensor) -> Tensor:
        with nullcontext() if self.tilted.learn_flow else _frozen(self.tilted.flow):
            x = self.tilted.push_forward(z)
        return self.tilted.model(x) + 0.5 * z.pow(2).sum(-1)

    def _reference_tensor(self) -> Tensor | None:
        return self.tilted._reference_tensor()
