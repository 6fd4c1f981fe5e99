"""pyroflows: modern normalizing flows for Pyro.

Flow layers are Pyro ``TransformModule`` subclasses (:mod:`pyroflows.transforms`); builders assemble them into flows
usable as guides (:class:`AutoFlow`, a faster drop-in for Pyro's ``AutoNormalizingFlow``:
``AutoFlow(model, partial(pyroflows.realnvp, num_layers=8))``), fitted with
:func:`pyroflows.infer.fit` and checked with :mod:`pyroflows.diagnostics` (ArviZ, imported on first use).
"""

from . import autoguide, data, elbo, hybrid, infer, latent, logdet, nn, ood, train, transforms
from .autoguide import AutoFlow, AutoFlowMixture, FlowMixture
from .builders import autoregressive_flow, glow, planar_flow, realnvp, residual_flow, spline_flow
from .cif import CIFDensity, cif
from .density import FlowDensity
from .hybrid import HybridDensity
from .transforms import Compose, FlowTransform, Inverse, enable_validation, inverse, is_validation_enabled

__version__ = "0.1.0"

__all__ = [
    "AutoFlow",
    "AutoFlowMixture",
    "CIFDensity",
    "Compose",
    "FlowDensity",
    "FlowMixture",
    "FlowTransform",
    "HybridDensity",
    "Inverse",
    "autoguide",
    "autoregressive_flow",
    "cif",
    "data",
    "diagnostics",
    "elbo",
    "enable_validation",
    "glow",
    "hybrid",
    "infer",
    "inverse",
    "is_validation_enabled",
    "latent",
    "logdet",
    "nn",
    "ood",
    "planar_flow",
    "realnvp",
    "residual_flow",
    "spline_flow",
    "train",
    "transforms",
]


def __getattr__(name: str):
    # diagnostics imports ArviZ (a second or two, and a FutureWarning in 0.23): only when it is used
    if name == "diagnostics":
        import importlib

        return importlib.import_module(".diagnostics", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
