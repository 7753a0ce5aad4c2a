r"""Annealed importance sampling (Neal 2001) estimate of $\log Z$ for an energy model.

The transition kernel is anything with ``run(energy, x, n_steps, generator=)``
(``TransitionKernel``): metrics imports no sampler. The path energy is an ``EnergyModel``
(so that every sampler accepts it); this is the one import of ``ebmflow.energy`` in metrics,
and the reason ``ebmflow.metrics`` imports this module only on first access.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..energy.base import EnergyModel
from ._checks import check_positive_int
from .ess import effective_sample_size

__all__ = ["ais_log_partition", "GeometricPathEnergy", "annealing_schedule", "SCHEDULES",
           "TransitionKernel"]


@runtime_checkable
class TransitionKernel(Protocol):
    """What AIS needs of a sampler: ``run`` leaves the target of ``energy`` invariant
    (every ``ebmflow.samplers.MCMCSampler`` is one). An optional ``stats`` dict of 0-d
    tensors (e.g. ``accept_rate``) is averaged over the temperatures."""

    def run(self, energy: Any, x: Tensor, n_steps: int, generator: Any = None) -> Tensor: ...

SCHEDULES = ("sigmoid", "linear")


class GeometricPathEnergy(EnergyModel):
    r"""Intermediate energy of the geometric path from a normalised base to a target:

    $$E_b(x) = (1 - b)\, E_{\text{base}}(x) + b\, E(x), \qquad
    E_{\text{base}}(x) = -\log p_{\text{base}}(x),$$

    so $p_0$ = base exactly and $p_1 \propto e^{-E}$. ``beta`` lives in a 0-d buffer (set it with
    ``path.beta = b``): a sampler's recorded CUDA graph or compiled block reads the current
    value at every temperature instead of baking the first one in.
    """

    def __init__(self, energy: EnergyModel, base: EnergyModel, beta: float = 0.0):
        super().__init__(energy.space)
        self.target = energy
        self.base = base
        ref = energy.reference_tensor()
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else None
        self.register_buffer("beta_t", torch.tensor(float(beta), dtype=dtype, device=device))

    @property
    def beta(self) -> float:
        """The inverse temperature $b$ (a host read of the buffer)."""
        return float(self.beta_t)

    @beta.setter
    def beta(self, value: float) -> None:
        self.beta_t.fill_(float(value))

    def energy(self, x: Tensor) -> Tensor:
        b = self.beta_t
        return (1.0 - b) * (-self.base.log_prob(x)) + b * self.target(x)


def annealing_schedule(
    n_temps: int,
    schedule: str = "sigmoid",
    sharpness: float = 4.0,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Inverse temperatures $0 = b_0 < b_1 < \dots < b_T = 1$, float64 ``(n_temps + 1,)``.

    ``"linear"``: $b_t = t / T$. ``"sigmoid"`` (Grosse et al. 2013):
    $c_t = \sigma\big(s (2 t / T - 1)\big)$ with sharpness $s$,
    $b_t = (c_t - c_0) / (c_T - c_0)$: more steps near both ends.
    """
    check_positive_int(n_temps, "n_temps")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    t = torch.linspace(0.0, 1.0, n_temps + 1, dtype=torch.float64, device=device)
    if schedule == "linear":
        return t
    c = torch.sigmoid(sharpness * (2.0 * t - 1.0))
    b = (c - c[0]) / (c[-1] - c[0])
    b[0], b[-1] = 0.0, 1.0
    return b


@torch.no_grad()
def ais_log_partition(
    energy: EnergyModel,
    base: EnergyModel,
    sampler: TransitionKernel,
    n_particles: int,
    n_temps: int,
    generator: torch.Generator | None = None,
    schedule: str = "sigmoid",
    mcmc_steps: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Estimate $\log Z = \log \int e^{-E(x)}\, \mathrm{d}x$ (a sum on discrete spaces) of
    ``energy`` by annealed importance sampling.

    Path: $E_b = (1 - b) E_{\text{base}} + b E$ with $E_{\text{base}} = -\log p_{\text{base}}$
    (normalised, $\log Z_{\text{base}} = 0$) and $0 = b_0 < \dots < b_T = 1$
    (``annealing_schedule``). With $x_0 \sim$ base exactly,

    $$\log w \mathrel{+}= -(b_t - b_{t-1}) \big(E(x_{t-1}) - E_{\text{base}}(x_{t-1})\big),
    \qquad x_t = \texttt{sampler.run}(E_{b_t}, x_{t-1}, \texttt{mcmc\_steps})$$

    for $t = 1, \dots, T - 1$, and $\log \hat Z = \log \operatorname{mean}_i e^{\log w_i}$.
    $\hat Z$ is unbiased for $Z$, so $\log \hat Z$ is biased low by about
    $\operatorname{var}(w / \bar w) / (2 n)$; ``stats["log_z_std_err"]`` estimates its error.

    Args:
        energy: target ``EnergyModel`` E (unnormalised).
        base: ``EnergyModel`` of the same space with exact ``sample(n, generator=)`` and
            normalised ``log_prob`` (e.g. a wide one-component ``GaussianMixtureEnergy``, or
            ``BernoulliBaseEnergy``).
        sampler: any ``TransitionKernel`` (every ``MCMCSampler`` is one); it is called as
            ``sampler.run(E_b, x, n_steps=mcmc_steps, generator=generator)`` on a
            ``GeometricPathEnergy`` and must leave $p_b$ invariant (use an exact-MH kernel:
            MALA, HMC, Gibbs, ... — ULA biases the estimate).
        n_particles: number of independent AIS chains (>= 1).
        n_temps: number of annealing steps T (>= 1).
        generator: random generator for the base samples and the sampler.
        schedule: "sigmoid" (default) or "linear".
        mcmc_steps: MCMC transitions per temperature (default 1).

    Returns:
        ``(log_z, stats)``: 0-d float64 estimate and a dict of tensors: ``log_weights`` (n,),
        ``ess`` (Kish ESS of the final weights), ``ess_fraction`` (ESS / n),
        ``log_weight_var`` (variance of the log-weights), ``log_z_std_err`` (delta-method
        standard error $\sqrt{\operatorname{var}(w / \bar w) / n}$), and the time-average of
        each 0-d stat the sampler reported (e.g. ``accept_rate``).
    """
    if not isinstance(energy, EnergyModel) or not isinstance(base, EnergyModel):
        raise ValueError("energy and base must be ebmflow EnergyModel instances")
    if base.space != energy.space:
        raise ValueError(
            f"base lives on {base.space!r} but energy on {energy.space!r}; use a base of the "
            f"same space"
        )
    if not hasattr(base, "sample"):
        raise ValueError(
            f"base ({type(base).__name__}) has no exact sample(n, generator=); use e.g. "
            f"GaussianMixtureEnergy or BernoulliBaseEnergy"
        )
    if not isinstance(sampler, TransitionKernel):
        raise ValueError(
            f"sampler must have run(energy, x, n_steps, generator=) (an MCMCSampler or any "
            f"TransitionKernel), got {type(sampler).__name__}"
        )
    check_positive_int(n_particles, "n_particles")
    check_positive_int(mcmc_steps, "mcmc_steps")
    path = GeometricPathEnergy(energy, base)
    # the schedule rounded to the path's precision: the weights use the very temperatures
    # the transitions keep invariant
    betas = annealing_schedule(n_temps, schedule).to(path.beta_t.dtype).double().tolist()

    x = base.sample(n_particles, generator=generator)
    log_w = torch.zeros(n_particles, dtype=torch.float64, device=x.device)
    acc: dict[str, Tensor] = {}
    for t in range(1, len(betas)):
        log_w = log_w - (betas[t] - betas[t - 1]) * (energy(x) + base.log_prob(x)).double()
        if t == len(betas) - 1:
            break  # the last transition would not change the weights
        path.beta = betas[t]
        x = sampler.run(path, x, n_steps=mcmc_steps, generator=generator)
        for key, value in getattr(sampler, "stats", {}).items():
            if value.dim() == 0 and key != "nonfinite":
                acc[key] = acc.get(key, 0.0) + value.double()
    if bool(torch.isnan(log_w).any()):
        raise ValueError("AIS log-weights contain NaN: the energy or the base returned NaN")
    log_z = torch.logsumexp(log_w, 0) - math.log(n_particles)
    w = torch.exp(log_w - log_w.max())
    w = w / w.mean()
    n_moves = max(len(betas) - 2, 1)
    stats = {
        "log_weights": log_w,
        "ess": effective_sample_size(log_w),
        "ess_fraction": effective_sample_size(log_w, normalized=True),
        "log_weight_var": log_w.var(unbiased=True) if n_particles > 1 else torch.zeros_like(log_z),
        "log_z_std_err": torch.sqrt(w.var(unbiased=True) / n_particles)
        if n_particles > 1
        else torch.full_like(log_z, float("inf")),
        **{k: v / n_moves for k, v in acc.items()},
    }
    return log_z, stats
