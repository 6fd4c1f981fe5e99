"""Training density models: :func:`~pyroflows.train.fit` (maximum likelihood, checkpoints, resume, DDP under
``torchrun``), configured by a :class:`~pyroflows.train.FitConfig`, :func:`~pyroflows.train.evaluate` (and
:func:`~pyroflows.train.evaluate_hybrid` for hybrid models, :func:`~pyroflows.train.evaluate_with_error` for a
figure with its standard error), and models
by name (:func:`~pyroflows.train.build_density`) so checkpoints can rebuild them. The run engine underneath
(errors, atomic checkpoints, resume policy, schedule, progress) is :mod:`pyroflows.run`, shared with
:func:`pyroflows.infer.fit`; its errors and checkpoint functions are re-exported here."""

from ..run import (
    CheckpointError,
    CheckpointExistsError,
    OutputError,
    TrainingError,
    atomic_torch_save,
    load_checkpoint,
)
from .checkpoint import load_model_state
from .evaluation import evaluate, evaluate_hybrid, evaluate_with_error
from .loop import FitConfig, FitResult, fit
from .models import FLOWS, SIZE_DEFAULTS, build_density, default_options, density_from_spec, load_density

__all__ = [
    "FLOWS",
    "CheckpointError",
    "CheckpointExistsError",
    "FitConfig",
    "FitResult",
    "OutputError",
    "SIZE_DEFAULTS",
    "TrainingError",
    "atomic_torch_save",
    "build_density",
    "default_options",
    "density_from_spec",
    "evaluate",
    "evaluate_hybrid",
    "evaluate_with_error",
    "fit",
    "load_checkpoint",
    "load_density",
    "load_model_state",
]
