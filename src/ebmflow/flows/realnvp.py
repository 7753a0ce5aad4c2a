"""RealNVP: a stack of affine coupling layers with alternating masks (Dinh et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..energy.networks import make_activation
from .base import Flow

__all__ = ["RealNVP", "AffineCoupling"]


# activations applied in place (on the fresh output of the previous linear layer) when no
# autograd graph is recorded
_INPLACE = {nn.SiLU: lambda x: F.silu(x, inplace=True), nn.ReLU: torch.relu_,
            nn.Tanh: torch.tanh_}


def _global_hooks() -> bool:
    """Whether module forward hooks were registered globally (they must then run)."""
    mod = torch.nn.modules.module
    return bool(getattr(mod, "_global_forward_hooks", None)
                or getattr(mod, "_global_forward_pre_hooks", None))


class AffineCoupling(nn.Module):
    """One affine coupling layer with a fixed binary mask m in {0, 1}^D.

    The coordinates with m = 1 pass unchanged and condition the others:

        s, t = net(m * z),   s <- b * tanh(s / b) (bounded log-scale, |s| < b),
        x = m * z + (1 - m) * (z * exp(s) + t),      log|det dx/dz| = sum_i (1 - m_i) s_i.

    The inverse is z = m * x + (1 - m) * (x - t) * exp(-s) with the same s, t (computed from
    m * x = m * z). The last linear layer starts at zero, so a new layer is the identity.

    Args:
        mask: float ``(D,)`` with values in {0, 1}.
        hidden: widths of the conditioner MLP.
        activation: activation name (see ``ebmflow.energy.networks.make_activation``).
        scale_bound: b, the bound on |log-scale| (default 3).
    """

    def __init__(self, mask: Tensor, hidden: Sequence[int], activation: str, scale_bound: float):
        super().__init__()
        dim = mask.shape[0]
        self.register_buffer("mask", mask.float())
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation)]
            width = h
        last = nn.Linear(width, 2 * dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        # derived from the mask (not saved): 1 - m, and b * (1 - m) for the bounded log-scale
        self.register_buffer("free", 1.0 - self.mask, persistent=False)
        self.register_buffer("free_bound", torch.empty_like(self.free), persistent=False)
        self.scale_bound = scale_bound

    @property
    def scale_bound(self) -> float:
        """b, the bound on |log-scale| (setting it updates the derived buffer b * (1 - m))."""
        return self._scale_bound

    @scale_bound.setter
    def scale_bound(self, value: float) -> None:
        self._scale_bound = float(value)
        with torch.no_grad():
            self.free_bound.copy_(self._scale_bound * self.free)

    def _conditioner(self, x: Tensor) -> Tensor:
        """``net(x)``; a Linear/activation stack without hooks is run functionally (the same
        kernels without the per-module call overhead, which dominates for small states)."""
        net = self.net
        mods = net._modules.values()
        if (type(net) is not nn.Sequential or _global_hooks() or net._forward_hooks
                or net._forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in mods)):
            return net(x)
        inplace = _INPLACE if not torch.is_grad_enabled() else {}  # no graph: reuse buffers
        for m in mods:
            if type(m) is nn.Linear:
                x = F.linear(x, m.weight, m.bias)
            elif type(m) in inplace:
                x = inplace[type(m)](x)
            else:
                x = m.forward(x)
        return x

    def _shift_and_log_scale(self, x_masked: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._conditioner(x_masked).chunk(2, dim=-1)
        s = torch.tanh(s / self.scale_bound) * self.free_bound
        return s, t * self.free

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._shift_and_log_scale(z * self.mask)
        return torch.addcmul(t, z, torch.exp(s)), s.sum(-1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z = (x - t(m x)) exp(-s(m x)) on the free coordinates; returns (z, -sum s) ``(B,)``."""
        s, t = self._shift_and_log_scale(x * self.mask)
        return (x - t) * torch.exp(-s), -s.sum(-1)


class RealNVP(Flow):
    r"""RealNVP flow x = A(C_L(...C_1(z))), z ~ N(0, I_D): L affine couplings with alternating
    masks (layer l keeps coordinates i with (i + l) even fixed) followed by an elementwise
    affine map A(u) = loc + exp(log_scale) * u.

    log q(x) = log N(z; 0, I) - sum_l sum_i (1 - m_li) s_li - sum_i log_scale_i  (exact).

    Args:
        dim: D.
        n_layers: number of coupling layers L (default 8; even, so every coordinate is
            transformed equally often).
        hidden: conditioner MLP widths (default (64, 64)).
        activation: default "silu".
        scale_bound: bound on each coupling's |log-scale| (default 3).
        loc: initial shift of the output affine map (default 0; with ``scale`` = 1 the flow
            starts as the identity, $q = \mathcal{N}(0, I)$); ``init_from_data`` sets it from
            the data mean.
        scale: initial scale of the output affine map (default 1); ``init_from_data`` sets it
            from the data standard deviation.
    """

    def __init__(
        self,
        dim: int,
        n_layers: int = 8,
        hidden: Sequence[int] = (64, 64),
        activation: str = "silu",
        scale_bound: float = 3.0,
        loc: Tensor | float = 0.0,
        scale: Tensor | float = 1.0,
    ):
        super().__init__(dim)
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        if not scale_bound > 0:
            raise ValueError(f"scale_bound must be positive, got {scale_bound!r}")
        hidden = tuple(int(h) for h in hidden)
        idx = torch.arange(dim)
        self.layers = nn.ModuleList(
            AffineCoupling(((idx + i) % 2 == 0).float(), hidden, activation, scale_bound)
            for i in range(n_layers)
        )
        loc_t = torch.as_tensor(loc, dtype=torch.get_default_dtype()).expand(dim).clone()
        scale_t = torch.as_tensor(scale, dtype=torch.get_default_dtype()).expand(dim).clone()
        if not bool((scale_t > 0).all()):
            raise ValueError(f"scale must be positive, got {scale_t.tolist()}")
        self.loc = nn.Parameter(loc_t)
        self.log_scale = nn.Parameter(scale_t.log())

    @torch.no_grad()
    def init_from_data(self, data: Tensor) -> RealNVP:
        """Set the output affine map to the data's mean and standard deviation (per
        coordinate) so that training starts from a moment-matched Gaussian. Returns self."""
        self._check_input(data, "data")
        self.loc.copy_(data.mean(0))
        self.log_scale.copy_(data.std(0).clamp_min(1e-6).log())
        return self

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        logdet = self.log_scale.sum()  # 0-d; broadcast to (B,) by the first coupling's term
        x = z
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        x = torch.addcmul(self.loc, torch.exp(self.log_scale), x)
        return x, logdet.expand(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = (x - self.loc) * torch.exp(-self.log_scale)
        logdet = -self.log_scale.sum()
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z)
            logdet = logdet + ld
        return z, logdet.expand(x.shape[0])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_layers={len(self.layers)}"
