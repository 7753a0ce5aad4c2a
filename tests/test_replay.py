"""ReplayBuffer and PersistentSampler: draws, re-initialisation, write-back, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy
from ebmflow.samplers import MALA, Langevin, PersistentSampler, ReplayBuffer
from ebmflow.spaces import Binary, Categorical, Continuous


def test_draw_reinit_fraction_and_push(gen: torch.Generator) -> None:
    buf = ReplayBuffer(Continuous(3), capacity=5000, reinit_prob=0.2)
    x, slots = buf.draw(4000, generator=gen)
    assert x.shape == (4000, 3) and slots.shape == (4000,)
    assert slots.unique().numel() == 4000  # distinct slots
    kept = (x == buf.states[slots]).all(1)
    rate = 1 - kept.float().mean()
    se = math.sqrt(0.2 * 0.8 / 4000)
    assert abs(float(rate) - 0.2) < 5 * se
    assert float(buf.stats["reinit_rate"]) == pytest.approx(float(rate))
    buf.push(torch.full((4000, 3), 7.0), slots)
    assert bool((buf.states[slots] == 7).all())
    others = torch.ones(5000, dtype=torch.bool)
    others[slots] = False
    assert not bool((buf.states[others] == 7).any())


@pytest.mark.parametrize("space", [Binary(6), Categorical(4, 3)], ids=["binary", "categorical"])
def test_discrete_states(space, gen: torch.Generator) -> None:
    buf = ReplayBuffer(space, capacity=100, reinit_prob=0.5)
    x, slots = buf.draw(50, generator=gen)
    assert x.dtype == space.dtype and x.shape == (50, *space.shape)
    space.validate(x)
    buf.push(x, slots)
    space.validate(buf.states)


def test_state_dict_round_trip(gen: torch.Generator) -> None:
    buf = ReplayBuffer(Categorical(5, 4), capacity=64)
    buf.draw(8, generator=gen)
    fresh = ReplayBuffer(Categorical(5, 4), capacity=64)
    fresh.load_state_dict(buf.state_dict())
    assert fresh.initialised and torch.equal(fresh.states, buf.states)
    with pytest.raises(ValueError, match="saved replay buffer"):
        ReplayBuffer(Categorical(5, 4), capacity=32).load_state_dict(buf.state_dict())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(Continuous(2), capacity=0)
    with pytest.raises(ValueError, match="reinit_prob"):
        ReplayBuffer(Continuous(2), reinit_prob=1.5)
    buf = ReplayBuffer(Continuous(2), capacity=10)
    with pytest.raises(ValueError, match="capacity 10"):
        buf.draw(11)
    with pytest.raises(ValueError, match="before any draw"):
        buf.push(torch.zeros(2, 2), torch.arange(2))
    buf.draw(2)
    with pytest.raises(ValueError, match="shape"):
        buf.push(torch.zeros(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match="mcmc"):
        PersistentSampler(buf, buf)  # type: ignore[arg-type]


def test_persistent_sampler_writes_back_and_reports(gen: torch.Generator) -> None:
    target = GaussianMixtureEnergy(torch.zeros(1, 2), 1.0)
    ps = PersistentSampler(MALA(0.5), ReplayBuffer(Continuous(2), capacity=256, reinit_prob=0.0),
                           n_steps=3)
    x = ps.sample(target, 32, generator=gen)
    assert x.shape == (32, 2)
    hits = (ps.buffer.states[:, None, :] == x[None]).all(-1).any(0)
    assert bool(hits.all())  # every returned state is stored
    for key in ("accept_rate", "reinit_rate", "buffer_capacity", "nonfinite"):
        assert key in ps.stats and ps.stats[key].dim() == 0
    assert "buffer.states" in ps.state_dict()
    x0 = torch.zeros(4, 2)
    before = ps.buffer.states.clone()
    ps.sample(target, x0=x0, generator=gen)  # explicit start: buffer untouched
    assert torch.equal(before, ps.buffer.states)


def test_persistent_chains_converge_across_calls(gen: torch.Generator) -> None:
    """Short runs that continue from the buffer reach the target (mean 2, sd 0.5) although
    each call does only 5 steps from a N(0, 1) fill."""
    target = GaussianMixtureEnergy(torch.tensor([[2.0]]), 0.5)
    ps = PersistentSampler(Langevin(0.02), ReplayBuffer(Continuous(1), 1024, reinit_prob=0.0),
                           n_steps=5)
    for _ in range(60):
        ps.sample(target, 512, generator=gen)
    s = ps.buffer.states
    assert abs(float(s.mean()) - 2.0) < 0.1 and abs(float(s.std()) - 0.5) < 0.06


def test_space_mismatch() -> None:
    ps = PersistentSampler(Langevin(), ReplayBuffer(Continuous(3), 16))
    with pytest.raises(ValueError, match="does not match the replay buffer"):
        ps.sample(MLPEnergy(Continuous(2), hidden=(4,)), 4)


@pytest.mark.cuda
def test_buffer_on_cuda() -> None:
    energy = MLPEnergy(Continuous(2), hidden=(8,)).cuda()
    ps = PersistentSampler(Langevin(cuda_graph=True), ReplayBuffer(Continuous(2), 64))
    x = ps.sample(energy, 16, generator=torch.Generator(device="cuda").manual_seed(0))
    assert x.is_cuda and ps.buffer.states.is_cuda
