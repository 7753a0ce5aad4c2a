"""Deterministic, resumable streams of training batches from a tensor, a Dataset or a DataLoader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["BatchStream", "first_tensor"]


def first_tensor(batch: Any) -> Tensor:
    """The state tensor of a batch: the batch itself, or the first item of a tuple/list/dict
    (``(x, y)`` pairs from labelled data sets keep only ``x``)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and batch:
        value = batch.get("x", next(iter(batch.values())))
        if isinstance(value, Tensor):
            return value
    raise ValueError(
        f"a batch must be a Tensor or a tuple/list whose first item is the state tensor, got "
        f"{type(batch).__name__}; return x (or (x, y)) from your Dataset"
    )


def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=gen)


class BatchStream:
    r"""An endless stream of batches whose order is a function of (seed, step) only.

    * Tensor ``(N, *event)``: each epoch is a fresh permutation (seeded by ``seed`` and the
      epoch number) cut into ``N // global_batch`` batches (the remainder is dropped).
    * ``Dataset``: the same permutation indexes the data set; items are collated with the
      default collate function.
    * ``DataLoader``: iterated as given, epoch after epoch; on resume the batches already used
      in the current epoch are skipped (the order is as reproducible as the loader's sampler).
      Under data parallelism a loader whose sampler is a ``DistributedSampler`` (has
      ``set_epoch``) is used as is; any other loader is sharded by batch: rank $r$ takes
      batches $r, r + W, r + 2W, \dots$ of each epoch ($W$ processes, equal counts per rank).

    Under data parallelism the global batch is ``batch_size * world_size`` rows, and rank $r$
    takes rows ``[r * batch_size, (r + 1) * batch_size)`` of it: ranks see disjoint shards and
    the union equals one process's batch of ``batch_size * world_size``.

    Args:
        data: a tensor, a Dataset or a DataLoader.
        batch_size: per-process batch size (ignored for a DataLoader).
        seed: seed of the epoch permutations.
        rank, world_size: this process's rank and the number of processes.
    """

    def __init__(
        self,
        data: Tensor | Dataset | DataLoader,
        batch_size: int | None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data = data
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        if isinstance(data, DataLoader):
            self.batch_size = data.batch_size
            # a loader without a DistributedSampler yields the same batches on every rank:
            # rank r then takes batches r, r + world, r + 2 world, ... of each epoch
            self._shard = world_size > 1 and not hasattr(getattr(data, "sampler", None),
                                                         "set_epoch")
            total = len(data)
            self.batches_per_epoch = total // world_size if self._shard else total
            if self._shard and self.batches_per_epoch < 1:
                raise ValueError(
                    f"the DataLoader yields {total} batches per epoch, fewer than the "
                    f"{world_size} processes; use a smaller batch_size or a DistributedSampler"
                )
            return
        if batch_size is None or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive int for tensor data, got {batch_size!r}")
        self.batch_size = int(batch_size)
        if isinstance(data, Tensor):
            n = data.shape[0]
        elif isinstance(data, Dataset):
            try:
                n = len(data)  # type: ignore[arg-type]
            except TypeError:
                raise ValueError(
                    "an iterable Dataset has no length; wrap it in a DataLoader and pass that"
                ) from None
        else:
            raise ValueError(
                f"data must be a Tensor, a torch Dataset or a DataLoader, got {type(data).__name__}"
            )
        global_batch = self.batch_size * world_size
        if n < global_batch:
            raise ValueError(
                f"the data has {n} rows but one step needs batch_size x processes = "
                f"{self.batch_size} x {world_size} = {global_batch}; lower batch_size"
            )
        self.n = n
        self.batches_per_epoch = n // global_batch
        self._perm: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _indices(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, _epoch_permutation(self.n, self.seed, epoch))
        start = (i * self.world_size + self.rank) * self.batch_size
        return self._perm[1][start : start + self.batch_size]

    def batches(self, start_step: int = 0) -> Iterator[Any]:
        """Yield the batches of steps ``start_step, start_step + 1, ...`` forever."""
        if isinstance(self.data, DataLoader):
            yield from self._loader_batches(start_step)
            return
        step = start_step
        while True:
            idx = self._indices(step)
            if isinstance(self.data, Tensor):
                yield self.data[idx.to(self.data.device)]
            else:
                from torch.utils.data import default_collate

                yield default_collate([self.data[int(j)] for j in idx])
            step += 1

    def _loader_batches(self, start_step: int) -> Iterator[Any]:
        loader: DataLoader = self.data  # type: ignore[assignment]
        epoch, skip = divmod(start_step, max(self.batches_per_epoch, 1))
        while True:
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)  # DistributedSampler reshuffles per epoch
            mine = 0
            for j, batch in enumerate(loader):
                if self._shard:
                    if j % self.world_size != self.rank:
                        continue
                    if mine >= self.batches_per_epoch:  # equal counts on every rank
                        break
                mine += 1
                if mine <= skip:
                    continue
                yield batch
            skip = 0
            epoch += 1
