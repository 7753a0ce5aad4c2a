"""Fast mode: the whole training step captured as one CUDA graph and replayed.

A CUDA graph records the kernels of one step (sampler update, loss, backward, gradient
clipping, optimiser step, statistics) once; each later step copies the new batch into the
captured input and replays the recording, removing Python and kernel-launch overhead. This
works for losses and samplers without data-dependent Python control flow and without host
synchronisation (no ``.item()``, no ``bool(tensor)``); otherwise capture fails and the Trainer
falls back to eager steps with a warning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CapturedStep", "capture_step"]


class CapturedStep:
    """A training step recorded as a CUDA graph; call it with a batch of the captured shape."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_batch: Tensor, outputs: Tensor):
        self.graph = graph
        self.static_batch = static_batch
        self.outputs = outputs

    def __call__(self, batch: Tensor) -> Tensor:
        if batch.shape != self.static_batch.shape:
            raise ValueError(
                f"the captured step expects batches of shape {tuple(self.static_batch.shape)}, "
                f"got {tuple(batch.shape)}; use a fixed batch size (drop the last partial batch)"
            )
        self.static_batch.copy_(batch, non_blocking=True)
        self.graph.replay()
        return self.outputs


def capture_step(step_fn: Callable[[Tensor], Tensor], batch: Tensor,
                 zero_grad: Callable[[], None]) -> CapturedStep:
    """Record ``step_fn(batch) -> outputs`` (one training step, outputs a stats vector) as a
    CUDA graph. Warm-up steps must already have run eagerly (the optimiser state exists).
    ``zero_grad`` (with ``set_to_none=True``) is called first so the graph owns the gradients."""
    static_batch = batch.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    zero_grad()
    with torch.cuda.graph(graph):
        outputs = step_fn(static_batch)
    return CapturedStep(graph, static_batch, outputs)
