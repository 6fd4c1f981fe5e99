r"""The flow-layer contract: :class:`FlowTransform`, :class:`Inverse` and :class:`Compose`.

A layer implements :meth:`FlowTransform.forward_and_log_det` and :meth:`FlowTransform.inverse_and_log_det`
and nothing else about caching. This module turns them into the torch/Pyro transform protocol
(``_call``, ``_inverse``, ``log_abs_det_jacobian``) and remembers the log-det computed with the last
``(x, y)`` pair, so that ``log_abs_det_jacobian(x, y)`` on that pair returns the very value computed with
it (no recomputation; stochastic estimators stay consistent with their sample), and so that ``t.inv(y)``
on the last output returns the last input without solving an inverse.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable, Sequence

import torch
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch.distributions import constraints
from torch.distributions.transforms import ComposeTransform, Transform
from torch.distributions.utils import _sum_rightmost

_VALIDATION: bool | None = None


def enable_validation(flag: bool | None = True) -> None:
    """Turn input/output checks of every :class:`FlowTransform` on or off.

    With ``None`` (the initial state) pyroflows follows torch's distribution validation flag, which
    ``pyro.enable_validation`` also sets, and which is on by default. The checks catch a wrong event
    shape, non-floating or mismatched dtypes, non-finite inputs, and non-finite outputs (naming the layer).
    Each check costs one device synchronisation per call; turn them off for speed once a model works.

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
    """Whether :class:`FlowTransform` checks its inputs and outputs (see :func:`enable_validation`).

    Example::

        >>> import pyroflows
        >>> pyroflows.is_validation_enabled()
        True
    """
    if _VALIDATION is None:
        return bool(torch.distributions.Distribution._validate_args)
    return _VALIDATION


# A counter bumped whenever any module anywhere registers or replaces a parameter, buffer or submodule, so
# that a FlowTransform can cache the list of tensors its memo key watches and rebuild it only when the module
# tree may have changed (walking ``parameters()`` on every call costs ~10% of a Glow training step).
_GENERATION = [0]


def _bump_generation(*args, **kwargs) -> None:
    _GENERATION[0] += 1


# Containers that were ever registered inside another module. A container outside this set that is not itself a
# FlowTransform belongs to no module tree, so filling it cannot change what any FlowTransform watches: Pyro's
# DenseNN slices ``self.layers[:-1]`` on every forward, which builds and fills a fresh ModuleList each time and
# would otherwise invalidate every cache once per step. Assigning such a container into a module later is itself
# a registration, which bumps the counter and adds it here.
_ATTACHED_CONTAINERS: weakref.WeakSet = weakref.WeakSet()
_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def _on_module_registration(parent, name, child) -> None:
    if isinstance(child, _CONTAINERS):
        _ATTACHED_CONTAINERS.add(child)
    if isinstance(parent, _CONTAINERS) and not isinstance(parent, FlowTransform) and parent not in _ATTACHED_CONTAINERS:
        return  # a detached container (a slice made on the fly): no FlowTransform's tree changed
    _bump_generation()


torch.nn.modules.module.register_module_parameter_registration_hook(_bump_generation)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump_generation)
torch.nn.modules.module.register_module_module_registration_hook(_on_module_registration)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, at the cost of one sum in the common case.

    A NaN or an infinity anywhere makes the sum non-finite, so a finite sum proves every element finite (about
    15x cheaper than ``isfinite(t).all()``, which writes a boolean tensor of ``t``'s size). A non-finite sum may
    also be an overflow of finite values; only then are the elements checked one by one.

    :param torch.Tensor t: any floating-point tensor.
    :returns: ``bool``.

    Example::

        >>> import torch
        >>> from pyroflows.transforms.base import all_finite
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
        >>> all_finite(torch.full((4,), 3e38))  # the sum overflows; the elements are finite
        True
    """
    t = t.detach()
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except Exception:  # inference-mode tensors and functorch wrappers carry no version counter
        return None


class _Memo:
    """The last ``(x, y, log|det dy/dx|)`` seen by a transform, keyed by tensor identity *and* state.

    Identity alone (torch's cache) is fooled by in-place edits of ``x``/``y``, by optimiser steps between
    calls, by a switch between train and eval mode, and by a switch of grad mode. The key records the
    tensors' version counters, the module's parameter and buffer versions, ``training`` and grad mode.
    Parameter updates written through ``.data`` (Pyro's ``ClippedAdam``) bypass version counters: the memo also
    compares the norms of all parameters and buffers, and forward calls never consult it; only
    ``log_abs_det_jacobian`` and ``inv`` of the pair just computed do.
    ``x`` and ``y`` are held strongly, as torch's cache holds them: in a guide the base sample ``x`` has no
    other owner between ``rsample`` and ``log_prob``, and a weak reference would lose it (and force an inverse).
    Only one pair per transform is kept, and ``clear_memo()`` drops it.
    """

    __slots__ = ("x", "y", "x_version", "y_version", "state", "fingerprint", "log_det")

    def __init__(self, x, y, log_det, state, fingerprint):
        self.x = x
        self.y = y
        self.x_version = _version(x)
        self.y_version = _version(y)
        self.log_det = log_det
        self.state = state
        self.fingerprint = fingerprint

    def matches(self, state, fingerprint_fn, x=None, y=None) -> bool:
        if state != self.state:
            return False
        if x is not None and (self.x is not x or _version(x) != self.x_version):
            return False
        if y is not None and (self.y is not y or _version(y) != self.y_version):
            return False
        if self.fingerprint is not None and not torch.equal(fingerprint_fn(), self.fingerprint):
            return False  # parameters changed without a version bump (updates through .data)
        return True


def forward_and_log_det(t: Transform, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t(x), log|det dt/dx|)`` for any torch transform, one pass for a :class:`FlowTransform`.

    The log-det has the shape torch's ``t.log_abs_det_jacobian`` gives, ``x.shape[:x.dim() - event_dim]``.

    :param torch.distributions.Transform t: any torch transform.
    :param torch.Tensor x: input, shape ``batch_shape + event_shape``.
    :returns: ``(y, log_det)``.

    Example::

        >>> import torch
        >>> from torch.distributions.transforms import ExpTransform
        >>> from pyroflows.transforms import Planar, forward_and_log_det
        >>> y, log_det = forward_and_log_det(Planar(3), torch.randn(4, 3))
        >>> y.shape, log_det.shape
        (torch.Size([4, 3]), torch.Size([4]))
        >>> forward_and_log_det(ExpTransform(), torch.zeros(2))
        (tensor([1., 1.]), tensor([0., 0.]))
    """
    if isinstance(t, FlowTransform):
        return t.forward_and_log_det(x)
    y = t(x)
    return y, t.log_abs_det_jacobian(x, y)


def inverse_and_log_det(t: Transform, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t⁻¹(y), log|det dt⁻¹/dy|)`` for any torch transform, one pass for a :class:`FlowTransform`.

    :param torch.distributions.Transform t: any bijective torch transform.
    :param torch.Tensor y: a point of ``t``'s codomain, shape ``batch_shape + event_shape``.
    :returns: ``(x, log_det)``, the log-det of the inverse map (minus the forward one at ``x``).

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ActNorm, inverse_and_log_det
        >>> x, log_det = inverse_and_log_det(ActNorm(3), torch.randn(4, 3))
        >>> x.shape, log_det.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """
    if isinstance(t, FlowTransform):
        return t.inverse_and_log_det(y)
    x = t.inv(y)
    return x, -t.log_abs_det_jacobian(x, y)


def forward_only(t: Transform, x: torch.Tensor) -> torch.Tensor:
    """``t(x)`` without the log-det where a :class:`FlowTransform` can skip it (no memo, no cache).

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ResidualBlock, forward_only
        >>> block = ResidualBlock(3, hidden=(8,)).eval()
        >>> x = torch.randn(4, 3)
        >>> torch.equal(forward_only(block, x), block.forward_and_log_det(x)[0])
        True
    """
    return t.forward_only(x) if isinstance(t, FlowTransform) else t(x)


def inverse_only(t: Transform, y: torch.Tensor) -> torch.Tensor:
    """``t⁻¹(y)`` without the log-det where a :class:`FlowTransform` can skip it; see :func:`forward_only`.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ActNorm, inverse_only
        >>> inverse_only(ActNorm(3), torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """
    return t.inverse_only(y) if isinstance(t, FlowTransform) else t.inv(y)


def _base_constraint(c):
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


class FlowTransform(TransformModule):
    r"""Base class of every pyroflows layer: a Pyro ``TransformModule`` that knows its own log-det.

    Subclasses implement

    .. code-block:: python

        def forward_and_log_det(self, x):  # -> (y, log|det dy/dx|) summed over the event dims
        def inverse_and_log_det(self, y):  # -> (x, log|det dx/dy|)

    and this class provides ``_call``, ``_inverse``, ``log_abs_det_jacobian`` (returning the log-det
    remembered with the last ``(x, y)`` pair, computing afresh on any other pair), ``with_cache`` for
    ``cache_size`` 0 and 1, input checks (see :func:`enable_validation`), and pickling/deep-copying without
    the remembered tensors.

    A layer whose log-det costs much more than its map (a residual block's Jacobian) also overrides
    ``forward_only`` / ``inverse_only`` and sets ``lazy_log_det = True``: with gradients off (sampling), a call
    then computes the map alone and the log-det is computed from the remembered ``x`` only if asked for.

    Direction: in a guide the forward map takes base noise to the posterior; in a density model it takes
    data to the latent, :math:`\log p(x) = \log p_Z(f(x)) + \log|\det \partial f/\partial x|`.

    :param int event_dim: 1 for vectors of shape ``(D,)``, 3 for images ``(C, H, W)``.
    :param event_shape: the input event shape, used to check inputs; ``None`` entries match any size.
    :param int cache_size: torch's identity cache, 0 or 1.

    Example: a layer is a constructor and the two methods (see the documentation's "Writing a new layer")::

        >>> import torch
        >>> from pyroflows.transforms import FlowTransform
        >>> class Shift(FlowTransform):
        ...     def __init__(self, dim):
        ...         super().__init__(event_dim=1, event_shape=(dim,))
        ...         self.b = torch.nn.Parameter(torch.ones(dim))
        ...     def forward_and_log_det(self, x):
        ...         return x + self.b, x.new_zeros(x.shape[:-1])
        ...     def inverse_and_log_det(self, y):
        ...         return y - self.b, y.new_zeros(y.shape[:-1])
        >>> t = Shift(2)
        >>> x = torch.zeros(3, 2)
        >>> y = t(x)
        >>> t.inv(y) is x  # the remembered pair: no inverse computed
        True
        >>> t.log_abs_det_jacobian(x, y)
        tensor([0., 0., 0.])
    """

    bijective = True
    sign = +1  # only meaningful for event_dim 0; kept for torch's API
    #: With gradients off, calls compute only the map (``forward_only`` / ``inverse_only``) and leave the log-det
    #: to the first ``log_abs_det_jacobian`` on the pair. Worth it only where the log-det dominates the cost.
    lazy_log_det = False

    def __init__(
        self,
        event_dim: int = 1,
        event_shape: Sequence[int | None] | None = None,
        cache_size: int = 0,
    ):
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        super().__init__(cache_size=cache_size)
        self._event_dim = int(event_dim)
        if event_shape is not None:
            event_shape = tuple(event_shape)
            if len(event_shape) != self._event_dim:
                raise ValueError(f"event_shape {event_shape} does not have event_dim={event_dim} dimensions")
        self._event_shape = event_shape
        self._memo: _Memo | None = None
        self._real = constraints.independent(constraints.real, self._event_dim)

    # ----------------------------------------------------------------- the two methods a layer writes
    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y, log|det dy/dx|)``; the log-det has shape ``x.shape[:x.dim() - event_dim]``."""
        raise NotImplementedError

    def inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, log|det dx/dy|)``; the log-det has shape ``y.shape[:y.dim() - event_dim]``."""
        raise NotImplementedError

    def forward_only(self, x: torch.Tensor) -> torch.Tensor:
        """``y`` alone; override (with ``lazy_log_det = True``) where skipping the log-det saves real work."""
        return self.forward_and_log_det(x)[0]

    def inverse_only(self, y: torch.Tensor) -> torch.Tensor:
        """``x`` alone; see :meth:`forward_only`."""
        return self.inverse_and_log_det(y)[0]

    def _defer_log_det(self) -> bool:
        return not torch.is_grad_enabled() and self.lazy_log_det

    # ----------------------------------------------------------------- shapes and constraints
    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return self._real

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return self._real

    @property
    def event_shape(self) -> tuple[int | None, ...] | None:
        """The input event shape this layer checks against (``None`` entries: any size)."""
        return self._event_shape

    @property
    def output_event_shape(self) -> tuple[int | None, ...] | None:
        """The output event shape (differs from :attr:`event_shape` only for reshaping layers)."""
        if self._event_shape is None or any(s is None for s in self._event_shape):
            return self._event_shape
        return tuple(self.forward_shape(self._event_shape))

    # ----------------------------------------------------------------- remembering the last pair
    def _watched(self) -> tuple[torch.Tensor, ...]:
        """This module's parameters and buffers, cached until the module tree may have changed."""
        cache = self.__dict__.get("_watched_cache")
        if cache is None or cache[0] != _GENERATION[0]:
            cache = (_GENERATION[0], tuple(self.parameters()) + tuple(self.buffers()))
            self.__dict__["_watched_cache"] = cache
        return cache[1]

    def _state(self):
        return (self.training, torch.is_grad_enabled(), tuple(_version(t) for t in self._watched()))

    def __setattr__(self, name, value):
        if isinstance(value, torch.Tensor | torch.nn.Module):  # e.g. a buffer replaced by assignment
            _bump_generation()
        super().__setattr__(name, value)

    def _apply(self, *args, **kwargs):  # .to(), .double(), .cuda() may swap tensors
        _bump_generation()
        return super()._apply(*args, **kwargs)

    def _fingerprint(self) -> torch.Tensor | None:
        """Norms of every floating parameter and buffer: catches updates that bypass version counters
        (``p.data.add_(...)``, as Pyro's ``ClippedAdam`` does), one fused kernel for all tensors."""
        tensors = [t.detach() for t in self._watched() if t.is_floating_point() and t.numel()]
        if not tensors:
            return None
        # NaN (a power iteration's "not yet iterated" marker) would never equal itself and defeat the memo;
        # a norm is never negative, so -1 stands for it without colliding.
        return torch.stack(torch._foreach_norm(tensors)).nan_to_num_(nan=-1.0)

    def _remember(self, x, y, log_det):
        self.__dict__["_memo"] = _Memo(x, y, log_det, self._state(), self._fingerprint())

    def _recall(self, x=None, y=None) -> _Memo | None:
        memo = self._memo
        if memo is not None and memo.matches(self._state(), self._fingerprint, x=x, y=y):
            return memo
        return None

    def clear_memo(self) -> None:
        """Forget the remembered ``(x, y, log-det)``; the next ``log_abs_det_jacobian`` recomputes."""
        self._memo = None

    # ----------------------------------------------------------------- torch's transform protocol
    def _call(self, x):
        # A forward call always computes: calling t(x) again on the same tensor is how a training loop on a
        # fixed batch reads the current parameters, and an optimiser that writes through ``.data`` (Pyro's
        # ClippedAdam) leaves no trace a memo could check. The memo serves the log-det and the inverse only.
        return self._call_and_log_det(x, lazy=self._defer_log_det())[0]

    def _call_and_log_det(self, x, lazy: bool = False):
        """``(t(x), log-det)`` checked and remembered as a call is; ``lazy`` leaves the log-det ``None``. A caller
        that wants both (``FlowDensity.log_prob``) uses this in one pass whatever the grad mode."""
        y, log_det = self._checked(x, "forward", lazy)
        self._remember(x, y, log_det)
        return y, log_det

    def _inverse(self, y):
        memo = self._recall(y=y)
        if memo is not None:
            return memo.x
        x, log_det = self._checked(y, "inverse", lazy=self._defer_log_det())
        self._remember(x, y, None if log_det is None else -log_det)
        return x

    def _checked(self, v, direction: str, lazy: bool):
        """The map of ``direction`` on ``v`` and its log-det (``None`` when ``lazy``), with the input and output
        checks when validation is on."""
        checking = is_validation_enabled()
        if checking:
            self._check_input(v, direction)
        if direction == "forward":
            out, log_det = (self.forward_only(v), None) if lazy else self.forward_and_log_det(v)
        else:
            out, log_det = (self.inverse_only(v), None) if lazy else self.inverse_and_log_det(v)
        if checking:
            self._check_output(v, out, log_det, direction)
        return out, log_det

    def log_abs_det_jacobian(self, x, y):
        """``log|det dy/dx|`` summed over the event dims: the remembered value for the last pair seen by
        ``__call__`` or ``inv``; for any other pair, computed afresh from ``x``."""
        memo = self._recall(x=x, y=y)
        if memo is not None:
            if memo.log_det is None:  # deferred by a call without gradients (lazy_log_det)
                _, log_det = self.forward_and_log_det(memo.x)
                if is_validation_enabled():
                    self._check_output(memo.x, memo.y, log_det, "forward")
                # Stamp the state after the computation, as a call does: a layer's own bookkeeping (a power
                # iteration's sigma buffer) may bump versions on the way.
                memo.log_det, memo.state, memo.fingerprint = log_det, self._state(), self._fingerprint()
            return memo.log_det
        if is_validation_enabled():
            self._check_input(x, "forward")
        y_new, log_det = self.forward_and_log_det(x)
        self._remember(x, y_new, log_det)
        return log_det

    def with_cache(self, cache_size: int = 1):
        """A view of this layer with torch's identity cache of ``cache_size`` (0 or 1).

        The view shares every parameter and buffer with ``self`` (it is a shallow copy), so training one
        trains the other.
        """
        if cache_size == self._cache_size:
            return self
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        new = copy.copy(self)
        new._cache_size = cache_size
        new._cached_x_y = (None, None)
        new._inv = None
        new._memo = None
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_memo"] = None
        state.pop("_watched_cache", None)
        state["_inv"] = None
        if "_cached_x_y" in state:
            state["_cached_x_y"] = (None, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # A copy's containers were rebuilt without registration hooks: mark them attached, so that filling one
        # later still invalidates the watched tensors (see _on_module_registration).
        for module in self.modules():
            if isinstance(module, _CONTAINERS):
                _ATTACHED_CONTAINERS.add(module)

    # ----------------------------------------------------------------- validation
    def _name(self) -> str:
        return type(self).__name__

    def _param_dtype(self) -> torch.dtype | None:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def _check_input(self, x, direction: str) -> None:
        name = f"{self._name()}.{direction}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} expects a floating-point tensor, got dtype {x.dtype}")
        dtype = self._param_dtype()
        if dtype is not None and dtype != x.dtype:
            raise TypeError(
                f"{name}: input dtype {x.dtype} does not match the layer's parameter dtype {dtype}; "
                f"convert one of them (e.g. x.to({dtype}) or layer.to({x.dtype}))"
            )
        expected = self.event_shape if direction == "forward" else self.output_event_shape
        event_dim = self.domain.event_dim if direction == "forward" else self.codomain.event_dim
        if x.dim() < event_dim:
            raise ValueError(
                f"{name} expects at least {event_dim} dimension(s) (event_dim={event_dim}), got shape {tuple(x.shape)}"
            )
        if expected is not None and not _shape_matches(x.shape, expected):
            raise ValueError(
                f"{name} expects event shape {_fmt_shape(expected)} in the rightmost dimensions, "
                f"got input of shape {tuple(x.shape)}"
            )
        if not all_finite(x):
            n_bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{name} received {n_bad} non-finite value(s) (NaN or inf) in its input")
        support = _base_constraint(self.domain if direction == "forward" else self.codomain)
        if support is not constraints.real and not bool(support.check(x).all()):
            raise ValueError(
                f"{name}: input outside the transform's domain {support} "
                f"(got values in [{float(x.min()):.4g}, {float(x.max()):.4g}])"
            )

    def _check_output(self, x, y, log_det, direction: str) -> None:
        if all_finite(y) and (log_det is None or all_finite(log_det)):
            return
        raise RuntimeError(
            f"{self._describe_nonfinite(x, direction)} produced a non-finite "
            f"{'output' if not all_finite(y) else 'log-det'} from finite input"
        )

    def _describe_nonfinite(self, x, direction: str) -> str:
        return f"{self._name()}.{direction}"

    __repr__ = torch.nn.Module.__repr__  # not Transform's, which hides the submodules and extra_repr


class Inverse(FlowTransform):
    """The inverse of a transform, as an ``nn.Module`` whose parameters are the wrapped transform's.

    Unlike torch's ``t.inv``, it can sit in module lists, optimisers and ``pyro.module``; use
    :func:`pyroflows.inverse` to build one (it unwraps ``inverse(inverse(t))`` to ``t``).

    :param torch.distributions.Transform base: the transform to invert (any bijective torch transform;
        a :class:`FlowTransform` inverts in one pass).

    Example::

        >>> import torch, pyroflows
        >>> t = pyroflows.transforms.Planar(3)
        >>> inv = pyroflows.inverse(t)
        >>> set(map(id, inv.parameters())) == set(map(id, t.parameters()))
        True
    """

    def __init__(self, base: Transform):
        if not isinstance(base, Transform):
            raise TypeError(f"Inverse expects a torch Transform, got {type(base).__name__}")
        if not base.bijective:
            raise ValueError(f"{type(base).__name__} is not bijective and has no inverse")
        event_shape = getattr(base, "output_event_shape", None)
        super().__init__(event_dim=base.codomain.event_dim, event_shape=event_shape)
        self.base = base

    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return self.base.codomain

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return self.base.domain

    @property
    def output_event_shape(self):
        return getattr(self.base, "event_shape", None)

    def forward_shape(self, shape):
        return self.base.inverse_shape(shape)

    def inverse_shape(self, shape):
        return self.base.forward_shape(shape)

    def forward_and_log_det(self, x):
        return inverse_and_log_det(self.base, x)

    def inverse_and_log_det(self, y):
        return forward_and_log_det(self.base, y)

    @property
    def lazy_log_det(self):
        return bool(getattr(self.base, "lazy_log_det", False))

    def forward_only(self, x):
        return inverse_only(self.base, x)

    def inverse_only(self, y):
        return forward_only(self.base, y)

    def _name(self):
        return f"Inverse({self.base._name() if isinstance(self.base, FlowTransform) else type(self.base).__name__})"


def inverse(t: Transform) -> Transform:
    """Module-aware inverse of ``t``: ``inverse(inverse(t)) is t``; see :class:`Inverse`.

    :param torch.distributions.Transform t: a bijective transform.
    :returns: :class:`Inverse` ``(t)``, or ``t.base`` when ``t`` is itself an :class:`Inverse`.

    Example::

        >>> import torch, pyroflows
        >>> flow = pyroflows.realnvp(2, num_layers=2)
        >>> inv = pyroflows.inverse(flow)  # latent -> data for a density-direction flow
        >>> pyroflows.inverse(inv) is flow
        True
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(inv(flow(x).clone()), x, atol=1e-5)
        True
    """
    if isinstance(t, Inverse):
        return t.base
    return Inverse(t)


class Compose(FlowTransform, ComposeTransformModule):
    """A sequence of transforms run once per call, their log-dets summed in the same pass.

    It is a Pyro ``ComposeTransformModule`` (so ``pyro.module`` and ``AutoNormalizingFlow`` see all
    parameters, and it indexes and iterates like a ``ModuleList``) and a :class:`FlowTransform` (so it
    remembers the log-det of its last pair and never recomputes intermediates). Parts may be any torch
    transforms; :class:`FlowTransform` parts run in one pass each.

    :param parts: the transforms, applied first to last in the forward direction.
    :param int cache_size: torch's identity cache for the composition, 0 or 1.

    Example::

        >>> import torch, pyroflows
        >>> from pyroflows.transforms import Compose, Planar
        >>> flow = Compose([Planar(2), Planar(2)])
        >>> x = torch.randn(5, 2)
        >>> y = flow(x)
        >>> flow.log_abs_det_jacobian(x, y).shape
        torch.Size([5])
    """

    def __init__(self, parts: Iterable[Transform], cache_size: int = 0):
        parts = list(parts)
        for i, part in enumerate(parts):
            if not isinstance(part, Transform):
                raise TypeError(f"Compose part {i} is a {type(part).__name__}, not a torch Transform")
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        # Parts keep no identity cache of their own: the composition remembers its pair as a whole.
        ComposeTransformModule.__init__(self, parts, cache_size=0)
        self._cache_size = cache_size
        if cache_size == 1:
            self._cached_x_y = (None, None)
        self._memo = None
        first = parts[0] if parts else None
        self._event_shape = getattr(first, "event_shape", None) if isinstance(first, FlowTransform) else None
        # The parts are fixed (ComposeTransform keeps them in a plain list), so the constraints and the
        # number of dims to sum each part's log-det over are computed once, not on every call.
        self._domain = ComposeTransform.domain.__get__(self, type(self))
        self._codomain = ComposeTransform.codomain.__get__(self, type(self))
        self._event_dim = self._domain.event_dim
        self._sum_dims_forward, self._sum_dims_inverse = [], []
        event_dim = self._domain.event_dim
        for part in parts:
            self._sum_dims_forward.append(event_dim - part.domain.event_dim)
            event_dim += part.codomain.event_dim - part.domain.event_dim
        event_dim = self._codomain.event_dim
        for part in reversed(parts):
            self._sum_dims_inverse.append(event_dim - part.codomain.event_dim)
            event_dim += part.domain.event_dim - part.codomain.event_dim

    __call__ = Transform.__call__  # not ComposeTransform's, which calls the parts one by one

    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return self._domain

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return self._codomain

    forward_shape = ComposeTransform.forward_shape
    inverse_shape = ComposeTransform.inverse_shape
    inv = Transform.inv

    @property
    def output_event_shape(self):
        shape = self._event_shape
        for part in self.parts:
            if shape is None or any(s is None for s in shape):
                return getattr(self.parts[-1], "output_event_shape", None) if self.parts else shape
            shape = tuple(part.forward_shape(shape))
        return shape

    def forward_and_log_det(self, x):
        log_det = x.new_zeros(x.shape[: x.dim() - self._domain.event_dim])
        for part, n in zip(self.parts, self._sum_dims_forward):
            x, ld = forward_and_log_det(part, x)
            log_det = log_det + _sum_rightmost(ld, n)
        return x, log_det

    def inverse_and_log_det(self, y):
        log_det = y.new_zeros(y.shape[: y.dim() - self._codomain.event_dim])
        for part, n in zip(reversed(self.parts), self._sum_dims_inverse):
            y, ld = inverse_and_log_det(part, y)
            log_det = log_det + _sum_rightmost(ld, n)
        return y, log_det

    @property
    def lazy_log_det(self):
        """Whether any part defers its log-det (then the composition does, and recomputes all of it on request)."""
        return any(getattr(part, "lazy_log_det", False) for part in self.parts)

    def forward_only(self, x):
        for part in self.parts:
            x = forward_only(part, x)
        return x

    def inverse_only(self, y):
        for part in reversed(self.parts):
            y = inverse_only(part, y)
        return y

    def _describe_nonfinite(self, x, direction):
        """Re-run part by part (no grad) to name the first part whose output or log-det is not finite."""
        parts = list(enumerate(self.parts))
        if direction == "inverse":
            parts = parts[::-1]
        with torch.no_grad():
            for i, part in parts:
                step = forward_and_log_det if direction == "forward" else inverse_and_log_det
                x_in = x
                x, ld = step(part, x)
                if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(ld).all())):
                    where = f"part {i} of {len(self.parts)} in Compose.{direction}"
                    if isinstance(part, Compose):  # name the innermost culprit
                        return f"{part._describe_nonfinite(x_in, direction)} <- {where}"
                    name = part._name() if isinstance(part, FlowTransform) else type(part).__name__
                    return f"{name} ({where})"
        return f"Compose.{direction}"

    def _name(self):
        return "Compose"

    def __getstate__(self):
        return FlowTransform.__getstate__(self)

    def __repr__(self):
        return torch.nn.ModuleList.__repr__(self).replace("ModuleList", "Compose", 1)
