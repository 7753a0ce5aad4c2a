"""Registry of sampler contract cases: one row per sampler (add yours to SAMPLER_CASES).

Each ``SamplerCase`` names a factory for the sampler, a target energy whose law is known
exactly, an exact sampler of that target and a per-state statistic ``(B, *event) -> (B, S)``.
``tests/test_sampler_base.py`` runs every row through the same checks: signature, shape /
dtype / device preservation, determinism under a seed, and invariance (chains started from
exact samples stay exact: the statistic's mean after ``n_steps`` matches a fresh exact sample
within ``z`` Monte Carlo standard errors). Set ``exact=False`` for biased kernels (ULA): the
tolerance then adds ``bias_tol``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ebmflow.energy import EnergyModel, GaussianMixtureEnergy
from ebmflow.samplers import HMC, MALA, Langevin, MCMCSampler


@dataclass
class SamplerCase:
    id: str
    make_sampler: Callable[[], MCMCSampler]
    make_target: Callable[[], EnergyModel]
    exact_sample: Callable[[EnergyModel, int, torch.Generator], Tensor]
    statistic: Callable[[Tensor], Tensor]
    n_chains: int = 2000
    n_steps: int = 20
    z: float = 5.0
    exact: bool = True
    bias_tol: float = 0.0


def _gaussian_2d() -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 0.5]]))


def _mixture_2d() -> GaussianMixtureEnergy:
    return GaussianMixtureEnergy(
        torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), torch.tensor([0.6, 0.8]), torch.tensor([0.7, 0.3])
    )


def _moments(x: Tensor) -> Tensor:
    """First and second moments per state: (x1, x2, x1^2, x2^2, x1 x2)."""
    x = x.flatten(1)
    return torch.cat([x, x.square(), x[:, :1] * x[:, 1:2]], dim=1)


def _gmm_sample(target: EnergyModel, n: int, gen: torch.Generator) -> Tensor:
    return target.sample(n, generator=gen)  # type: ignore[operator]


SAMPLER_CASES: list[SamplerCase] = [
    SamplerCase("mala-gauss", lambda: MALA(0.3), _gaussian_2d, _gmm_sample, _moments),
    SamplerCase("mala-mixture", lambda: MALA(0.2), _mixture_2d, _gmm_sample, _moments),
    SamplerCase("hmc-gauss", lambda: HMC(0.3, n_leapfrog=4), _gaussian_2d, _gmm_sample, _moments,
                n_steps=8),
    SamplerCase("hmc-mixture", lambda: HMC(0.2, n_leapfrog=4), _mixture_2d, _gmm_sample,
                _moments, n_steps=8),
    # ULA with eta = 0.01 is biased by O(eta): the variance of N(0, s^2) becomes
    # s^2 / (1 - eta / (2 s^2)), +2% for s = 0.5; bias_tol covers it
    SamplerCase("langevin-gauss", lambda: Langevin(0.01), _gaussian_2d, _gmm_sample, _moments,
                exact=False, bias_tol=0.05),
]
