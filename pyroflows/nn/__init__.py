"""Networks that parameterise flow layers: conditioners (and, later, Lipschitz-constrained networks)."""

from .conditioners import MLP

__all__ = ["MLP"]
