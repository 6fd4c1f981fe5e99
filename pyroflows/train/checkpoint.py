"""Density checkpoints: what :func:`pyroflows.train.fit` writes, read back by :func:`load_checkpoint`, and
:func:`load_model_state` for the architecture check.

The run-level pieces (atomic writes, reading a checkpoint, RNG states, the errors) live in :mod:`pyroflows.run`,
shared with :func:`pyroflows.infer.fit`; they are re-exported here under their old import paths."""

from __future__ import annotations

import torch

from ..run import (
    FORMAT,
    VERSION,
    CheckpointError,
    CheckpointExistsError,
    atomic_torch_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
)


def load_model_state(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """``model.load_state_dict(state)`` with an error that says the architectures differ, and how.

    :param torch.nn.Module model: the model to load into.
    :param dict state: a ``state_dict``, e.g. ``load_checkpoint(path)["model"]``.
    :param str source: how to name the state's origin in the error message.
    :raises CheckpointError: for missing or unexpected entries or shape mismatches, with examples of each.

    Example::

        >>> from pyroflows.train import build_density, load_model_state
        >>> small = build_density("glow", (1, 8, 8), levels=1, num_layers=1, hidden=4)
        >>> large = build_density("glow", (1, 8, 8), levels=1, num_layers=2, hidden=4)
        >>> load_model_state(small, large.state_dict(), "the large model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        pyroflows.run.CheckpointError: the large model was written for a different architecture: ...
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    # an empty entry is a lazily sized buffer (e.g. SpectralConv2d's power-iteration vectors): the layer sizes it
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and v.numel() > 0 and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing entries (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected entries (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(f"{source} was written for a different architecture: " + "; ".join(parts))
    model.load_state_dict(state)


__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "CheckpointExistsError",
    "atomic_torch_save",
    "load_checkpoint",
    "load_model_state",
    "rng_state",
    "set_rng_state",
]
