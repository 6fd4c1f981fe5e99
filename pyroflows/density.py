r"""Density models: a flow from data to a standard-normal latent, with exact log-likelihood and bits/dim."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import nn

from .data.images import check_pixels, dequantize
from .transforms import ConditionalCompose, inverse
from .transforms.base import Compose, FlowTransform, forward_only, inverse_only


class FlowDensity(nn.Module):
    r"""A normalizing-flow density model :math:`\log p(x) = \log p_Z(f(x)) + \log|\det \partial f / \partial x|`.

    ``flow`` maps data to latent (the RealNVP/Glow/Residual-Flow direction); sampling runs its inverse.
    The base is a standard normal over the latent shape ``flow.forward_shape(event_shape)`` (its ``loc`` and
    ``scale`` are buffers, so ``.to(device)`` moves everything), or the Pyro distribution ``base``.
    The image builders start with a :class:`~pyroflows.transforms.Logit`, so their data space is
    :math:`[0, 1]^D` and :meth:`log_prob` is a density there; :meth:`bits_per_dim` turns it into the
    standard dequantised bits/dim of integer pixels.

    The first :meth:`log_prob` call in training mode performs ActNorm's data-dependent init.

    **Conditional density** :math:`p(x \mid c)`: give a conditional flow (e.g. ``pyroflows.realnvp(D,
    context_dim=k)``, a Pyro ``ConditionalTransformModule``) and ``context_shape=(k,)``; then :meth:`log_prob`,
    :meth:`bits_per_dim` and :meth:`sample` take ``context`` (shape ``(..., k)``, broadcast against the data's batch
    shape), and :attr:`distribution` is a Pyro ``ConditionalTransformedDistribution``.

    :param flow: a transform from data to latent (e.g. :func:`pyroflows.glow`), or a conditional one.
    :param event_shape: the data event shape, e.g. ``(1, 8, 8)`` or ``(2,)``.
    :param base: optional Pyro distribution over the latent, with ``event_shape`` equal to the latent shape.
    :param context_shape: ``(k,)`` for a conditional flow; ``None`` otherwise.

    Example::

        >>> import torch, pyroflows
        >>> model = pyroflows.FlowDensity(pyroflows.glow((1, 8, 8), levels=2, num_layers=1, hidden=8), (1, 8, 8))
        >>> pixels = torch.randint(0, 256, (4, 1, 8, 8))
        >>> model.bits_per_dim(pixels).shape
        torch.Size([4])
        >>> model.sample(3).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, flow: torch.distributions.Transform, event_shape: Sequence[int], base=None, context_shape=None):
        super().__init__()
        self.flow = flow
        self.event_shape = tuple(int(n) for n in event_shape)
        conditional = isinstance(flow, ConditionalTransform)
        if conditional != (context_shape is not None):
            raise ValueError(
                "FlowDensity: a conditional flow needs context_shape=(k,), and context_shape needs a conditional flow "
                f"(got a {type(flow).__name__} and context_shape={context_shape!r})"
            )
        self.context_shape = None if context_shape is None else tuple(int(n) for n in context_shape)
        if conditional and (len(self.context_shape) != 1 or self.context_shape[0] != flow.context_dim):
            raise ValueError(
                f"FlowDensity: context_shape {self.context_shape} does not match the flow's context_dim "
                f"{flow.context_dim}"
            )
        try:
            self.latent_shape = tuple(flow.forward_shape(self.event_shape))
        except ValueError as e:  # e.g. a multi-scale flow whose squeezes need sides divisible by 2**levels
            raise ValueError(f"FlowDensity: the flow cannot take data of shape {self.event_shape}: {e}") from None
        if flow.domain.event_dim != len(self.event_shape):
            raise ValueError(
                f"FlowDensity: the flow has event_dim {flow.domain.event_dim} but event_shape {self.event_shape} "
                f"has {len(self.event_shape)} dims"
            )
        if base is not None and tuple(base.event_shape) != self.latent_shape:
            raise ValueError(f"FlowDensity: base event_shape {tuple(base.event_shape)} != latent {self.latent_shape}")
        self.base = base
        self.register_buffer("_loc", torch.zeros(self.latent_shape))
        self.register_buffer("_scale", torch.ones(self.latent_shape))

    @property
    def dim(self) -> int:
        """Number of data dimensions ``D``."""
        return math.prod(self.event_shape)

    def base_dist(self, temperature: float = 1.0):
        """The latent distribution (the standard normal's scale multiplied by ``temperature``)."""
        if self.base is not None:
            if temperature != 1.0:
                raise ValueError("FlowDensity: temperature applies to the default standard-normal base only")
            return self.base
        return dist.Normal(self._loc, self._scale * temperature).to_event(len(self.latent_shape))

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FlowDensity expects a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[x.dim() - len(self.event_shape) :]) != self.event_shape or x.dim() < len(self.event_shape):
            raise ValueError(f"FlowDensity expects data of shape (..., {self.event_shape}), got {tuple(x.shape)}")
        if x.is_meta or self._loc.is_meta:
            raise ValueError(
                "FlowDensity: meta tensors carry no values to compute a density of; move the "
                + ("model" if self._loc.is_meta else "data")
                + " to a real device (model.to_empty(device=...) and load weights, or x.to(device))"
            )

    def flow_for(self, context: torch.Tensor | None = None):
        """The flow (data to latent) for ``context``: ``flow.condition(context)`` for a conditional model, else the
        flow; a clear error for a missing context, or a context given to an unconditional model.

        :param torch.Tensor context: shape ``(..., k)`` for a conditional model.
        """
        if self.context_shape is None:
            if context is not None:
                raise ValueError("FlowDensity: this model is not conditional; it takes no context")
            return self.flow
        if context is None:
            raise ValueError(
                f"FlowDensity: this model is conditional: pass context of shape (..., {self.context_shape[0]})"
            )
        return self.flow.condition(context)

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log-density of ``x`` (shape ``batch + event_shape``) in data space; returns shape ``batch``
        (broadcast with the context's batch shape for a conditional model).

        Non-finite results raise ``RuntimeError`` naming the layer (with validation on, see
        :func:`pyroflows.enable_validation`).

        :param torch.Tensor x: data.
        :param torch.Tensor context: a conditional model's context, shape ``(..., k)``.
        """
        self._check(x)
        flow = self.flow_for(context)
        batch = x.shape[: x.dim() - len(self.event_shape)]
        if 0 in batch:  # an empty batch has an empty answer (layers would reshape 0 elements)
            return torch.zeros(batch, dtype=self._loc.dtype, device=x.device)
        return self._latent_and_log_prob(x, flow)[1]

    def _latent_and_log_prob(self, x: torch.Tensor, flow) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass through ``flow``: the latent ``f(x)`` and :math:`\\log p(x)` (checked data)."""
        if isinstance(flow, FlowTransform):
            # one pass even without gradients, where residual blocks defer; the latent never leaves this model, so
            # the pair is not remembered (it would keep the pass's graph alive after the caller dropped the result)
            z, log_det = flow.call_and_log_det(x, remember=False)
        else:
            z = flow(x)
            log_det = flow.log_abs_det_jacobian(x, z)
        return z, self.base_dist().log_prob(z) + log_det

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`log_prob` (so ``DistributedDataParallel`` can wrap the model)."""
        return self.log_prob(x, context)

    def bits_per_dim(
        self,
        x: torch.Tensor,
        n_bins: int = 256,
        generator: torch.Generator | None = None,
        context: torch.Tensor | None = None,
    ):
        r"""Per-example bits/dim of integer-valued pixels ``x`` in ``[0, n_bins)`` (any numeric dtype).

        Dequantises uniformly with :func:`pyroflows.data.dequantize` in the model's dtype,
        :math:`\tilde x = (x + u)/n_{bins}`, :math:`u \sim U[0, 1)^D`, and returns
        :math:`\big(-\log p(\tilde x) + D \log n_{bins}\big) / (D \log 2)`
        (:func:`pyroflows.density.to_bits_per_dim`), which includes the logit Jacobian of the flow's preprocessing:
        the standard figure of the RealNVP/Glow papers. :func:`pyroflows.train.evaluate` reports the mean of this.

        :param x: pixels, shape ``batch + event_shape``.
        :param int n_bins: number of intensity levels (256 for 8-bit images, 17 for scikit-learn's digits).
        :param generator: optional torch generator for the dequantisation noise (drawn on its device).
        :param torch.Tensor context: a conditional model's context.
        """
        self._check(x)
        x_cont = self._dequantized(x, n_bins, generator, "FlowDensity.bits_per_dim")
        return to_bits_per_dim(self.log_prob(x_cont, context), self.dim, n_bins)

    def _dequantized(self, x: torch.Tensor, n_bins: int, generator, caller: str) -> torch.Tensor:
        """Integer pixels, checked, as continuous data in the model's dtype: :math:`(x + u)/n_{bins}`."""
        check_pixels(x, n_bins, caller)
        return dequantize(x.to(self._loc.dtype), n_bins, generator, check=False)  # checked just above

    def sample(
        self, n: int, temperature: float = 1.0, clamp: bool = True, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``n`` samples in data space, the latent drawn at ``temperature`` (0 gives the mode path,
        the image of the latent's mean). Runs in eval mode and without gradients. A conditional model draws ``n``
        samples per context: shape ``(n, *context_batch, *event_shape)``.

        With ``clamp`` (default), samples are clipped to the data range of a flow that starts with a
        :class:`~pyroflows.transforms.Logit`, ``[0, 1]``: the model is a density on a slightly wider interval,
        :math:`(-\alpha/(1-2\alpha), 1 + \alpha/(1-2\alpha))`, and :attr:`distribution` draws from all of it."""
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"sample: n must be an int >= 1, got {n!r}")
        if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"sample: temperature must be a finite number >= 0, got {temperature!r}")
        flow = self.flow_for(context)
        shape = (n,) + (() if context is None else tuple(context.shape[:-1]))
        with self._evaluating():
            if temperature == 0:
                z = self._loc.expand(shape + self.latent_shape)
            else:
                z = self.base_dist(temperature).sample(shape)
            x = self._decode(z, flow)
        data_range = self._data_range()
        if clamp and data_range is not None:
            x = x.clamp(*data_range)
        return x

    # ----------------------------------------------------------------- latent space
    def _data_range(self):
        """The data interval of a flow that starts with a ``Logit`` (samples and decodes are clipped to it)."""
        return getattr(self._first_layer(), "data_range", None)

    def encode(
        self,
        x: torch.Tensor,
        n_bins: int | None = None,
        generator: torch.Generator | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The exact latent ``z = f(x)`` of the whole flow, shape ``batch + latent_shape``.

        For a multi-scale model this is one tensor holding every factored-out part where the flow put it (the
        factor-outs keep the event shape). Without gradients unless ``x`` needs them.

        :param x: data in the flow's data space (floats), or integer pixels with ``n_bins``: those are dequantised
            as :meth:`bits_per_dim` does, :math:`(x + u)/n_{bins}` with :math:`u \\sim U[0, 1)` from ``generator``,
            so that :meth:`decode` with the same ``n_bins`` gives the pixels back.
        :param int n_bins: intensity levels of integer pixels (``None``: ``x`` is already continuous).
        :param generator: torch generator for the dequantisation noise.
        :param torch.Tensor context: a conditional model's context.
        """
        self._check(x)
        if n_bins is not None:
            x = self._dequantized(x, n_bins, generator, "FlowDensity.encode")
        flow = self.flow_for(context)
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            return forward_only(flow, x)

    def decode(self, z: torch.Tensor, n_bins: int | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        """Data from latents: the flow's exact inverse (a residual model's to its fixed-point tolerance), clipped to
        the data range of a flow that starts with a ``Logit``; with ``n_bins``, quantised back to integer pixels
        (``floor(x · n_bins)``, the inverse of :meth:`encode`'s dequantisation).

        :param torch.Tensor z: latents, shape ``batch + latent_shape`` (a latent of another architecture is refused).
        :param int n_bins: return integer pixels in ``[0, n_bins)`` (``None``: continuous data).
        :param torch.Tensor context: a conditional model's context.
        """
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"FlowDensity.decode expects a torch.Tensor, got {type(z).__name__}")
        k = len(self.latent_shape)
        if z.dim() < k or tuple(z.shape[z.dim() - k :]) != self.latent_shape:
            raise ValueError(
                f"FlowDensity.decode expects latents of shape (..., {self.latent_shape}), got {tuple(z.shape)}: "
                "a latent from another architecture or image size?"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and z.requires_grad):
            x = self._decode(z, self.flow_for(context))
        data_range = self._data_range()
        if data_range is not None:
            x = x.clamp(*data_range)
        if n_bins is None:
            return x
        return (x.clamp(0.0, 1.0) * n_bins).floor().clamp_max(n_bins - 1).long()

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, num: int = 8, path: str = "linear", **encode_kwargs):
        """Images along a path between the latents of ``x0`` and ``x1``, in data space: ``(num, *event_shape)``.

        ``path="linear"``: :math:`z_t = (1 - t) z_0 + t z_1`; ``"slerp"``: spherical interpolation, which keeps the
        latent's norm near that of typical draws (a Gaussian's mass lies near a sphere). Both ends reproduce the
        inputs. Runs in eval mode.

        :param x0: one example, shape ``event_shape`` (integer pixels with ``n_bins=`` in ``encode_kwargs``).
        :param x1: another.
        :param int num: points on the path, ``>= 2``, ends included.
        :param str path: ``"linear"`` or ``"slerp"``.
        :param encode_kwargs: passed to :meth:`encode` (``n_bins``, ``generator``, ``context``).
        """
        from .latent import interpolate_latents

        for x in (x0, x1):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != self.event_shape:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"interpolate: expects one example of shape {self.event_shape}, got {shape}")
        with self._evaluating():
            z = interpolate_latents(self.encode(x0, **encode_kwargs), self.encode(x1, **encode_kwargs), num, path)
            return self.decode(z, context=encode_kwargs.get("context"))

    def manipulate(self, x: torch.Tensor, direction: torch.Tensor, alphas, **encode_kwargs) -> torch.Tensor:
        """``decode(encode(x) + α · direction)`` for each ``α``: shape ``(len(alphas), *x.shape)`` (Glow's attribute
        manipulation; :func:`pyroflows.latent.attribute_direction` gives ``direction``). Runs in eval mode.

        :param x: examples, shape ``batch + event_shape`` (or one example).
        :param torch.Tensor direction: a latent-space direction, shape ``latent_shape``.
        :param alphas: the step sizes, a sequence or 1-D tensor.
        :param encode_kwargs: passed to :meth:`encode`.
        """
        alphas = torch.as_tensor(alphas, dtype=self._loc.dtype, device=self._loc.device).reshape(-1)
        if not isinstance(direction, torch.Tensor) or tuple(direction.shape) != self.latent_shape:
            shape = tuple(direction.shape) if isinstance(direction, torch.Tensor) else type(direction).__name__
            raise ValueError(f"manipulate: direction must have the latent shape {self.latent_shape}, got {shape}")
        with self._evaluating():
            z = self.encode(x, **encode_kwargs)
            moved = z.unsqueeze(0) + alphas.reshape((-1,) + (1,) * z.dim()) * direction.to(z)
            return self.decode(moved, context=encode_kwargs.get("context"))

    @contextlib.contextmanager
    def _evaluating(self):
        """Eval mode and no gradients for the duration (the mode restored after)."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def _decode(self, z: torch.Tensor, flow) -> torch.Tensor:
        """Data from latents (sampling): the flow's inverse, without the log-det (a residual flow's would cost more
        than the inverse)."""
        return inverse_only(flow, z)

    def _first_layer(self):
        """The flow's first layer (its ``data_range``, if any, bounds the samples)."""
        first = self.flow
        while isinstance(first, (Compose, ConditionalCompose)) and len(first):
            first = first[0]
        return first

    @property
    def distribution(self) -> dist.TransformedDistribution:
        """The model as a Pyro distribution over data, usable as ``pyro.sample("x", d.distribution, obs=x)``.

        Its support is the flow's domain (for image builders, the open interval of
        :class:`~pyroflows.transforms.Logit`, a little wider than ``[0, 1]``): every draw lies in it and has a finite
        ``log_prob``. For a conditional model: a Pyro ``ConditionalTransformedDistribution``, whose
        ``.condition(context)`` is the distribution for that context."""
        if self.context_shape is not None:
            return dist.ConditionalTransformedDistribution(self.base_dist(), [self.flow.inv])
        return dist.TransformedDistribution(self.base_dist(), inverse(self.flow))


def to_bits_per_dim(log_prob: torch.Tensor, dim: int, n_bins: int) -> torch.Tensor:
    r"""Bits/dim of integer pixels from the log-density of their dequantised values in :math:`[0, 1)^D`:
    :math:`\big(-\log p(\tilde x) + D \log n_{bins}\big) / (D \log 2)`, elementwise.

    The one formula behind :meth:`pyroflows.FlowDensity.bits_per_dim`, :func:`pyroflows.train.evaluate` and the
    training loss of :func:`pyroflows.train.fit` (which applies it to the batch mean of ``log_prob``).

    :param log_prob: log-densities in nats, any shape.
    :param int dim: the number of data dimensions ``D``.
    :param int n_bins: the number of intensity levels.

    Example::

        >>> import math, torch
        >>> to_bits_per_dim(torch.tensor([0.0]), 64, 256)  # the uniform density on [0, 1): 8 bits per pixel
        tensor([8.])
    """
    return -(log_prob - dim * math.log(n_bins)) / (dim * math.log(2.0))


__all__ = ["FlowDensity", "to_bits_per_dim"]
