r"""Shape-changing layers: :class:`Squeeze` (space to depth) and :class:`MultiScale` (RealNVP factor-out)."""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalTransform

from .._deprecation import renamed_kwargs
from ._shapes import count, legacy_image_channels, parse_shape
from .base import FlowTransform, forward_and_log_det, inverse_and_log_det


class Squeeze(FlowTransform):
    r"""Space-to-depth :math:`(C, H, W) \to (4C, H/2, W/2)`: each 2x2 patch becomes 4 channels; log-det 0.

    Output channel ``4c + 2i + j`` holds input channel ``c`` at offset ``(i, j)`` of each patch.

    Reference: Dinh, Sohl-Dickstein & Bengio, *Density estimation using Real NVP*, ICLR 2017, §3.6.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import Squeeze
        >>> Squeeze()(torch.zeros(5, 3, 8, 6)).shape
        torch.Size([5, 12, 4, 3])
        >>> Squeeze().forward_shape((3, 8, 6))
        (12, 4, 3)
    """

    def __init__(self):
        super().__init__(event_dim=3, event_shape=(None, None, None))

    def forward_shape(self, shape):
        *batch, c, h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got H={h}, W={w}")
        return (*batch, 4 * c, h // 2, w // 2)

    def inverse_shape(self, shape):
        *batch, c, h, w = shape
        if c % 4:
            raise ValueError(f"Squeeze's inverse needs a channel count divisible by 4, got C={c}")
        return (*batch, c // 4, 2 * h, 2 * w)

    @property
    def output_event_shape(self):
        return (None, None, None)

    def forward_and_log_det(self, x):
        batch, (c, h, w) = x.shape[:-3], x.shape[-3:]
        self.forward_shape((c, h, w))
        y = x.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(batch + (4 * c, h // 2, w // 2))
        return y, x.new_zeros(batch)

    def inverse_and_log_det(self, y):
        batch, (c, h, w) = y.shape[:-3], y.shape[-3:]
        self.inverse_shape((c, h, w))
        x = y.reshape(-1, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(batch + (c // 4, 2 * h, 2 * w))
        return x, y.new_zeros(batch)


class MultiScale(FlowTransform):
    r"""RealNVP factor-out: the first ``C - C_keep`` channels go straight to the latent, the last ``C_keep``
    run through ``inner`` (the rest of the flow, typically the next level).

    .. math::

        y = \big[\, g(x_f \mid x_k),\; \mathrm{reshape}(\mathrm{inner}(x_k)) \,\big], \qquad
        \log|\det| = \log|\det \partial g / \partial x_f| + \log|\det \partial\,\mathrm{inner}/\partial x_k|,

    where :math:`g` is an optional learned conditional prior for the factored channels, written as an affine
    coupling conditioned on the kept channels (``prior=True``), and the output of ``inner`` is reshaped back to
    ``(C_keep, H, W)`` (a reshape is volume preserving), so the layer keeps the event shape and composes like
    any other.

    Reference: Dinh, Sohl-Dickstein & Bengio, *Density estimation using Real NVP*, ICLR 2017, §3.6;
    Kingma & Dhariwal, *Glow*, NeurIPS 2018 (learned prior for the factored half).

    :param shape: the input's ``(C, H, W)`` (``H``, ``W`` may be ``None``).
    :param inner: the transform applied to the kept channels, shape ``(C_keep, H, W)`` to any shape of the same size.
    :param int keep_channels: ``C_keep`` (default ``C // 2``).
    :param bool prior: add the learned conditional prior coupling on the factored channels.
    :param int hidden: the prior's conditioner width.
    :param int context_dim: for a conditional flow: ``inner`` may be conditional (a Pyro
        ``ConditionalTransform``) and the prior's conditioner also sees the context; the two methods then take
        ``context=``. Use the layer through :class:`~pyroflows.transforms.ConditionalLayer`.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import AffineCoupling, MultiScale, Squeeze, Compose
        >>> coupling = AffineCoupling((8, None, None), mask="channel", hidden=8)
        >>> inner = Compose([Squeeze(), coupling])  # (2, 4, 4) -> (8, 2, 2)
        >>> layer = MultiScale((4, None, None), inner, hidden=8)  # keeps the last 2 of 4 channels
        >>> x = torch.randn(3, 4, 4, 4)
        >>> y = layer(x)
        >>> y.shape, layer.log_abs_det_jacobian(x, y).shape
        (torch.Size([3, 4, 4, 4]), torch.Size([3]))
        >>> torch.allclose(layer.inv(y.clone()), x, atol=1e-5)
        True
    """

    @renamed_kwargs(num_channels="shape", hidden_channels="hidden")
    def __init__(
        self,
        shape: tuple,
        inner: torch.distributions.Transform,
        keep_channels: int | None = None,
        prior: bool = True,
        hidden: int = 64,
        *,
        context_dim: int = 0,
    ):
        if isinstance(shape, int):
            event_shape = legacy_image_channels(shape, "MultiScale", "an int shape")
        else:
            event_shape = parse_shape(shape, "MultiScale")
        if len(event_shape) != 3:
            raise ValueError(f"MultiScale: works on images, shape must be (C, H, W), got {shape!r}")
        num_channels = event_shape[0]
        keep = num_channels // 2 if keep_channels is None else keep_channels
        if not 0 < keep < num_channels:
            raise ValueError(f"MultiScale: keep_channels must lie in (0, {num_channels}), got {keep!r}")
        super().__init__(event_dim=3, event_shape=event_shape)
        self.num_channels = num_channels
        self.keep_channels = keep
        self.context_dim = count(context_dim, "context_dim", "MultiScale", low=0)
        self.inner = inner
        self.prior = None
        if prior:
            from .coupling import AffineCoupling

            # channel groups [factored, kept]; flip: the kept channels condition, the factored ones move
            self.prior = AffineCoupling(
                (num_channels, None, None),
                mask="channel",
                split=num_channels - keep,
                flip=True,
                hidden=hidden,
                context_dim=self.context_dim,
            )

    def _inner(self, context):
        """``inner``, conditioned on ``context`` when it is conditional."""
        if isinstance(self.inner, ConditionalTransform):
            if context is None:
                raise ValueError("MultiScale: the inner flow is conditional; call .condition(context) first")
            return self.inner.condition(context)
        return self.inner

    def _prior(self, x, inverse, context):
        method = self.prior.inverse_and_log_det if inverse else self.prior.forward_and_log_det
        return method(x, context=context) if self.context_dim else method(x)

    def _split(self, x):
        n_f = self.num_channels - self.keep_channels
        return x[..., :n_f, :, :], x[..., n_f:, :, :]

    def forward_shape(self, shape):
        """The shape is kept; ``inner`` must accept the kept channels at this size (e.g. its squeezes need even
        sides), which is checked here so that a size the flow cannot take fails when the model is built."""
        *batch, c, h, w = shape
        if c != self.num_channels:
            raise ValueError(f"MultiScale expects {self.num_channels} channels, got shape {tuple(shape)}")
        self.inner.forward_shape((*batch, self.keep_channels, h, w))
        return tuple(shape)

    def inverse_shape(self, shape):
        return self.forward_shape(shape)

    def forward_and_log_det(self, x, context=None):
        inner = self._inner(context)
        log_det = x.new_zeros(x.shape[:-3])
        if self.prior is not None:
            x, log_det = self._prior(x, False, context)
        x_f, x_k = self._split(x)
        z_k, ld = forward_and_log_det(inner, x_k)
        batch = z_k.shape[: z_k.dim() - 3]  # a context may have broadcast the batch
        return torch.cat(
            [x_f.expand(batch + x_f.shape[-3:]), z_k.reshape(batch + x_k.shape[-3:])], dim=-3
        ), log_det + ld

    def inverse_and_log_det(self, y, context=None):
        inner = self._inner(context)
        y_f, y_k = self._split(y)
        inner_shape = tuple(self.inner.forward_shape(y_k.shape[-3:]))
        x_k, log_det = inverse_and_log_det(inner, y_k.reshape(y_k.shape[:-3] + inner_shape))
        batch = x_k.shape[: x_k.dim() - 3]
        x = torch.cat([y_f.expand(batch + y_f.shape[-3:]), x_k], dim=-3)
        if self.prior is not None:
            x, ld = self._prior(x, True, context)
            log_det = log_det + ld
        return x, log_det

    def extra_repr(self) -> str:
        return f"shape={self.event_shape}, keep_channels={self.keep_channels}"
