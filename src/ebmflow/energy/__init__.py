r"""Energy models $E(x)$, density $p(x) \propto \exp(-E(x))$: the base class, neural energies
and exact analytic targets for tests and benchmarks."""

from .base import EnergyModel, SumEnergy
from .bernoulli import BernoulliBaseEnergy
from .gaussian_mixture import GaussianMixtureEnergy
from .ising import IsingEnergy, enumerate_binary, lattice_adjacency
from .networks import ConvEnergy, MLPEnergy
from .tilted import LatentEnergy, TiltedEnergy

__all__ = [
    "EnergyModel",
    "SumEnergy",
    "MLPEnergy",
    "ConvEnergy",
    "GaussianMixtureEnergy",
    "IsingEnergy",
    "BernoulliBaseEnergy",
    "enumerate_binary",
    "lattice_adjacency",
    "TiltedEnergy",
    "LatentEnergy",
]
