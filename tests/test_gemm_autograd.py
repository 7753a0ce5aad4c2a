"""The MLP's oneDNN matrix products under autograd: first and second derivatives equal those of
``torch.nn.functional.linear`` (to float32 rounding), under ``torch.func`` and ``torch.compile``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ebmflow.energy import MLPEnergy, _gemm
from ebmflow.spaces import Continuous

needs_onednn = pytest.mark.skipif(not _gemm._ONEDNN, reason="oneDNN linear not in this torch build")


def _plain(model: MLPEnergy, x: torch.Tensor) -> torch.Tensor:
    h = x
    for mod in model.net:  # the same layers through F.linear (BLAS) and autograd's own backward
        h = F.linear(h, mod.weight, mod.bias) if isinstance(mod, torch.nn.Linear) else mod(h)
    return h.squeeze(-1)


def _model_and_data(seed: int = 0) -> tuple[MLPEnergy, torch.Tensor]:
    torch.manual_seed(seed)
    model = MLPEnergy(Continuous(3), hidden=(64, 64))
    x = torch.randn(4096, 3, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


@needs_onednn
def test_oneDNN_path_is_taken_with_autograd(monkeypatch):
    model, x = _model_and_data()
    calls = []
    apply = _gemm._Linear.apply
    monkeypatch.setattr(_gemm._Linear, "apply", lambda *a: calls.append(1) or apply(*a))
    model(x.requires_grad_()).sum().backward()
    assert len(calls) == 1  # the 64 x 64 layer; the 3-wide input and 1-wide output stay on BLAS


@needs_onednn
def test_first_derivatives_match_blas_autograd():
    model, x = _model_and_data()
    x.requires_grad_(True)
    params = list(model.parameters())
    loss = (model(x) ** 2).mean() + model(x).exp().mean()
    ref = (_plain(model, x) ** 2).mean() + _plain(model, x).exp().mean()
    got = torch.autograd.grad(loss, params + [x])
    want = torch.autograd.grad(ref, params + [x])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@needs_onednn
def test_second_derivatives_match_blas_autograd():
    # score-matching shape: d/dtheta of |dE/dx|^2 needs the backward to be differentiable
    model, x = _model_and_data(3)
    x.requires_grad_(True)
    params = [p for n, p in model.named_parameters() if n != "net.4.bias"]  # E's offset: no score

    def objective(f):
        gx, = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        return gx.pow(2).sum(1).mean()

    got = torch.autograd.grad(objective(model), params)
    want = torch.autograd.grad(objective(lambda z: _plain(model, z)), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max().item() for g in got) > 1e-4  # not a vacuous comparison of zeros


@needs_onednn
def test_func_grad_and_compile_match():
    model, x = _model_and_data(5)
    want, = torch.autograd.grad(_plain(model, x.requires_grad_()).sum(), x)
    got = torch.func.grad(lambda z: model(z).sum())(x.detach())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    params = list(model.parameters())
    fn = torch.compile(lambda z: torch.autograd.grad((model(z) ** 2).mean(), params), fullgraph=False)
    ref = torch.autograd.grad((_plain(model, x.detach()) ** 2).mean(), params)
    for g, w in zip(fn(x.detach()), ref):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_autocast_keeps_blas_path():
    # under autocast F.linear runs in bfloat16; the oneDNN float32 path must not bypass that
    torch.manual_seed(0)
    model = MLPEnergy(Continuous(32), hidden=(64, 64))  # every layer but the last is wide
    x = torch.randn(4096, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = model(x)
        ref = _plain(model, x)
    assert e.dtype == torch.bfloat16
    assert torch.equal(e, ref)  # every product in bfloat16, as F.linear does under autocast


@needs_onednn
def test_compiled_no_grad_products_run_the_opaque_onednn_operator():
    """Inside torch.compile a no-grad product is one call of ``ebmflow::onednn_linear`` (a
    plain operator, registered once per process), equal to F.linear to float32 rounding."""
    assert _gemm._opaque is torch.ops.ebmflow.onednn_linear
    assert _gemm._register_opaque() is _gemm._opaque  # a second registration finds the first
    torch.manual_seed(0)
    x, w, b = torch.randn(300, 64), torch.randn(128, 64), torch.randn(128)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        got = torch.compile(lambda z: _gemm.linear(z, w, b), backend=backend)(x)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.ebmflow.onednn_linear in targets
    torch.testing.assert_close(_gemm._opaque(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert _gemm._opaque(x, w, None).shape == (300, 128)
