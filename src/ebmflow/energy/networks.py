"""Neural energies: ``MLPEnergy`` for any space and ``ConvEnergy`` for images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from ..spaces import Binary, Categorical, Continuous, Space
from . import _gemm as gemm
from .base import EnergyModel

__all__ = ["MLPEnergy", "ConvEnergy", "make_activation", "mlp_energy_and_grad"]

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "elu": nn.ELU,
                "gelu": nn.GELU, "tanh": nn.Tanh, "softplus": nn.Softplus,
                "leaky_relu": lambda: nn.LeakyReLU(0.2)}


def make_activation(name: str) -> nn.Module:
    """An activation module by name: silu (default), relu, elu, gelu, tanh, softplus, leaky_relu."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


_aten = torch.ops.aten

# d act(a) / da applied to an upstream gradient g, given the pre-activation a and the output h
# (the fused backward kernels autograd itself uses)
_BACKWARD: dict[type, Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]] = {
    nn.SiLU: lambda m, g, a, h: _aten.silu_backward(g, a),
    nn.ReLU: lambda m, g, a, h: _aten.threshold_backward(g, h, 0),
    nn.Tanh: lambda m, g, a, h: _aten.tanh_backward(g, h),
    nn.Softplus: lambda m, g, a, h: _aten.softplus_backward(g, a, m.beta, m.threshold),
    nn.ELU: lambda m, g, a, h: _aten.elu_backward(g, m.alpha, 1, 1, False, a),
    nn.GELU: lambda m, g, a, h: _aten.gelu_backward(g, a, approximate=m.approximate),
    nn.LeakyReLU: lambda m, g, a, h: _aten.leaky_relu_backward(g, a, m.negative_slope, False),
}


def _mlp_plan(net: nn.Sequential) -> list[tuple[nn.Linear, nn.Module | None]] | None:
    """(Linear, activation) pairs of a plain Linear/activation stack ending in Linear(., 1);
    None for any other structure (or one with hooks), which then uses autograd."""
    mods = list(net)
    if not mods or len(mods) % 2 != 1 or net._forward_hooks or net._forward_pre_hooks:
        return None
    plan: list[tuple[nn.Linear, nn.Module | None]] = []
    for i in range(0, len(mods), 2):
        lin = mods[i]
        act = mods[i + 1] if i + 1 < len(mods) else None
        if type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks:
            return None
        if act is not None and (type(act) not in _BACKWARD or act._forward_hooks
                                or act._forward_pre_hooks):
            return None
        plan.append((lin, act))
    return plan if plan[-1][0].out_features == 1 else None


def mlp_energy_and_grad(net: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor] | None:
    r"""$E$ = ``net(x).squeeze(-1)`` and $\partial E / \partial x$ for a Linear/activation
    stack, by a hand-written backward pass (no autograd graph is recorded):

    $$
    \begin{aligned}
    a_l &= h_{l-1} W_l^\top + b_l, & h_l &= \operatorname{act}(a_l), &
    E &= h_L w^\top + c, \\
    g_L &= \operatorname{act}'(a_L) \odot w, &
    g_{l-1} &= \operatorname{act}'(a_{l-1}) \odot (g_l W_l), &
    \frac{\partial E}{\partial x} &= g_1 W_1.
    \end{aligned}
    $$

    ``x`` is ``(B, n_in)``. Same math as autograd's backward (fused activation backward ops,
    one matrix product per layer), without the graph bookkeeping; medium and large float32
    matrix products on CPU run on oneDNN (``energy/_gemm.py``: about twice as fast as the BLAS
    behind ``F.linear`` on the CPUs measured), so there the result agrees with autograd to
    float32 rounding rather than bit for bit. Inside a compiled graph, SiLU layers keep
    $s = \sigma(a)$ from the forward pass and use $\mathrm{silu}'(a) = s (1 + a (1 - s))$
    (one exponential per layer instead of two). Returns None when ``net`` is not such a stack.
    """
    plan = _mlp_plan(net)
    if plan is None:
        return None
    # inside a compiled graph, SiLU keeps its sigmoid for the backward: one exp per layer
    # instead of two (eager, the fused silu / silu_backward kernels are faster)
    keep_sigmoid = torch.compiler.is_compiling()
    with torch.no_grad():
        h = x
        saved: list[tuple[Tensor, Tensor]] = []
        for lin, act in plan:
            a = gemm.linear(h, lin.weight, lin.bias)
            if act is None:
                h = a
            elif keep_sigmoid and type(act) is nn.SiLU:
                s = torch.sigmoid(a)
                h = a * s
                saved.append((a, s))
            else:
                h = act(a)
                saved.append((a, h))
        e = h.squeeze(-1)
        g = plan[-1][0].weight.expand(x.shape[0], -1)  # dE/dh_L, (B, H_L)
        for (lin, act), (a, hl) in zip(reversed(plan[:-1]), reversed(saved)):
            if keep_sigmoid and type(act) is nn.SiLU:  # hl is sigmoid(a): silu' = s (1 + a (1 - s))
                g = g * (hl * (1 + a * (1 - hl)))
            else:
                g = _BACKWARD[type(act)](act, g, a, hl)
            g = gemm.linear(g, lin.weight.t())  # g W
    return e, g


class MLPEnergy(EnergyModel):
    r"""Multi-layer perceptron energy $E(x) = \operatorname{MLP}(\operatorname{flatten}(x))$,
    a scalar per state.

    * ``Continuous(shape)``: input is $x$ flattened to ``(B, prod(shape))``.
    * ``Binary(D)``: input is the float bits ``(B, D)``; gradient samplers differentiate
      through it directly.
    * ``Categorical(D, K)``: input is the one-hot ``(B, D, K)`` flattened to ``(B, D*K)``;
      long indices are one-hot encoded first.

    Args:
        space: the state space.
        hidden: widths of the hidden layers (default three of 256).
        activation: name of the activation (default "silu", smooth so gradients are useful).
    """

    def __init__(self, space: Space, hidden: Sequence[int] = (256, 256, 256),
                 activation: str = "silu"):
        super().__init__(space)
        if isinstance(space, Categorical):
            in_dim = space.num_dims * space.num_classes
        elif isinstance(space, (Binary, Continuous)):
            in_dim = space.dim
        else:
            raise ValueError(f"MLPEnergy does not support space {space!r}")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be positive, got {hidden}")
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def energy(self, x: Tensor) -> Tensor:
        if isinstance(self.space, Categorical):
            x = self.space.one_hot(x, dtype=self.net[0].weight.dtype)
        if x.dim() != 2:
            x = x.flatten(1)
        if x.dtype == torch.float32 and x.device.type == "cpu":
            plan = _mlp_plan(self.net)  # the faster CPU GEMM (with or without autograd)
            if plan is not None:
                h = x
                for lin, act in plan:
                    h = gemm.linear(h, lin.weight, lin.bias)
                    if act is not None:
                        h = act(h)
                return h.squeeze(-1)
        return self.net(x).squeeze(-1)

    def energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""$(E(x), \partial E / \partial x)$, detached, by a hand-written backward pass through
        the MLP (``mlp_energy_and_grad``): the same math as autograd, without recording a graph,
        which is most of the cost of a sampler step for small and medium networks. Falls back to
        autograd for subclasses that override ``energy``, modified networks, autocast and
        non-float input. Categorical states must be one-hot ``(B, D, K)``.
        """
        if (type(self).energy is not MLPEnergy.energy or not isinstance(x, Tensor)
                or not x.is_floating_point() or x.dim() < 2
                or torch.is_autocast_enabled(x.device.type)):
            return super().energy_and_grad(x)
        try:
            out = mlp_energy_and_grad(self.net, x if x.dim() == 2 else x.flatten(1))
        except RuntimeError:
            return super().energy_and_grad(x)  # the checked path names shape / device / dtype
        if out is None:
            return super().energy_and_grad(x)
        e, g = out
        return e, g.view_as(x)


class ConvEnergy(EnergyModel):
    r"""Convolutional energy for images ``(B, C, H, W)``.

    Blocks of (3x3 conv, activation, 3x3 stride-2 conv, activation), then global mean
    pooling and a linear head: $E(x) = w^\top \operatorname{mean}_{h,w} \text{features}(x) + b$.

    Args:
        space: ``Continuous((C, H, W))`` (or ``Binary(C*H*W)`` with ``image_shape``).
        channels: channels of each block (default (32, 64, 128)).
        activation: default "silu".
        image_shape: ``(C, H, W)`` used to reshape flat binary states.
    """

    def __init__(self, space: Space, channels: Sequence[int] = (32, 64, 128),
                 activation: str = "silu", image_shape: tuple[int, int, int] | None = None):
        super().__init__(space)
        if image_shape is None:
            if not isinstance(space, Continuous) or len(space.shape) != 3:
                raise ValueError(
                    f"ConvEnergy needs image states (B, C, H, W): use Continuous((C, H, W)) "
                    f"or pass image_shape for flat binary states; got {space!r}"
                )
            image_shape = space.shape  # type: ignore[assignment]
        elif isinstance(space, Categorical) or image_shape[0] * image_shape[1] * image_shape[2] != space.dim:
            raise ValueError(f"image_shape {image_shape} does not match {space!r}")
        self.image_shape = tuple(image_shape)
        blocks: list[nn.Module] = []
        c_in = self.image_shape[0]
        for c in channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), make_activation(activation),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), make_activation(activation)]
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, 1)

    def energy(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            c, h, w = self.image_shape
            x = rearrange(x, "b (c h w) -> b c h w", c=c, h=h, w=w)
        feats = self.features(x).mean(dim=(2, 3))
        return self.head(feats).squeeze(-1)
