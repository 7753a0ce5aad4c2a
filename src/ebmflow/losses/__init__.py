"""EBM objectives behind one interface: contrastive divergence, energy discrepancy, score matching."""

from .base import EBMLoss, LossOutput

__all__ = ["EBMLoss", "LossOutput"]
