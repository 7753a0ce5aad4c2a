"""Normalizing flows and flow-assisted MCMC.

``Flow`` (base, N(0, I) base density), ``RealNVP`` (affine couplings), ``ContinuousFlow``
(continuous normalizing flow solved with torchdiffeq) and ``FlowMC`` (local MCMC plus
independent flow proposals, with the flow fitted to the chains).
"""

from .base import Flow, standard_normal_log_prob
from .continuous import ContinuousFlow, TimeMLP, exact_divergence, hutchinson_divergence
from .flowmc import FlowMC
from .realnvp import AffineCoupling, RealNVP

__all__ = [
    "Flow",
    "RealNVP",
    "ContinuousFlow",
    "FlowMC",
    "AffineCoupling",
    "TimeMLP",
    "exact_divergence",
    "hutchinson_divergence",
    "standard_normal_log_prob",
]
