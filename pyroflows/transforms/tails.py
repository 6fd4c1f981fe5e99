r"""An elementwise layer that gives standard-normal noise power-law tails with a learned weight per coordinate and
side: a flow guide whose posterior has heavier tails than a Gaussian's (scale parameters, shrinkage priors,
funnels) starts from noise that can reach them."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._shapes import positive, vector_dim
from .base import FlowTransform

_SERIES = 1e-4  # below this argument the two helpers use their Taylor series (relative error < 1e-12)


def _log_exprel(s: torch.Tensor) -> torch.Tensor:
    r""":math:`\log((e^s - 1)/s)` for :math:`s \ge 0`, without overflow for large :math:`s` (as
    :math:`s + \log(1 - e^{-s}) - \log s`) or cancellation near 0 (as :math:`s/2 + s^2/24`)."""
    small = s < _SERIES
    safe = torch.where(small, torch.ones_like(s), s)
    return torch.where(small, s / 2 + s * s / 24, safe + torch.log(-torch.expm1(-safe)) - torch.log(safe))


def _log_log1p_rel(log_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(log1p(t), log(log1p(t) / t))`` from :math:`\log t`, so that :math:`t = h y^2` may overflow: ``log1p(t)``
    is ``softplus(log t)``; near :math:`t = 0` the ratio's log is :math:`-t/2 + 5t^2/24 - t^3/8`."""
    t = torch.exp(log_t.clamp(max=0.0))  # only used where t < _SERIES
    small = log_t < math.log(_SERIES)
    l1p = torch.nn.functional.softplus(log_t)
    safe_l1p = torch.where(small, torch.ones_like(l1p), l1p)
    safe_log_t = torch.where(small, torch.zeros_like(log_t), log_t)
    return l1p, torch.where(small, t * (-1 / 2 + t * (5 / 24 - t / 8)), torch.log(safe_l1p) - safe_log_t)


class HeavyTails(FlowTransform):
    r"""Elementwise :math:`y = x\,\sqrt{(e^{h x^2} - 1)/(h x^2)}`, i.e. :math:`y^2 = (e^{h x^2} - 1)/h` with the sign
    of :math:`x`, a tail weight :math:`h \ge 0` per coordinate and side (:math:`h_+` for :math:`x > 0`,
    :math:`h_-` for :math:`x < 0`).

    For :math:`x \sim \mathcal N(0, 1)`, :math:`P(|y| > t)` decays as :math:`t^{-1/h}`: the tails of a Student-t
    with :math:`1/h` degrees of freedom, and :math:`h \to 0` is the identity (the map is :math:`y = x + h x^3/4 +
    O(h^2)` near it). Placed next to the base noise of a flow guide (``pyroflows.AutoFlow(..., heavy_tails=True)``),
    it lets the flow draw from noise whose tails it learns: a flow of Lipschitz layers (affine couplings
    with bounded scales, residual blocks) keeps its base's tail class, so a Gaussian base cannot reach the
    exponential or power-law tails that scale parameters and shrinkage priors have in unconstrained space, and
    importance weights of such a guide have a heavy right tail (a high PSIS :math:`\hat k`). Heavy-tailed base
    noise of this kind is the tail-adaptive flow of Jaini et al. (2020) and Laszkiewicz et al. (2022); the
    transform here is a Gaussian-to-power-law map with closed forms both ways:

    .. math::

        \log\left|\frac{dy}{dx}\right| = h x^2 - \tfrac12 \log\frac{e^{h x^2} - 1}{h x^2}, \qquad
        x = y \sqrt{\frac{\log(1 + h y^2)}{h y^2}}.

    :math:`h = h_{\max}\,\sigma(r)` with :math:`r` the trainable parameter ``raw`` (shape ``(2, D)``, row 0 the
    right tails, row 1 the left), so the weight stays in :math:`(0, h_{\max})`. The default :math:`h_{\max} = 1/5`
    allows tails down to a Student-t's with 5 degrees of freedom, and no heavier on purpose: a guide's ELBO has
    terms quadratic in the latent (every Gaussian likelihood or prior), so its Monte Carlo estimate and gradient need
    :math:`E_q[x^4] < \infty`, a tail index above 4 (:math:`h < 1/4`); with index 2 (:math:`h = 1/2`) KL(q‖p) is
    infinite wherever the posterior has a Gaussian direction. Power tails of any index cover the exponential tails of
    log-scales. Values stay finite in float32 for base draws below 18 in absolute value up to :math:`h = 1/2`.

    :param shape: the event size, ``D`` or ``(D,)``; inputs have shape ``(..., D)``.
    :param float init: the initial tail weight of every coordinate and side, in ``(0, max_weight)``.
    :param float max_weight: :math:`h_{\max}`, in ``(0, 1]`` (see above before raising it).

    Example::

        >>> import torch
        >>> from pyroflows.transforms import HeavyTails
        >>> t = HeavyTails(2, init=0.15)
        >>> x = torch.tensor([[0.5, 1.0], [-3.0, 6.0]])
        >>> y = t(x)
        >>> y  # near 0 nearly the identity; far out much further out
        tensor([[ 0.5047,  1.0387],
                [-4.3646, 38.3325]], grad_fn=<MulBackward0>)
        >>> torch.allclose(y, x.sign() * torch.sqrt(torch.expm1(0.15 * x**2) / 0.15))
        True
        >>> torch.allclose(t.inv(y.clone()), x, atol=1e-5)
        True
    """

    sign = +1  # elementwise and increasing

    def __init__(self, shape: int | tuple[int], *, init: float = 0.02, max_weight: float = 0.2):
        dim = vector_dim(shape, "HeavyTails")
        self.max_weight = positive(max_weight, "max_weight", "HeavyTails", high=1.0 + 1e-12)
        init = positive(init, "init", "HeavyTails", high=self.max_weight)
        super().__init__(event_dim=1, event_shape=(dim,))
        self.dim = dim
        p = init / self.max_weight
        self.raw = nn.Parameter(torch.full((2, dim), math.log(p / (1.0 - p))))

    def tail_weights(self) -> torch.Tensor:
        """The weights :math:`h`, shape ``(2, D)``: row 0 the right tails (:math:`x > 0`), row 1 the left."""
        return self.max_weight * torch.sigmoid(self.raw)

    def _weight_at(self, v: torch.Tensor) -> torch.Tensor:
        h = self.tail_weights()
        return torch.where(v > 0, h[0], h[1])

    def forward_and_log_det(self, x):
        s = self._weight_at(x) * x * x
        le = _log_exprel(s)
        return x * torch.exp(0.5 * le), (s - 0.5 * le).sum(-1)

    def inverse_and_log_det(self, y):
        h = self._weight_at(y)
        log_t = torch.log(h) + 2.0 * torch.log(y.abs())  # -inf at y = 0: the series branch
        s, log_ratio = _log_log1p_rel(log_t)  # s = log1p(h y^2) = h x^2
        return y * torch.exp(0.5 * log_ratio), -(s - 0.5 * _log_exprel(s)).sum(-1)

    def extra_repr(self) -> str:
        return f"{self.dim}, max_weight={self.max_weight}"
