"""EBM objectives behind one interface: contrastive divergence, energy discrepancy, score matching."""

from .base import EBMLoss, LossOutput
from .contrastive_divergence import ContrastiveDivergence
from .energy_discrepancy import EnergyDiscrepancy
from .perturbations import (
    BernoulliPerturbation,
    CategoricalPerturbation,
    GaussianPerturbation,
    GridPerturbation,
    Perturbation,
)
from .score_matching import DenoisingScoreMatching

__all__ = ["EBMLoss", "LossOutput", "ContrastiveDivergence"]
__all__ += [
    "EnergyDiscrepancy",
    "Perturbation",
    "GaussianPerturbation",
    "BernoulliPerturbation",
    "GridPerturbation",
    "CategoricalPerturbation",
    "DenoisingScoreMatching",
]
