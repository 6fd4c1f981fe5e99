r"""Conditional layers: flows :math:`q(x \mid c)` whose conditioners also see a context :math:`c`.

A conditional layer is a Pyro ``ConditionalTransformModule``: ``layer.condition(context)`` returns an ordinary
:class:`~pyroflows.transforms.FlowTransform` (a :class:`Conditioned`), the map for that context, with the whole
layer contract (remembered pair, checks, log-det). So conditional flows work wherever Pyro expects them,
``pyro.distributions.ConditionalTransformedDistribution(base, [flow]).condition(context)``, and a conditioned flow
works wherever a flow does.

The context is a vector of ``context_dim`` numbers per example, shape ``(..., context_dim)``; its batch dims
broadcast against the input's (one context for a whole batch, or one per example). For image layers it is tiled
over the pixels and given to the conditioner as extra channels. The Jacobian is taken in ``x`` for a fixed context;
gradients flow into the context (an encoder that computes it is trained with the flow).
"""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalTransform, ConditionalTransformModule
from torch import nn

from ._shapes import count
from .base import Compose, FlowTransform, remember_for_warm_start
from .validation import is_validation_enabled


def broadcast_context(x: torch.Tensor, context, event_dim: int, context_dim: int, where: str):
    """``x`` and ``context`` expanded to their common batch shape; ``ValueError`` naming a missing or ill-shaped
    context.

    :param torch.Tensor x: input, shape ``batch_x + event_shape`` (``event_dim`` trailing dims).
    :param torch.Tensor context: shape ``batch_c + (context_dim,)``; ``batch_x`` and ``batch_c`` must broadcast.
    :param int event_dim: the layer's event dims.
    :param int context_dim: the context size the layer was built for.
    :param str where: the layer's name, for messages.
    :returns: ``(x, context)`` with the same batch shape.

    Example::

        >>> import torch
        >>> x, c = broadcast_context(torch.zeros(5, 3), torch.ones(2), 1, 2, "demo")
        >>> x.shape, c.shape
        (torch.Size([5, 3]), torch.Size([5, 2]))
    """
    if context is None:
        raise ValueError(
            f"{where} is conditional (context_dim={context_dim}): call layer.condition(context) and use the result"
        )
    check_context(context, context_dim, where)
    batch_x = x.shape[: x.dim() - event_dim]
    try:
        batch = torch.broadcast_shapes(batch_x, context.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"{where}: the context's batch shape {tuple(context.shape[:-1])} does not broadcast with the input's "
            f"{tuple(batch_x)}"
        ) from None
    return x.expand(batch + x.shape[x.dim() - event_dim :]), context.expand(batch + (context_dim,))


def join_context(h: torch.Tensor, context: torch.Tensor, event_dim: int) -> torch.Tensor:
    """A conditioner's input with the context appended: along the last dim for vectors, as channels tiled over the
    pixels for images. ``h`` and ``context`` have the same batch shape (:func:`broadcast_context`).

    Example::

        >>> import torch
        >>> join_context(torch.zeros(4, 2, 3, 3), torch.ones(4, 5), 3).shape
        torch.Size([4, 7, 3, 3])
    """
    if event_dim == 1:
        return torch.cat([h, context.to(h.dtype)], dim=-1)
    tiled = context.to(h.dtype)[..., None, None].expand(context.shape + h.shape[-2:])
    return torch.cat([h, tiled], dim=-3)


def check_context(context, context_dim: int, where: str) -> None:
    """``TypeError``/``ValueError`` for a context that is not a floating tensor of shape ``(..., context_dim)``, or
    (with validation on) holds NaN or inf.

    Example::

        >>> import torch
        >>> check_context(torch.zeros(3, 2), 2, "demo")  # fine: returns None
    """
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"{where}: the context must be a torch.Tensor, got {type(context).__name__}")
    if not context.is_floating_point():
        raise TypeError(f"{where}: the context must be a floating tensor, got dtype {context.dtype}")
    if context.dim() < 1 or context.shape[-1] != context_dim:
        raise ValueError(f"{where}: the context must have shape (..., {context_dim}), got {tuple(context.shape)}")
    if is_validation_enabled() and not bool(torch.isfinite(context).all()):
        raise ValueError(f"{where}: the context holds non-finite values (NaN or inf)")


class Conditioned(FlowTransform):
    """A context-aware layer with its context fixed: an ordinary :class:`~pyroflows.transforms.FlowTransform`.

    Made by :meth:`ConditionalLayer.condition`; its parameters are the layer's.

    :param layer: a layer whose ``forward_and_log_det`` / ``inverse_and_log_det`` take ``context=``.
    :param torch.Tensor context: shape ``(..., context_dim)``.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ConditionalAffineCoupling
        >>> t = ConditionalAffineCoupling(3, context_dim=2, hidden=(8,)).condition(torch.randn(2))
        >>> y = t(torch.randn(4, 3))
        >>> t.log_abs_det_jacobian(torch.randn(4, 3), y).shape
        torch.Size([4])
    """

    def __init__(self, layer: FlowTransform, context: torch.Tensor):
        super().__init__(event_dim=layer._event_dim, event_shape=layer.event_shape)
        self.layer = layer
        self.context = context

    @property
    def sign(self):
        return self.layer.sign

    def forward_shape(self, shape):
        return self.layer.forward_shape(shape)

    def inverse_shape(self, shape):
        return self.layer.inverse_shape(shape)

    def forward_and_log_det(self, x):
        y, log_det = self.layer.forward_and_log_det(x, context=self.context)
        # the layer's inverse (called with the context) starts from the layer's own remembered input
        remember_for_warm_start(self.layer, x, y, log_det)
        return y, log_det

    def inverse_and_log_det(self, y):
        return self.layer.inverse_and_log_det(y, context=self.context)


class ConditionalLayer(ConditionalTransformModule):
    """Base of the conditional layers: holds a context-aware layer and conditions it.

    :param layer: a :class:`~pyroflows.transforms.FlowTransform` built with a ``context_dim``, whose two methods take
        ``context=``.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import AffineCoupling, ConditionalLayer
        >>> cond = ConditionalLayer(AffineCoupling(3, hidden=(8,), context_dim=1))
        >>> cond.condition(torch.zeros(1))(torch.randn(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, layer: FlowTransform):
        super().__init__()
        if not getattr(layer, "context_dim", 0):
            raise ValueError(f"ConditionalLayer: {type(layer).__name__} was not built with a context_dim")
        self.layer = layer
        self.context_dim = layer.context_dim
        self.event_dim = layer._event_dim

    def condition(self, context: torch.Tensor) -> Conditioned:
        """The layer's map for ``context`` (shape ``(..., context_dim)``)."""
        check_context(context, self.context_dim, type(self).__name__)
        return Conditioned(self.layer, context)

    def forward_shape(self, shape):
        return self.layer.forward_shape(shape)

    def inverse_shape(self, shape):
        return self.layer.inverse_shape(shape)

    @property
    def domain(self):
        return self.layer.domain


class ConditionalAffineCoupling(ConditionalLayer):
    """An :class:`~pyroflows.transforms.AffineCoupling` whose conditioner also sees a context vector.

    :param shape: ``D`` or ``(D,)`` for vectors, ``(C, H, W)`` for images.
    :param int context_dim: context size (``>= 1``).
    :param kwargs: the coupling's other arguments (``mask``, ``hidden``, ``scale_bound``, ``additive``, ``flip``,
        ``split``).

    Example::

        >>> import torch
        >>> import pyro.distributions as dist
        >>> from pyroflows.transforms import ConditionalAffineCoupling
        >>> t = ConditionalAffineCoupling(2, context_dim=3, hidden=(8,))
        >>> d = dist.ConditionalTransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
        >>> d.condition(torch.randn(3)).sample((4,)).shape
        torch.Size([4, 2])
    """

    def __init__(self, shape, context_dim: int, **kwargs):
        from .coupling import AffineCoupling

        context_dim = count(context_dim, "context_dim", "ConditionalAffineCoupling")
        super().__init__(AffineCoupling(shape, context_dim=context_dim, **kwargs))


class ConditionalSplineCoupling(ConditionalLayer):
    """A :class:`~pyroflows.transforms.SplineCoupling` whose conditioner also sees a context vector.

    :param shape: ``D`` or ``(D,)``.
    :param int context_dim: context size (``>= 1``).
    :param kwargs: the coupling's other arguments (``mask``, ``num_bins``, ``bound``, ``hidden``, ``flip``).

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ConditionalSplineCoupling
        >>> t = ConditionalSplineCoupling(3, context_dim=2, hidden=(8,)).condition(torch.randn(5, 2))
        >>> t(torch.randn(5, 3)).shape
        torch.Size([5, 3])
    """

    def __init__(self, shape, context_dim: int, **kwargs):
        from .spline import SplineCoupling

        context_dim = count(context_dim, "context_dim", "ConditionalSplineCoupling")
        super().__init__(SplineCoupling(shape, context_dim=context_dim, **kwargs))


class ConditionalAffineAutoregressive(ConditionalLayer):
    """An :class:`~pyroflows.transforms.AffineAutoregressive` layer whose MADE also sees a context vector (as inputs
    of degree 0, so every coordinate's shift and scale may depend on it: the autoregressive structure in ``x`` is
    kept).

    :param shape: ``D`` or ``(D,)``.
    :param int context_dim: context size (``>= 1``).
    :param kwargs: the layer's other arguments (``hidden``, ``order``, ``scale_bound``).

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ConditionalAffineAutoregressive
        >>> t = ConditionalAffineAutoregressive(3, context_dim=2, hidden=(8,)).condition(torch.randn(2))
        >>> t(torch.randn(5, 3)).shape
        torch.Size([5, 3])
    """

    def __init__(self, shape, context_dim: int, **kwargs):
        from .autoregressive import AffineAutoregressive

        context_dim = count(context_dim, "context_dim", "ConditionalAffineAutoregressive")
        super().__init__(AffineAutoregressive(shape, context_dim=context_dim, **kwargs))


class ConditionalPlanar(ConditionalLayer):
    """A :class:`~pyroflows.transforms.Planar` layer whose :math:`(u, w, b)` move with a context (a zero-initialised
    linear map of it), the invertibility constraint :math:`w^\\top \\hat u > -1` applied per example.

    :param shape: ``D`` or ``(D,)``.
    :param int context_dim: context size (``>= 1``).
    :param kwargs: the layer's other arguments (``max_iter``, ``margin``).

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ConditionalPlanar
        >>> t = ConditionalPlanar(3, context_dim=2).condition(torch.randn(4, 2))
        >>> t(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(self, shape, context_dim: int, **kwargs):
        from .planar import Planar

        context_dim = count(context_dim, "context_dim", "ConditionalPlanar")
        super().__init__(Planar(shape, context_dim=context_dim, **kwargs))


class ConditionalResidualBlock(ConditionalLayer):
    """A :class:`~pyroflows.transforms.ResidualBlock` whose branch is shifted by a context: the Lipschitz bound in
    ``x`` (hence invertibility) holds for every context; every log-det estimator, the memory-efficient backward and
    the fixed-point inverse pass gradients to the context.

    :param shape: ``D`` or ``(C, H, W)``.
    :param int context_dim: context size (``>= 1``).
    :param kwargs: the block's other arguments (``hidden``, ``coeff``, ``logdet``, ...).

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ConditionalResidualBlock
        >>> t = ConditionalResidualBlock(3, context_dim=2, hidden=(8,), logdet="exact").condition(torch.randn(4, 2))
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-5)
        True
    """

    def __init__(self, shape, context_dim: int, **kwargs):
        from .residual import ResidualBlock

        context_dim = count(context_dim, "context_dim", "ConditionalResidualBlock")
        super().__init__(ResidualBlock(shape, context_dim=context_dim, **kwargs))


class ConditionalCompose(ConditionalTransformModule):
    """A sequence of conditional layers and ordinary transforms; :meth:`condition` gives a
    :class:`~pyroflows.transforms.Compose` of the conditioned layers (one pass, log-dets summed), every conditional
    part seeing the same context.

    :param parts: conditional layers (Pyro ``ConditionalTransform`` objects) and ordinary transforms, in the
        forward direction.

    Example::

        >>> import torch, pyroflows
        >>> flow = pyroflows.realnvp(2, num_layers=2, hidden=(8,), context_dim=3)
        >>> t = flow.condition(torch.randn(5, 3))
        >>> x = torch.randn(5, 2)
        >>> t.log_abs_det_jacobian(x, t(x)).shape
        torch.Size([5])
    """

    def __init__(self, parts):
        super().__init__()
        parts = list(parts)
        if not parts:
            raise ValueError("ConditionalCompose: needs at least one part")
        dims = {getattr(p, "context_dim", None) for p in parts if isinstance(p, ConditionalTransform)} - {None}
        if len(dims) > 1:
            raise ValueError(f"ConditionalCompose: the conditional parts disagree on context_dim: {sorted(dims)}")
        self.context_dim = dims.pop() if dims else None
        self.parts = nn.ModuleList(parts)

    def condition(self, context: torch.Tensor) -> Compose:
        """The flow for ``context``: a :class:`~pyroflows.transforms.Compose`."""
        if self.context_dim is not None:
            check_context(context, self.context_dim, "ConditionalCompose")
        return Compose([p.condition(context) if isinstance(p, ConditionalTransform) else p for p in self.parts])

    def forward_shape(self, shape):
        for p in self.parts:
            shape = p.forward_shape(shape)
        return shape

    def inverse_shape(self, shape):
        for p in reversed(self.parts):
            shape = p.inverse_shape(shape)
        return shape

    @property
    def domain(self):
        return self.parts[0].domain

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i):
        return self.parts[i]


__all__ = [
    "ConditionalAffineAutoregressive",
    "ConditionalAffineCoupling",
    "ConditionalCompose",
    "ConditionalLayer",
    "ConditionalPlanar",
    "ConditionalResidualBlock",
    "ConditionalSplineCoupling",
    "Conditioned",
    "broadcast_context",
    "check_context",
    "join_context",
]
