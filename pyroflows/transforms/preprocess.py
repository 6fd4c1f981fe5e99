r"""Preprocessing for image data: :class:`Logit` maps pixels in [0, 1] to the real line."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import constraints
from torch.distributions.utils import _sum_rightmost

from .base import FlowTransform


class _OpenInterval(constraints.Constraint):
    """The open interval ``(lower, upper)`` (torch has closed and half-open ones only)."""

    is_discrete = False
    event_dim = 0

    def __init__(self, lower: float, upper: float):
        self.lower_bound, self.upper_bound = lower, upper
        super().__init__()

    def check(self, value):
        return (self.lower_bound < value) & (value < self.upper_bound)

    def __repr__(self):
        return f"OpenInterval(lower_bound={self.lower_bound:.6g}, upper_bound={self.upper_bound:.6g})"


class Logit(FlowTransform):
    r"""Logit with squashing, :math:`y = \mathrm{logit}(\alpha + (1 - 2\alpha) x)`, for pixels :math:`x \in [0, 1]`.

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_i \big[\log(1 - 2\alpha) - \log p_i
        - \log(1 - p_i)\big], \qquad p = \alpha + (1 - 2\alpha) x,

    summed over the event. :math:`\alpha > 0` keeps the output finite at 0 and 1. As the first layer of a
    density model (data to latent) it makes ``log_prob`` a density in pixel space, so bits/dim are
    directly comparable with published figures (Dinh et al., 2017, §4.1, use :math:`\alpha = 0.05`).

    Domain and codomain: the map is a bijection from the open interval
    :math:`(-\alpha/(1-2\alpha),\ 1 + \alpha/(1-2\alpha))`, which contains :math:`[0, 1]`, onto the whole real
    line. A density model that starts with it is a normalised density on that interval (per pixel); its draws
    (``FlowDensity.distribution.sample()``) land in the interval, slightly outside :math:`[0, 1]` where the model
    puts mass there, and ``log_prob`` accepts every one of them. ``FlowDensity.sample`` clamps to :math:`[0, 1]`
    for images.

    :param float alpha: squashing, in ``[0, 0.5)``.
    :param int event_dim: 3 for images, 1 for vectors.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import Logit
        >>> t = Logit(0.05)
        >>> x = torch.rand(2, 1, 4, 4)
        >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-6)
        True
    """

    sign = +1  # elementwise and increasing, as torch's ``sign`` asks

    def __init__(self, alpha: float = 0.05, event_dim: int = 3):
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"Logit: alpha must lie in [0, 0.5), got {alpha!r}")
        if event_dim not in (1, 3):
            raise ValueError(f"Logit: event_dim must be 1 or 3, got {event_dim!r}")
        super().__init__(event_dim=event_dim, event_shape=(None,) * event_dim)
        self.alpha = float(alpha)
        self._log_span = math.log1p(-2 * self.alpha)
        margin = self.alpha / (1 - 2 * self.alpha)
        self._domain = constraints.independent(_OpenInterval(-margin, 1.0 + margin), event_dim)

    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        r"""The open interval :math:`(-\alpha/(1-2\alpha), 1 + \alpha/(1-2\alpha))`, whose image is the real line."""
        return self._domain

    @property
    def data_range(self) -> tuple[float, float]:
        """The range of the data this layer preprocesses, ``(0.0, 1.0)``: ``FlowDensity.sample`` clamps to it."""
        return (0.0, 1.0)

    def _sum(self, t):
        return _sum_rightmost(t, self._event_dim)

    def forward_and_log_det(self, x):
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        return y, self._sum(self._log_span - torch.log(p) - torch.log1p(-p))

    def inverse_and_log_det(self, y):
        p = torch.sigmoid(y)
        x = (p - self.alpha) / (1 - 2 * self.alpha)
        # log p + log(1 - p) = -softplus(-y) - softplus(y), stable for large |y|
        return x, self._sum(-F.softplus(-y) - F.softplus(y) - self._log_span)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
