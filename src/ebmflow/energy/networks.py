"""Neural energies: ``MLPEnergy`` for any space and ``ConvEnergy`` for images."""

from __future__ import annotations

from collections.abc import Sequence

from einops import rearrange
from torch import Tensor, nn

from ..spaces import Binary, Categorical, Continuous, Space
from .base import EnergyModel

__all__ = ["MLPEnergy", "ConvEnergy", "make_activation"]

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


class MLPEnergy(EnergyModel):
    """Multi-layer perceptron energy E(x) = MLP(flatten(x)) -> scalar.

    * ``Continuous(shape)``: input is x flattened to ``(B, prod(shape))``.
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
        return self.net(x).squeeze(-1)


class ConvEnergy(EnergyModel):
    """Convolutional energy for images ``(B, C, H, W)``.

    Blocks of (3x3 conv, activation, 3x3 stride-2 conv, activation), then global mean
    pooling and a linear head: E(x) = w^T mean_{h,w} features(x) + b.

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
