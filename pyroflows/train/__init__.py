"""Training density models: :func:`~pyroflows.train.fit` (maximum likelihood, checkpoints, resume, DDP under
``torchrun``), :func:`~pyroflows.train.evaluate`, and models by name (:func:`~pyroflows.train.build_density`) so
checkpoints can rebuild them."""

from .checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, load_model_state
from .evaluation import evaluate
from .loop import FitResult, TrainingError, fit
from .models import FLOWS, build_density, density_from_spec, load_density

__all__ = [
    "FLOWS",
    "CheckpointError",
    "FitResult",
    "TrainingError",
    "atomic_torch_save",
    "build_density",
    "density_from_spec",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_density",
    "load_model_state",
]
