"""Discrete flows on {0..S-1}^D: mixture paths, velocity models, velocity regression,
importance-weighted (data-free) training, a CTMC solver and ``DiscreteFlowSampler``.

Vocabulary as in Meta's flow_matching library: path (``MixturePath``), scheduler
(``LinearSchedule``, ``PolynomialSchedule``), solver (``CTMCSolver``) and losses
(``velocity_regression_loss``, ``posterior_loss``) are separate objects. The three EBM
training recipes of the samplingEBMs report are ``FlowNegatives``, ``BootstrapFlow`` and
``BackAndForth`` (samplers to pair with ``ContrastiveDivergence``).
"""

from .losses import posterior_loss, velocity_regression_loss
from .models import MLPVelocity, VelocityModel
from .path import MixturePath
from .proposals import FactorizedProposal
from .recipes import BackAndForth, BootstrapFlow, FlowNegatives, ebm_step
from .sampler import DiscreteFlowSampler, from_tokens, to_tokens
from .schedules import LinearSchedule, PolynomialSchedule, Schedule
from .solver import CTMCSolver, SolverOutput
from .weights import LowESSWarning, effective_sample_size, importance_weights

__all__ = [
    "MixturePath",
    "Schedule",
    "LinearSchedule",
    "PolynomialSchedule",
    "VelocityModel",
    "MLPVelocity",
    "velocity_regression_loss",
    "posterior_loss",
    "CTMCSolver",
    "SolverOutput",
    "DiscreteFlowSampler",
    "FactorizedProposal",
    "LowESSWarning",
    "importance_weights",
    "effective_sample_size",
    "to_tokens",
    "FlowNegatives",
    "BootstrapFlow",
    "BackAndForth",
    "ebm_step",
    "from_tokens",
]
