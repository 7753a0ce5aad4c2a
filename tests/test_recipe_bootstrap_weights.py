"""The bootstrapped-proposal recipe reweights its kept samples from E_k to E_{k+1} by
w ∝ exp(-(E_{k+1}(x) - E_k(x))) (self-normalised, mean 1), checked against a hand computation
through the recipe's public behaviour: the weights the flow is trained with and the weight
statistics ``update`` returns."""

from __future__ import annotations

import torch
from torch import nn

from ebmflow.discrete_flows import BootstrapFlow, DiscreteFlowSampler, MixturePath, MLPVelocity
from ebmflow.energy import EnergyModel
from ebmflow.spaces import Binary

D, B = 6, 64


class Field(EnergyModel):
    """E(x) = -h . x on {0, 1}^D: the energy change is linear in the bits, easy to compute."""

    def __init__(self):
        super().__init__(Binary(D))
        self.h = nn.Parameter(torch.zeros(D))

    def energy(self, x):
        return -(x.float() @ self.h)


def _recipe():
    torch.manual_seed(0)
    path = MixturePath(2, "mask")
    flow = DiscreteFlowSampler(MLPVelocity(D, 2, hidden=(16,), schedule=path.schedule), path,
                               batch_size=B)
    return BootstrapFlow(flow, n_steps=0)


def _sample_then_move(recipe, energy, gen):
    with torch.no_grad():
        energy.h.copy_(torch.linspace(-1.0, 1.0, D))
    x = recipe.sample(energy, B, generator=gen)
    e_old = energy(x).detach()
    with torch.no_grad():  # the EBM step: E_k -> E_{k+1}
        energy.h.add_(torch.tensor([2.0, -1.5, 0.5, 0.0, 1.0, -2.0]))
    e_new = energy(x).detach()
    assert not torch.allclose(e_old - e_new, (e_old - e_new).mean().expand(B))  # weights vary
    return x, e_old, e_new


def _expected(e_old, e_new):
    """w_i = B exp(-(E_new - E_old)_i) / sum_j exp(-(E_new - E_old)_j)."""
    return B * torch.softmax(-(e_new - e_old), dim=0)


def test_bootstrap_trains_the_flow_with_weights_exp_minus_energy_change(gen):
    recipe, energy = _recipe(), Field()
    x, e_old, e_new = _sample_then_move(recipe, energy, gen)
    seen = {}
    fit_step = recipe.flow.fit_step

    def spy(tokens, weights=None, generator=None):
        seen["tokens"], seen["weights"] = tokens, weights
        return fit_step(tokens, weights, generator)

    recipe.flow.fit_step = spy  # instance attribute: observes the call, changes nothing
    stats = recipe.update(energy, None, generator=gen)
    assert torch.equal(seen["tokens"], x.long())
    w = seen["weights"]
    assert w.shape == (B,)
    torch.testing.assert_close(w, _expected(e_old, e_new), rtol=1e-5, atol=1e-6)
    # the samples whose energy went down gain weight
    down = (e_new - e_old) < -1e-6
    up = (e_new - e_old) > 1e-6
    assert bool(down.any()) and bool(up.any())
    assert float(w[down].min()) > float(w[up].max())
    assert "flow_loss" in stats


def test_bootstrap_weight_statistics_match_exp_minus_energy_change(gen):
    recipe, energy = _recipe(), Field()
    _x, e_old, e_new = _sample_then_move(recipe, energy, gen)
    stats = recipe.update(energy, None, generator=gen)
    p = _expected(e_old, e_new) / B  # normalised weights
    torch.testing.assert_close(stats["weight_max"], p.max(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["ess"], 1.0 / p.pow(2).sum(), rtol=1e-4, atol=1e-5)


def test_no_energy_change_gives_uniform_weights(gen):
    recipe, energy = _recipe(), Field()
    with torch.no_grad():
        energy.h.copy_(torch.linspace(-1.0, 1.0, D))
    recipe.sample(energy, B, generator=gen)
    stats = recipe.update(energy, None, generator=gen)
    torch.testing.assert_close(stats["ess"], torch.tensor(float(B)))
