r"""Planar flow (Rezende & Mohamed, 2015) with the invertibility constraint and a true inverse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import FlowTransform

# softplus(a + _SHIFT) - 1 is 0 at a = 0, so a layer with u = 0 is the identity.
_SHIFT = math.log(math.e - 1.0)


class Planar(FlowTransform):
    r"""Planar flow :math:`y = x + \hat u \tanh(w^\top x + b)` (Rezende & Mohamed, 2015, §A.1).

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right| = \log\left(1 + (1 - \tanh^2(w^\top x + b))\,
        w^\top \hat u\right),

    with :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \|w\|^2` and
    :math:`m(a) = \mathrm{softplus}(a + \log(e - 1)) - 1 > -1`, so :math:`w^\top \hat u > -1` and the map is
    invertible. ``u`` starts at zero, so a fresh layer is the identity.

    The inverse (which Pyro's own planar flow lacks) solves the scalar equation
    :math:`a + c \tanh(a) = w^\top y + b`, :math:`c = w^\top \hat u`, for :math:`a = w^\top x + b` by
    Newton's method safeguarded by bisection on the bracket :math:`[w^\top y + b - |c|, w^\top y + b + |c|]`
    (the left side is strictly increasing), then sets :math:`x = y - \hat u \tanh(a)`. It raises
    ``RuntimeError`` with the residual reached if it does not converge in ``max_iter`` steps. Gradients
    flow through the inverse by the implicit-function theorem (one differentiable Newton step at the root).

    :param int input_dim: the event size ``D``; inputs have shape ``(..., D)``.
    :param int max_iter: the inverse's iteration limit.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import Planar
        >>> t = Planar(3)
        >>> with torch.no_grad():
        ...     _ = t.u.normal_()
        >>> x = torch.randn(10, 3)
        >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-5)
        True
    """

    def __init__(self, input_dim: int, *, max_iter: int = 100):
        if not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"Planar: input_dim must be a positive int, got {input_dim!r}")
        if max_iter < 0:
            raise ValueError(f"Planar: max_iter must be >= 0, got {max_iter!r}")
        super().__init__(event_dim=1, event_shape=(input_dim,))
        self.input_dim = input_dim
        self.max_iter = max_iter
        bound = 1.0 / math.sqrt(input_dim)
        self.u = nn.Parameter(torch.zeros(input_dim))
        self.w = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> torch.Tensor:
        """The constrained direction :math:`\\hat u`, with :math:`w^\\top \\hat u > -1`."""
        wu = self.w @ self.u
        m = F.softplus(wu + _SHIFT) - 1.0
        return self.u + (m - wu) * self.w / (self.w @ self.w).clamp_min(torch.finfo(self.w.dtype).tiny)

    def forward_and_log_det(self, x):
        u_hat = self.u_hat()
        h = torch.tanh(x @ self.w + self.b)
        y = x + h.unsqueeze(-1) * u_hat
        log_det = torch.log1p((1.0 - h * h) * (self.w @ u_hat))
        return y, log_det

    def inverse_and_log_det(self, y):
        u_hat = self.u_hat()
        c = self.w @ u_hat
        target = y @ self.w + self.b
        with torch.no_grad():
            a = self._solve(target.detach(), c.detach())
        # One Newton step with grad enabled: exact value at the root, implicit-function gradients.
        h = torch.tanh(a)
        a = a - (a + c * h - target) / (1.0 + c * (1.0 - h * h))
        h = torch.tanh(a)
        x = y - h.unsqueeze(-1) * u_hat
        return x, -torch.log1p((1.0 - h * h) * c)

    def _solve(self, target, c):
        """Solve ``a + c tanh(a) = target`` elementwise (``c > -1``) to near machine precision."""
        eps = torch.finfo(target.dtype).eps
        tol = 16 * eps * (1.0 + target.abs() + c.abs())
        lo, hi = target - c.abs(), target + c.abs()
        a = target - c * torch.tanh(target)
        a = torch.minimum(torch.maximum(a, lo), hi)
        residual = a + c * torch.tanh(a) - target
        for _ in range(self.max_iter):
            if bool((residual.abs() <= tol).all()):
                return a
            hi = torch.where(residual > 0, a, hi)
            lo = torch.where(residual < 0, a, lo)
            t = torch.tanh(a)
            step = a - residual / (1.0 + c * (1.0 - t * t))
            outside = ~((step > lo) & (step < hi))
            a = torch.where(outside, 0.5 * (lo + hi), step)
            residual = a + c * torch.tanh(a) - target
        if bool((residual.abs() <= tol).all()):
            return a
        worst = float(residual.abs().max())
        n_bad = int((residual.abs() > tol).sum())
        raise RuntimeError(
            f"Planar inverse did not converge in max_iter={self.max_iter} iterations: "
            f"{n_bad} element(s) above tolerance, max residual |a + c·tanh(a) - (w·y + b)| = {worst:.3e}"
        )

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"
