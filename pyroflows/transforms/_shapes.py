"""The one way a layer is told its event: ``shape``, an int ``D`` or ``(D,)`` for vectors, ``(C, H, W)`` for images
(``H``, ``W`` may be ``None``: any size)."""

from __future__ import annotations

import math
import numbers
import warnings

from .._deprecation import REMOVAL


def _is_int(n) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def count(value, name: str, where: str, low: int = 1) -> int:
    """An integer argument of a builder or layer (``num_layers``, ``levels``, channels, iterations) ``>= low``;
    ``ValueError`` naming ``where``, ``name`` and the value for anything else (``2.5``, ``True``, ``-3``)."""
    if not _is_int(value) or value < low:
        raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def positive(value, name: str, where: str, *, low: float = 0.0, high: float | None = None, closed: bool = False):
    """A real argument in ``(low, high)`` (``[low, high)`` when ``closed``), finite; ``ValueError`` naming it."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if closed else value > low) and (high is None or value < high)
    if not ok:
        span = f"{'[' if closed else '('}{low}, {high if high is not None else 'inf'})"
        raise ValueError(f"{where}: {name} must be a finite number in {span}, got {value!r}")
    return float(value)


def parse_shape(shape, where: str) -> tuple:
    """``shape`` as a tuple ``(D,)`` or ``(C, H, W)``; ``ValueError`` naming ``where`` for anything else."""
    tup = (shape,) if _is_int(shape) else tuple(shape) if isinstance(shape, (tuple, list)) else None
    ok = tup is not None and len(tup) in (1, 3) and _is_int(tup[0]) and tup[0] >= 1
    ok = ok and all(s is None or (_is_int(s) and s >= 1) for s in tup[1:])
    if not ok:
        raise ValueError(
            f"{where}: shape must be a positive int D or (D,) for vectors, or (C, H, W) for images "
            f"(H, W may be None), got {shape!r}"
        )
    return tup


def vector_dim(shape, where: str) -> int:
    """``D`` from ``D`` or ``(D,)``; ``ValueError`` naming ``where`` for an image shape or anything else."""
    event_shape = parse_shape(shape, where)
    if len(event_shape) != 1:
        raise ValueError(f"{where}: works on vectors, shape must be D or (D,), not an image shape; got {shape!r}")
    return event_shape[0]


def hidden_sizes(hidden, default: tuple, where: str) -> tuple:
    """Vector conditioner sizes: ``None`` (``default``), an int (one hidden layer) or a sequence of ints >= 1."""
    ok_type = hidden is None or _is_int(hidden) or isinstance(hidden, (tuple, list))
    sizes = () if not ok_type else default if hidden is None else (hidden,) if _is_int(hidden) else tuple(hidden)
    if not sizes or not all(_is_int(h) and h >= 1 for h in sizes):
        raise ValueError(f"{where}: hidden must be an int or a sequence of ints >= 1, got {hidden!r}")
    return sizes


def legacy_event_dim(shape, event_dim, where: str, default_image: bool = False) -> tuple:
    """Resolve the old ``(int, event_dim)`` way of choosing vector or image, warning where it is used.

    ``event_dim`` given, or an int ``shape`` for a layer whose int used to mean image channels
    (``default_image``), means the old convention: an int with ``event_dim=3`` is ``(C, None, None)``.
    """
    if event_dim is None and not (default_image and isinstance(shape, int)):
        return parse_shape(shape, where)
    if event_dim is None:
        return legacy_image_channels(shape, where, "an int shape")
    if event_dim not in (1, 3):
        raise ValueError(f"{where}: event_dim must be 1 (vectors) or 3 (images), got {event_dim!r}")
    warnings.warn(
        f"{where}: event_dim is deprecated and will be removed in pyroflows {REMOVAL}; pass shape=(C, None, None) "
        "for images, D or (D,) for vectors",
        FutureWarning,
        stacklevel=4,
    )
    if isinstance(shape, int):
        return parse_shape((shape,) if event_dim == 1 else (shape, None, None), where)
    tup = parse_shape(shape, where)
    if len(tup) != event_dim:
        raise ValueError(f"{where}: shape {shape!r} does not have event_dim={event_dim} dimensions")
    return tup


def legacy_image_channels(channels: int, where: str, what: str) -> tuple:
    """``(channels, None, None)`` for an int that meant image channels before 0.2, with a ``FutureWarning``."""
    warnings.warn(
        f"{where}: {what} means image channels ({channels}, None, None) until pyroflows {REMOVAL}, and vectors after; "
        f"pass shape=({channels}, None, None)",
        FutureWarning,
        stacklevel=5,
    )
    return parse_shape((channels, None, None), where)
