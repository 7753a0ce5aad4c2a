"""TiltedEnergy: E_tilt = E_theta - log q, gradient routing, the latent (neural-transport)
energy, and errors."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy, TiltedEnergy
from ebmflow.flows import RealNVP
from ebmflow.spaces import Binary, Continuous


def _flow(dim: int = 2) -> RealNVP:
    torch.manual_seed(0)
    flow = RealNVP(dim, n_layers=4, hidden=(16, 16))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return flow


class Zero(MLPEnergy):
    def energy(self, x):
        return 0.0 * super().energy(x)


def test_energy_is_model_minus_flow_log_prob(gen):
    flow = _flow()
    model = MLPEnergy(Continuous(2), hidden=(8,))
    tilted = TiltedEnergy(model, flow)
    x = torch.randn(16, 2, generator=gen)
    torch.testing.assert_close(tilted(x), model(x) - flow.log_prob(x))


def test_zero_correction_is_the_normalised_flow():
    tilted = TiltedEnergy(Zero(Continuous(2), hidden=(4,)), _flow())
    lin = torch.linspace(-9, 9, 121)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], -1)
    with torch.no_grad():
        mass = float(torch.exp(-tilted(grid)).sum()) * float(lin[1] - lin[0]) ** 2
    assert abs(mass - 1) < 0.02


def test_gradient_routing(gen):
    flow = _flow()
    model = MLPEnergy(Continuous(2), hidden=(8,))
    x = torch.randn(8, 2, generator=gen)
    TiltedEnergy(model, flow)(x).sum().backward()
    assert all(p.grad is None for p in flow.parameters())
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.requires_grad for p in flow.parameters())  # restored after the call
    TiltedEnergy(model, flow, learn_flow=True)(x).sum().backward()
    assert all(p.grad is not None for p in flow.parameters())
    # the score includes the flow's score
    tilted = TiltedEnergy(model, flow)
    xg = x.clone().requires_grad_(True)
    (gq,) = torch.autograd.grad(flow.log_prob(xg).sum(), xg)
    torch.testing.assert_close(tilted.score(x), model.score(x) + gq, atol=1e-5, rtol=1e-5)


def test_latent_energy_is_pullback(gen):
    """E_z(z) = E_tilt(T(z)) - log|det dT/dz| - D/2 log(2 pi), and = |z|^2/2 when E_theta = 0."""
    flow = _flow()
    model = MLPEnergy(Continuous(2), hidden=(8,))
    tilted = TiltedEnergy(model, flow)
    latent = tilted.latent()
    z = torch.randn(16, 2, generator=gen)
    x, logdet = flow(z)
    expected = tilted(x) - logdet - math.log(2 * math.pi)
    torch.testing.assert_close(latent(z), expected, atol=1e-4, rtol=1e-5)
    zero_latent = TiltedEnergy(Zero(Continuous(2), hidden=(4,)), flow).latent()
    torch.testing.assert_close(zero_latent(z), 0.5 * z.pow(2).sum(-1))
    torch.testing.assert_close(tilted.push_forward(z), x)


def test_tilted_by_exact_flow_recovers_target(gen):
    """A flow that equals a Gaussian target and a zero correction: E_tilt = E_target."""
    target = GaussianMixtureEnergy(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 2.0]]))
    flow = RealNVP(2, n_layers=2, loc=torch.tensor([1.0, -2.0]), scale=torch.tensor([0.5, 2.0]))
    tilted = TiltedEnergy(Zero(Continuous(2), hidden=(4,)), flow)
    x = torch.randn(32, 2, generator=gen)
    torch.testing.assert_close(tilted(x), target(x), atol=1e-5, rtol=1e-5)


def test_errors():
    model = MLPEnergy(Continuous(2), hidden=(4,))
    with pytest.raises(ValueError, match="dim=3"):
        TiltedEnergy(model, RealNVP(3))
    with pytest.raises(ValueError, match="continuous"):
        TiltedEnergy(MLPEnergy(Binary(2), hidden=(4,)), RealNVP(2))
    with pytest.raises(ValueError, match="log_prob"):
        TiltedEnergy(model, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="EnergyModel"):
        TiltedEnergy(torch.nn.Linear(2, 1), RealNVP(2))


def test_energy_package_does_not_import_flows():
    """Arrows point one way: energy must not depend on flows (duck-typed flow)."""
    import ebmflow.energy as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "flows" not in (node.module or ""), path
            elif isinstance(node, ast.Import):
                assert not any("flows" in a.name for a in node.names), path
