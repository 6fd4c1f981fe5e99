r"""Input and output checks of every :class:`~pyroflows.transforms.FlowTransform`, and the switch that turns them off.

A layer never calls these itself: :class:`~pyroflows.transforms.FlowTransform` runs :func:`check_input` before
and :func:`check_output` after each call while :func:`is_validation_enabled` is true.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributions import constraints

_VALIDATION: bool | None = None


def enable_validation(flag: bool | None = True) -> None:
    """Turn input/output checks of every :class:`~pyroflows.transforms.FlowTransform` on or off.

    With ``None`` (the initial state) pyroflows follows torch's distribution validation flag, which
    ``pyro.enable_validation`` also sets, and which is on by default. The checks catch a wrong event
    shape, non-floating or mismatched dtypes, non-finite inputs, inputs outside the domain, and non-finite
    outputs (naming the layer). Each check costs one device synchronisation per call; turn them off for speed
    once a model works.

    :param flag: ``True``/``False`` to force, ``None`` to follow ``torch.distributions``.

    Example::

        >>> import torch, pyroflows
        >>> t = pyroflows.transforms.Planar(2)
        >>> t(torch.randn(3, 5))
        Traceback (most recent call last):
          ...
        ValueError: Planar.forward expects event shape (2,) in the rightmost dimensions, got input of shape (3, 5)
        >>> pyroflows.enable_validation(False)
        >>> pyroflows.is_validation_enabled()
        False
        >>> pyroflows.enable_validation(None)  # back to following torch.distributions (on by default)
    """
    global _VALIDATION
    _VALIDATION = flag


def is_validation_enabled() -> bool:
    """Whether :class:`~pyroflows.transforms.FlowTransform` checks its inputs and outputs (see
    :func:`enable_validation`).

    Example::

        >>> import pyroflows
        >>> pyroflows.is_validation_enabled()
        True
    """
    if _VALIDATION is None:
        return bool(torch.distributions.Distribution._validate_args)
    return _VALIDATION


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, at the cost of one sum in the common case.

    A NaN or an infinity anywhere makes the sum non-finite, so a finite sum proves every element finite (about
    15x cheaper than ``isfinite(t).all()``, which writes a boolean tensor of ``t``'s size). A non-finite sum may
    also be an overflow of finite values; only then are the elements checked one by one.

    :param torch.Tensor t: any floating-point tensor.
    :returns: ``bool``.

    Example::

        >>> import torch
        >>> from pyroflows.transforms.validation import all_finite
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
        >>> all_finite(torch.full((4,), 3e38))  # the sum overflows; the elements are finite
        True
    """
    t = t.detach()
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def base_constraint(c: constraints.Constraint) -> constraints.Constraint:
    """The elementwise constraint under any ``constraints.independent`` wrappers.

    Example::

        >>> from torch.distributions import constraints
        >>> from pyroflows.transforms.validation import base_constraint
        >>> base_constraint(constraints.independent(constraints.unit_interval, 3)) is constraints.unit_interval
        True
    """
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c


def _shape_matches(shape: torch.Size, expected: Sequence[int | None]) -> bool:
    if len(shape) < len(expected):
        return False
    tail = shape[len(shape) - len(expected) :]
    return all(e is None or s == e for s, e in zip(tail, expected))


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _param_dtype(module: torch.nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def check_input(t, x, direction: str) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``t`` and the problem unless ``x`` is a valid input of ``t`` in
    ``direction`` (``"forward"`` or ``"inverse"``): a floating tensor of the layer's parameter dtype, with the
    event shape and at least ``event_dim`` dims, finite, and inside the domain (codomain for the inverse)."""
    name = f"{t._name()}.{direction}"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point tensor, got dtype {x.dtype}")
    dtype = _param_dtype(t)
    if dtype is not None and dtype != x.dtype:
        raise TypeError(
            f"{name}: input dtype {x.dtype} does not match the layer's parameter dtype {dtype}; "
            f"convert one of them (e.g. x.to({dtype}) or layer.to({x.dtype}))"
        )
    expected = t.event_shape if direction == "forward" else t.output_event_shape
    support = t.domain if direction == "forward" else t.codomain
    event_dim = support.event_dim
    if x.dim() < event_dim:
        raise ValueError(
            f"{name} expects at least {event_dim} dimension(s) (event_dim={event_dim}), got shape {tuple(x.shape)}"
        )
    if expected is not None and not _shape_matches(x.shape, expected):
        raise ValueError(
            f"{name} expects event shape {_fmt_shape(expected)} in the rightmost dimensions, "
            f"got input of shape {tuple(x.shape)}"
        )
    if torch.compiler.is_compiling():
        return  # the value checks below sync and would break the compiled graph; see check_output
    if not all_finite(x):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} received {n_bad} non-finite value(s) (NaN or inf) in its input")
    support = base_constraint(support)
    if support is not constraints.real and not bool(support.check(x).all()):
        raise ValueError(
            f"{name}: input outside the transform's {'domain' if direction == 'forward' else 'codomain'} "
            f"{support} (got values in [{float(x.min()):.4g}, {float(x.max()):.4g}])"
        )


def check_output(t, x, y, log_det, direction: str) -> None:
    """Raise ``RuntimeError`` naming the (innermost) layer unless ``y`` and ``log_det`` (or ``None``) are finite.

    Inside ``torch.compile`` (``torch.compiler.is_compiling()``) the value checks of both functions are left out:
    each is a device sync that would split the compiled graph in two. A NaN then reaches the loss, where both
    trainers' one check per step stops the update (:func:`pyroflows.run.check_finite`); the type, dtype and shape
    checks stay, as they cost nothing at run time.
    """
    if torch.compiler.is_compiling() or (all_finite(y) and (log_det is None or all_finite(log_det))):
        return
    raise RuntimeError(
        f"{t._describe_nonfinite(x, direction)} produced a non-finite "
        f"{'output' if not all_finite(y) else 'log-det'} from finite input"
    )


__all__ = ["all_finite", "base_constraint", "check_input", "check_output", "enable_validation", "is_validation_enabled"]
