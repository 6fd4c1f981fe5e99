"""Networks that parameterise flow layers: conditioners (and, later, Lipschitz-constrained networks)."""

from .conditioners import MLP, ConvNet

__all__ = ["ConvNet", "MLP"]
