"""Normalizing flows and flow-assisted MCMC.

``Flow`` (base, N(0, I) base density), ``RealNVP`` (affine couplings), ``ContinuousFlow``
(continuous normalizing flow solved with torchdiffeq), ``ZukoFlow`` (any zuko flow; zuko is
optional and imported only when one is built) and ``FlowMC`` (local MCMC plus independent
flow proposals, with the flow fitted to the chains).
"""

from .base import Flow, standard_normal_log_prob
from .continuous import ContinuousFlow, TimeMLP, exact_divergence, hutchinson_divergence
from .flowmc import FlowMC, check_exact_log_prob
from .realnvp import AffineCoupling, RealNVP
from .zuko_adapter import ZukoFlow

__all__ = [
    "Flow",
    "RealNVP",
    "ContinuousFlow",
    "FlowMC",
    "ZukoFlow",
    "check_exact_log_prob",
    "AffineCoupling",
    "TimeMLP",
    "exact_divergence",
    "hutchinson_divergence",
    "standard_normal_log_prob",
]
