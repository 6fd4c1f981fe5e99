r"""The flow-layer contract: :class:`FlowTransform`, :class:`Inverse` and :class:`Compose`.

A layer implements :meth:`FlowTransform.forward_and_log_det` and :meth:`FlowTransform.inverse_and_log_det`
and nothing else about caching. This module turns them into the torch/Pyro transform protocol
(``_call``, ``_inverse``, ``log_abs_det_jacobian``) and remembers the log-det computed with the last
``(x, y)`` pair, so that ``log_abs_det_jacobian(x, y)`` on that pair returns the very value computed with
it (no recomputation; stochastic estimators stay consistent with their sample), and so that ``t.inv(y)``
on the last output returns the last input without solving an inverse. The checks every call runs live in
:mod:`pyroflows.transforms.validation`.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable, Iterator, Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import constraints
from torch.distributions.transforms import ComposeTransform, Transform
from torch.distributions.utils import _sum_rightmost

from .validation import check_input, check_output, is_validation_enabled


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except Exception:  # inference-mode tensors and functorch wrappers carry no version counter
        return None


class _Pair:
    """The last ``(x, y, log|det dy/dx|)`` of a transform, with what makes it valid: the tensors' version counters
    (an in-place edit of ``x`` or ``y`` breaks the pair) and the train/eval and grad mode it was computed in.

    ``x`` and ``y`` are held strongly, as torch's cache holds them: in a guide the base sample ``x`` has no other
    owner between ``rsample`` and ``log_prob``, and a weak reference would lose it (and force an inverse).
    ``log_det`` is ``None`` while deferred (:attr:`FlowTransform.lazy_log_det`).
    """

    __slots__ = ("x", "y", "x_version", "y_version", "mode", "log_det")

    def __init__(self, x, y, log_det, mode):
        self.x, self.y, self.log_det, self.mode = x, y, log_det, mode
        self.x_version, self.y_version = _version(x), _version(y)

    def matches(self, mode, x=None, y=None) -> bool:
        if mode != self.mode:
            return False
        if torch.compiler.is_compiling():
            # Inside torch.compile a version counter is a data-dependent value: comparing it splits the graph.
            # There the pair is matched by identity alone, as torch's own transform cache does
            # (``Transform._call``), so an in-place edit of a sample between its draw and its log_prob inside a
            # compiled function is not noticed (eager calls notice it).
            return (x is None or self.x is x) and (y is None or self.y is y)
        if x is not None and (self.x is not x or _version(x) != self.x_version):
            return False
        return y is None or (self.y is y and _version(y) == self.y_version)


def remember_for_warm_start(t, x: torch.Tensor, y: torch.Tensor, log_det: torch.Tensor) -> None:
    """Leave the pair ``(x, y, log-det)`` of a forward pass made on ``t``'s behalf (by a :class:`Compose`, or a
    conditioned layer) with ``t``, as a call of ``t`` would, when its inverse warm-starts from it
    (:attr:`FlowTransform.warm_start_inverse`) and gradients are on; otherwise keep no reference."""
    if torch.is_grad_enabled() and getattr(t, "warm_start_inverse", False):
        t._remember(x, y, log_det)


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


class FlowTransform(TransformModule):
    r"""Base class of every pyroflows layer: a Pyro ``TransformModule`` that knows its own log-det.

    Subclasses implement

    .. code-block:: python

        def forward_and_log_det(self, x):  # -> (y, log|det dy/dx|) summed over the event dims
        def inverse_and_log_det(self, y):  # -> (x, log|det dx/dy|)

    and this class provides ``_call``, ``_inverse``, ``log_abs_det_jacobian``, ``with_cache``, the input and
    output checks of :mod:`pyroflows.transforms.validation`, and pickling/deep-copying without the remembered
    tensors.

    **The remembered pair.** Each call, in either direction, remembers its ``(x, y, log-det)``.
    ``log_abs_det_jacobian(x, y)`` returns the remembered log-det when ``x`` and ``y`` are the very tensors of
    that pair, neither was edited in place since (version counters), and train/eval and grad mode are those of
    the call; on any other pair it computes afresh from ``x``. ``t.inv(y)`` on the last output returns the last
    input. The value served is the one computed *with* the pair: after an optimiser step, a sample drawn before
    still gets the log-det of the map that drew it (as torch's own cache does); pass a copy, or call
    :meth:`clear_memo`, to evaluate an old tensor under the new parameters. A forward call ``t(x)`` always
    computes, so a loop that calls ``t(x)`` on a fixed batch after each step reads the current parameters.

    A layer whose log-det costs much more than its map (a residual block's Jacobian) also overrides
    ``forward_only`` / ``inverse_only`` and sets ``lazy_log_det = True``: with gradients off (sampling), a call
    then computes the map alone and the log-det is computed from the remembered ``x`` (with the current
    parameters) only if asked for.

    Direction: in a guide the forward map takes base noise to the posterior; in a density model it takes
    data to the latent, :math:`\log p(x) = \log p_Z(f(x)) + \log|\det \partial f/\partial x|`.

    :param int event_dim: 1 for vectors of shape ``(D,)``, 3 for images ``(C, H, W)``.
    :param event_shape: the input event shape, used to check inputs; ``None`` entries match any size.
    :param int cache_size: 0 or 1, accepted for torch's API; the remembered pair does the caching either way.

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
    #: With gradients off, calls compute only the map (``forward_only`` / ``inverse_only``) and leave the log-det
    #: to the first ``log_abs_det_jacobian`` on the pair. Worth it only where the log-det dominates the cost.
    lazy_log_det = False
    #: The layer's inverse is iterative and starts from :meth:`remembered_input` when there is one (an
    #: autoregressive layer's Jacobi passes, a residual block's fixed-point iteration, a planar layer's scalar
    #: Newton solve): a :class:`Compose` then remembers this part's pair on each forward pass with gradients on, as
    #: a call of the part would, so that inverting a copy of the draw it just made (the sticking-the-landing
    #: gradient) starts at the answer. Other parts, and every part without gradients (evaluation, sampling), keep
    #: no reference to their intermediates inside a composition.
    warm_start_inverse = False

    @property
    def random_log_det(self) -> bool:
        """Whether this layer's log-det, in its current mode, is a random (unbiased) estimate rather than the exact
        value: two evaluations at the same point then differ (a residual block's stochastic series in training mode).
        ``False`` for every exact layer."""
        return False

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
        self._memo: _Pair | None = None
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

    def _positions(self, x: torch.Tensor) -> int:
        """Positions per feature of ``x``'s event: 1 for vectors, ``H·W`` for images (a per-channel layer's log-det
        is its per-position log-det times this)."""
        return 1 if self._event_dim == 1 else x.shape[-1] * x.shape[-2]

    # ----------------------------------------------------------------- the remembered pair
    def _memo_mode(self) -> tuple[bool, bool]:
        return self.training, torch.is_grad_enabled()

    def _recall(self, x=None, y=None) -> _Pair | None:
        memo = self._memo
        return memo if memo is not None and memo.matches(self._memo_mode(), x=x, y=y) else None

    def _remember(self, x: torch.Tensor, y: torch.Tensor, log_det: torch.Tensor | None) -> None:
        """Remember ``(x, y, log-det)`` as the pair of a call in the current train/eval and grad mode."""
        self._memo = _Pair(x, y, log_det, self._memo_mode())

    def remembered_input(self, like: torch.Tensor, within=None) -> torch.Tensor | None:
        """The input of the remembered pair, detached, when it has ``like``'s shape, dtype and device; else ``None``.

        A first guess for an iterative inverse (see :attr:`warm_start_inverse`): the pair may be stale (other
        parameters, another batch), so a solve must still check it, but when ``like`` is a copy of the last output it
        is the answer. With ``within``, a function of the remembered output giving an elementwise tolerance, the input
        is returned only when ``like`` is that close to the output (a solve whose remembered input of another point
        would be a worse start than its own first guess).

        Example::

            >>> import torch
            >>> from pyroflows.transforms import AffineAutoregressive
            >>> t = AffineAutoregressive(3)
            >>> x = torch.randn(4, 3)
            >>> y = t(x)
            >>> torch.equal(t.remembered_input(y.clone()), x), t.remembered_input(torch.zeros(2, 3)) is None
            (True, True)
        """
        memo = self._memo
        if memo is None:
            return None
        x = memo.x
        if not (x.shape == like.shape and x.dtype == like.dtype and x.device == like.device):
            return None
        if within is not None:
            out = memo.y.detach()
            if out.shape != like.shape or not bool(((like.detach() - out).abs() <= within(out)).all()):
                return None
        return x.detach()

    def clear_memo(self) -> None:
        """Forget the remembered ``(x, y, log-det)``; the next ``log_abs_det_jacobian`` or ``inv`` computes."""
        self._memo = None

    # ----------------------------------------------------------------- torch's transform protocol
    def __call__(self, x):
        # Always computed (torch's cache would return a stale y after a parameter change); the pair is remembered.
        return self._call(x)

    def _inv_call(self, y):
        return self._inverse(y)

    def _call(self, x):
        return self.call_and_log_det(x, lazy=not torch.is_grad_enabled() and self.lazy_log_det)[0]

    def call_and_log_det(
        self, x: torch.Tensor, lazy: bool = False, remember: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(t(x), log|det dt/dx|)`` in one checked pass, remembered as a call ``t(x)`` is.

        Use it where both are wanted whatever the grad mode (a density's ``log_prob``): a plain call without
        gradients defers a lazy layer's log-det, which would then cost a second pass.

        :param torch.Tensor x: input, shape ``batch_shape + event_shape``.
        :param bool lazy: leave the log-det ``None`` (and deferred) where the layer allows it.
        :param bool remember: keep the pair for a later ``inv(y)`` or ``log_abs_det_jacobian(x, y)``. Pass
            ``False`` where ``y`` never leaves the caller: the remembered pair would hold the pass's autograd graph,
            every saved activation, until the next call, after the caller has dropped the result.
        :returns: ``(y, log_det)``.

        Example::

            >>> import torch
            >>> from pyroflows.transforms import Planar
            >>> t = Planar(2)
            >>> x = torch.randn(3, 2)
            >>> y, log_det = t.call_and_log_det(x)
            >>> t.log_abs_det_jacobian(x, y) is log_det
            True
            >>> y2, log_det2 = t.call_and_log_det(x, remember=False)  # the pair of y is still the one remembered
            >>> t.inv(y) is x, t.log_abs_det_jacobian(x, y2) is log_det2
            (True, False)
        """
        y, log_det = self._checked(x, "forward", lazy)
        if remember:
            self._remember(x, y, log_det)
        return y, log_det

    def _inverse(self, y):
        memo = self._recall(y=y)
        if memo is not None:
            return memo.x
        x, log_det = self._checked(y, "inverse", lazy=not torch.is_grad_enabled() and self.lazy_log_det)
        self._remember(x, y, None if log_det is None else -log_det)
        return x

    def _checked(self, v, direction: str, lazy: bool):
        """The map of ``direction`` on ``v`` and its log-det (``None`` when ``lazy``), with the input and output
        checks when validation is on."""
        checking = is_validation_enabled()
        if checking:
            check_input(self, v, direction)
        if direction == "forward":
            out, log_det = (self.forward_only(v), None) if lazy else self.forward_and_log_det(v)
        else:
            out, log_det = (self.inverse_only(v), None) if lazy else self.inverse_and_log_det(v)
        if checking:
            check_output(self, v, out, log_det, direction)
        return out, log_det

    def log_abs_det_jacobian(self, x, y):
        """``log|det dy/dx|`` summed over the event dims: the value remembered with the pair ``(x, y)`` of the
        last call in either direction; for any other pair, computed afresh from ``x``."""
        memo = self._recall(x=x, y=y)
        if memo is None:
            return self.call_and_log_det(x)[1]
        if memo.log_det is None:  # deferred by a call without gradients (lazy_log_det)
            _, memo.log_det = self.forward_and_log_det(memo.x)
            if is_validation_enabled():
                check_output(self, memo.x, memo.y, memo.log_det, "forward")
        return memo.log_det

    def with_cache(self, cache_size: int = 1):
        """This layer with torch's ``cache_size`` (0 or 1): a shallow copy sharing every parameter and buffer.

        The remembered pair already does what torch's cache does (and also notices in-place edits), so both
        behave alike: ``t.with_cache(1).inv(y)`` of the last output returns the last input, and a forward call
        always computes.
        """
        if cache_size == self._cache_size:
            return self
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        new = copy.copy(self)
        new._cache_size, new._cached_x_y, new._inv, new._memo = cache_size, (None, None), None, None
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_memo"] = None
        state["_inv"] = None
        state.pop("_module_inverse", None)
        if "_cached_x_y" in state:
            state["_cached_x_y"] = (None, None)
        return state

    # ----------------------------------------------------------------- naming, for error messages
    def _name(self) -> str:
        return type(self).__name__

    def _describe_nonfinite(self, x, direction: str) -> str:
        return f"{self._name()}.{direction}"

    __repr__ = torch.nn.Module.__repr__  # not Transform's, which hides the submodules and extra_repr


class Inverse(FlowTransform):
    """The inverse of a transform, as an ``nn.Module`` whose parameters are the wrapped transform's.

    Unlike torch's ``t.inv``, it can sit in module lists, optimisers and ``pyro.module``. Build one with
    :func:`pyroflows.inverse`, which returns the same module for the same ``t`` while it is alive (so
    ``inverse(t) == inverse(t)``, as torch's inverses compare equal) and unwraps ``inverse(inverse(t))`` to ``t``.
    Its ``sign`` is the base's (an inverse of a monotone map runs the same way).

    :param torch.distributions.Transform base: the transform to invert (any bijective torch transform;
        a :class:`FlowTransform` inverts in one pass).

    Example::

        >>> import torch, pyroflows
        >>> t = pyroflows.transforms.Planar(3)
        >>> inv = pyroflows.inverse(t)
        >>> set(map(id, inv.parameters())) == set(map(id, t.parameters()))
        True
        >>> pyroflows.inverse(inv) is t and pyroflows.inverse(t) is inv
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
        # pyroflows.inverse(base) returns this module from now on (a weak reference: no cycle in the module tree)
        base.__dict__["_module_inverse"] = weakref.ref(self)

    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return self.base.codomain

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return self.base.domain

    @property
    def sign(self):
        return self.base.sign

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


def has_random_log_det(module: torch.nn.Module) -> bool:
    """Whether ``module`` or one of its submodules estimates its log-det at random in its current mode
    (:attr:`FlowTransform.random_log_det`).

    :param torch.nn.Module module: a flow, or any module holding flows.
    :returns: ``bool``.
    """
    return any(getattr(m, "random_log_det", False) for m in module.modules())


def inverse(t: Transform) -> Transform:
    """Module-aware inverse of ``t``; see :class:`Inverse`.

    ``inverse(inverse(t)) is t`` for every ``t``, an :class:`Inverse` included, and ``inverse(t)`` returns the
    same module on every call while that module is alive. (The one exception is a double inverse built by hand,
    ``d = Inverse(Inverse(t))``, which this function never builds: ``inverse(d)`` unwraps to ``Inverse(t)`` and
    ``inverse(inverse(d))`` to ``t``.)

    :param torch.distributions.Transform t: a bijective transform.
    :returns: ``t.base`` when ``t`` is an :class:`Inverse`; otherwise ``t``'s :class:`Inverse`.

    Example::

        >>> import torch, pyroflows
        >>> flow = pyroflows.realnvp(2, num_layers=2)
        >>> inv = pyroflows.inverse(flow)  # latent -> data for a density-direction flow
        >>> pyroflows.inverse(inv) is flow and pyroflows.inverse(flow) is inv
        True
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(inv(flow(x).clone()), x, atol=1e-5)
        True
    """
    if isinstance(t, Inverse):
        return t.base
    ref = t.__dict__.get("_module_inverse")
    existing = ref() if ref is not None else None
    return existing if existing is not None else Inverse(t)


class Compose(FlowTransform):
    """A sequence of transforms run once per call, their log-dets summed in the same pass.

    A :class:`FlowTransform` over its parts: it remembers the log-det of its last pair and never recomputes
    intermediates, registers the parts that are modules (so ``pyro.module``, optimisers and
    ``AutoNormalizingFlow`` see all parameters), and indexes, slices and iterates over its parts like a list
    (``len(c) == len(c.parts)``, ``c[i] is c.parts[i]``). Parts may be any torch transforms (plain ones, such as
    ``ExpTransform``, run through their own ``__call__`` and ``log_abs_det_jacobian``); its ``sign`` is the
    product of the parts' signs.

    :param parts: the transforms, applied first to last in the forward direction.
    :param int cache_size: 0 or 1, accepted for torch's API (see :class:`FlowTransform`).

    Example::

        >>> import torch, pyroflows
        >>> from torch.distributions import ExpTransform
        >>> from pyroflows.transforms import Compose, Planar
        >>> flow = Compose([Planar(2), ExpTransform(), Planar(2)])
        >>> len(flow), flow[1] is flow.parts[1]
        (3, True)
        >>> x = torch.randn(5, 2)
        >>> flow.log_abs_det_jacobian(x, flow(x)).shape
        torch.Size([5])
    """

    def __init__(self, parts: Iterable[Transform], cache_size: int = 0):
        parts = tuple(parts)
        for i, part in enumerate(parts):
            if not isinstance(part, Transform):
                raise TypeError(f"Compose part {i} is a {type(part).__name__}, not a torch Transform")
        # torch's rule for the domain and codomain of a composition (the largest event_dim any part needs)
        spec = ComposeTransform(list(parts))
        super().__init__(event_dim=spec.domain.event_dim, cache_size=cache_size)
        self._domain, self._codomain = spec.domain, spec.codomain
        first = parts[0] if parts else None
        self._event_shape = first.event_shape if isinstance(first, FlowTransform) else None
        self._parts = parts
        for i, part in enumerate(parts):
            if isinstance(part, torch.nn.Module):
                self.add_module(str(i), part)
        # How many rightmost dims of each part's log-det belong to the composition's event, once, not per call.
        self._sum_dims_forward, self._sum_dims_inverse = [], []
        event_dim = self._domain.event_dim
        for part in parts:
            self._sum_dims_forward.append(event_dim - part.domain.event_dim)
            event_dim += part.codomain.event_dim - part.domain.event_dim
        event_dim = self._codomain.event_dim
        for part in reversed(parts):
            self._sum_dims_inverse.append(event_dim - part.codomain.event_dim)
            event_dim += part.domain.event_dim - part.codomain.event_dim

    @property
    def parts(self) -> tuple[Transform, ...]:
        """The transforms, first to last in the forward direction."""
        return self._parts

    def __len__(self) -> int:
        return len(self._parts)

    def __iter__(self) -> Iterator[Transform]:
        return iter(self._parts)

    def __getitem__(self, index):
        return Compose(self._parts[index]) if isinstance(index, slice) else self._parts[index]

    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return self._domain

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return self._codomain

    @property
    def sign(self):
        sign = 1
        for part in self._parts:
            sign = sign * part.sign
        return sign

    def forward_shape(self, shape):
        for part in self._parts:
            shape = part.forward_shape(shape)
        return shape

    def inverse_shape(self, shape):
        for part in reversed(self._parts):
            shape = part.inverse_shape(shape)
        return shape

    @property
    def output_event_shape(self):
        shape = self._event_shape
        for part in self._parts:
            if shape is None or any(s is None for s in shape):
                return getattr(self._parts[-1], "output_event_shape", None)
            shape = tuple(part.forward_shape(shape))
        return shape

    def forward_and_log_det(self, x):
        log_det = x.new_zeros(x.shape[: x.dim() - self._domain.event_dim])
        for part, n in zip(self._parts, self._sum_dims_forward):
            x_in = x
            x, ld = forward_and_log_det(part, x)
            remember_for_warm_start(part, x_in, x, ld)
            log_det = log_det + _sum_rightmost(ld, n)
        return x, log_det

    def inverse_and_log_det(self, y):
        log_det = y.new_zeros(y.shape[: y.dim() - self._codomain.event_dim])
        for part, n in zip(reversed(self._parts), self._sum_dims_inverse):
            y, ld = inverse_and_log_det(part, y)
            log_det = log_det + _sum_rightmost(ld, n)
        return y, log_det

    @property
    def lazy_log_det(self):
        """Whether any part defers its log-det (then the composition does, and recomputes all of it on request)."""
        return any(getattr(part, "lazy_log_det", False) for part in self._parts)

    def forward_only(self, x):
        for part in self._parts:
            x = forward_only(part, x)
        return x

    def inverse_only(self, y):
        for part in reversed(self._parts):
            y = inverse_only(part, y)
        return y

    def _describe_nonfinite(self, x, direction):
        """Re-run part by part (no grad) to name the first part whose output or log-det is not finite."""
        parts = list(enumerate(self._parts))
        if direction == "inverse":
            parts = parts[::-1]
        step = forward_and_log_det if direction == "forward" else inverse_and_log_det
        with torch.no_grad():
            for i, part in parts:
                x_in = x
                x, ld = step(part, x)
                if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(ld).all())):
                    where = f"part {i} of {len(self._parts)} in Compose.{direction}"
                    if isinstance(part, Compose):  # name the innermost culprit
                        return f"{part._describe_nonfinite(x_in, direction)} <- {where}"
                    name = part._name() if isinstance(part, FlowTransform) else type(part).__name__
                    return f"{name} ({where})"
        return f"Compose.{direction}"

    def _name(self):
        return "Compose"
