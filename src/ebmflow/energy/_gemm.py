r"""Matrix products of the MLP fast paths on the faster CPU GEMM.

``linear(x, w, b)`` computes $x W^\top + b$ like ``torch.nn.functional.linear``. On CPU float32
tensors of medium and large size it calls oneDNN's matrix product (the kernel inductor uses
for linear layers) instead of the BLAS library behind ``F.linear``: on the AMD EPYC CPU this
library was measured on, oneDNN took 144-150 microseconds for a 256 x 256 x 256 product on
one thread (contiguous weight or its transposed view) against 311 for MKL, and 2.1-2.3x
less for the shapes (128, 784, 256) and (4096, 256, 256) (``benchmarks/gemm.py``; tiny
products, e.g. an input of 2 features or an output of 1, stay on BLAS, which is faster
there). Results agree to float32 rounding (a different summation
order), not bit for bit. With autograd (training), ``linear`` is an ``autograd.Function``
whose backward is written with the same products, so it is differentiable twice (score
matching, gradient penalties):

$$
\frac{\partial L}{\partial x} = G W, \qquad \frac{\partial L}{\partial W} = G^\top x,
\qquad \frac{\partial L}{\partial b} = \textstyle\sum_i G_i,
$$

with $G = \partial L / \partial (x W^\top + b)$; $G W$ is again a product on oneDNN.

Narrow outputs (2 to 8 columns from at least 16 inputs, e.g. the input gradient of an MLP on
2-D data, $G W_1$ with $W_1$ of shape (H, 2)) are computed as $(W x^\top)^\top$: MKL's
product with few output columns is slow on this CPU (776 against 120 microseconds for
(4096, 256) x (256, 2), 50 against 10 for (256, 256) x (256, 2); ``benchmarks/bounds.py``).
The result is the transposed view of a row-major $(n, B)$ matrix, i.e. column-major $(B, n)$.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear"]

_MIN_WIDTH = 16  # both matrix dimensions of the weight at least this
_NARROW_MAX = 8  # outputs of 2.._NARROW_MAX columns (from >= _MIN_WIDTH inputs): (W x^T)^T
_MIN_WORK = 1 << 18  # rows x weight entries (multiply-adds) at least this
# with autograd the forward product, G W and G^T x (BLAS) together gain less, and the custom
# function costs a fixed overhead: measured on one thread for a 128 x 128 layer, forward +
# backward took 0.68x BLAS's speed at 128 rows, 0.90x at 256, 1.15x at 640, 1.38x at 4096
_MIN_WORK_AUTOGRAD = 1 << 23


def _onednn_linear_available() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return op is not None and torch.backends.mkldnn.is_available()


_ONEDNN = _onednn_linear_available()


_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if _ONEDNN else None


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _LINEAR_POINTWISE(x, weight, bias, "none", [], "")


def _fake_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def _define_op(name: str, kernel: Any, fake: Any) -> Any:
    """``torch.ops.ebmflow.<name>(Tensor x, Tensor weight, Tensor? bias) -> Tensor``: an
    operator that torch.compile keeps opaque, with ``kernel`` on CPU and ``fake`` giving the
    output's shape and strides; None where this torch cannot define one.

    Defined with ``torch.library.Library`` and a CPU kernel rather than
    ``torch.library.custom_op``, whose Python autograd and dispatch wrappers cost more per
    call (``benchmarks/bounds.py``: 93 against 86 microseconds for a 128 x 256 x 256
    product, the direct oneDNN call 82); compiled samplers call these at every step."""
    if not hasattr(torch.library, "register_fake"):
        return None
    try:  # defined once per process (a re-imported module finds it)
        return getattr(torch.ops.ebmflow, name)
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("ebmflow", "FRAGMENT")
    lib.define(f"{name}(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    lib.impl(name, kernel, "CPU")
    torch.library.register_fake(f"ebmflow::{name}", lib=lib)(fake)
    _LIBRARIES.append(lib)  # the registration lasts as long as its Library object
    return getattr(torch.ops.ebmflow, name)


def _register_opaque() -> Any:
    """``ebmflow::onednn_linear``: the oneDNN product as an operator that torch.compile keeps
    opaque (inductor's own lowering of the oneDNN linear expects prepacked weights). Eager
    calls skip it."""
    if not _ONEDNN:
        return None
    return _define_op("onednn_linear", lambda x, w, b: _onednn(x.contiguous(), w, b),
                      _fake_linear)


def _narrow(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    r"""$x W^\top + b$ as $(W x^\top + b)^\top$ (a column-major result). The small weight is
    made contiguous: MKL took 2.4-3.0x longer with its transposed view (bounds.py)."""
    xt, w = x.t(), weight.contiguous()
    out = torch.mm(w, xt) if bias is None else torch.addmm(bias.unsqueeze(1), w, xt)
    return out.t()


def _fake_narrow(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((weight.shape[0], x.shape[0])).t()


_LIBRARIES: list = []
_opaque: Any = _register_opaque()
# inside compiled graphs: inductor lays the contiguous copy of the weight out like its view
_narrow_op: Any = _define_op("narrow_linear", _narrow, _fake_narrow)


class _Linear(torch.autograd.Function):
    """$x W^\top + b$ on oneDNN with a backward of oneDNN / BLAS products (differentiable)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if _opaque is not None:  # also what torch.compile and torch.func see
            return _opaque(x, weight, bias)
        return _onednn(x.contiguous(), weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        gx = linear(grad, weight.t()) if ctx.needs_input_grad[0] else None  # G W
        gw = grad.t().mm(x) if ctx.needs_input_grad[1] else None  # G^T x
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _records(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether autograd records this product."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""$x W^\top + b$ for ``x`` ``(B, n_in)``, ``weight`` ``(n_out, n_in)`` (a transposed view
    is fine); differentiable (twice) when autograd records. Outputs of 2 to 8 columns come back
    column-major (``_narrow``)."""
    if (x.device.type == "cpu" and x.dim() == 2 and weight.dim() == 2
            and 2 <= weight.shape[0] <= _NARROW_MAX and weight.shape[1] >= _MIN_WIDTH
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu")):
        if _narrow_op is not None and torch.compiler.is_compiling() and not _records(x, weight, bias):
            return _narrow_op(x, weight, bias)
        return _narrow(x, weight, bias)
    if (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.dim() == 2 and weight.dim() == 2
            and min(weight.shape) >= _MIN_WIDTH and x.shape[0] * weight.numel() >= _MIN_WORK
            and not torch.is_autocast_enabled("cpu")):
        if _records(x, weight, bias):
            if x.shape[0] * weight.numel() >= _MIN_WORK_AUTOGRAD:
                return _Linear.apply(x, weight, bias)
            return F.linear(x, weight, bias)
        if not torch.compiler.is_compiling():
            return _onednn(x, weight, bias)
        if _opaque is not None:
            return _opaque(x, weight, bias)
    return F.linear(x, weight, bias)
