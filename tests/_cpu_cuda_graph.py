"""A CPU stand-in for CUDA graphs, so that the graph recorders run in the CPU test suite.

``torch.cuda.graph(g)`` capture records every aten operation run inside it (through a
``TorchDispatchMode``), with the tensors it read and wrote; ``g.replay()`` runs the recorded
operations again in order and writes each result into the tensor that the capture produced.
That is what a CUDA graph's fixed memory gives: the recorded work re-runs on whatever the
static input tensors hold at replay time, and Python control flow is frozen at capture. As a
CUDA capture runs nothing, the tensors that existed before the capture and the generators
are restored when it ends: parameters, optimiser state and random streams are as they were.
Random operations draw from the generator they were called with, at replay time, so
replays advance it as eager steps would (a CUDA graph advances the Philox offset). As a CUDA
graph keeps the generator's *state*, not the Python object, the graph holds the user's
``torch.Generator`` only weakly: after it is freed, a new generator can get its ``id``, while
replays keep drawing from the old state.

As on CUDA, reading a value on the host (``.item()``, ``bool(t)``) during capture raises.
Streams and RNG states must be given their device explicitly (``torch.cuda.Stream(device)``,
``get_rng_state(device)``): on a machine with several GPUs the current device need not be
the tensors' one.

Use ``graphs = patch_cuda_graphs(monkeypatch)`` in a test; ``graphs`` lists every graph
recorded, for counting recordings and replays.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ebmflow._capture

__all__ = ["CPUGraph", "patch_cuda_graphs"]

# operations that read a tensor's value on the host: not allowed while a stream captures
_HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.nonzero.default,
}


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    """Records the operations of a capture. They also run (their outputs are needed to go
    on), but a CUDA capture runs nothing: so every tensor that existed before the capture
    and is written during it, and every generator drawn from, is put back as it was when
    the capture ends (``undo``)."""

    def __init__(self, graph: CPUGraph) -> None:
        super().__init__()
        self.graph = graph
        self.created: set[int] = set()  # storages allocated inside the capture
        self.saved: list[tuple[Tensor, Tensor]] = []
        self.saved_ids: set[tuple] = set()
        self.generators: dict[int, tuple[torch.Generator, Tensor]] = {}
        self.default_rng = torch.get_rng_state()

    def _save_written(self, func, args, kwargs) -> None:  # noqa: ANN001
        named = dict(zip((a.name for a in func._schema.arguments), args))
        named.update(kwargs)
        for arg in func._schema.arguments:
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = named.get(arg.name)
            for t in value if isinstance(value, (list, tuple)) else [value]:  # Tensor[] too
                if not isinstance(t, Tensor) or _storage(t) in self.created:
                    continue
                key = (t.data_ptr(), tuple(t.shape), t.stride())
                if key not in self.saved_ids:
                    self.saved_ids.add(key)
                    self.saved.append((t, t.detach().clone()))
        gen = named.get("generator")
        if isinstance(gen, torch.Generator) and gen.device.type == "cpu":
            self.generators.setdefault(id(gen), (gen, gen.get_state()))

    def undo(self) -> None:
        with torch.no_grad():
            for t, value in reversed(self.saved):
                t.detach().copy_(value)
        for gen, state in self.generators.values():
            gen.set_state(state)
        torch.set_rng_state(self.default_rng)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _HOST_READS:
            raise RuntimeError(
                f"{func}: operation not permitted when stream is capturing (CPU stand-in of "
                "CUDA graph capture)"
            )
        self._save_written(func, args, kwargs)
        out = func(*args, **kwargs)
        inputs = {_storage(a) for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)}
        for o in tree_leaves(out):  # new memory (a view of an input is not)
            if isinstance(o, Tensor) and _storage(o) not in inputs:
                self.created.add(_storage(o))
        self.graph.ops.append((func, args, kwargs, out))
        return out


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class CPUGraph:
    """Recorded operations of one capture; ``replay`` re-runs them into the same tensors."""

    def __init__(self) -> None:
        self.ops: list[tuple] = []
        self.generators: list[weakref.ref] = []
        self.captured = False
        self.replays = 0

    def register_generator_state(self, generator: torch.Generator) -> None:
        self.generators.append(weakref.ref(generator))

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("replay of a graph that was never captured")
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                res = func(*args, **kwargs)
                for o, r in zip(tree_leaves(out), tree_leaves(res)):
                    if isinstance(o, Tensor) and not _same_tensor(o, r):
                        o.detach().copy_(r)
        self.replays += 1


def _device(device: object, what: str) -> torch.device:
    """Streams and RNG states are per device: with several GPUs, "the current device" may not
    be the tensors' one, so the library passes the device explicitly. The stand-in insists."""
    if device is None:
        raise RuntimeError(f"{what} called without a device (the current device may differ "
                           "from the tensors' one on a machine with several GPUs)")
    return torch.device(device)


class _Stream:
    def __init__(self, device: object = None) -> None:
        self.device = _device(device, "torch.cuda.Stream")

    def wait_stream(self, other: object) -> None:
        if not isinstance(other, _Stream):
            raise TypeError(f"wait_stream expects a stream, got {other!r}")


def _stream_context(stream: object) -> contextlib.AbstractContextManager:
    if not isinstance(stream, _Stream):
        raise TypeError(f"torch.cuda.stream expects a stream, got {stream!r}")
    return contextlib.nullcontext()


def _get_rng_state(device: object = None) -> Tensor:
    _device(device, "torch.cuda.get_rng_state")
    return torch.get_rng_state()


def _set_rng_state(state: Tensor, device: object = None) -> None:
    _device(device, "torch.cuda.set_rng_state")
    torch.set_rng_state(state)


def patch_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> list[CPUGraph]:
    """Make ``torch.cuda``'s graph, stream and RNG-state functions work on CPU tensors."""
    graphs: list[CPUGraph] = []
    capturing = [False]

    def new_graph() -> CPUGraph:
        g = CPUGraph()
        graphs.append(g)
        return g

    @contextlib.contextmanager
    def graph(g: CPUGraph, pool: object = None, stream: object = None,
              capture_error_mode: object = None) -> Iterator[None]:
        capturing[0] = True
        recorder = _Recorder(g)
        try:
            with recorder:
                yield
        finally:
            capturing[0] = False
            recorder.undo()
        g.captured = True

    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", _stream_context)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream(device))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    # CPU tensors stand in for CUDA tensors while a graph is recorded
    monkeypatch.setattr(ebmflow._capture, "capturing", lambda x: capturing[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", _get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", _set_rng_state)
    return graphs
