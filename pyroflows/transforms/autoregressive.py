r"""Affine autoregressive layers (Kingma et al., 2016, IAF; Papamakarios et al., 2017, MAF) and their builder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.made import MADE, _check_order
from ._shapes import count, vector_dim
from .base import FlowTransform
from .conditional import broadcast_context


class AffineAutoregressive(FlowTransform):
    r"""Affine autoregressive layer: for coordinates in the autoregressive ``order``,

    .. math::

        y_i = x_i\, e^{s_i(x_{<i})} + t_i(x_{<i}), \qquad
        \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_i s_i(x_{<i}),

    where :math:`x_{<i}` are the coordinates before :math:`i` in the order (``order[j] < order[i]``) and the shift
    :math:`t` and raw log-scale :math:`\tilde s` are the two outputs of one :class:`~pyroflows.nn.MADE` pass.
    The Jacobian is triangular (in the order), so the log-det is the sum of the log-scales. The log-scale is
    bounded, :math:`s = \beta \tanh(\tilde s / \beta)` with ``scale_bound`` :math:`\beta`; the MADE's last layer
    starts at zero, so a fresh layer is the identity.

    The forward map and its log-det take one parallel pass. The inverse is sequential:
    :math:`x_i = (y_i - t_i(x_{<i}))\, e^{-s_i(x_{<i})}` coordinate by coordinate in the order, ``D`` MADE passes
    (each vectorised over the batch and differentiable), with log-det :math:`-\sum_i s_i(x_{<i})` at the
    recovered :math:`x`.

    Direction: in a guide, where the forward map takes base noise to the posterior, this is an inverse
    autoregressive flow (IAF, Kingma et al., 2016): a draw and its log-density come out of one parallel pass,
    and no inverse is ever computed. In a density model, where the forward map takes data to the latent, it is a
    masked autoregressive flow (MAF, Papamakarios et al., 2017): the exact likelihood of data takes one pass,
    and sampling (the inverse) takes ``D``. Alternate the order between layers (``order=torch.arange(D).flip(0)``
    every other layer) so that every coordinate conditions every other.

    References: Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, *Improved Variational Inference with
    Inverse Autoregressive Flow*, NeurIPS 2016; Papamakarios, Pavlakou & Murray, *Masked Autoregressive Flow for
    Density Estimation*, NeurIPS 2017; Germain, Gregor, Murray & Larochelle, *MADE*, ICML 2015.

    :param shape: the event size ``D`` or ``(D,)`` (vectors only).
    :param hidden: MADE hidden sizes (an int for one hidden layer; ``None``: ``(64, 64)``).
    :param order: a permutation of ``range(D)``, the autoregressive order (coordinate ``i`` comes
        ``order[i]``-th); default the identity. With a ``conditioner`` of its own ``order``, leave it ``None``.
    :param float scale_bound: bound :math:`\beta` on the absolute log-scale.
    :param torch.nn.Module conditioner: optional replacement network ``(..., D) -> (..., 2, D)`` (shift, then raw
        log-scale) that is autoregressive in ``order``; default a zero-initialised
        :class:`~pyroflows.nn.MADE`.
    :param int context_dim: size of a context vector every output of the MADE also sees (0: none); use such a layer
        through :class:`~pyroflows.transforms.ConditionalAffineAutoregressive`.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import AffineAutoregressive
        >>> t = AffineAutoregressive(3, hidden=(16,), order=[2, 0, 1])
        >>> x = torch.randn(4, 3)
        >>> torch.equal(t(x), x)  # identity at init
        True
        >>> with torch.no_grad():
        ...     _ = t.conditioner.layers[-1].bias.normal_()
        >>> y = t(x)
        >>> torch.allclose(t.inv(y.clone()), x, atol=1e-5)  # the sequential inverse
        True
        >>> t.log_abs_det_jacobian(x, y).shape
        torch.Size([4])
    """

    def __init__(
        self,
        shape: int | tuple,
        hidden: Sequence[int] | int | None = (64, 64),
        order: Sequence[int] | torch.Tensor | None = None,
        scale_bound: float = 3.0,
        conditioner: nn.Module | None = None,
        *,
        context_dim: int = 0,
    ):
        dim = vector_dim(shape, "AffineAutoregressive")
        context_dim = count(context_dim, "context_dim", "AffineAutoregressive", low=0)
        if not scale_bound > 0:
            raise ValueError(f"AffineAutoregressive: scale_bound must be positive, got {scale_bound!r}")
        super().__init__(event_dim=1, event_shape=(dim,))
        if order is None and conditioner is not None and isinstance(getattr(conditioner, "order", None), torch.Tensor):
            order = conditioner.order
        order = _check_order(order, dim, "AffineAutoregressive")
        if isinstance(conditioner, MADE) and not torch.equal(conditioner.order.cpu(), order):
            raise ValueError("AffineAutoregressive: order differs from the conditioner's own order")
        self.dim = dim
        self.context_dim = context_dim
        self.scale_bound = float(scale_bound)
        self.register_buffer("order", order)
        self.conditioner = (
            conditioner
            if conditioner is not None
            else MADE(dim, (64, 64) if hidden is None else hidden, num_outputs=2, order=order, context_dim=context_dim)
        )

    def _shift_and_log_scale(self, x: torch.Tensor, context=None) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.conditioner(x) if context is None else self.conditioner(x, context)
        shift, raw = params[..., 0, :], params[..., 1, :]
        return shift, self.scale_bound * torch.tanh(raw / self.scale_bound)

    def forward_and_log_det(self, x, context=None):
        if self.context_dim:
            x, context = broadcast_context(x, context, 1, self.context_dim, "AffineAutoregressive")
        shift, log_scale = self._shift_and_log_scale(x, context)
        return x * torch.exp(log_scale) + shift, log_scale.sum(-1)

    def inverse_and_log_det(self, y, context=None):
        if self.context_dim:
            y, context = broadcast_context(y, context, 1, self.context_dim, "AffineAutoregressive")
        # Pass k fills the coordinate that is k-th in the order; its shift and log-scale depend only on coordinates
        # filled before, so they are exact. torch.where builds a new x each pass: no in-place edit of a tensor that
        # autograd needs. After the last pass every log-scale was computed from exact inputs: it is s(x).
        x = torch.zeros_like(y)
        log_scale = None
        for k in range(self.dim):
            shift, log_scale = self._shift_and_log_scale(x, context)
            x = torch.where(self.order == k, (y - shift) * torch.exp(-log_scale), x)
        return x, -log_scale.sum(-1)

    def extra_repr(self) -> str:
        return f"shape={self.event_shape}, scale_bound={self.scale_bound}"
