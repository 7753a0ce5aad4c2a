"""Fixes of the GPU paths that can be checked on a CPU (the CUDA halves are in cuda tests)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from ebmflow.training.batches import BatchStream
from ebmflow.training.trainer import keep_tensor_lr


def test_scheduler_steps_reach_a_tensor_learning_rate() -> None:
    """A recorded graph reads the learning-rate tensor it was captured with: a scheduler that
    assigns a float must land in that tensor, not replace it."""
    p = torch.nn.Parameter(torch.zeros(3))
    lr = torch.tensor(0.1)
    opt = torch.optim.Adam([p], lr=lr)
    tensors = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for expected in (0.05, 0.025):
        opt.step()
        sched.step()
        keep_tensor_lr(opt, tensors)
        assert opt.param_groups[0]["lr"] is lr
        assert abs(float(lr) - expected) < 1e-7


def test_dataloader_is_sharded_across_ranks() -> None:
    """A plain DataLoader under data parallelism: ranks see disjoint batches, equal counts."""
    data = TensorDataset(torch.arange(40.0)[:, None])
    loader = DataLoader(data, batch_size=4, shuffle=False)
    seen = []
    for rank in range(3):
        stream = BatchStream(loader, None, rank=rank, world_size=3)
        assert len(stream) == 3  # 10 batches // 3 ranks
        it = stream.batches()
        seen.append([int(next(it)[0][0, 0]) for _ in range(3)])
    assert seen == [[0, 12, 24], [4, 16, 28], [8, 20, 32]]
    # resume in the middle of an epoch skips this rank's used batches only
    it = BatchStream(loader, None, rank=1, world_size=3).batches(start_step=2)
    assert int(next(it)[0][0, 0]) == 28
    assert int(next(it)[0][0, 0]) == 4  # next epoch


def _recording_sync(calls: list):
    def sync(params):
        params = list(params)
        assert all(p.grad is not None for p in params), "gradients must exist when synced"
        calls.append([p for p in params])
        for p in params:  # a stand-in all-reduce: visible in the step that follows
            p.grad.zero_()
    return sync


def test_learned_samplers_sync_gradients_before_their_optimiser_step() -> None:
    """Under data parallelism the Trainer sets ``grad_sync`` (an all-reduce of gradients);
    learned samplers must call it between backward and their step: here a sync that zeroes
    the gradients must leave the parameters unchanged (Adam with zero gradient, first step)."""
    from ebmflow.discrete_flows import DiscreteFlowSampler, MixturePath, MLPVelocity
    from ebmflow.energy import GaussianMixtureEnergy, MLPEnergy
    from ebmflow.flows import FlowMC, RealNVP
    from ebmflow.samplers import MALA
    from ebmflow.spaces import Binary

    torch.manual_seed(0)
    target = GaussianMixtureEnergy(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.full((2, 2), 0.5))
    fmc = FlowMC(RealNVP(2, n_layers=2, hidden=(8,)), MALA(0.1), n_local=1, n_global=1)
    fmc.sample(target, 16, generator=torch.Generator().manual_seed(0))
    path = MixturePath(2)
    dfs = DiscreteFlowSampler(MLPVelocity(4, 2, hidden=(8,)), path)
    ising = MLPEnergy(Binary(4), hidden=(8,))
    assert FlowMC.syncs_gradients and DiscreteFlowSampler.syncs_gradients
    for sampler, module, energy in ((fmc, fmc.flow, target), (dfs, dfs.model, ising)):
        calls: list = []
        sampler.grad_sync = _recording_sync(calls)
        before = [p.detach().clone() for p in module.parameters()]
        sampler.update(energy)
        assert calls, f"{type(sampler).__name__}.update never synced its gradients"
        assert {id(p) for p in calls[0]} == {id(p) for p in module.parameters()}
        for b, p in zip(before, module.parameters()):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
