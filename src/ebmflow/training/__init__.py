"""ebmflow.training: the Trainer, its callbacks, EMA, checkpoints and data-parallel helpers.

``Trainer(energy, loss, sampler=None, optimizer=None, ...)`` trains any loss with any sampler
whose states fit the energy's space; see ``Trainer`` for the options.
``load_energy(path)`` gives back the trained (EMA) energy of a checkpoint, ready to sample.
"""

from .callbacks import Callback, EvalCallback, LambdaCallback, PlotCallback, StopOnNonFinite
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .ema import EMA
from .loading import load_energy
from .run_folder import RunExistsError
from .trainer import Trainer, TrainingDiverged

__all__ = [
    "Trainer",
    "TrainingDiverged",
    "Callback",
    "EvalCallback",
    "PlotCallback",
    "StopOnNonFinite",
    "LambdaCallback",
    "EMA",
    "CheckpointError",
    "atomic_save",
    "load_checkpoint",
    "load_energy",
    "RunExistsError",
]
