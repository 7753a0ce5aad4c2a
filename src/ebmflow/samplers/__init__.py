"""MCMC samplers for continuous and discrete states, persistent chains and replay buffers."""

from . import rng
from ._compiled import CompileFallbackWarning
from .base import ChainState, MCMCSampler, NonFiniteError, Sampler
from .hmc import HMC
from .langevin import Langevin
from .mala import MALA
from .replay import PersistentSampler, ReplayBuffer

__all__ = [
    "Sampler",
    "MCMCSampler",
    "ChainState",
    "NonFiniteError",
    "CompileFallbackWarning",
    "rng",
    "Langevin",
    "MALA",
    "HMC",
    "ReplayBuffer",
    "PersistentSampler",
]

from .discrete_langevin import DiscreteLangevin  # noqa: E402
from .gibbs import Gibbs  # noqa: E402
from .gwg import GibbsWithGradients  # noqa: E402

__all__ += ["Gibbs", "GibbsWithGradients", "DiscreteLangevin"]
