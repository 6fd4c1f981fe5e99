r"""Affine coupling (Dinh et al., 2017, RealNVP): half the coordinates condition an affine map of the rest."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.conditioners import MLP
from .base import FlowTransform

MASKS_1D = ("half", "alternate")


def make_mask(kind: str | torch.Tensor | Sequence[bool], input_dim: int) -> torch.Tensor:
    """A boolean mask of length ``input_dim``; ``True`` marks the coordinates that pass unchanged and
    condition the others.

    :param kind: ``"half"`` (the first ``input_dim // 2`` coordinates), ``"alternate"`` (even indices),
        or an explicit boolean / 0-1 sequence or tensor of length ``input_dim``.
    :param int input_dim: the event size ``D``.
    """
    if isinstance(kind, str):
        idx = torch.arange(input_dim)
        if kind == "half":
            return idx < input_dim // 2
        if kind == "alternate":
            return idx % 2 == 0
        raise ValueError(f"mask must be one of {MASKS_1D} or a boolean tensor for vectors, got {kind!r}")
    mask = torch.as_tensor(kind)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or contain only 0 and 1")
        mask = mask.bool()
    if mask.shape != (input_dim,):
        raise ValueError(f"mask must have shape ({input_dim},), got {tuple(mask.shape)}")
    return mask.clone()


class AffineCoupling(FlowTransform):
    r"""Affine coupling layer for vectors: with ``m`` the mask,

    .. math::

        y_m = x_m, \qquad y_{\bar m} = x_{\bar m} \odot e^{s(x_m)} + t(x_m), \qquad
        \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_i s_i(x_m).

    The log-scale is bounded, :math:`s = \beta \tanh(\tilde s / \beta)` with ``scale_bound`` :math:`\beta`,
    so no layer can blow up, and the conditioner's last layer starts at zero, so a fresh layer is the
    identity. Alternate the mask (``mask`` then ``~mask``) between layers so that every coordinate moves.

    Reference: Dinh, Sohl-Dickstein & Bengio, *Density estimation using Real NVP*, ICLR 2017.

    :param int input_dim: the event size ``D``; inputs have shape ``(..., D)``.
    :param mask: ``"half"``, ``"alternate"``, or a boolean tensor of shape ``(D,)`` (``True`` = conditions).
    :param hidden: the conditioner's hidden sizes.
    :param torch.nn.Module conditioner: optional network mapping ``(..., n_cond)`` to ``(..., 2 n_trans)``
        (shift then raw log-scale); replaces the default :class:`pyroflows.nn.MLP`.
    :param float scale_bound: bound :math:`\beta` on the absolute log-scale.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import AffineCoupling
        >>> t = AffineCoupling(4, mask="alternate", hidden=(16,))
        >>> x = torch.randn(3, 4)
        >>> torch.equal(t(x), x)  # identity at init
        True
    """

    def __init__(
        self,
        input_dim: int,
        mask: str | torch.Tensor = "half",
        hidden: Sequence[int] = (64, 64),
        conditioner: nn.Module | None = None,
        scale_bound: float = 3.0,
    ):
        if not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"AffineCoupling: input_dim must be a positive int, got {input_dim!r}")
        if not scale_bound > 0:
            raise ValueError(f"AffineCoupling: scale_bound must be positive, got {scale_bound!r}")
        super().__init__(event_dim=1, event_shape=(input_dim,))
        mask = make_mask(mask, input_dim)
        n_cond = int(mask.sum())
        n_trans = input_dim - n_cond
        if n_trans == 0:
            raise ValueError("AffineCoupling: the mask marks every coordinate as conditioning; none is transformed")
        self.input_dim = input_dim
        self.scale_bound = float(scale_bound)
        self.register_buffer("mask", mask)
        cond_idx = torch.nonzero(mask).flatten()
        trans_idx = torch.nonzero(~mask).flatten()
        self.register_buffer("_cond_idx", cond_idx, persistent=False)
        self.register_buffer("_trans_idx", trans_idx, persistent=False)
        # y = cat([y_cond, y_trans])[..., _unsort] puts every coordinate back in place.
        self.register_buffer("_unsort", torch.argsort(torch.cat([cond_idx, trans_idx])), persistent=False)
        self.conditioner = conditioner if conditioner is not None else MLP(n_cond, 2 * n_trans, hidden)

    def _shift_log_scale(self, x_cond):
        shift, raw = self.conditioner(x_cond).chunk(2, dim=-1)
        return shift, self.scale_bound * torch.tanh(raw / self.scale_bound)

    def forward_and_log_det(self, x):
        x_cond, x_trans = x[..., self._cond_idx], x[..., self._trans_idx]
        shift, log_scale = self._shift_log_scale(x_cond)
        y_trans = x_trans * torch.exp(log_scale) + shift
        y = torch.cat([x_cond, y_trans], dim=-1)[..., self._unsort]
        return y, log_scale.sum(-1)

    def inverse_and_log_det(self, y):
        y_cond, y_trans = y[..., self._cond_idx], y[..., self._trans_idx]
        shift, log_scale = self._shift_log_scale(y_cond)
        x_trans = (y_trans - shift) * torch.exp(-log_scale)
        x = torch.cat([y_cond, x_trans], dim=-1)[..., self._unsort]
        return x, -log_scale.sum(-1)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, conditioning={int(self.mask.sum())}, scale_bound={self.scale_bound}"
