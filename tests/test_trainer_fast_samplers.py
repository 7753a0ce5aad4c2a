"""The Trainer's fast mode with the samplers that need random numbers every step: short-run
contrastive divergence (Langevin from noise) and persistent CD (a replay buffer).

Fast mode captures the whole step as one CUDA graph after ``warmup_steps`` eager steps; on a
CPU it is accepted and ignored. In both cases a run is a function of its seed: the same seed
gives the same parameters, replay buffer and random stream, and fast mode gives what the
normal mode gives (bit for bit on CPU; on CUDA up to the rounding of the capturable Adam).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ebmflow.energy import MLPEnergy
from ebmflow.losses import ContrastiveDivergence
from ebmflow.samplers import Langevin, PersistentSampler, ReplayBuffer
from ebmflow.spaces import Continuous
from ebmflow.training import Trainer

STEPS, BATCH = 12, 32


def _data(n: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g) * 0.5 + torch.tensor([1.0, -1.0])


def _build(kind: str):
    torch.manual_seed(123)  # the same initial weights for every run
    space = Continuous(2)
    energy = MLPEnergy(space, hidden=(16, 16))
    langevin = Langevin(step_size=0.01, n_steps=5)
    if kind == "cd":
        sampler = langevin
    else:
        sampler = PersistentSampler(langevin, ReplayBuffer(space, capacity=128), n_steps=5)
    return energy, ContrastiveDivergence(alpha=0.1), sampler


def _run(kind: str, fast: bool, seed: int, device: str = "cpu"):
    energy, loss, sampler = _build(kind)
    trainer = Trainer(energy, loss, sampler, fast=fast, device=device, progress=False,
                      seed=seed, log_every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: fail instead
        record = trainer.fit(_data(), steps=STEPS, batch_size=BATCH)
    params = torch.cat([p.detach().flatten().cpu() for p in energy.parameters()])
    buffer = sampler.buffer.states.detach().cpu().clone() if kind == "pcd" else None
    after = torch.randn(8, device=device).cpu()  # the global stream right after training
    return trainer, params, buffer, after, record


@pytest.mark.parametrize("kind", ["cd", "pcd"])
def test_fast_mode_on_cpu_equals_normal_mode_bit_for_bit(kind):
    """The documented CPU fallback: fast=True on CPU is the normal step (fast mode captures
    CUDA graphs only), with the same RNG use; the CUDA tests below check fast mode itself."""
    trainer, p_fast, b_fast, r_fast, rec_fast = _run(kind, fast=True, seed=7)
    assert trainer.fast is False  # the fallback this test pins
    _, p_norm, b_norm, r_norm, rec_norm = _run(kind, fast=False, seed=7)
    assert torch.equal(p_fast, p_norm)
    assert torch.equal(r_fast, r_norm)  # the same number of random draws
    if kind == "pcd":
        assert b_fast.shape == (128, 2) and torch.equal(b_fast, b_norm)
    assert rec_fast["loss"] == rec_norm["loss"]


@pytest.mark.parametrize("kind", ["cd", "pcd"])
def test_same_seed_same_run_other_seed_other_run(kind):
    _, p1, b1, r1, _ = _run(kind, fast=True, seed=3)
    _, p2, b2, r2, _ = _run(kind, fast=True, seed=3)
    _, p3, b3, r3, _ = _run(kind, fast=True, seed=4)
    assert torch.equal(p1, p2) and torch.equal(r1, r2)
    assert not torch.equal(p1, p3) and not torch.equal(r1, r3)
    if kind == "pcd":
        assert torch.equal(b1, b2) and not torch.equal(b1, b3)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["cd", "pcd"])
def test_fast_mode_on_cuda_captures_and_is_deterministic(kind):
    t1, p1, b1, r1, _ = _run(kind, fast=True, seed=3, device="cuda")
    _, p2, b2, r2, _ = _run(kind, fast=True, seed=3, device="cuda")
    assert t1.fast and t1._capture_failed is False and t1._captured is not None
    assert torch.equal(p1, p2) and torch.equal(r1, r2)
    if kind == "pcd":
        assert torch.equal(b1, b2)
    _, p3, _, _, _ = _run(kind, fast=True, seed=4, device="cuda")
    assert not torch.equal(p1, p3)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["cd", "pcd"])
def test_fast_mode_on_cuda_matches_normal_mode(kind):
    _, p_fast, b_fast, _, rec_fast = _run(kind, fast=True, seed=5, device="cuda")
    _, p_norm, b_norm, _, rec_norm = _run(kind, fast=False, seed=5, device="cuda")
    # the same random numbers drive both: only the optimiser's rounding differs
    torch.testing.assert_close(p_fast, p_norm, atol=1e-3, rtol=1e-3)
    if kind == "pcd":
        torch.testing.assert_close(b_fast, b_norm, atol=1e-2, rtol=1e-2)
    assert abs(rec_fast["loss"] - rec_norm["loss"]) < 1e-2
