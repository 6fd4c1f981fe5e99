r"""Preprocessing for image data: :class:`Logit` maps pixels in [0, 1] to the real line."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import constraints

from .base import FlowTransform


class Logit(FlowTransform):
    r"""Logit with squashing, :math:`y = \mathrm{logit}(\alpha + (1 - 2\alpha) x)` for :math:`x \in [0, 1]`.

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_i \big[\log(1 - 2\alpha) - \log p_i
        - \log(1 - p_i)\big], \qquad p = \alpha + (1 - 2\alpha) x,

    summed over the event. :math:`\alpha > 0` keeps the output finite at 0 and 1. As the first layer of a
    density model (data to latent) it makes ``log_prob`` a density on :math:`[0, 1]^D`, so bits/dim are
    directly comparable with published figures (Dinh et al., 2017, §4.1, use :math:`\alpha = 0.05`).

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

    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return constraints.independent(constraints.unit_interval, self._event_dim)

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        r"""The image of [0, 1]: :math:`(\mathrm{logit}\,\alpha, \mathrm{logit}(1 - \alpha))`."""
        bound = math.log((1 - self.alpha) / self.alpha) if self.alpha > 0 else math.inf
        return constraints.independent(constraints.interval(-bound, bound), self._event_dim)

    def _sum(self, t):
        return t.reshape(t.shape[: t.dim() - self._event_dim] + (-1,)).sum(-1)

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
