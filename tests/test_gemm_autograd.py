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
    # compiled blocks run without inductor's size asserts: the fake output's strides must be
    # the real ones, also for a transposed weight (the hand-written backward's G W)
    for weight in (w, torch.randn(64, 128).t()):
        real = _gemm._opaque(x, weight, None)
        fake = _gemm._fake_linear(x, weight, None)
        assert (real.shape, real.stride()) == (fake.shape, fake.stride())


@pytest.mark.parametrize("n_out", [2, 5, 8])
def test_narrow_outputs_equal_f_linear_and_come_back_column_major(n_out):
    """2-8 output columns from >= 16 inputs: $(W x^\\top + b)^\\top$, equal to F.linear (float32
    rounding), column-major, with the weight given as a transposed view too (the MLP's input
    gradient $G W_1$ passes ``W_1.t()``)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(300, 64), torch.randn(n_out, 64), torch.randn(n_out)
    got = _gemm.linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert got.stride() == (1, 300)
    w_view = torch.randn(64, n_out).t()  # (n_out, 64), not contiguous
    torch.testing.assert_close(_gemm.linear(x, w_view), F.linear(x, w_view), rtol=1e-5, atol=1e-5)
    assert _gemm.linear(x[:, :8], torch.randn(4, 8)).is_contiguous()  # narrow inputs: F.linear


def test_narrow_outputs_are_differentiable_twice():
    torch.manual_seed(1)
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_gemm.linear, (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *a: _gemm.linear(*a).pow(2), (x, w, b))


def test_compiled_narrow_products_run_the_opaque_operator():
    """Inside torch.compile (no grad) a narrow product is ``ebmflow::narrow_linear``, whose fake
    output has the strides of the real one (column-major)."""
    torch.manual_seed(0)
    x, w = torch.randn(256, 64), torch.randn(64, 2)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        got = torch.compile(lambda z: _gemm.linear(z, w.t()), backend=backend)(x)
        inductor = torch.compile(lambda z: _gemm.linear(z, w.t()) * 2)(x)
    torch.testing.assert_close(got, x @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inductor, 2 * (x @ w), rtol=1e-5, atol=1e-5)
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.ebmflow.narrow_linear in targets
    real = torch.ops.ebmflow.narrow_linear(x, w.t(), None)
    fake = _gemm._fake_narrow(x, w.t(), None)
    assert (real.shape, real.stride()) == (fake.shape, fake.stride()) == ((256, 2), (1, 256))


def test_energy_and_grad_of_a_narrow_multi_dim_state():
    """States of shape (B, 2, 2) flatten to 4 inputs; the input gradient comes from a narrow
    (column-major) product and still takes the state's shape and values."""
    torch.manual_seed(0)
    model = MLPEnergy(Continuous((2, 2)), hidden=(32, 32))
    x = torch.randn(64, 2, 2)
    e, g = model.energy_and_grad(x)
    xf = x.flatten(1).requires_grad_()
    want, = torch.autograd.grad(_plain(model, xf).sum(), xf)
    torch.testing.assert_close(g, want.view_as(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e, _plain(model, x.flatten(1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["silu", "tanh"])
def test_compiled_hand_written_backward_equals_autograd(activation):
    """Inside a compiled graph SiLU keeps its sigmoid for the backward
    ($\\mathrm{silu}'(a) = s (1 + a (1 - s))$); energies and gradients still equal autograd's."""
    from ebmflow.energy.networks import mlp_energy_and_grad

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLPEnergy(Continuous(2), hidden=(32, 32), activation=activation)
    x = 2 * torch.randn(64, 2)
    e, g = torch.compile(lambda z: mlp_energy_and_grad(model.net, z), backend="eager")(x)
    want, = torch.autograd.grad(_plain(model, x.requires_grad_()).sum(), x)
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e, _plain(model, x.detach()), rtol=1e-5, atol=1e-6)
