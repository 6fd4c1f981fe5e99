"""pyroflows: modern normalizing flows for Pyro.

Flow layers are Pyro ``TransformModule``s (:mod:`pyroflows.transforms`); builders assemble them into flows
usable as ``AutoNormalizingFlow`` guides (``partial(pyroflows.realnvp, num_layers=8)``).
"""

from . import data, logdet, nn, train, transforms
from .builders import glow, planar_flow, realnvp, residual_flow
from .density import FlowDensity
from .transforms import Compose, FlowTransform, Inverse, enable_validation, inverse, is_validation_enabled

__version__ = "0.1.0"

__all__ = [
    "Compose",
    "FlowDensity",
    "FlowTransform",
    "Inverse",
    "data",
    "enable_validation",
    "glow",
    "inverse",
    "is_validation_enabled",
    "logdet",
    "nn",
    "planar_flow",
    "realnvp",
    "residual_flow",
    "train",
    "transforms",
]
