"""Density models by name, so that a checkpoint can rebuild the model it was written from."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from pyro.distributions.conditional import ConditionalTransform

from ..builders import glow, realnvp, residual_flow
from ..cif import CIFDensity, CIFFlow, cif
from ..density import FlowDensity
from ..hybrid import HybridDensity
from .checkpoint import CheckpointError, load_checkpoint, load_model_state

#: The builders :func:`build_density` knows, by name.
FLOWS = {
    "glow": glow,
    "realnvp": realnvp,
    "residual": residual_flow,
    # continuously indexed flows (pyroflows.cif): a CIFDensity, trained on the ELBO, evaluated by importance weights
    "cif-realnvp": partial(cif, base="realnvp"),
    "cif-residual": partial(cif, base="residual"),
}
# Builder options as checkpoints written before 0.2 name them (glow's steps/hidden_channels, residual's num_blocks).
_RENAMED = {"steps": "num_layers", "hidden_channels": "hidden", "num_blocks": "num_layers"}


# Per flow: (levels, num_layers, hidden) by image size class and device kind. "small" is a longer side of at most 16
# pixels (the embedded 8x8 digits), "large" anything bigger (28x28 MNIST, 32x32 CIFAR-10). Sized so a CPU run
# makes visible progress in minutes (glow 28x28 at 2/8/64: about 0.15 s per step of 64 images on 2 cores) and a
# GPU run uses the device. Levels are capped by what the image size allows (28x28: glow at most 2).
SIZE_DEFAULTS = {
    "glow": {
        ("small", "cpu"): (2, 4, 64),
        ("large", "cpu"): (2, 8, 64),
        ("small", "cuda"): (2, 8, 128),
        ("large", "cuda"): (3, 16, 256),
    },
    "realnvp": {
        ("small", "cpu"): (2, 3, 32),
        ("large", "cpu"): (2, 4, 32),
        ("small", "cuda"): (2, 4, 64),
        ("large", "cuda"): (3, 8, 64),
    },
    "residual": {
        ("small", "cpu"): (2, 2, 32),
        ("large", "cpu"): (2, 2, 32),
        ("small", "cuda"): (2, 4, 64),
        ("large", "cuda"): (3, 4, 128),
    },
    # one scale: a multi-scale factor-out cannot hold indexed layers
    "cif-realnvp": {
        ("small", "cpu"): (1, 4, 32),
        ("large", "cpu"): (1, 4, 32),
        ("small", "cuda"): (1, 6, 64),
        ("large", "cuda"): (1, 8, 64),
    },
    "cif-residual": {
        ("small", "cpu"): (2, 2, 32),
        ("large", "cpu"): (2, 2, 32),
        ("small", "cuda"): (2, 4, 64),
        ("large", "cuda"): (3, 4, 128),
    },
}


def default_options(flow: str, shape: Sequence[int], device="cpu") -> dict:
    """The architecture ``pyroflows fit`` uses when ``--levels`` / ``--num-layers`` / ``--hidden`` are not given:
    sized by the image (longer side at most 16 pixels, or more) and the device (CPU, or CUDA).

    ============  ===========  ============  ============  ==============
    flow          8x8, CPU     28x28, CPU    8x8, GPU      32x32, GPU
    ============  ===========  ============  ============  ==============
    glow          2 / 4 / 64   2 / 8 / 64    2 / 8 / 128   3 / 16 / 256
    realnvp       2 / 3 / 32   2 / 4 / 32    2 / 4 / 64    3 / 8 / 64
    residual      2 / 2 / 32   2 / 2 / 32    2 / 4 / 64    3 / 4 / 128
    cif-realnvp   1 / 4 / 32   1 / 4 / 32    1 / 6 / 64    1 / 8 / 64
    cif-residual  2 / 2 / 32   2 / 2 / 32    2 / 4 / 64    3 / 4 / 128
    ============  ===========  ============  ============  ==============

    (levels / num_layers / hidden; 28x28 on a GPU is as 32x32 with the levels the size allows: glow 2.)

    :param str flow: ``"glow"``, ``"realnvp"``, ``"residual"``, ``"cif-realnvp"`` or ``"cif-residual"``.
    :param shape: the image shape ``(C, H, W)``.
    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``.
    :returns: ``{"levels", "num_layers", "hidden"}``.

    Example::

        >>> from pyroflows.train import default_options
        >>> default_options("glow", (1, 28, 28), "cpu")
        {'levels': 2, 'num_layers': 8, 'hidden': 64}
        >>> default_options("glow", (1, 28, 28), "cuda")  # 28 = 4 x 7: two levels at most
        {'levels': 2, 'num_layers': 16, 'hidden': 256}
    """
    import torch

    from ..builders import _max_levels

    key = str(flow).lower()
    if key not in SIZE_DEFAULTS:
        raise ValueError(f"unknown flow {flow!r}; choose one of {sorted(SIZE_DEFAULTS)}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"default_options: expected an image shape (C, H, W), got {shape}")
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    size = "small" if max(shape[1:]) <= 16 else "large"
    levels, num_layers, hidden = SIZE_DEFAULTS[key][(size, kind)]
    allowed = _max_levels(shape, extra_squeeze=1 if key == "glow" else 0)
    return {"levels": max(1, min(levels, allowed)), "num_layers": num_layers, "hidden": hidden}


def build_density(flow: str, shape: Sequence[int], hybrid: dict | None = None, **options) -> FlowDensity:
    """A :class:`~pyroflows.FlowDensity` on data of ``shape`` with the named builder (a
    :class:`~pyroflows.CIFDensity` for the continuously indexed ``"cif-realnvp"`` and ``"cif-residual"``, built by
    :func:`pyroflows.cif` with that base; a :class:`~pyroflows.HybridDensity` with ``hybrid``).

    The recipe is kept as ``model.spec`` (``{"flow", "shape", "options"}``, and ``"hybrid"`` for a hybrid model)
    and stored in every checkpoint, which is how ``pyroflows sample CHECKPOINT`` rebuilds the model without being
    told the architecture.

    :param str flow: ``"glow"``, ``"realnvp"``, ``"residual"`` (:func:`pyroflows.residual_flow`),
        ``"cif-realnvp"`` or ``"cif-residual"``.
    :param shape: event shape, ``(C, H, W)`` for images or ``(D,)`` for vectors.
    :param dict hybrid: make a :class:`~pyroflows.HybridDensity`: its keyword arguments ``num_classes``, ``lam``
        and optionally ``head`` and ``hidden``.
    :param options: keyword arguments of the builder (e.g. ``levels``, ``num_layers``, ``hidden``).

    Example::

        >>> from pyroflows.train import build_density
        >>> model = build_density("glow", (1, 8, 8), levels=2, num_layers=2, hidden=8)
        >>> model.spec["flow"], model.event_shape
        ('glow', (1, 8, 8))
        >>> build_density("realnvp", (1, 8, 8), hybrid={"num_classes": 10, "lam": 1 / 64}).spec["hybrid"]
        {'num_classes': 10, 'lam': 0.015625}
    """
    key = str(flow).lower()
    if key not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; choose one of {sorted(FLOWS)}")
    from ..transforms._shapes import parse_shape

    shape = parse_shape(tuple(shape) if isinstance(shape, list) else shape, "build_density")
    if any(n is None for n in shape):
        raise ValueError(f"build_density: the data shape must be fully known, got {shape}")
    builder = FLOWS[key]
    try:
        transform = builder(shape if len(shape) > 1 else shape[0], **options)
    except TypeError as e:
        raise ValueError(f"build_density: bad options for {key!r}: {e}") from e
    if hybrid is not None:
        if not isinstance(hybrid, dict):
            raise ValueError(f"build_density: hybrid must be a dict of HybridDensity options, got {hybrid!r}")
        if isinstance(transform, (CIFFlow, ConditionalTransform)):
            raise ValueError(f"build_density: a hybrid model needs an unconditional bijective flow, not {key!r}")
        try:
            model = HybridDensity(transform, shape, **hybrid)
        except TypeError as e:
            raise ValueError(f"build_density: bad hybrid options {hybrid!r}: {e}") from e
    elif isinstance(transform, CIFFlow):
        model = CIFDensity(transform, shape)
    elif isinstance(transform, ConditionalTransform):
        model = FlowDensity(transform, shape, context_shape=(transform.context_dim,))
    else:
        model = FlowDensity(transform, shape)
    model.spec = {"flow": key, "shape": list(shape), "options": dict(options)}
    if hybrid is not None:
        model.spec["hybrid"] = dict(hybrid)
    return model


def density_from_spec(spec: dict) -> FlowDensity:
    """Rebuild the (untrained) model that :func:`build_density` made from ``spec``.

    :param dict spec: ``{"flow", "shape", "options"}``, as in ``model.spec`` and in checkpoints.
    :raises ValueError: for an incomplete spec or unknown flow.

    Example::

        >>> from pyroflows.train import build_density, density_from_spec
        >>> model = build_density("realnvp", (2,), num_layers=2)
        >>> density_from_spec(model.spec).spec == model.spec
        True
    """
    try:
        options = {_RENAMED.get(k, k): v for k, v in spec.get("options", {}).items()}
        return build_density(spec["flow"], spec["shape"], hybrid=spec.get("hybrid"), **options)
    except KeyError as e:
        raise ValueError(f"model spec lacks {e.args[0]!r}: {spec!r}") from None


def load_density(path, ema: bool = False, map_location="cpu") -> FlowDensity:
    """The trained model stored in a checkpoint of :func:`pyroflows.train.fit`, in eval mode.

    :param path: the checkpoint file (``out/checkpoint.pt``).
    :param bool ema: load the exponential moving average of the weights (the run must have used ``ema=``).
    :param map_location: the device to load onto (and to move the model to).
    :raises CheckpointError: missing/corrupted file, no model recipe (a model not built by
        :func:`build_density`), no weights or no EMA weights, or weights that do not fit the recipe.
    :raises ValueError: for an unknown device or one this machine does not have.

    Example::

        >>> import tempfile
        >>> from pyroflows.data import load_digits
        >>> from pyroflows.train import build_density, fit, load_density
        >>> model = build_density("realnvp", (1, 8, 8), levels=1, num_layers=1, hidden=4)
        >>> result = fit(model, load_digits("train"), num_steps=2, out=tempfile.mkdtemp(), device="cpu", progress=False)
        >>> reloaded = load_density(result.checkpoint)
        >>> reloaded.training, reloaded.sample(3).shape
        (False, torch.Size([3, 1, 8, 8]))
    """
    from ..run import check_device

    map_location = check_device("load_density", map_location)
    ckpt = load_checkpoint(path, map_location=map_location)
    for key, kind in (("model", dict), ("spec", (dict, type(None))), ("ema", (dict, type(None)))):
        if key == "model" and key not in ckpt:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks the model weights ('model')")
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"checkpoint {str(path)!r}: {key!r} is a {type(ckpt[key]).__name__}, not a dict")
    if ckpt.get("spec") is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no model recipe: the model was not made by build_density, so rebuild it "
            "yourself and load ckpt['model'] into it"
        )
    try:
        model = density_from_spec(ckpt["spec"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from e
    state = dict(ckpt["model"])
    if ema:
        if ckpt.get("ema") is None:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA weights (the run did not use ema=)")
        prefix = "module."
        state.update(
            {
                k[len(prefix) :]: v
                for k, v in ckpt["ema"].items()
                if k.startswith(prefix) and k[len(prefix) :] in dict(model.named_parameters())
            }
        )
    load_model_state(model, state, f"checkpoint {str(path)!r}")
    return model.to(map_location).eval()


__all__ = ["FLOWS", "SIZE_DEFAULTS", "build_density", "default_options", "density_from_spec", "load_density"]
