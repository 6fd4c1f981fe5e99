r"""Continuously indexed flows (Cornish, Caterini, Deligiannidis & Doucet, ICML 2020).

A bijection cannot map a connected base (a standard normal) onto a density with disconnected or oddly connected
support without a region of low but positive density joining the pieces: a flow draws "bridges" between modes.
A continuously indexed flow (CIF) indexes each layer by a continuous latent :math:`u`, so the model is a mixture of
a continuum of flows and can switch between them across the data space. In the density direction (data to latent),
a CIF layer maps its input :math:`x` to

.. math::

    z = F(x; u) = \big(g(x) - t(u)\big) \odot e^{-s(u)}, \qquad
    \log\left|\det \frac{\partial z}{\partial x}\right| = \log\left|\det \frac{\partial g}{\partial x}\right|
        - \sum_i s_i(u),

with :math:`g` an ordinary layer (an affine coupling or a residual block) and :math:`s, t` networks of
:math:`u`. Generatively, :math:`z \sim p_Z` and, layer by layer from the latent end,
:math:`u \sim p(u \mid z)` and :math:`x = F^{-1}(z; u)`. The marginal likelihood
:math:`p(x) = \int p(x, u)\, du` has no closed form; an inference network :math:`q(u \mid x)` per layer gives the
evidence lower bound (ELBO) used for training,

.. math::

    \log p(x) \ge \mathbb{E}_{q}\Big[\log p_Z(z_L) + \sum_\ell \Big(\log\left|\det
        \tfrac{\partial z_\ell}{\partial x_\ell}\right| + \log p(u_\ell \mid z_\ell)
        - \log q(u_\ell \mid x_\ell)\Big)\Big],

and the importance-weighted estimate with :math:`K` draws,
:math:`\log \tfrac1K \sum_k \exp(\text{log-weight}_k)`, used for evaluation: it is a lower bound in expectation
that increases with :math:`K` and converges to :math:`\log p(x)` (Burda et al., 2016).

Everything here is an ordinary PyTorch module: :class:`CIFLayer` (one indexed layer), :class:`CIFFlow` (a stack
of indexed and ordinary layers), :func:`cif` (the builder: the layers of :func:`pyroflows.realnvp` or
:func:`pyroflows.residual_flow` with every coupling or residual block indexed) and :class:`CIFDensity` (the
density model, a :class:`~pyroflows.FlowDensity` whose ``log_prob`` is the importance-weighted estimate, trained by
:func:`pyroflows.train.fit`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .builders import realnvp, residual_flow
from .density import FlowDensity
from .nn.conditioners import MLP, ConvNet
from .transforms import AffineCoupling, Compose, MultiScale, ResidualBlock, SplineCoupling
from .transforms._shapes import count, hidden_sizes, parse_shape, positive
from .transforms.base import FlowTransform, forward_and_log_det, inverse_only

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Diagonal Gaussian log-density of ``u``, summed over the last ``event_dim`` dims."""
    z = (u - mean) * torch.exp(-log_scale)
    return (-0.5 * z.square() - log_scale - _HALF_LOG_2PI).flatten(u.dim() - event_dim).sum(-1)


class CIFLayer(nn.Module):
    r"""One continuously indexed layer: ``bijection`` followed by a ``u``-indexed affine map (see :mod:`pyroflows.cif`).

    In the density direction, :meth:`forward` draws :math:`u \sim q(u \mid x)` (reparameterised) and returns
    :math:`z = (g(x) - t(u)) e^{-s(u)}` with the log-weight
    :math:`\log|\det \partial z/\partial x| + \log p(u \mid z) - \log q(u \mid x)`; :meth:`generate` draws
    :math:`u \sim p(u \mid z)` and inverts. :math:`p` and :math:`q` are diagonal Gaussians whose means and
    log-scales come from networks (an MLP for vectors, a small CNN for images, where :math:`u` is a
    ``(u_dim, H, W)`` map); :math:`s, t` are a network of :math:`u` alone, :math:`s` bounded by
    :math:`\beta \tanh(\cdot/\beta)` as in the couplings. Every last layer starts at zero, so a fresh CIF layer is
    its bijection with :math:`u \sim N(0, I)` under both :math:`p` and :math:`q` (log-weight = the bijection's
    log-det).

    :param bijection: a shape-preserving :class:`~pyroflows.transforms.FlowTransform` in the density direction.
    :param shape: the event shape, ``(D,)`` or ``(C, H, W)`` (``H``, ``W`` may be ``None``).
    :param int u_dim: size of :math:`u` (vectors) or its channels per position (images).
    :param hidden: hidden sizes of the three networks: a tuple for vectors (default ``(32, 32)``), an int (channels)
        for images (default 32).
    :param float scale_bound: bound :math:`\beta` on :math:`|s|`.

    Example::

        >>> import torch
        >>> from pyroflows.cif import CIFLayer
        >>> from pyroflows.transforms import AffineCoupling
        >>> layer = CIFLayer(AffineCoupling(2, hidden=(8,)), (2,), u_dim=1)
        >>> z, log_weight = layer(torch.randn(5, 2))
        >>> z.shape, log_weight.shape
        (torch.Size([5, 2]), torch.Size([5]))
        >>> layer.generate(z).shape
        torch.Size([5, 2])
    """

    def __init__(self, bijection: FlowTransform, shape, u_dim: int = 2, hidden=None, scale_bound: float = 3.0):
        super().__init__()
        shape = parse_shape(shape, "CIFLayer")
        if not isinstance(bijection, FlowTransform):
            raise TypeError(f"CIFLayer: bijection must be a pyroflows FlowTransform, got {type(bijection).__name__}")
        if bijection.domain.event_dim != len(shape):
            raise ValueError(
                f"CIFLayer: the bijection has event_dim {bijection.domain.event_dim}, the shape {shape} has "
                f"{len(shape)} dims"
            )
        if len(shape) == 3 and bijection.forward_shape((shape[0], 4, 4)) != (shape[0], 4, 4):
            raise ValueError("CIFLayer: the bijection must keep the event shape (a squeeze cannot be indexed)")
        self.bijection = bijection
        self.event_shape = shape
        self.event_dim = len(shape)
        self.u_dim = count(u_dim, "u_dim", "CIFLayer")
        self.scale_bound = positive(scale_bound, "scale_bound", "CIFLayer")
        if self.event_dim == 1:
            dim = shape[0]
            sizes = hidden_sizes(hidden, (32, 32), "CIFLayer")
            self.shift_scale = MLP(self.u_dim, 2 * dim, sizes)
            self.prior_net = MLP(dim, 2 * self.u_dim, sizes)
            self.posterior_net = MLP(dim, 2 * self.u_dim, sizes)
        else:
            channels = shape[0]
            width = 32 if hidden is None else count(hidden, "hidden", "CIFLayer")
            self.shift_scale = ConvNet(self.u_dim, 2 * channels, width)
            self.prior_net = ConvNet(channels, 2 * self.u_dim, width)
            self.posterior_net = ConvNet(channels, 2 * self.u_dim, width)

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = out.chunk(2, dim=out.dim() - self.event_dim)
        return first, second

    def _affine(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t(u), s(u))``, ``s`` bounded."""
        shift, raw = self._split(self.shift_scale(u))
        return shift, self.scale_bound * torch.tanh(raw / self.scale_bound)

    def _gaussian(self, net: nn.Module, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = self._split(net(v))
        return mean, self.scale_bound * torch.tanh(raw / self.scale_bound)  # log-scales bounded as well

    def terms(self, x: torch.Tensor, u: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        r"""Every term of the layer at ``x``: ``u`` (drawn from ``q(u | x)``, reparameterised, unless given), ``z``,
        ``log_det`` (:math:`\log|\det \partial z/\partial x|` at that ``u``), ``log_p`` (:math:`\log p(u|z)`) and
        ``log_q`` (:math:`\log q(u|x)`).

        :param torch.Tensor x: input, shape ``batch + event_shape``.
        :param torch.Tensor u: optional index, shape ``batch + u_shape`` (``(u_dim,)``, or ``(u_dim, H, W)``).
        """
        q_mean, q_log_scale = self._gaussian(self.posterior_net, x)
        if u is None:
            u = q_mean + torch.exp(q_log_scale) * torch.randn_like(q_mean)
        elif u.shape != q_mean.shape:
            raise ValueError(f"CIFLayer: u must have shape {tuple(q_mean.shape)}, got {tuple(u.shape)}")
        y, log_det = forward_and_log_det(self.bijection, x)
        shift, log_scale = self._affine(u)
        z = (y - shift) * torch.exp(-log_scale)
        log_det = log_det - log_scale.flatten(log_scale.dim() - self.event_dim).sum(-1)
        p_mean, p_log_scale = self._gaussian(self.prior_net, z)
        log_p = _gaussian_log_prob(u, p_mean, p_log_scale, self.event_dim)
        log_q = _gaussian_log_prob(u, q_mean, q_log_scale, self.event_dim)
        return {"u": u, "z": z, "log_det": log_det, "log_p": log_p, "log_q": log_q}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density direction: ``(z, log_weight)`` for one reparameterised draw of ``u ~ q(u | x)``, where
        ``log_weight = log_det + log p(u|z) - log q(u|x)``."""
        t = self.terms(x)
        return t["z"], t["log_det"] + t["log_p"] - t["log_q"]

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Generative direction: ``x`` for one draw of ``u ~ p(u | z)``."""
        p_mean, p_log_scale = self._gaussian(self.prior_net, z)
        u = p_mean + torch.exp(p_log_scale) * torch.randn_like(p_mean)
        shift, log_scale = self._affine(u)
        return inverse_only(self.bijection, z * torch.exp(log_scale) + shift)

    def forward_shape(self, shape):
        return tuple(shape)

    def extra_repr(self) -> str:
        return f"shape={self.event_shape}, u_dim={self.u_dim}"


class CIFFlow(nn.Module):
    """A stack of :class:`CIFLayer` and ordinary layers in the density direction (data to latent).

    Not a bijection: :meth:`forward` returns the latent and the summed log-weight of one draw of every layer's
    ``u``; :meth:`generate` maps a latent back to data. It has the two things :class:`~pyroflows.FlowDensity`
    asks of a flow, ``forward_shape`` and ``domain``, so :class:`CIFDensity` is a ``FlowDensity``.

    :param parts: :class:`CIFLayer` objects and torch transforms (e.g. ``Logit``, ``Squeeze``, ``ActNorm``).

    Example::

        >>> import torch
        >>> from pyroflows.cif import cif
        >>> flow = cif(2, num_layers=2, hidden=(8,))
        >>> z, log_weight = flow(torch.randn(4, 2))
        >>> z.shape, log_weight.shape
        (torch.Size([4, 2]), torch.Size([4]))
    """

    def __init__(self, parts: Sequence):
        super().__init__()
        parts = list(parts)
        if not parts:
            raise ValueError("CIFFlow: needs at least one layer")
        for p in parts:
            if isinstance(p, MultiScale):
                raise ValueError(
                    "CIFFlow: a multi-scale factor-out (MultiScale) cannot hold indexed layers; build the base flow "
                    "with levels=1, or from residual blocks (their levels only squeeze)"
                )
            if not isinstance(p, (CIFLayer, torch.distributions.Transform)):
                raise TypeError(f"CIFFlow: parts must be CIFLayer objects or transforms, got {type(p).__name__}")
        self.parts = nn.ModuleList(parts)

    @property
    def domain(self):
        first = self.parts[0]
        return first.bijection.domain if isinstance(first, CIFLayer) else first.domain

    @property
    def num_indexed(self) -> int:
        """The number of indexed layers."""
        return sum(isinstance(p, CIFLayer) for p in self.parts)

    def forward_shape(self, shape):
        for p in self.parts:
            shape = tuple(p.forward_shape(shape))
        return shape

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log_weight)``: the latent and the summed log-dets and ``log p(u|z) - log q(u|x)`` terms."""
        total = 0.0
        for p in self.parts:
            if isinstance(p, CIFLayer):
                x, w = p(x)
            else:
                x, w = forward_and_log_det(p, x)
            total = total + w
        return x, total

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Data from latents ``z``: every layer inverted from the latent end, each ``u`` drawn from its prior."""
        for p in reversed(self.parts):
            z = p.generate(z) if isinstance(p, CIFLayer) else inverse_only(p, z)
        return z


_INDEXABLE = (AffineCoupling, SplineCoupling, ResidualBlock)


def _flatten(t) -> list:
    return [q for p in t.parts for q in _flatten(p)] if isinstance(t, Compose) else [t]


def cif(
    shape: int | Sequence[int],
    num_layers: int | None = None,
    hidden=None,
    *,
    base: str = "realnvp",
    u_dim: int | None = None,
    cif_hidden=None,
    **base_options,
) -> CIFFlow:
    """A continuously indexed flow: the layers of an existing builder, every coupling or residual block wrapped in a
    :class:`CIFLayer`.

    :param shape: ``D`` (or ``(D,)``) or an image shape ``(C, H, W)``.
    :param int num_layers: passed to the base builder.
    :param hidden: the base builder's conditioner sizes.
    :param str base: ``"realnvp"`` (:func:`pyroflows.realnvp`; for images built with ``levels=1``, a single scale
        of checkerboard couplings, since a factor-out cannot hold indexed layers) or ``"residual"``
        (:func:`pyroflows.residual_flow`).
    :param int u_dim: size of each layer's ``u`` (vectors, default 2) or its channels per position (images,
        default 1).
    :param cif_hidden: hidden sizes of each layer's ``p(u|z)``, ``q(u|x)`` and ``s, t`` networks (default
        ``(32, 32)`` for vectors, 32 channels for images).
    :param base_options: other keyword arguments of the base builder (``coeff``, ``logdet``, ``logit_alpha``, ...).

    Example::

        >>> import torch, pyroflows
        >>> flow = pyroflows.cif(2, num_layers=4, hidden=(16,))
        >>> flow.num_indexed
        4
        >>> model = pyroflows.CIFDensity(flow, (2,), num_samples=8)
        >>> model.log_prob(torch.randn(3, 2)).shape
        torch.Size([3])
    """
    shape = parse_shape(shape if not isinstance(shape, list) else tuple(shape), "cif")
    key = str(base).lower()
    options = dict(base_options)
    if num_layers is not None:
        options["num_layers"] = num_layers
    if hidden is not None:
        options["hidden"] = hidden
    if key == "realnvp":
        if len(shape) == 3:
            levels = options.setdefault("levels", 1)
            if levels != 1:
                raise ValueError(
                    "cif: an image realnvp base must have levels=1 (a factor-out cannot hold indexed layers)"
                )
        flow = realnvp(shape if len(shape) > 1 else shape[0], **options)
    elif key == "residual":
        flow = residual_flow(shape if len(shape) > 1 else shape[0], **options)
    else:
        raise ValueError(f"cif: unknown base {base!r}; choose 'realnvp' or 'residual'")
    image = len(shape) == 3
    u_dim = (1 if image else 2) if u_dim is None else u_dim
    parts, current = [], shape
    for p in _flatten(flow):
        if isinstance(p, _INDEXABLE):
            event = (current[0], None, None) if image else current
            parts.append(CIFLayer(p, event, u_dim=u_dim, hidden=cif_hidden))
        else:
            parts.append(p)
        current = tuple(p.forward_shape(current))
    return CIFFlow(parts)


class CIFDensity(FlowDensity):
    r"""A density model of a :class:`CIFFlow`, with the interface of :class:`~pyroflows.FlowDensity`.

    * :meth:`log_prob` is the importance-weighted estimate of :math:`\log p(x)` with ``num_samples`` draws of
      every layer's ``u`` (``K``): a stochastic lower bound in expectation, exact as ``K → ∞``.
      :meth:`~pyroflows.FlowDensity.bits_per_dim` and :func:`pyroflows.train.evaluate` report it.
    * :meth:`elbo` is the single-draw evidence lower bound.
    * :meth:`forward`, what :func:`pyroflows.train.fit` maximises, is the importance-weighted bound with
      ``train_samples`` draws (1: the ELBO) in training mode, and :meth:`log_prob` in eval mode.
    * :meth:`~pyroflows.FlowDensity.sample` draws every ``u`` from its prior; ``temperature`` scales the base.

    There is no exact density, so :attr:`distribution` (a Pyro ``TransformedDistribution``) is not available.

    :param CIFFlow flow: e.g. from :func:`pyroflows.cif`.
    :param event_shape: the data event shape.
    :param int num_samples: ``K`` of :meth:`log_prob`.
    :param int train_samples: draws in the training objective.
    :param base: optional Pyro distribution over the latent.

    Example::

        >>> import torch, pyroflows
        >>> model = pyroflows.CIFDensity(pyroflows.cif(2, num_layers=2, hidden=(8,)), (2,), num_samples=16)
        >>> x = torch.randn(5, 2)
        >>> model.log_prob(x).shape, model.elbo(x).shape, model.sample(4).shape
        (torch.Size([5]), torch.Size([5]), torch.Size([4, 2]))
    """

    def __init__(self, flow: CIFFlow, event_shape, num_samples: int = 32, train_samples: int = 1, base=None):
        if not isinstance(flow, CIFFlow):
            raise TypeError(f"CIFDensity: flow must be a CIFFlow (see pyroflows.cif), got {type(flow).__name__}")
        super().__init__(flow, event_shape, base=base)
        self.num_samples = count(num_samples, "num_samples", "CIFDensity")
        self.train_samples = count(train_samples, "train_samples", "CIFDensity")

    #: Draws evaluated together in one pass: as many as keep a pass within this many input elements.
    chunk_elements = 1 << 16

    def _log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``(k, *batch)`` log-weights ``log p(x, u) - log q(u | x)``: the draws run in chunks along a new leading
        dim, each chunk within :attr:`chunk_elements` input elements (one draw at a time for large batches)."""
        chunk = max(1, min(k, self.chunk_elements // max(1, x.numel())))
        out, done = [], 0
        while done < k:
            c = min(chunk, k - done)
            z, log_weight = self.flow(x.unsqueeze(0).expand((c,) + x.shape))
            out.append(self.base_dist().log_prob(z) + log_weight)
            done += c
        return torch.cat(out)

    def _iw(self, x: torch.Tensor, k: int) -> torch.Tensor:
        self._check(x)
        batch = x.shape[: x.dim() - len(self.event_shape)]
        if 0 in batch:
            return torch.zeros(batch, dtype=self._loc.dtype, device=x.device)
        return torch.logsumexp(self._log_weights(x, k), 0) - math.log(k)

    def log_prob(self, x: torch.Tensor, context=None, *, num_samples: int | None = None) -> torch.Tensor:
        """Importance-weighted estimate of ``log p(x)`` with ``num_samples`` (default ``self.num_samples``) draws.

        :param x: data, shape ``batch + event_shape``.
        :param context: must be ``None`` (continuously indexed flows are not conditional).
        :param int num_samples: ``K``; larger is tighter and costs ``K`` passes.
        """
        self.flow_for(context)  # an error for a context
        k = self.num_samples if num_samples is None else count(num_samples, "num_samples", "CIFDensity.log_prob")
        return self._iw(x, k)

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """The evidence lower bound of ``x`` from one draw of every ``u`` (shape ``batch``)."""
        return self._iw(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training objective: the ``train_samples``-draw bound in training mode, :meth:`log_prob` in eval."""
        return self._iw(x, self.train_samples) if self.training else self.log_prob(x)

    def _decode(self, z: torch.Tensor, flow) -> torch.Tensor:
        return flow.generate(z)

    def _first_layer(self):
        first = self.flow.parts[0]
        return first.bijection if isinstance(first, CIFLayer) else first

    def encode(self, *args, **kwargs):
        """Not available: a continuously indexed flow maps data to a latent only through a random ``u``."""
        raise TypeError("CIFDensity has no deterministic latent (each layer draws u): encode/decode need a bijection")

    decode = encode

    @property
    def distribution(self):
        raise TypeError(
            "CIFDensity has no exact density, so no Pyro TransformedDistribution: use log_prob (an importance-"
            "weighted estimate) or sample"
        )


__all__ = ["CIFDensity", "CIFFlow", "CIFLayer", "cif"]
