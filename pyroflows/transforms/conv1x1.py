r"""Invertible 1x1 convolution (Kingma & Dhariwal, 2018): a learned mixing of channels (or features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._deprecation import renamed_kwargs
from ._shapes import legacy_event_dim
from .base import FlowTransform


def _random_rotation(n: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal matrix (column-major strides)


def _parameter(t: torch.Tensor) -> nn.Parameter:
    # LAPACK results are column-major. Pyro's param store keeps ``.contiguous()`` of what it registers, so a
    # non-contiguous Parameter would be replaced there by a copy: SVI would train the copy, not this layer.
    return nn.Parameter(t.contiguous())


class Invertible1x1Conv(FlowTransform):
    r"""Channel mixing :math:`y_{:,h,w} = W x_{:,h,w}` at every position (images) or :math:`y = W x` (vectors).

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right| = P \log|\det W|,

    with :math:`P = H W` positions for images and 1 for vectors. With ``lu=False`` the weight is a free
    matrix and the log-det uses ``slogdet``. With ``lu=True`` it is stored as :math:`W = P L (U + \mathrm{diag}
    (\mathrm{sign}(s)\, e^{\log|s|}))` with :math:`P` a fixed permutation, :math:`L` unit lower-triangular
    and :math:`U` strictly upper-triangular, so the log-det is :math:`P \sum_i \log|s_i|`, :math:`O(C)`
    instead of :math:`O(C^3)`. Both start from a random rotation (log-det 0), drawn from torch's RNG.

    Reference: Kingma & Dhariwal, *Glow: Generative Flow with Invertible 1x1 Convolutions*, NeurIPS 2018.

    :param shape: ``(C, H, W)`` for images ``(..., C, H, W)`` (``H``, ``W`` may be ``None``), ``D`` or ``(D,)``
        for vectors ``(..., D)``. (Until pyroflows 0.3 an int still means image channels, with a warning.)
    :param bool lu: use the LU parameterisation.
    :param int event_dim: deprecated: ``3`` with an int ``shape`` means ``(C, None, None)``.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import Invertible1x1Conv
        >>> t = Invertible1x1Conv((4, None, None), lu=True)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-5)
        True
    """

    @renamed_kwargs(num_channels="shape")
    def __init__(self, shape: int | tuple, lu: bool = False, event_dim: int | None = None):
        event_shape = legacy_event_dim(shape, event_dim, "Invertible1x1Conv", default_image=True)
        num_channels = event_shape[0]
        super().__init__(event_dim=len(event_shape), event_shape=event_shape)
        self.num_channels = num_channels
        self.lu = lu
        w = _random_rotation(num_channels)
        if not lu:
            self.weight = _parameter(w)
            return
        p, l, u = torch.linalg.lu(w)
        s = torch.diagonal(u)
        self.register_buffer("perm", p.contiguous())
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = _parameter(l)
        self.upper = _parameter(torch.triu(u, 1))
        self.log_s = _parameter(torch.log(torch.abs(s)))

    def _lu_factors(self):
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight_matrix(self) -> torch.Tensor:
        """The ``C x C`` mixing matrix :math:`W`."""
        if not self.lu:
            return self.weight
        lower, upper = self._lu_factors()
        return self.perm @ lower @ upper

    def _log_abs_det_weight(self) -> torch.Tensor:
        if self.lu:
            return self.log_s.sum()
        return torch.linalg.slogdet(self.weight)[1]

    def _mix(self, matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._event_dim == 1:
            return x @ matrix.T
        if x.shape[-1] * x.shape[-2] < 256:  # small images: a batched matmul beats conv2d ~2x on CPU
            return torch.einsum("ij,...jhw->...ihw", matrix, x)
        out = F.conv2d(x.reshape((-1,) + x.shape[-3:]), matrix[:, :, None, None])
        return out.reshape(x.shape)

    def _batch(self, x, log_det):
        return log_det.expand(x.shape[: x.dim() - self._event_dim])

    def forward_and_log_det(self, x):
        y = self._mix(self.weight_matrix(), x)
        return y, self._batch(x, self._log_abs_det_weight() * self._positions(x))

    def inverse_and_log_det(self, y):
        if self.lu:
            lower, upper = self._lu_factors()
            # W^{-1} = U^{-1} L^{-1} P^T, by two triangular solves against the identity
            inv_l = torch.linalg.solve_triangular(lower, self.eye, upper=False, unitriangular=True)
            inv_u = torch.linalg.solve_triangular(upper, self.eye, upper=True)
            inverse = inv_u @ inv_l @ self.perm.T
        else:
            inverse = torch.linalg.inv(self.weight)
        x = self._mix(inverse, y)
        return x, self._batch(y, -self._log_abs_det_weight() * self._positions(y))

    def extra_repr(self) -> str:
        return f"shape={self.event_shape}, lu={self.lu}"
