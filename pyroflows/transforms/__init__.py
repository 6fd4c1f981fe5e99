"""Flow layers: Pyro ``TransformModule``s that know their own log-det (see :class:`FlowTransform`)."""

from .base import (
    Compose,
    FlowTransform,
    Inverse,
    enable_validation,
    forward_and_log_det,
    inverse,
    inverse_and_log_det,
    is_validation_enabled,
)
from .coupling import AffineCoupling, make_mask
from .normalization import ActNorm
from .permute import Permute
from .planar import Planar

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Compose",
    "FlowTransform",
    "Inverse",
    "Permute",
    "Planar",
    "enable_validation",
    "forward_and_log_det",
    "inverse",
    "inverse_and_log_det",
    "is_validation_enabled",
    "make_mask",
]
