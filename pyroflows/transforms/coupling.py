r"""Affine coupling (Dinh et al., 2017, RealNVP; Kingma & Dhariwal, 2018, Glow), for vectors and images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions.utils import _sum_rightmost

from .._deprecation import renamed_kwargs
from ..nn.conditioners import MLP, ConvNet
from ._shapes import count, legacy_image_channels, parse_shape
from .base import FlowTransform
from .conditional import broadcast_context, join_context

VECTOR_MASKS = ("half", "alternate")
IMAGE_MASKS = ("checkerboard", "channel")


def make_mask(kind: str | torch.Tensor | Sequence[bool], input_dim: int, flip: bool = False) -> torch.Tensor:
    """A boolean vector mask of length ``input_dim``; ``True`` marks the coordinates that pass unchanged and
    condition the others.

    :param kind: ``"half"`` (the first ``input_dim // 2`` coordinates), ``"alternate"`` (even indices),
        or an explicit boolean / 0-1 sequence or tensor of length ``input_dim``.
    :param int input_dim: the event size ``D``.
    :param bool flip: negate the mask.

    Example::

        >>> from pyroflows.transforms import make_mask
        >>> make_mask("half", 5).tolist()
        [True, True, False, False, False]
        >>> make_mask("alternate", 4, flip=True).tolist()
        [False, True, False, True]
    """
    if isinstance(kind, str):
        idx = torch.arange(input_dim)
        if kind == "half":
            mask = idx < input_dim // 2
        elif kind == "alternate":
            mask = idx % 2 == 0
        else:
            raise ValueError(f"mask must be one of {VECTOR_MASKS} or a boolean tensor for vectors, got {kind!r}")
        return ~mask if flip else mask
    mask = _as_bool(kind)
    if mask.shape != (input_dim,):
        raise ValueError(f"mask must have shape ({input_dim},), got {tuple(mask.shape)}")
    return ~mask if flip else mask


def _as_bool(mask) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or contain only 0 and 1")
        mask = mask.bool()
    return mask.clone()


def _is_image_mask(mask) -> bool:
    if isinstance(mask, str):
        if mask in IMAGE_MASKS:
            return True
        if mask in VECTOR_MASKS:
            return False
        raise ValueError(f"mask must be one of {VECTOR_MASKS + IMAGE_MASKS} or a boolean tensor, got {mask!r}")
    return torch.as_tensor(mask).dim() == 3


def _describe(mask) -> str:
    return repr(mask) if isinstance(mask, str) else f"a tensor of shape {tuple(torch.as_tensor(mask).shape)}"


# The conditioning and transformed coordinates of a vector coupling's boolean mask (kept as the layer's ``mask``
# buffer), split from an input and merged back into an output of the same layout: shared by AffineCoupling and
# SplineCoupling.
def init_vector_split(layer: nn.Module, mask: torch.Tensor) -> None:
    """Register ``mask`` and the index buffers of the split on ``layer``."""
    layer.register_buffer("mask", mask)
    cond_idx, trans_idx = torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()
    layer.register_buffer("_cond_idx", cond_idx, persistent=False)
    layer.register_buffer("_trans_idx", trans_idx, persistent=False)
    # y = cat([y_cond, y_trans])[..., _unsort] puts every coordinate back in place.
    layer.register_buffer("_unsort", torch.argsort(torch.cat([cond_idx, trans_idx])), persistent=False)
    # A mask of two contiguous blocks (the half mask, flipped or not) splits by views instead of gathers:
    # the gathers' scatter-add backward made a vector coupling step about 20% slower.
    n_cond, n_trans = cond_idx.numel(), trans_idx.numel()
    layer._blocks = None
    if n_cond and bool((cond_idx.diff() == 1).all()) and bool((trans_idx.diff() == 1).all()):
        if int(cond_idx[0]) == 0:
            layer._blocks = (False, n_cond, n_trans)  # (transformed block first?, first size, second size)
        elif int(trans_idx[0]) == 0:
            layer._blocks = (True, n_trans, n_cond)


def vector_split(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_cond, x_trans)`` of ``x`` for a layer set up by :func:`init_vector_split`."""
    if layer._blocks is None:
        return x.index_select(-1, layer._cond_idx), x.index_select(-1, layer._trans_idx)  # (see Permute)
    trans_first, first, second = layer._blocks
    a, b = x.split([first, second], dim=-1)
    return (b, a) if trans_first else (a, b)


def vector_merge(layer: nn.Module, x_cond: torch.Tensor, y_trans: torch.Tensor) -> torch.Tensor:
    """The output with every coordinate back in its place (the inverse of :func:`vector_split`)."""
    if layer._blocks is None:
        return torch.cat([x_cond, y_trans], dim=-1).index_select(-1, layer._unsort)
    return torch.cat([y_trans, x_cond] if layer._blocks[0] else [x_cond, y_trans], dim=-1)


class AffineCoupling(FlowTransform):
    r"""Affine coupling layer: with ``m`` the mask (``True`` = conditioning, passed unchanged),

    .. math::

        y_m = x_m, \qquad y_{\bar m} = x_{\bar m} \odot e^{s(x_m)} + t(x_m), \qquad
        \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_{i \in \bar m} s_i(x_m).

    The log-scale is bounded, :math:`s = \beta \tanh(\tilde s / \beta)` with ``scale_bound`` :math:`\beta`,
    so no layer can blow up; with ``additive=True`` :math:`s = 0` (NICE). The conditioner's last layer starts
    at zero, so a fresh layer is the identity. Alternate the mask (``flip=True`` every other layer) or mix
    features in between (1x1 convolutions, permutations) so that every coordinate moves.

    Vectors (event shape ``(D,)``): masks ``"half"``, ``"alternate"`` or a boolean tensor of shape ``(D,)``;
    the conditioner is a :class:`~pyroflows.nn.MLP`. Images (event shape ``(C, H, W)``): masks
    ``"checkerboard"`` (pixels with even ``h + w`` condition), ``"channel"`` (the first ``C // 2`` channels
    condition) or a boolean tensor broadcastable to ``(C, H, W)``; the conditioner is a
    :class:`~pyroflows.nn.ConvNet` that sees the masked image.

    References: Dinh, Sohl-Dickstein & Bengio, *Density estimation using Real NVP*, ICLR 2017;
    Kingma & Dhariwal, *Glow*, NeurIPS 2018; Dinh, Krueger & Bengio, *NICE*, 2015 (additive).

    :param shape: ``D`` or ``(D,)`` for vectors, ``(C, H, W)`` for images (``H``, ``W`` may be ``None``).
    :param mask: see above; a vector mask for a vector shape, an image mask for an image shape.
    :param hidden: vector conditioner hidden sizes (default ``(64, 64)``) or image conditioner width
        (an int, default 64).
    :param torch.nn.Module conditioner: optional replacement network: vectors ``(..., n_cond) -> (..., 2 n_trans)``;
        images ``(..., C, H, W) -> (..., 2C, H, W)`` (channel mask: ``C_cond -> 2 C_trans``); shift first, then raw
        log-scale (only the shift when ``additive``).
    :param float scale_bound: bound :math:`\beta` on the absolute log-scale.
    :param bool additive: volume-preserving shift-only coupling.
    :param bool flip: negate a named mask.
    :param int split: for ``mask="channel"``, the size of the first channel group (default ``C // 2``); the
        first group conditions, or the second one with ``flip=True``.
    :param int context_dim: size of a context vector the conditioner also sees (0: none). A coupling with a context
        takes ``context=`` in its two methods; use it through
        :class:`~pyroflows.transforms.ConditionalAffineCoupling`, a Pyro ``ConditionalTransformModule``.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import AffineCoupling
        >>> t = AffineCoupling(4, mask="alternate", hidden=(16,))
        >>> x = torch.randn(3, 4)
        >>> torch.equal(t(x), x)  # identity at init
        True
        >>> AffineCoupling((2, None, None), mask="checkerboard", hidden=8)(torch.randn(5, 2, 4, 4)).shape
        torch.Size([5, 2, 4, 4])
    """

    @renamed_kwargs(num_features="shape")
    def __init__(
        self,
        shape: int | tuple,
        mask: str | torch.Tensor = "half",
        hidden: Sequence[int] | int | None = None,
        conditioner: nn.Module | None = None,
        scale_bound: float = 3.0,
        additive: bool = False,
        flip: bool = False,
        split: int | None = None,
        *,
        context_dim: int = 0,
    ):
        if not scale_bound > 0:
            raise ValueError(f"AffineCoupling: scale_bound must be positive, got {scale_bound!r}")
        context_dim = count(context_dim, "context_dim", "AffineCoupling", low=0)
        image = _is_image_mask(mask)
        if image and isinstance(shape, int):
            event_shape = legacy_image_channels(
                shape, "AffineCoupling", f"an int shape with an image mask ({_describe(mask)})"
            )
        else:
            event_shape = parse_shape(shape, "AffineCoupling")
        if image != (len(event_shape) == 3):
            kind = "an image" if image else "a vector"
            raise ValueError(
                f"AffineCoupling: mask {_describe(mask)} is {kind} mask, but shape {shape!r} is not {kind} shape"
            )
        num_features = event_shape[0]
        super().__init__(event_dim=len(event_shape), event_shape=event_shape)
        self.num_features = num_features
        self.context_dim = context_dim
        self.scale_bound = float(scale_bound)
        self.additive = additive
        self.flip = flip
        self._n_params = 1 if additive else 2
        if image:
            self._init_image(num_features, mask, hidden, conditioner, flip, split)
        else:
            self._init_vector(num_features, mask, hidden, conditioner, flip, split)

    # ----------------------------------------------------------------- construction
    def _init_vector(self, dim, mask, hidden, conditioner, flip, split):
        self._mode = "vector"
        mask = make_mask(mask, dim, flip)
        n_cond = int(mask.sum())
        n_trans = dim - n_cond
        if n_trans == 0:
            raise ValueError("AffineCoupling: the mask marks every coordinate as conditioning; none is transformed")
        if split is not None:
            raise ValueError("AffineCoupling: split applies to the image channel mask only")
        init_vector_split(self, mask)
        hidden = (64, 64) if hidden is None else ((hidden,) if isinstance(hidden, int) else tuple(hidden))
        self.conditioner = conditioner or MLP(n_cond + self.context_dim, self._n_params * n_trans, hidden)

    def _init_image(self, channels, mask, hidden, conditioner, flip, split):
        width = 64 if hidden is None else (hidden if isinstance(hidden, int) else int(tuple(hidden)[0]))
        if isinstance(mask, str) and mask == "channel":
            first = channels // 2 if split is None else split
            if not 0 < first < channels:
                raise ValueError(f"AffineCoupling: the channel mask needs 0 < split < C={channels}, got {first!r}")
            self._mode = "channel"
            self._sizes = [first, channels - first]  # the two channel groups; the first conditions unless flip
            n_cond, n_trans = self._sizes[::-1] if flip else self._sizes
            self.conditioner = conditioner or ConvNet(n_cond + self.context_dim, self._n_params * n_trans, width)
            return
        self._mode = "spatial"
        if isinstance(mask, str):  # checkerboard, built for the input's H, W on each call
            self.register_buffer("mask", None)
            self.checker_parity = 1 if flip else 0
        else:
            m = _as_bool(mask)
            if flip:
                m = ~m
            if m.dim() != 3 or m.shape[0] not in (1, channels):
                raise ValueError(f"AffineCoupling: an image mask must have shape (1 or C, H, W), got {tuple(m.shape)}")
            if bool(m.all()):
                raise ValueError("AffineCoupling: the mask marks every pixel as conditioning; none is transformed")
            self.register_buffer("mask", m)
            self.checker_parity = None
        self.conditioner = conditioner or ConvNet(channels + self.context_dim, self._n_params * channels, width)

    # ----------------------------------------------------------------- the map
    def _scale(self, params):
        if self.additive:
            return params, None
        shift, raw = params.chunk(2, dim=-1 if self._mode == "vector" else -3)
        return shift, self.scale_bound * torch.tanh(raw / self.scale_bound)

    def _spatial_mask(self, x):
        if self.mask is not None:
            return self.mask.to(x.dtype)
        h, w = x.shape[-2:]
        ii = torch.arange(h, device=x.device)[:, None]
        jj = torch.arange(w, device=x.device)[None, :]
        return ((ii + jj) % 2 == self.checker_parity).to(x.dtype)[None]

    def _split_channels(self, x):
        a, b = x.split(self._sizes, dim=-3)
        return (b, a) if self.flip else (a, b)

    def _condition(self, x_cond, context):
        """The conditioner's output for ``x_cond`` (and the context, broadcast to it, for a conditional coupling)."""
        if context is None:
            return self.conditioner(x_cond)
        return self.conditioner(join_context(x_cond, context, self._event_dim))

    def _couple(self, x, inverse: bool, context=None):
        """Returns ``(output, log|det d output / d input|)`` for the forward or inverse map."""
        sign = -1.0 if inverse else 1.0
        if self.context_dim:
            x, context = broadcast_context(x, context, self._event_dim, self.context_dim, "AffineCoupling")
        if self._mode == "vector":
            x_cond, x_trans = vector_split(self, x)
            shift, log_scale = self._scale(self._condition(x_cond, context))
            y_trans = self._affine(x_trans, shift, log_scale, inverse)
            return vector_merge(self, x_cond, y_trans), self._sum(log_scale, x, 1, sign)
        if self._mode == "channel":
            x_cond, x_trans = self._split_channels(x)
            shift, log_scale = self._scale(self._condition(x_cond, context))
            y_trans = self._affine(x_trans, shift, log_scale, inverse)
            parts = [x_cond, y_trans] if not self.flip else [y_trans, x_cond]
            return torch.cat(parts, dim=-3), self._sum(log_scale, x, 3, sign)
        m = self._spatial_mask(x)
        x_cond = x * m
        shift, log_scale = self._scale(self._condition(x_cond, context))
        shift = shift * (1 - m)
        log_scale = None if log_scale is None else log_scale * (1 - m)
        y = x_cond + (1 - m) * self._affine(x, shift, log_scale, inverse)
        return y, self._sum(log_scale, x, 3, sign)

    @staticmethod
    def _affine(x, shift, log_scale, inverse):
        if log_scale is None:
            return x - shift if inverse else x + shift
        return (x - shift) * torch.exp(-log_scale) if inverse else x * torch.exp(log_scale) + shift

    @staticmethod
    def _sum(log_scale, x, event_dim, sign):
        batch = x.shape[: x.dim() - event_dim]
        if log_scale is None:
            return x.new_zeros(batch)
        return sign * _sum_rightmost(log_scale, event_dim)

    def forward_and_log_det(self, x, context=None):
        return self._couple(x, inverse=False, context=context)

    def inverse_and_log_det(self, y, context=None):
        return self._couple(y, inverse=True, context=context)

    def extra_repr(self) -> str:
        extra = f", context_dim={self.context_dim}" if self.context_dim else ""
        return (
            f"shape={self.event_shape}, mode={self._mode}, scale_bound={self.scale_bound}, additive={self.additive}"
            + extra
        )
