"""Builders: plain functions taking the event size first, so ``partial(builder, ...)`` is an
``init_transform_fn`` for :class:`pyro.infer.autoguide.AutoNormalizingFlow`. Each returns a
:class:`~pyroflows.transforms.Compose`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._deprecation import renamed_kwargs
from .transforms import (
    ActNorm,
    AffineAutoregressive,
    AffineCoupling,
    BatchNorm,
    Compose,
    ConditionalAffineAutoregressive,
    ConditionalAffineCoupling,
    ConditionalCompose,
    ConditionalLayer,
    ConditionalPlanar,
    ConditionalResidualBlock,
    ConditionalSplineCoupling,
    Invertible1x1Conv,
    Logit,
    MultiScale,
    Permute,
    Planar,
    ResidualBlock,
    SplineCoupling,
    Squeeze,
    inverse,
    make_mask,
)
from .transforms._shapes import count, hidden_sizes, parse_shape, vector_dim


def _output_affine(dim: int):
    """The last layer of a vector flow, ``y = x * exp(s) + b`` (an inverted ActNorm).

    ``AutoNormalizingFlow``'s base is a fixed N(0, I), so the flow itself must place and scale the posterior.
    In this parameterisation ``b`` is the posterior location and ``s`` its log-scale, one Adam step moves
    each by about ``lr``; ActNorm's own ``(x - b) * exp(-s)`` would need ``b = -loc * exp(s)``, far and
    ill-conditioned for narrow posteriors. In the density direction it is the layer next to the latent.
    """
    return inverse(ActNorm(dim))


def _fixed_permutation(dim: int, seed: int) -> torch.Tensor:
    """A random-looking but fixed permutation: rebuilding a flow (e.g. a guide whose parameters come back
    from the param store, which holds no buffers) gives the same layers, whatever the global RNG state."""
    return torch.randperm(dim, generator=torch.Generator().manual_seed(seed))


def _shape(shape_or_dim, builder: str = "builder") -> tuple:
    return parse_shape(shape_or_dim, builder)


def _image_shape(shape, builder: str) -> tuple[int, int, int]:
    if not isinstance(shape, (tuple, list)) or len(shape) != 3:
        raise ValueError(f"{builder}: expected an image shape (C, H, W) of positive ints, got {shape!r}")
    shape = _shape(shape, builder)
    if not all(n is not None for n in shape):
        raise ValueError(f"{builder}: expected an image shape (C, H, W) of positive ints, got {shape!r}")
    return shape


def _check_levels(shape, levels: int, builder: str, extra_squeeze: int = 0) -> None:
    c, h, w = shape
    count(levels, "levels", builder)
    need = 2 ** (levels - 1 + extra_squeeze)
    if levels < 1 or h % need or w % need:
        raise ValueError(
            f"{builder}: H={h}, W={w} must be divisible by {need} for levels={levels}; "
            f"the largest levels this size allows is {_max_levels(shape, extra_squeeze)}"
        )


def _max_levels(shape, extra_squeeze: int = 0) -> int:
    _, h, w = shape
    levels = 0
    while h % (2 ** (levels + extra_squeeze)) == 0 and w % (2 ** (levels + extra_squeeze)) == 0 and levels < 8:
        if min(h, w) // 2 ** (levels + extra_squeeze) < 1:
            break
        levels += 1
    return levels


def _with_logit(flow, logit_alpha, compose=Compose):
    """An image flow's top level: ``compose([Logit(logit_alpha), flow])``, or ``compose([flow])`` when
    ``logit_alpha`` is ``None``."""
    return compose(([Logit(logit_alpha)] if logit_alpha is not None else []) + [flow])


def _realnvp_image(shape, num_layers, hidden, scale_bound, levels, logit_alpha, batch_norm, context_dim=None):
    shape = _image_shape(shape, "realnvp")
    if levels is None:
        levels = max(1, min(3, _max_levels(shape)))
    _check_levels(shape, levels, "realnvp")
    num_layers = count(num_layers, "num_layers", "realnvp")
    compose = Compose if context_dim is None else ConditionalCompose

    def coupling(c, mask, flip):
        kwargs = dict(mask=mask, hidden=hidden, scale_bound=scale_bound, flip=flip)
        if context_dim is None:
            layer = AffineCoupling((c, None, None), **kwargs)
        else:
            layer = ConditionalAffineCoupling((c, None, None), context_dim, **kwargs)
        return [layer, BatchNorm((c, None, None))] if batch_norm else [ActNorm((c, None, None)), layer]

    def factor_out(c, inner):
        if context_dim is None:
            return MultiScale((c, None, None), inner, hidden=hidden)
        return ConditionalLayer(MultiScale((c, None, None), inner, hidden=hidden, context_dim=context_dim))

    def level(c, remaining):
        parts = []
        if remaining == 1:
            for i in range(num_layers + 1):
                parts += coupling(c, "checkerboard", i % 2 == 1)
            return compose(parts)
        for i in range(num_layers):
            parts += coupling(c, "checkerboard", i % 2 == 1)
        parts.append(Squeeze())
        for i in range(num_layers):
            parts += coupling(4 * c, "channel", i % 2 == 1)
        parts.append(factor_out(4 * c, level(2 * c, remaining - 1)))
        return compose(parts)

    flow = level(shape[0], levels)
    return _with_logit(flow, logit_alpha, compose)


@renamed_kwargs(steps="num_layers", hidden_channels="hidden")
def glow(
    shape: Sequence[int],
    levels: int = 3,
    num_layers: int = 8,
    hidden: int = 128,
    *,
    lu: bool = True,
    additive: bool = False,
    scale_bound: float = 3.0,
    logit_alpha: float | None = 0.05,
    learned_prior: bool = True,
    context_dim: int | None = None,
) -> Compose | ConditionalCompose:
    """Glow (Kingma & Dhariwal, 2018) as a density model (data to latent): an optional
    :class:`~pyroflows.transforms.Logit` of data in ``[0, 1]``, then per level a squeeze and ``num_layers`` steps ×
    (ActNorm → Invertible1x1Conv → channel AffineCoupling), and, except at the last level, a factor-out of half
    the channels with a learned conditional prior (:class:`~pyroflows.transforms.MultiScale`; ``learned_prior=False``
    gives the factored channels the standard-normal base instead, as normflows' multi-scale Glow does).

    :param shape: the image shape ``(C, H, W)``; ``H`` and ``W`` must be divisible by ``2**levels``.
    :param int levels: number of levels (squeezes).
    :param int num_layers: flow steps per level (Glow's "K"; formerly ``steps``).
    :param int hidden: width (channels) of each coupling's conditioner (formerly ``hidden_channels``).
    :param bool lu: LU-parameterised 1x1 convolutions.
    :param bool additive: additive (volume-preserving) couplings.
    :param float scale_bound: bound on each coupling's absolute log-scale.
    :param float logit_alpha: squashing of the first Logit; ``None`` leaves it out.
    :param bool learned_prior: the factor-outs' learned conditional prior (one more conv net per level).
    :param int context_dim: build a conditional Glow :math:`p(x \\mid c)` (e.g. class-conditional, with a one-hot
        label): every coupling's and factor-out prior's conditioner also sees the context, tiled over the pixels.
        Returns a :class:`~pyroflows.transforms.ConditionalCompose`; ``flow.condition(c)`` is the flow for ``c``.

    Example::

        >>> import torch, pyroflows
        >>> flow = pyroflows.glow((1, 8, 8), levels=2, num_layers=2, hidden=16)
        >>> flow.forward_shape((1, 8, 8))
        (4, 4, 4)
        >>> plain = pyroflows.glow((1, 8, 8), levels=2, num_layers=2, hidden=16, learned_prior=False)
        >>> sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in flow.parameters())
        True
    """
    shape = _image_shape(shape, "glow")
    num_layers = count(num_layers, "num_layers", "glow")
    hidden = count(hidden, "hidden", "glow")  # the conditioner channels
    _check_levels(shape, levels, "glow", extra_squeeze=1)
    if context_dim is not None:
        context_dim = count(context_dim, "context_dim", "glow")
    compose = Compose if context_dim is None else ConditionalCompose

    def coupling(c):
        kwargs = dict(mask="channel", hidden=hidden, additive=additive, scale_bound=scale_bound)
        if context_dim is None:
            return AffineCoupling((c, None, None), **kwargs)
        return ConditionalAffineCoupling((c, None, None), context_dim, **kwargs)

    def level(c, remaining):
        c = 4 * c
        parts = [Squeeze()]
        for _ in range(num_layers):
            parts += [ActNorm((c, None, None)), Invertible1x1Conv((c, None, None), lu=lu), coupling(c)]
        if remaining > 1:
            inner = level(c // 2, remaining - 1)
            if context_dim is None:
                parts.append(MultiScale((c, None, None), inner, prior=learned_prior, hidden=hidden))
            else:
                factor_out = MultiScale(
                    (c, None, None), inner, prior=learned_prior, hidden=hidden, context_dim=context_dim
                )
                parts.append(ConditionalLayer(factor_out))
        return compose(parts)

    return _with_logit(level(shape[0], levels), logit_alpha, compose)


@renamed_kwargs(input_dim="shape")
def planar_flow(
    shape: int | Sequence[int], num_layers: int = 16, context_dim: int | None = None
) -> Compose | ConditionalCompose:
    """``num_layers`` :class:`~pyroflows.transforms.Planar` layers, then an elementwise affine map
    ``y = x * exp(s) + b`` (an inverted :class:`~pyroflows.transforms.ActNorm`) so the flow can shift and
    scale (``AutoNormalizingFlow``'s base is a fixed standard normal).

    :param shape: the event size ``D`` (or ``(D,)``).
    :param int num_layers: number of planar layers.
    :param int context_dim: build a conditional flow (every layer's ``u, w, b`` move with a context of this size):
        returns a :class:`~pyroflows.transforms.ConditionalCompose`.

    Example::

        >>> from functools import partial
        >>> import pyroflows
        >>> flow = pyroflows.planar_flow(2, num_layers=4)
        >>> len(flow)
        5
        >>> init_fn = partial(pyroflows.planar_flow, num_layers=8)  # for AutoNormalizingFlow(model, init_fn)
    """
    dim = vector_dim(shape, "planar_flow")
    num_layers = count(num_layers, "num_layers", "planar_flow")
    if context_dim is None:
        return Compose([Planar(dim) for _ in range(num_layers)] + [_output_affine(dim)])
    context_dim = count(context_dim, "context_dim", "planar_flow")
    return ConditionalCompose([ConditionalPlanar(dim, context_dim) for _ in range(num_layers)] + [_output_affine(dim)])


@renamed_kwargs(input_dim_or_shape="shape")
def realnvp(
    shape: int | Sequence[int],
    num_layers: int | None = None,
    hidden: Sequence[int] | int | None = None,
    scale_bound: float = 3.0,
    *,
    levels: int | None = None,
    logit_alpha: float | None = 0.05,
    batch_norm: bool = False,
    context_dim: int | None = None,
) -> Compose | ConditionalCompose:
    r"""RealNVP for vectors: ``num_layers`` × (ActNorm → AffineCoupling), masks alternating between the first
    half and the second half of the coordinates, a fixed random permutation after every second coupling
    (for ``D > 2``) so that every coordinate conditions every other, and a final elementwise affine map
    ``y = x * exp(s) + b`` (an inverted ActNorm).

    Every coordinate is transformed (unlike ``iterated(n, affine_coupling)`` in Pyro, which never moves
    coordinate 0), and the final affine layer lets the flow shift and scale its fixed standard-normal base.
    In the density direction (data to latent) the first ActNorm normalises the data by its data-dependent
    init.

    For an image shape ``(C, H, W)`` it builds the multi-scale RealNVP of Dinh et al. (2017) as a density model
    (data to latent): an optional :class:`~pyroflows.transforms.Logit` preprocessing of data in ``[0, 1]``, then
    per level ``num_layers`` checkerboard couplings (alternating parity) → squeeze → ``num_layers`` channel
    couplings (alternating halves) → factor out half the channels (:class:`~pyroflows.transforms.MultiScale`)
    and recurse; the last level has ``num_layers + 1`` checkerboard couplings. ActNorm precedes each coupling.
    The latent has shape ``flow.forward_shape((C, H, W))``.

    :param shape: the event size ``D`` (or ``(D,)``), or an image shape ``(C, H, W)``.
    :param int num_layers: couplings per block; default 8 (vectors) or 3 (images).
    :param hidden: vectors: conditioner hidden sizes, a tuple, or an int for one hidden layer (default
        ``(max(64, 4D),) * 2``); images: conditioner width, an int (default 64).
    :param float scale_bound: bound on each coupling's absolute log-scale.
    :param int levels: image scales (default: as many as the size allows, at most 3).
    :param float logit_alpha: images: squashing of the first :class:`~pyroflows.transforms.Logit`; ``None``
        leaves it out (the data space is then the real line).
    :param bool batch_norm: as in the paper, a :class:`~pyroflows.transforms.BatchNorm` after every coupling
        instead of an ActNorm before it (vectors and images). The flow then depends on its mode: batch statistics
        in training mode, running averages in eval mode (call ``flow.eval()`` before evaluating or sampling; see
        :class:`~pyroflows.transforms.BatchNorm` for guides).
    :param int context_dim: build a conditional flow :math:`q(x \mid c)`, every coupling's conditioner (and, for
        images, every factor-out prior's) also seeing a context of this size: returns a
        :class:`~pyroflows.transforms.ConditionalCompose` (a Pyro ``ConditionalTransformModule``;
        ``flow.condition(c)`` is the flow for ``c``).

    Example::

        >>> import torch, pyroflows
        >>> flow = pyroflows.realnvp(3, num_layers=4)
        >>> x = torch.randn(5, 3)
        >>> flow.log_abs_det_jacobian(x, flow(x)).shape
        torch.Size([5])
    """
    image = len(_shape(shape, "realnvp")) == 3
    if context_dim is not None:
        context_dim = count(context_dim, "context_dim", "realnvp")
    num_layers = (3 if image else 8) if num_layers is None else num_layers
    num_layers = count(num_layers, "num_layers", "realnvp")
    if image:
        if hidden is not None:
            count(hidden, "hidden", "realnvp")  # images: the conditioner channels, one int
        hidden = 64 if hidden is None else hidden
        return _realnvp_image(
            shape, num_layers, hidden, scale_bound, levels, logit_alpha, bool(batch_norm), context_dim
        )
    dim = vector_dim(shape, "realnvp")
    hidden = hidden_sizes(hidden, (max(64, 4 * dim),) * 2, "realnvp")
    half = make_mask("half", dim)
    parts = []
    for i in range(num_layers):
        # With D = 1 there is nothing to condition on: every layer is a learned elementwise affine map.
        mask = half if (i % 2 == 0 or dim == 1) else ~half
        if context_dim is None:
            layer = AffineCoupling(dim, mask=mask, hidden=hidden, scale_bound=scale_bound)
        else:
            layer = ConditionalAffineCoupling(dim, context_dim, mask=mask, hidden=hidden, scale_bound=scale_bound)
        parts += [layer, BatchNorm(dim)] if batch_norm else [ActNorm(dim), layer]
        if dim > 2 and i % 2 == 1 and i < num_layers - 1:
            parts.append(Permute(_fixed_permutation(dim, seed=i)))
    parts.append(_output_affine(dim))
    return Compose(parts) if context_dim is None else ConditionalCompose(parts)


def autoregressive_flow(
    shape: int | Sequence[int],
    num_layers: int = 4,
    hidden: Sequence[int] | int | None = None,
    scale_bound: float = 3.0,
    context_dim: int | None = None,
) -> Compose | ConditionalCompose:
    """An affine autoregressive flow for vectors: ``num_layers`` × (ActNorm →
    :class:`~pyroflows.transforms.AffineAutoregressive`), the autoregressive order alternating between the identity
    and its reverse, then an elementwise affine map ``y = x * exp(s) + b`` (an inverted ActNorm) so that an
    ``AutoNormalizingFlow`` guide can place and scale its fixed standard-normal base.

    As a guide (base noise to posterior) it is an IAF: sampling and the log-density of a draw take one parallel
    pass per layer. As a density model (data to latent) it is a MAF: the likelihood takes one pass, sampling (the
    inverse) up to ``D`` passes per layer, fewer when the solve converges sooner (and so does the sticking-the-landing
    gradient's score of a guide's draws: :class:`~pyroflows.transforms.AffineAutoregressive`).

    :param shape: the event size ``D`` (or ``(D,)``); image shapes are not supported.
    :param int num_layers: autoregressive layers.
    :param hidden: MADE hidden sizes, a tuple, or an int for one hidden layer (default ``(max(64, 4D),) * 2``).
    :param float scale_bound: bound on each layer's absolute log-scale.
    :param int context_dim: build a conditional flow (every MADE also sees a context of this size): returns a
        :class:`~pyroflows.transforms.ConditionalCompose`.

    Example::

        >>> from functools import partial
        >>> import torch
        >>> import pyroflows
        >>> flow = pyroflows.autoregressive_flow(3, num_layers=2, hidden=(16,))
        >>> len(flow)  # 2 x (ActNorm, AffineAutoregressive) + the output affine map
        5
        >>> x = torch.randn(5, 3)
        >>> flow.log_abs_det_jacobian(x, flow(x)).shape
        torch.Size([5])
        >>> init_fn = partial(pyroflows.autoregressive_flow, num_layers=4)  # for AutoNormalizingFlow(model, init_fn)
    """
    dim = vector_dim(shape, "autoregressive_flow")
    num_layers = count(num_layers, "num_layers", "autoregressive_flow")
    if not scale_bound > 0:
        raise ValueError(f"autoregressive_flow: scale_bound must be positive, got {scale_bound!r}")
    sizes = hidden_sizes(hidden, (max(64, 4 * dim),) * 2, "autoregressive_flow")
    if context_dim is not None:
        context_dim = count(context_dim, "context_dim", "autoregressive_flow")
    parts = []
    for i in range(num_layers):
        order = torch.arange(dim) if i % 2 == 0 else torch.arange(dim).flip(0)
        kwargs = dict(hidden=sizes, order=order, scale_bound=scale_bound)
        if context_dim is None:
            layer = AffineAutoregressive(dim, **kwargs)
        else:
            layer = ConditionalAffineAutoregressive(dim, context_dim, **kwargs)
        parts += [ActNorm(dim), layer]
    parts.append(_output_affine(dim))
    return Compose(parts) if context_dim is None else ConditionalCompose(parts)


@renamed_kwargs(input_dim_or_shape="shape", num_blocks="num_layers")
def residual_flow(
    shape: int | Sequence[int],
    num_layers: int = 4,
    hidden: int | Sequence[int] | None = None,
    coeff: float = 0.98,
    logdet: str = "auto",
    actnorm: bool = True,
    *,
    levels: int | None = None,
    logit_alpha: float | None = 0.05,
    context_dim: int | None = None,
    **block_kwargs,
) -> Compose | ConditionalCompose:
    """A Residual Flow (Chen et al., 2019) of :class:`~pyroflows.transforms.ResidualBlock` layers.

    Vectors ``D``: ``num_layers`` × (ActNorm → residual MLP block), then an elementwise affine
    ``y = x * exp(s) + b`` (so an ``AutoNormalizingFlow`` guide can place and scale its posterior). Images
    ``(C, H, W)`` (a density model, data to latent): optional Logit, then per level ``num_layers`` ×
    (ActNorm → residual CNN block) with a squeeze between levels, and a final ActNorm.

    :param shape: ``D`` (or ``(D,)``) or ``(C, H, W)``.
    :param int num_layers: residual blocks (per level, for images; formerly ``num_blocks``).
    :param hidden: hidden sizes (vectors, default ``(128,)``) or hidden channels (images, default 64).
    :param float coeff: Lipschitz bound of every residual branch, in ``(0, 1)``.
    :param str logdet: training log-det estimator, ``"auto"`` (exact for vectors of ``D <= 16``, and up to 64 for
        a guide's few draws; else unbiased),
        ``"unbiased"``, ``"series"`` or ``"exact"`` (see :class:`~pyroflows.transforms.ResidualBlock`).
    :param bool actnorm: interleave ActNorm layers.
    :param int levels: images: number of scales (default: as many as the size allows, at most 3).
    :param float logit_alpha: images: squashing of the first Logit; ``None`` leaves it out.
    :param int context_dim: build a conditional flow: every block's branch is shifted by a context of this size (the
        Lipschitz bound in ``x`` kept); returns a :class:`~pyroflows.transforms.ConditionalCompose`.
    :param block_kwargs: passed to every block: ``n_exact_terms``, ``geom_p``, ``memory_efficient``,
        ``n_samples``, ``probe``, ``eval_logdet``, ``atol``, ``max_iter``, ...

    Example::

        >>> import torch, pyroflows
        >>> flow = pyroflows.residual_flow(2, num_layers=2, hidden=(16,))
        >>> x = torch.randn(3, 2)
        >>> flow.log_abs_det_jacobian(x, flow(x)).shape
        torch.Size([3])
    """
    num_layers = count(num_layers, "num_layers", "residual_flow")
    shape = _shape(shape, "residual_flow")
    kwargs = dict(coeff=coeff, logdet=logdet, **block_kwargs)
    compose = Compose
    block = ResidualBlock
    if context_dim is not None:
        context_dim = count(context_dim, "context_dim", "residual_flow")
        compose = ConditionalCompose

        def block(shape, hidden, **kwargs):
            return ConditionalResidualBlock(shape, context_dim, hidden=hidden, **kwargs)

    if len(shape) == 1:
        dim = vector_dim(shape, "residual_flow")
        parts = []
        for _ in range(num_layers):
            parts += ([ActNorm(dim)] if actnorm else []) + [block(dim, hidden, **kwargs)]
        return compose(parts + [_output_affine(dim)])
    c, h, w = _image_shape(shape, "residual_flow")
    if levels is None:
        levels = max(1, min(3, _max_levels(shape)))
    _check_levels(shape, levels, "residual_flow")
    parts = []
    for level in range(levels):
        if level > 0:
            parts.append(Squeeze())
            c *= 4
        for _ in range(num_layers):
            parts += ([ActNorm((c, None, None))] if actnorm else []) + [block((c, None, None), hidden, **kwargs)]
    if actnorm:
        parts.append(ActNorm((c, None, None)))
    return _with_logit(compose(parts), logit_alpha, compose)


def spline_flow(
    shape: int | Sequence[int],
    num_layers: int = 8,
    hidden: Sequence[int] | int | None = None,
    num_bins: int = 8,
    bound: float = 5.0,
    context_dim: int | None = None,
) -> Compose | ConditionalCompose:
    """A neural spline flow for vectors (Durkan et al., 2019): ``num_layers`` × (ActNorm →
    :class:`~pyroflows.transforms.SplineCoupling`), masks alternating between the first half and the second half of
    the coordinates, a fixed random permutation after every second coupling (for ``D > 2``) so that every coordinate
    conditions every other, and a final elementwise affine map ``y = x * exp(s) + b`` (an inverted ActNorm), so that
    an ``AutoNormalizingFlow`` guide, whose base is a fixed standard normal, can place and scale its posterior.

    Every coupling is the identity at initialisation, so a fresh flow is the identity. The permutations are drawn
    from fixed seeds: rebuilding the flow gives the same layers whatever the global random state.

    :param shape: the event size ``D`` (or ``(D,)``).
    :param int num_layers: number of couplings (at least 1).
    :param hidden: conditioner hidden sizes, a tuple, or an int for one hidden layer (default
        ``(max(64, 4D),) * 2``).
    :param int num_bins: spline bins per coupling (at least 2).
    :param float bound: each spline acts on ``[-bound, bound]`` and is the identity outside.
    :param int context_dim: build a conditional flow (every coupling's conditioner also sees a context of this
        size): returns a :class:`~pyroflows.transforms.ConditionalCompose`.

    Example::

        >>> from functools import partial
        >>> import torch, pyroflows
        >>> flow = pyroflows.spline_flow(3, num_layers=4, hidden=(16,))
        >>> len(flow)  # 4 x (ActNorm, SplineCoupling), one Permute, the output affine map
        10
        >>> x = torch.randn(5, 3)
        >>> y = flow(x)
        >>> torch.allclose(flow.inv(y.clone()), x, atol=1e-5), flow.log_abs_det_jacobian(x, y).shape
        (True, torch.Size([5]))
        >>> init_fn = partial(pyroflows.spline_flow, num_layers=8)  # for AutoNormalizingFlow(model, init_fn)
    """
    dim = vector_dim(shape, "spline_flow")
    num_layers = count(num_layers, "num_layers", "spline_flow")
    if context_dim is not None:
        context_dim = count(context_dim, "context_dim", "spline_flow")
    hidden = hidden_sizes(hidden, (max(64, 4 * dim),) * 2, "spline_flow")
    parts = []
    for i in range(num_layers):
        # With D = 1 there is nothing to condition on: every coupling is a learned elementwise spline.
        flip = i % 2 == 1 and dim > 1
        kwargs = dict(mask="half", num_bins=num_bins, bound=bound, hidden=hidden, flip=flip)
        if context_dim is None:
            coupling = SplineCoupling(dim, **kwargs)
        else:
            coupling = ConditionalSplineCoupling(dim, context_dim, **kwargs)
        parts += [ActNorm(dim), coupling]
        if dim > 2 and i % 2 == 1 and i < num_layers - 1:
            parts.append(Permute(_fixed_permutation(dim, seed=i)))
    parts.append(_output_affine(dim))
    return Compose(parts) if context_dim is None else ConditionalCompose(parts)


__all__ = ["autoregressive_flow", "glow", "planar_flow", "realnvp", "residual_flow", "spline_flow"]
