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
