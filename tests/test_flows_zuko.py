"""Bring your own flow: zuko flows through ``ZukoFlow`` in FlowMC, TiltedEnergy and Flow.fit.
Skipped when zuko is not installed (``pip install ebmflow[zuko]``)."""

from __future__ import annotations

import math

import pytest
import torch

from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy, TiltedEnergy
from ebmflow.flows import FlowMC, ZukoFlow
from ebmflow.samplers import MALA
from ebmflow.spaces import Continuous

zuko = pytest.importorskip("zuko")

W_HEAVY = 2 / 3


def _nsf(seed: int = 0, dim: int = 2):
    torch.manual_seed(seed)
    return zuko.flows.NSF(dim, transforms=3, hidden_features=(32, 32))


def test_adapter_matches_zuko_and_is_invertible(gen):
    nsf = _nsf()
    flow = ZukoFlow(nsf)
    assert flow.dim == 2 and set(flow.parameters()) == set(nsf.parameters())
    x, logq = flow.sample_and_log_prob(64, torch.Generator().manual_seed(3))
    x2, _ = flow.sample_and_log_prob(64, torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, x2)  # the generator drives the draw
    torch.testing.assert_close(logq, nsf().log_prob(x), atol=1e-4, rtol=1e-4)
    z, ladj = flow.inverse(x)
    x_back, ladj_fwd = flow.forward(z)
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ladj, -ladj_fwd, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flow.base_log_prob(z) + ladj, flow.log_prob(x),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="LazyDistribution"):
        ZukoFlow(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dim=3"):
        ZukoFlow(nsf, dim=3)


def test_fit_reduces_the_loss(gen):
    target = GaussianMixtureEnergy.two_modes(dim=2, separation=8.0, scale=1.0)
    data = target.sample(512, gen)
    flow = ZukoFlow(_nsf())
    losses = flow.fit(data, 60, lr=1e-2, batch_size=256, generator=gen)
    assert float(losses[-10:].mean()) < float(losses[:10].mean()) - 1.0


def test_flowmc_with_a_zuko_flow_keeps_the_two_to_one_weights(gen):
    """All chains start in the heavy mode; FlowMC with an NSF (passed as the raw zuko flow)
    fitted to the chain history reaches the 2:1 weights (binomial tolerance)."""
    target = GaussianMixtureEnergy.two_modes(dim=2, separation=8.0, scale=1.0)
    n = 400
    x0 = torch.tensor([-4.0, 0.0]) + torch.randn(n, 2, generator=gen)
    sampler = FlowMC.flowmc_schedule(_nsf(), MALA(0.3), n_local=5, n_global=5, history=10,
                                     train_examples=1000, batch_size=500, n_epochs=3,
                                     lr=5e-3, train_updates=10)
    assert isinstance(sampler.flow, ZukoFlow)
    sampler.sample(target, x0=x0, generator=gen)
    for _ in range(10):
        sampler.update(target, generator=gen)
        sampler.sample(target, generator=gen)
    x = sampler.sample(target, generator=gen, n_rounds=2)
    assert float(sampler.stats["global_accept"]) > 0.2
    heavy = float((x[:, 0] < 0).float().mean())
    assert abs(heavy - W_HEAVY) < 4 * math.sqrt(W_HEAVY * (1 - W_HEAVY) / n)


def test_tilted_energy_takes_a_zuko_flow(gen):
    nsf = _nsf()
    model = MLPEnergy(Continuous(2), hidden=(8,))
    with torch.no_grad():
        model.net[-1].weight.zero_()
        model.net[-1].bias.zero_()
    x = torch.randn(16, 2, generator=gen)
    for flow in (nsf, ZukoFlow(nsf)):
        tilted = TiltedEnergy(model, flow)
        torch.testing.assert_close(tilted(x), -nsf().log_prob(x).detach())
        z = torch.randn(16, 2, generator=gen)  # latent view: E_z = E_theta(T(z)) + |z|^2 / 2
        torch.testing.assert_close(tilted.latent()(z), 0.5 * z.pow(2).sum(-1))
        assert tilted.push_forward(z).shape == (16, 2)
    # E_theta = 0: the tilted model is the flow, so flow proposals are always accepted
    sampler = FlowMC(nsf, MALA(0.1), n_local=1, n_global=2, flow_steps=0)
    sampler.sample(TiltedEnergy(model, sampler.flow), 64, generator=gen)
    assert float(sampler.stats["global_accept"]) > 0.999


def _box_flow(device: str = "cpu"):
    torch.manual_seed(0)
    return zuko.flows.Flow(
        transform=[zuko.flows.MaskedAutoregressiveTransform(2, hidden_features=(16,))],
        base=zuko.flows.UnconditionalDistribution(
            zuko.distributions.BoxUniform, torch.full((2,), -1.0, device=device),
            torch.full((2,), 1.0, device=device), buffer=True),
    ).to(device)


def test_non_gaussian_base_is_seeded_by_the_generator_and_leaves_the_global_rng():
    flow = ZukoFlow(_box_flow())
    state = torch.get_rng_state()
    x, logq = flow.sample_and_log_prob(16, torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())  # sampled under a forked global RNG
    x2, _ = flow.sample_and_log_prob(16, torch.Generator().manual_seed(3))
    x3, _ = flow.sample_and_log_prob(16, torch.Generator().manual_seed(4))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    torch.testing.assert_close(logq, flow.flow().log_prob(x))
    with pytest.raises(TypeError, match="BoxUniform base"):
        from ebmflow.samplers import rng

        flow.sample_and_log_prob(4, rng.NoiseTape([torch.zeros(4, 2)]))


@pytest.mark.parametrize("flow_device,gen_device,forked", [
    ("cpu", "cpu", []), ("cuda:0", "cpu", ["cuda:0"]), ("cpu", "cuda:0", ["cuda:0"]),
    ("cuda:0", "cuda:0", ["cuda:0"]),
])
def test_non_gaussian_base_forks_the_cuda_devices_it_reseeds(monkeypatch, flow_device, gen_device,
                                                             forked):
    """``torch.manual_seed`` reseeds every device: the RNG of a CUDA flow is forked too, not
    only a CUDA generator's (a CPU generator with a CUDA flow left the global CUDA RNG
    reseeded). Devices are faked here, so the list handed to fork_rng is what is checked."""
    import contextlib

    flow = ZukoFlow(_box_flow())
    seen = []

    @contextlib.contextmanager
    def fork_rng(devices=None, **kwargs):
        seen.append([str(d) for d in devices])
        yield

    class FakeGenerator(torch.Generator):
        @property
        def device(self):
            return torch.device(gen_device)

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    monkeypatch.setattr(ZukoFlow, "_param_device", lambda self: torch.device(flow_device))
    real_randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **k: real_randint(*a, **{**k, "device": "cpu"}))
    flow.sample_and_log_prob(4, FakeGenerator().manual_seed(0))
    assert seen == [forked]


@pytest.mark.cuda
def test_non_gaussian_base_on_cuda_leaves_the_global_cuda_rng_with_a_cpu_generator():
    flow = ZukoFlow(_box_flow("cuda"))
    state = torch.cuda.get_rng_state()
    flow.sample_and_log_prob(16, torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.cuda.get_rng_state())


@pytest.mark.cuda
def test_non_gaussian_base_takes_a_cuda_generator():
    flow = ZukoFlow(_box_flow("cuda"))
    x, _ = flow.sample_and_log_prob(16, torch.Generator(device="cuda").manual_seed(3))
    x2, _ = flow.sample_and_log_prob(16, torch.Generator(device="cuda").manual_seed(3))
    assert x.device.type == "cuda" and torch.equal(x, x2)


def test_a_zuko_mixture_samples_with_its_log_prob(gen):
    torch.manual_seed(0)
    gmm = zuko.mixtures.GMM(2, components=3)
    flow = ZukoFlow(gmm)
    x, logq = flow.sample_and_log_prob(32, torch.Generator().manual_seed(1))
    x2, _ = flow.sample_and_log_prob(32, torch.Generator().manual_seed(1))
    assert x.shape == (32, 2) and torch.equal(x, x2)
    torch.testing.assert_close(logq, gmm().log_prob(x))
    x3, logq3 = flow.sample_and_log_prob(16)  # global RNG
    torch.testing.assert_close(logq3, gmm().log_prob(x3))


def test_param_device_is_the_device_of_the_flows_parameters():
    assert ZukoFlow(_box_flow())._param_device() == torch.device("cpu")
    meta = ZukoFlow(_box_flow()).to("meta")
    assert meta._param_device() == torch.device("meta")

    class Empty(ZukoFlow):
        def parameters(self, recurse=True):
            return iter(())

    assert Empty(_box_flow())._param_device() == torch.device("cpu")
