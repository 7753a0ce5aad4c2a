"""Denoising score matching (Vincent 2011): the sampler-free baseline energy discrepancy is
compared with."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..energy.base import EnergyModel
from ..samplers.base import Sampler
from ..spaces import Continuous
from .base import EBMLoss, LossOutput

__all__ = ["DenoisingScoreMatching"]


class DenoisingScoreMatching(EBMLoss):
    r"""Denoising score matching for continuous energies.

    The model's score is $s(x) = -\nabla_x E(x)$. Noising $\tilde x = x + \sigma \xi$,
    $\xi \sim \mathcal{N}(0, I)$, has the conditional score
    $\nabla \log q(\tilde x \mid x) = -(\tilde x - x) / \sigma^2 = -\xi / \sigma$, so matching
    $s(\tilde x)$ to it gives

    $$
    L = \frac{1}{2B} \sum_i \big\lVert \nabla_x E(\tilde x_i) - \xi_i / \sigma \big\rVert^2
    $$

    (squared norm summed over all event dims). Its minimiser is the score of the noised data
    density $p_\sigma = p * \mathcal{N}(0, \sigma^2 I)$. The gradient $\nabla_x E$ is taken with
    ``create_graph=True`` so the loss backpropagates into the energy's parameters.

    Args:
        sigma: noise standard deviation $\sigma > 0$, default 0.1.
        check_data: when the values of ``data`` are checked (``"auto"``: every call on CPU,
            once on an accelerator; ``"always"``; ``"never"``); shape and dtype are always
            checked. See ``EBMLoss``.

    Shapes: ``data`` float ``(B, *event)`` of a ``Continuous`` space. Returns
    ``LossOutput(loss, stats)`` with stats ``energy_pos`` (mean E(x~), 0-d, detached).
    """

    requires_sampler = False

    def __init__(self, sigma: float = 0.1, *, check_data: str = "auto"):
        super().__init__(check_data=check_data)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (
            math.isfinite(sigma) and sigma > 0
        ):
            raise ValueError(f"sigma (noise std) must be a positive float, got {sigma!r}; e.g. 0.1")
        self.sigma = float(sigma)

    def forward(
        self,
        energy: EnergyModel,
        data: Tensor,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """DSM loss of ``energy`` on ``data`` ``(B, *event)``; ``sampler`` is ignored."""
        if isinstance(energy, EnergyModel) and not isinstance(energy.space, Continuous):
            raise ValueError(
                f"DenoisingScoreMatching needs a Continuous space (it differentiates with "
                f"respect to x), got {energy.space!r}; use EnergyDiscrepancy with a discrete "
                f"perturbation instead"
            )
        self.check_data(energy, data)
        xi = torch.randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
        x_noisy = (data.detach() + self.sigma * xi).requires_grad_(True)
        with torch.enable_grad():
            e = energy(x_noisy)
            (grad,) = torch.autograd.grad(e.sum(), x_noisy, create_graph=True)
        loss = 0.5 * (grad - xi / self.sigma).pow(2).flatten(1).sum(-1).mean()
        return LossOutput(loss=loss, stats={"energy_pos": e.detach().mean()})

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"
