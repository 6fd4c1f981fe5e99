r"""Planar flow (Rezende & Mohamed, 2015) with the invertibility constraint and a true inverse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._deprecation import renamed_kwargs
from ._shapes import count, vector_dim
from .base import FlowTransform
from .conditional import broadcast_context


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` in one kernel: a matrix-vector product where ``b`` is one vector, else the sum."""
    if b.dim() == 1:
        return torch.matmul(a, b)
    if a.dim() == 1:
        return torch.matmul(b, a)
    return (a * b).sum(-1)


class Planar(FlowTransform):
    r"""Planar flow :math:`y = x + \hat u \tanh(w^\top x + b)` (Rezende & Mohamed, 2015, §A.1).

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right| = \log\left(1 + (1 - \tanh^2(w^\top x + b))\,
        w^\top \hat u\right),

    with :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \|w\|^2` and
    :math:`m(a) = \mathrm{softplus}(a + \log(e^{1-\delta} - 1)) - (1 - \delta)`, so
    :math:`w^\top \hat u \ge -1 + \delta` and the map is invertible with a log-det bounded below by
    :math:`\log\delta` (Rezende & Mohamed's :math:`m(a) = -1 + \mathrm{softplus}(a)` reaches :math:`-1` in
    floating point for very negative :math:`w^\top u`, where the log-det is :math:`-\infty`).
    ``u`` starts at zero and :math:`m(0) = 0`, so a fresh layer is the identity.

    The inverse (which Pyro's own planar flow lacks) solves the scalar equation
    :math:`a + c \tanh(a) = w^\top y + b`, :math:`c = w^\top \hat u`, for :math:`a = w^\top x + b` by
    Newton's method safeguarded by bisection on the bracket :math:`[w^\top y + b - |c|, w^\top y + b + |c|]`
    (the left side is strictly increasing), then sets :math:`x = y - \hat u \tanh(a)`. It raises
    ``RuntimeError`` with the residual reached if it does not converge in ``max_iter`` steps. Gradients
    flow through the inverse by the implicit-function theorem (one differentiable Newton step at the root).

    :param shape: the event size, ``D`` or ``(D,)``; inputs have shape ``(..., D)``.
    :param int max_iter: the inverse's iteration limit.
    :param float margin: :math:`\delta \in (0, 1)`, how far :math:`w^\top \hat u` stays above -1.
    :param int context_dim: a conditional planar layer (0: none): :math:`(u, w, b)` plus a zero-initialised linear
        map of the context, per example, the constraint applied to each; use it through
        :class:`~pyroflows.transforms.ConditionalPlanar`.

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

    @renamed_kwargs(input_dim="shape")
    def __init__(self, shape: int | tuple[int], *, max_iter: int = 100, margin: float = 1e-4, context_dim: int = 0):
        input_dim = vector_dim(shape, "Planar")
        if max_iter < 0:
            raise ValueError(f"Planar: max_iter must be >= 0, got {max_iter!r}")
        if not 0.0 < margin < 1.0:
            raise ValueError(f"Planar: margin must lie in (0, 1), got {margin!r}")
        super().__init__(event_dim=1, event_shape=(input_dim,))
        self.input_dim = input_dim
        self.max_iter = max_iter
        self.margin = margin
        self._floor = 1.0 - margin  # w·u_hat >= -floor
        self._shift = math.log(math.expm1(self._floor))  # softplus(0 + shift) - floor = 0
        bound = 1.0 / math.sqrt(input_dim)
        self.u = nn.Parameter(torch.zeros(input_dim))
        self.w = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(()))
        self.context_dim = count(context_dim, "context_dim", "Planar", low=0)
        self.hyper = None
        if self.context_dim:  # (du, dw, db) from the context; zero at init, so the map starts as the plain one
            self.hyper = nn.Linear(self.context_dim, 2 * input_dim + 1)
            nn.init.zeros_(self.hyper.weight)
            nn.init.zeros_(self.hyper.bias)

    def u_hat(self) -> torch.Tensor:
        """The constrained direction :math:`\\hat u`, with :math:`w^\\top \\hat u > -1`."""
        return self._u_hat(self.u, self.w)

    def _u_hat(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        wu = _dot(w, u).unsqueeze(-1)
        m = F.softplus(wu + self._shift) - self._floor
        ww = _dot(w, w).unsqueeze(-1).clamp_min(torch.finfo(w.dtype).tiny)
        return torch.addcmul(u, (m - wu) / ww, w)

    def _params(self, x: torch.Tensor, context):
        """``(x, u_hat, w, b)``: the layer's own parameters, or (with a context) per example, ``x`` broadcast."""
        if not self.context_dim:
            return x, self.u_hat(), self.w, self.b
        x, context = broadcast_context(x, context, 1, self.context_dim, "Planar")
        du, dw, db = self.hyper(context.to(x.dtype)).split([self.input_dim, self.input_dim, 1], dim=-1)
        u, w = self.u + du, self.w + dw
        return x, self._u_hat(u, w), w, self.b + db[..., 0]

    def _map(self, x, context):
        """``(y, h, u_hat, w)`` of the forward map, ``h = tanh(w·x + b)``."""
        x, u_hat, w, b = self._params(x, context)
        h = torch.tanh(_dot(x, w) + b)
        return torch.addcmul(x, h.unsqueeze(-1), u_hat), h, u_hat, w

    def forward_and_log_det(self, x, context=None):
        y, h, u_hat, w = self._map(x, context)
        return y, torch.log1p((1.0 - h * h) * _dot(w, u_hat))

    def forward_only(self, x, context=None):
        return self._map(x, context)[0]

    warm_start_inverse = True  # the solve starts at w·x + b of the remembered input when y is its output

    def inverse_and_log_det(self, y, context=None):
        y, u_hat, w, b = self._params(y, context)
        c = _dot(w, u_hat)
        target = _dot(y, w) + b
        with torch.no_grad():
            x = self._warm_start(y)
            start = None if x is None else (_dot(x, w) + b).expand(target.shape)
            a = self._solve(target.detach(), c.detach().expand(target.shape), start)
        # One Newton step with grad enabled: exact value at the root, implicit-function gradients.
        h = torch.tanh(a)
        a = a - (a + c * h - target) / (1.0 + c * (1.0 - h * h))
        h = torch.tanh(a)
        x = y - h.unsqueeze(-1) * u_hat
        return x, -torch.log1p((1.0 - h * h) * c)

    def _warm_start(self, y: torch.Tensor) -> torch.Tensor | None:
        """The remembered input when ``y`` is its output to within ``sqrt(eps)`` relative (the sticking-the-landing
        gradient inverts a copy of each draw; a later layer's inverse returns its input to rounding): its ``w·x + b``
        is then the root, or next to it. ``None`` otherwise: another point's input would be a worse start."""
        return self.remembered_input(y, within=lambda out: torch.finfo(out.dtype).eps ** 0.5 * (1.0 + out.abs()))

    def _solve(self, target, c, start=None):
        """Solve ``a + c tanh(a) = target`` elementwise (``c > -1``, same shape as ``target``) to near machine
        precision, from ``start`` when given (clamped into the bracket; any start converges).

        Newton steps, replaced by bisection whenever they leave the bracket; each iteration works only on
        the elements not yet converged.
        """
        shape = target.shape
        t = target.reshape(-1)
        c = c.reshape(-1)
        tol_all = 16 * torch.finfo(t.dtype).eps * (1.0 + t.abs() + c.abs())
        lo, hi = t - c.abs(), t + c.abs()
        a = t - c * torch.tanh(t) if start is None else start.reshape(-1)
        a = torch.minimum(torch.maximum(a, lo), hi)
        solution = a.clone()
        idx = torch.arange(t.numel(), device=t.device)
        tol = tol_all
        dx_old = hi - lo  # the step before last (Numerical Recipes' rtsafe rule)
        for it in range(self.max_iter + 1):
            th = torch.tanh(a)
            residual = a + c * th - t
            solution[idx] = a
            keep = residual.abs() > tol
            if not bool(keep.any()):
                return solution.reshape(shape)
            if it == self.max_iter:
                break
            idx, a, t, c, lo, hi, tol, th, residual, dx_old = (
                v[keep] for v in (idx, a, t, c, lo, hi, tol, th, residual, dx_old)
            )
            hi = torch.where(residual > 0, a, hi)
            lo = torch.where(residual < 0, a, lo)
            newton = residual / (1.0 + c * (1.0 - th * th))
            step = a - newton
            # bisect when Newton leaves the bracket or does not halve the step: for large |c| Newton can
            # bounce between the two flanks of tanh while the bracket shrinks only slowly
            use_newton = (step > lo) & (step < hi) & (2 * newton.abs() <= dx_old.abs())
            a_new = torch.where(use_newton, step, 0.5 * (lo + hi))
            dx_old = a_new - a
            a = a_new
        raise RuntimeError(
            f"Planar inverse did not converge in max_iter={self.max_iter} iterations: "
            f"{idx.numel()} element(s) above tolerance, max residual |a + c·tanh(a) - (w·y + b)| = "
            f"{float(residual.abs().max()):.3e} (tolerance {float(tol.max()):.1e})"
        )

    def extra_repr(self) -> str:
        return f"shape={self.event_shape}" + (f", context_dim={self.context_dim}" if self.context_dim else "")
