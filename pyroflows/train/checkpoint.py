"""Checkpoints that survive crashes: written to a temporary file in the same directory, flushed to disk, then
renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so a reader sees either the previous
complete checkpoint or the new complete one, never a torn file."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "pyroflows-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupted, not ours, or for another architecture.

    Example::

        >>> from pyroflows.train import CheckpointError, load_density
        >>> try:
        ...     load_density("no/such/checkpoint.pt")
        ... except CheckpointError as e:
        ...     print(e)
        no checkpoint at 'no/such/checkpoint.pt'
    """


def _default_mode(fd: int) -> None:
    """Give a ``mkstemp`` file (mode 0600) the mode a plain ``open`` would (0666 less the umask)."""
    if os.name != "posix":
        return
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically: temp file in the target directory, ``fsync``, ``os.replace``.

    If the process dies at any point, ``path`` still holds its previous content (or does not exist); a
    leftover temporary file (``.<name>.*.tmp``) is harmless and removed when the save fails in-process.

    :param obj: anything ``torch.save`` accepts.
    :param path: the destination file; its directory is created if needed.

    Example::

        >>> import tempfile, os, torch
        >>> d = tempfile.mkdtemp()
        >>> atomic_torch_save({"a": torch.ones(2)}, os.path.join(d, "c.pt"))
        >>> torch.load(os.path.join(d, "c.pt"))["a"]
        tensor([1., 1.])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _default_mode(fd)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    """Python, NumPy, torch CPU and (if present) CUDA generator states, as tensors and plain types only,
    so the checkpoint loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------------ loading
def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu", marker: str = FORMAT
) -> dict:
    """Read a checkpoint written by :func:`pyroflows.train.fit`.

    It is a dict with the model's ``state_dict`` (``"model"``), its recipe (``"spec"``), the optimiser, schedule
    and EMA states, the ``"step"``, the loss history, the configuration and the RNG states. Loaded with
    ``torch.load(weights_only=True)``: no code in the file is executed.

    :param path: the checkpoint file (``out/checkpoint.pt``).
    :param map_location: where to load the tensors, as for ``torch.load``.
    :param str marker: the ``"format"`` entry the file must carry (``pyroflows.infer.fit`` writes its own).
    :raises CheckpointError: when the file is missing, truncated/corrupted, or not a pyroflows checkpoint.

    Example::

        >>> import tempfile, torch
        >>> from pyroflows.data import load_digits
        >>> from pyroflows.train import build_density, fit, load_checkpoint
        >>> model = build_density("realnvp", (1, 8, 8), levels=1, num_layers=1, hidden=4)
        >>> out = tempfile.mkdtemp()
        >>> result = fit(model, load_digits("train"), steps=2, out=out, device="cpu", progress=False)
        >>> ckpt = load_checkpoint(result.checkpoint)
        >>> ckpt["step"], ckpt["spec"]["flow"]
        (2, 'realnvp')
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read (corrupted or truncated file?): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != marker:
        raise CheckpointError(f"{str(path)!r} is not a pyroflows checkpoint (no {marker!r} marker)")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {ckpt['version']}, newer than {VERSION}")
    return ckpt


def load_model_state(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """``model.load_state_dict(state)`` with an error that says the architectures differ, and how.

    :param torch.nn.Module model: the model to load into.
    :param dict state: a ``state_dict``, e.g. ``load_checkpoint(path)["model"]``.
    :param str source: how to name the state's origin in the error message.
    :raises CheckpointError: for missing or unexpected entries or shape mismatches, with examples of each.

    Example::

        >>> from pyroflows.train import build_density, load_model_state
        >>> small = build_density("glow", (1, 8, 8), levels=1, steps=1, hidden_channels=4)
        >>> large = build_density("glow", (1, 8, 8), levels=1, steps=2, hidden_channels=4)
        >>> load_model_state(small, large.state_dict(), "the large model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        pyroflows.train.checkpoint.CheckpointError: the large model was written for a different architecture: ...
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
    "CheckpointError",
    "atomic_torch_save",
    "load_checkpoint",
    "load_model_state",
    "rng_state",
    "set_rng_state",
]
