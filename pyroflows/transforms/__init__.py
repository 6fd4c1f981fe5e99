"""Flow layers: Pyro ``TransformModule`` subclasses that know their own log-det
(see :class:`~pyroflows.transforms.FlowTransform`)."""

from .autoregressive import AffineAutoregressive
from .base import (
    Compose,
    FlowTransform,
    Inverse,
    forward_and_log_det,
    forward_only,
    inverse,
    inverse_and_log_det,
    inverse_only,
)
from .conditional import (
    ConditionalAffineAutoregressive,
    ConditionalAffineCoupling,
    ConditionalCompose,
    ConditionalLayer,
    ConditionalPlanar,
    ConditionalResidualBlock,
    ConditionalSplineCoupling,
    Conditioned,
)
from .conv1x1 import Invertible1x1Conv
from .coupling import AffineCoupling, make_mask
from .normalization import ActNorm, BatchNorm
from .permute import Permute
from .planar import Planar
from .preprocess import Logit
from .reshape import MultiScale, Squeeze
from .residual import ResidualBlock
from .spline import SplineCoupling, rational_quadratic_spline
from .tails import HeavyTails
from .validation import enable_validation, is_validation_enabled

__all__ = [
    "ActNorm",
    "AffineAutoregressive",
    "AffineCoupling",
    "BatchNorm",
    "Compose",
    "ConditionalAffineAutoregressive",
    "ConditionalAffineCoupling",
    "ConditionalCompose",
    "ConditionalLayer",
    "ConditionalPlanar",
    "ConditionalResidualBlock",
    "ConditionalSplineCoupling",
    "Conditioned",
    "FlowTransform",
    "HeavyTails",
    "Inverse",
    "Invertible1x1Conv",
    "Logit",
    "MultiScale",
    "Permute",
    "Planar",
    "ResidualBlock",
    "SplineCoupling",
    "Squeeze",
    "enable_validation",
    "forward_and_log_det",
    "forward_only",
    "inverse",
    "inverse_and_log_det",
    "inverse_only",
    "is_validation_enabled",
    "make_mask",
    "rational_quadratic_spline",
]
