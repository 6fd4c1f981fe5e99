"""Networks that parameterise flow layers: conditioners and Lipschitz-constrained networks."""

from .conditioners import MLP, ConvNet, set_compute_dtype
from .lipschitz import (
    LearnableNorm,
    LipSwish,
    SpectralConv2d,
    SpectralLinear,
    frozen_power_iteration,
    has_closed_form_jacobian,
    input_gradients_only,
    lipschitz_cnn,
    lipschitz_mlp,
    mlp_value_and_jacobian,
)
from .made import MADE

__all__ = [
    "ConvNet",
    "LearnableNorm",
    "LipSwish",
    "MADE",
    "MLP",
    "SpectralConv2d",
    "SpectralLinear",
    "frozen_power_iteration",
    "has_closed_form_jacobian",
    "input_gradients_only",
    "lipschitz_cnn",
    "lipschitz_mlp",
    "mlp_value_and_jacobian",
    "set_compute_dtype",
]
