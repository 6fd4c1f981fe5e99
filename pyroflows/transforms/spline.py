r"""Rational-quadratic spline coupling (Durkan, Bekasov, Murray & Papamakarios, 2019, Neural Spline Flows), for
vectors: the elementwise spline, the coupling layer built on it, and the :func:`spline_flow` builder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.conditioners import MLP
from ._shapes import count, hidden_sizes, vector_dim
from .base import FlowTransform
from .conditional import broadcast_context, join_context
from .coupling import init_vector_split, make_mask, vector_merge, vector_split

DEFAULT_MIN_BIN_WIDTH = 1e-3
DEFAULT_MIN_BIN_HEIGHT = 1e-3
DEFAULT_MIN_DERIVATIVE = 1e-3


#: from this many rows on, ``_softmax_last`` takes the transposed route on CPU (measured crossover: about 200 rows
#: of 8 values)
_TRANSPOSED_SOFTMAX_ROWS = 256


def _softmax_last(raw: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(raw, -1)``, by a faster route for many short rows on CPU.

    torch's CPU softmax over a short last dimension costs about 0.2 µs per row (forward and backward, 8 values a
    row), several times an elementwise pass; over the leading dimension of a transposed copy it is vectorised
    across the rows instead: 2048 rows of 8 took 128 µs against 460 µs, 8192 rows 297 against 1735 (one thread).
    Below a few hundred rows the copy costs more than it saves.
    """
    k = raw.shape[-1]
    if raw.device.type != "cpu" or raw.dim() < 2 or raw.numel() < _TRANSPOSED_SOFTMAX_ROWS * k:
        return torch.softmax(raw, dim=-1)
    return torch.softmax(raw.reshape(-1, k).t().contiguous(), dim=0).t().reshape(raw.shape)


def _knots(raw: torch.Tensor, minimum: float | torch.Tensor, bound: float) -> torch.Tensor:
    """The ``K + 1`` knots on ``[-bound, bound]`` from ``K`` unnormalised bin sizes (last dimension).

    Each bin gets ``minimum`` of the interval's length plus its softmax share of the rest; the end knots are set to
    ``±bound`` exactly. Bin sizes are taken as differences of adjacent knots, so the knots and sizes agree bit for
    bit (equal raw widths and heights then give knots of ``x`` and ``y`` that are the same numbers). ``minimum``
    may be a tensor broadcasting against ``raw[..., :1]`` (the widths' and heights' minima, stacked).
    """
    num_bins = raw.shape[-1]
    fractions = minimum + (1.0 - minimum * num_bins) * _softmax_last(raw)
    inner = 2.0 * bound * torch.cumsum(fractions[..., :-1], dim=-1) - bound
    ends = inner.new_full(inner.shape[:-1] + (1,), bound)
    return torch.cat([-ends, inner, ends], dim=-1)


def _derivative_offset(min_derivative: float) -> float:
    """``c`` with ``min_derivative + softplus(c) = 1``: a raw derivative of zero is a derivative of one."""
    return math.log(math.expm1(1.0 - min_derivative))


def rational_quadratic_spline(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    bound: float,
    inverse: bool = False,
    *,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The monotone rational-quadratic spline of Durkan et al. (2019), elementwise, on ``[-bound, bound]``, and
    the identity outside it.

    ``K`` bins with knots :math:`(x^{(k)}, y^{(k)})_{k=0}^{K}`, :math:`x^{(0)} = y^{(0)} = -B`,
    :math:`x^{(K)} = y^{(K)} = B`, and derivatives :math:`\delta^{(k)} > 0` at the knots. In bin ``k``, with
    :math:`w_k = x^{(k+1)} - x^{(k)}`, :math:`h_k = y^{(k+1)} - y^{(k)}`, :math:`s_k = h_k / w_k` and
    :math:`\xi = (x - x^{(k)}) / w_k \in [0, 1]`,

    .. math::

        g(x) = y^{(k)} + \frac{h_k \left[s_k \xi^2 + \delta^{(k)} \xi (1 - \xi)\right]}
        {s_k + \left[\delta^{(k+1)} + \delta^{(k)} - 2 s_k\right] \xi (1 - \xi)},
        \qquad
        g'(x) = \frac{s_k^2 \left[\delta^{(k+1)} \xi^2 + 2 s_k \xi (1 - \xi) + \delta^{(k)} (1 - \xi)^2\right]}
        {\left(s_k + \left[\delta^{(k+1)} + \delta^{(k)} - 2 s_k\right] \xi (1 - \xi)\right)^2}.

    The inverse solves the quadratic :math:`a \xi^2 + b \xi + c = 0` for :math:`\xi` in the bin of ``y`` by the
    root :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})`, stable where :math:`a \approx 0` (the discriminant is clamped
    at 0 against rounding). The boundary derivatives are fixed at 1, so with the identity outside ``[-B, B]``
    (linear tails) the map is :math:`C^1` and bijective on the whole real line.

    Parameterisation: bin widths (heights) are ``min_bin_width`` (``min_bin_height``) of ``2B`` plus a softmax share
    of the rest; the ``K - 1`` inner derivatives are ``min_derivative + softplus(raw + c)`` with ``c`` chosen so that
    a raw value of 0 gives 1. Zero parameters (equal bins, unit derivatives) give the identity, up to rounding.

    Reference: C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, *Neural Spline Flows*, NeurIPS 2019
    (eqs. 4-6 and the inverse in their appendix).

    :param torch.Tensor x: input points, any shape ``S`` (``y`` when ``inverse``).
    :param torch.Tensor widths: unnormalised bin widths, shape ``S' + (K,)`` with ``S'`` broadcastable to ``S``.
    :param torch.Tensor heights: unnormalised bin heights, shape ``S' + (K,)``.
    :param torch.Tensor derivatives: unnormalised derivatives at the ``K - 1`` inner knots, shape ``S' + (K - 1,)``.
    :param float bound: the half-width ``B`` of the spline's interval; outside it the map is the identity.
    :param bool inverse: evaluate the inverse map.
    :param float min_bin_width: smallest bin width, as a fraction of ``2B`` (``K * min_bin_width < 1``).
    :param float min_bin_height: smallest bin height, as a fraction of ``2B`` (``K * min_bin_height < 1``).
    :param float min_derivative: smallest derivative at an inner knot (below 1).
    :returns: ``(y, log|dy/dx|)`` elementwise, both of the broadcast shape; with ``inverse``, ``(x, log|dx/dy|)``.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import rational_quadratic_spline
        >>> x = torch.linspace(-6.0, 6.0, 7, dtype=torch.float64)  # K = 4 bins per point
        >>> w, h, d = torch.randn(7, 4).double(), torch.randn(7, 4).double(), torch.randn(7, 3).double()
        >>> y, log_d = rational_quadratic_spline(x, w, h, d, bound=5.0)
        >>> x_back, inv_log_d = rational_quadratic_spline(y, w, h, d, bound=5.0, inverse=True)
        >>> torch.allclose(x_back, x), torch.allclose(inv_log_d, -log_d)
        (True, True)
        >>> y[0].item(), log_d[0].item()  # outside [-5, 5]: the identity
        (-6.0, 0.0)
        >>> zero = torch.zeros(7, 4, dtype=torch.float64)
        >>> torch.allclose(rational_quadratic_spline(x, zero, zero, zero[:, :3], bound=5.0)[0], x)
        True
    """
    num_bins = widths.shape[-1]
    if num_bins < 2:
        raise ValueError(f"rational_quadratic_spline: need at least 2 bins (widths.shape[-1]), got {num_bins}")
    if heights.shape[-1] != num_bins or derivatives.shape[-1] != num_bins - 1:
        raise ValueError(
            "rational_quadratic_spline: widths and heights need K entries and derivatives K - 1 in their last "
            f"dimension, got {widths.shape[-1]}, {heights.shape[-1]} and {derivatives.shape[-1]}"
        )
    if isinstance(bound, bool) or not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise ValueError(f"rational_quadratic_spline: bound must be a positive finite number, got {bound!r}")
    for name, value in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
        if not 0 <= value * num_bins < 1:
            raise ValueError(f"rational_quadratic_spline: {name} must lie in [0, 1/K) with K={num_bins}, got {value!r}")
    if not 0 <= min_derivative < 1:
        raise ValueError(f"rational_quadratic_spline: min_derivative must lie in [0, 1), got {min_derivative!r}")
    bound = float(bound)
    if widths.shape != heights.shape:
        widths, heights = torch.broadcast_tensors(widths, heights)
    sizes = torch.stack([widths, heights], dim=-2)
    return _spline(x, sizes, derivatives, bound, inverse, min_bin_width, min_bin_height, min_derivative)


def _spline(x, sizes, derivatives, bound: float, inverse: bool, min_bin_width, min_bin_height, min_derivative):
    """:func:`rational_quadratic_spline` on checked arguments, the raw widths and heights stacked as ``sizes``
    (``S' + (2, K)``): one softmax, cumulative sum and concatenation make the knots of both ``x`` and ``y``."""
    if min_bin_width == min_bin_height:
        minimum = min_bin_width
    else:
        minimum = sizes.new_tensor([[min_bin_width], [min_bin_height]])
    knots = _knots(sizes, minimum, bound)  # (..., 2, K + 1): x's knots, y's knots
    inner = min_derivative + F.softplus(derivatives + _derivative_offset(min_derivative))
    ones = inner.new_ones(inner.shape[:-1] + (1,))
    knot_derivatives = torch.cat([ones, inner, ones], dim=-1)  # (..., K + 1), 1 at both ends

    outside = (x < -bound) | (x > bound)
    # The spline is evaluated at a point inside the interval, so that the branch torch.where discards stays finite
    # (its gradient is multiplied by zero, and 0 * nan would be nan).
    x_in = x.masked_fill(outside, 0.0)
    knots_in = knots[..., 1 if inverse else 0, 1:-1]
    # The bin: the number of inner knots at or below the input (0 .. K - 1); the end knots are never compared,
    # so a point at +bound falls in the last bin whatever the rounding of the cumulative sum.
    index = (x_in.unsqueeze(-1) >= knots_in).sum(dim=-1)

    # Both knots of the bin, for x, y and the derivative, in one gather (one autograd node); a bin's width and
    # height are differences of its knots
    if knot_derivatives.shape[:-1] != knots.shape[:-2]:  # parameters of batch shapes that broadcast
        batch = torch.broadcast_shapes(knots.shape[:-2], knot_derivatives.shape[:-1])
        knots = knots.expand(batch + knots.shape[-2:])
        knot_derivatives = knot_derivatives.expand(batch + knot_derivatives.shape[-1:])
    table = torch.cat([knots, knot_derivatives.unsqueeze(-2)], dim=-2)  # (..., 3, K + 1)
    ends = torch.stack([index, index + 1], dim=-1).unsqueeze(-2)  # (..., 1, 2)
    table = table.expand(index.shape + table.shape[-2:])
    (x_lo, x_hi), (y_lo, y_hi), (d_lo, d_hi) = (
        v.unbind(-1) for v in torch.gather(table, -1, ends.expand(index.shape + (3, 2))).unbind(-2)
    )
    w, h = x_hi - x_lo, y_hi - y_lo
    slope = h / w
    curvature = torch.sub(d_hi + d_lo, slope, alpha=2.0)
    # (fused multiply-adds below: each is one autograd node where the plain expression would be two or three)
    if inverse:  # xi in [0, 1] from the quadratic a xi^2 + b xi - c = 0 of g(x) = y
        dy = x_in - y_lo
        a = torch.addcmul(h * (slope - d_lo), dy, curvature)
        b = torch.addcmul(h * d_lo, dy, curvature, value=-1.0)
        c = slope * dy
        discriminant = torch.addcmul(b * b, a, c, value=4.0).clamp_min(0.0)
        xi = (2.0 * c / (b + torch.sqrt(discriminant))).clamp(0.0, 1.0)
    else:
        xi = ((x_in - x_lo) / w).clamp(0.0, 1.0)
    xi_1m = 1.0 - xi
    mixed = xi * xi_1m
    xi_sq = xi * xi
    denominator = torch.addcmul(slope, curvature, mixed)
    numerator = torch.addcmul(torch.addcmul(d_hi * xi_sq, slope, mixed, value=2.0), d_lo, xi_1m * xi_1m)
    log_derivative = torch.add(torch.log(numerator), torch.log(slope / denominator), alpha=2.0)
    if inverse:
        out, log_derivative = torch.addcmul(x_lo, xi, w), -log_derivative
    else:
        out = torch.addcdiv(y_lo, h * torch.addcmul(slope * xi_sq, d_lo, mixed), denominator)
    return torch.where(outside, x, out), log_derivative.masked_fill(outside, 0.0)


def _check_spline_args(num_bins, bound, where: str) -> None:
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 2:
        raise ValueError(f"{where}: num_bins must be an int >= 2, got {num_bins!r}")
    if not (isinstance(bound, (int, float)) and not isinstance(bound, bool) and math.isfinite(bound) and bound > 0):
        raise ValueError(f"{where}: bound must be a positive finite number, got {bound!r}")


class SplineCoupling(FlowTransform):
    r"""Rational-quadratic spline coupling layer for vectors: with ``m`` the mask (``True`` = conditioning, passed
    unchanged),

    .. math::

        y_m = x_m, \qquad y_i = g_{\theta_i(x_m)}(x_i) \quad (i \in \bar m), \qquad
        \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_{i \in \bar m} \log g'_{\theta_i(x_m)}(x_i),

    where :math:`g_\theta` is the monotone rational-quadratic spline of
    :func:`~pyroflows.transforms.spline.rational_quadratic_spline` on ``[-bound, bound]`` with ``num_bins`` bins,
    the identity outside it, and :math:`\theta_i(x_m)` are ``3 * num_bins - 1`` conditioner outputs per transformed
    coordinate (bin widths, bin heights, inner-knot derivatives). The inverse runs the conditioner once on
    :math:`y_m = x_m` and inverts each spline in closed form (a quadratic root); its log-det is minus the forward
    one. The conditioner's last layer starts at zero, which makes every spline the identity: a fresh layer is the
    identity map. Alternate the mask (``flip=True`` every other layer) or permute in between so that every
    coordinate moves. With ``D = 1`` nothing conditions (the ``"half"`` mask leaves the coordinate to transform) and
    the spline's parameters are learned constants.

    Direction: the spline maps ``[-bound, bound]`` onto itself; in a guide (base noise to posterior) precede it
    with an affine layer or end the flow with one (:func:`~pyroflows.spline_flow` does both) so that the
    interesting mass lies in the interval.

    Reference: C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, *Neural Spline Flows*, NeurIPS 2019.

    :param shape: the event size ``D`` or ``(D,)``; image shapes are rejected.
    :param mask: ``"half"`` (the first ``D // 2`` coordinates condition), ``"alternate"`` (even indices) or a
        boolean / 0-1 tensor of shape ``(D,)``; see :func:`~pyroflows.transforms.make_mask`.
    :param int num_bins: the number of spline bins ``K`` (at least 2).
    :param float bound: the half-width ``B`` of the interval ``[-B, B]`` the splines act on.
    :param hidden: conditioner hidden sizes (default ``(64, 64)``); an int means one hidden layer.
    :param torch.nn.Module conditioner: optional replacement network ``(..., n_cond) -> (..., n_trans * (3K - 1))``,
        per transformed coordinate ``K`` raw widths, then ``K`` raw heights, then ``K - 1`` raw derivatives; zero
        output is the identity.
    :param bool flip: negate the mask.
    :param int context_dim: size of a context vector the conditioner also sees (0: none); use such a layer through
        :class:`~pyroflows.transforms.ConditionalSplineCoupling`.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import SplineCoupling
        >>> t = SplineCoupling(4, mask="alternate", num_bins=6, hidden=(16,))
        >>> x = 3.0 * torch.randn(5, 4)
        >>> torch.allclose(t(x), x, atol=1e-5)  # identity at init
        True
        >>> with torch.no_grad():
        ...     for p in t.parameters():
        ...         _ = p.add_(0.1 * torch.randn_like(p))
        >>> y = t(x)
        >>> torch.allclose(t.inv(y.clone()), x, atol=1e-4), t.log_abs_det_jacobian(x, y).shape
        (True, torch.Size([5]))
    """

    def __init__(
        self,
        shape: int | tuple,
        mask: str | torch.Tensor = "half",
        num_bins: int = 8,
        bound: float = 5.0,
        hidden: Sequence[int] | int | None = None,
        conditioner: nn.Module | None = None,
        flip: bool = False,
        *,
        context_dim: int = 0,
    ):
        dim = vector_dim(shape, "SplineCoupling")
        context_dim = count(context_dim, "context_dim", "SplineCoupling", low=0)
        _check_spline_args(num_bins, bound, "SplineCoupling")
        hidden = hidden_sizes(hidden, (64, 64), "SplineCoupling")
        super().__init__(event_dim=1, event_shape=(dim,))
        mask = make_mask(mask, dim, flip)
        n_cond = int(mask.sum())
        n_trans = dim - n_cond
        if n_trans == 0:
            raise ValueError("SplineCoupling: the mask marks every coordinate as conditioning; none is transformed")
        self.num_features = dim
        self.num_bins = num_bins
        self.bound = float(bound)
        self.flip = flip
        init_vector_split(self, mask)
        self._n_trans = n_trans
        self.context_dim = context_dim
        self.conditioner = conditioner or MLP(n_cond + context_dim, n_trans * (3 * num_bins - 1), hidden)

    def _couple(self, x: torch.Tensor, inverse: bool, context=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.context_dim:
            x, context = broadcast_context(x, context, 1, self.context_dim, "SplineCoupling")
        x_cond, x_trans = vector_split(self, x)
        params = self.conditioner(x_cond if context is None else join_context(x_cond, context, 1))
        params = params.reshape(params.shape[:-1] + (self._n_trans, 3 * self.num_bins - 1))
        k = self.num_bins
        sizes, derivatives = params.split([2 * k, k - 1], dim=-1)
        y_trans, log_derivative = _spline(
            x_trans,
            sizes.unflatten(-1, (2, k)),
            derivatives,
            self.bound,
            inverse,
            DEFAULT_MIN_BIN_WIDTH,
            DEFAULT_MIN_BIN_HEIGHT,
            DEFAULT_MIN_DERIVATIVE,
        )
        return vector_merge(self, x_cond, y_trans), log_derivative.sum(dim=-1)

    def forward_and_log_det(self, x, context=None):
        return self._couple(x, inverse=False, context=context)

    def inverse_and_log_det(self, y, context=None):
        return self._couple(y, inverse=True, context=context)

    def extra_repr(self) -> str:
        extra = f", context_dim={self.context_dim}" if self.context_dim else ""
        return f"shape={self.event_shape}, num_bins={self.num_bins}, bound={self.bound}{extra}"


__all__ = ["SplineCoupling", "rational_quadratic_spline"]
