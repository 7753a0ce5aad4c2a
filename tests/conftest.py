"""Shared fixtures: deterministic generators, one thread per xdist worker, CUDA skipping."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator seeded with 0 (tests are deterministic)."""
    return torch.Generator().manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Under mutation testing (tools/mutation.py runs mutmut, which imports itself into the test
# process) the sampler tests run compiled blocks eagerly: ``torch.compile`` becomes a
# stand-in that calls the block with ``torch.compiler.is_compiling()`` true, so the
# executor's own logic (pre-drawn noise, block sizes, cache keys, the traced code paths) is
# checked against eager chains without seconds of inductor per mutant. The normal suite
# compiles for real.
_EAGER_COMPILE_FILES = {
    "test_compiled.py", "test_samplers_continuous.py", "test_samplers_discrete.py",
    "test_sampler_base.py", "test_invariance_all_samplers.py", "test_mutants_samplers.py",
    "test_samplers_cuda_graph_cpu.py",
}


@pytest.fixture(autouse=True)
def _eager_compile_under_mutmut(request, monkeypatch):
    import sys

    if "mutmut" not in sys.modules or request.node.path.name not in _EAGER_COMPILE_FILES:
        yield
        return
    tracing = [False]

    def compile(fn=None, **kwargs):
        def wrap(f):
            def run(*args, **kw):
                outer, tracing[0] = tracing[0], True
                try:
                    return f(*args, **kw)
                finally:
                    tracing[0] = outer

            return run

        return wrap if fn is None else wrap(fn)

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: tracing[0])
    yield
