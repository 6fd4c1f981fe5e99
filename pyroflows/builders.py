"""Builders: plain functions taking the event size first, so ``partial(builder, ...)`` is an
``init_transform_fn`` for :class:`pyro.infer.autoguide.AutoNormalizingFlow`. Each returns a :class:`Compose`."""

from __future__ import annotations

from collections.abc import Sequence

from .transforms import ActNorm, AffineCoupling, Compose, Permute, Planar, inverse, make_mask


def _output_affine(dim: int):
    """The last layer of a vector flow, ``y = x * exp(s) + b`` (an inverted ActNorm).

    ``AutoNormalizingFlow``'s base is a fixed N(0, I), so the flow itself must place and scale the posterior.
    In this parameterisation ``b`` is the posterior location and ``s`` its log-scale, one Adam step moves
    each by about ``lr``; ActNorm's own ``(x - b) * exp(-s)`` would need ``b = -loc * exp(s)``, far and
    ill-conditioned for narrow posteriors. In the density direction it is the layer next to the latent.
    """
    return inverse(ActNorm(dim))


def _vector_dim(input_dim_or_shape, builder: str) -> int:
    shape = (input_dim_or_shape,) if isinstance(input_dim_or_shape, int) else tuple(input_dim_or_shape)
    if len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 1:
        return shape[0]
    if len(shape) == 3:
        raise NotImplementedError(f"{builder}: image shapes {shape} are not supported yet (vectors only)")
    raise ValueError(f"{builder}: expected a positive int or a shape (D,), got {input_dim_or_shape!r}")


def planar_flow(input_dim: int, num_layers: int = 16) -> Compose:
    """``num_layers`` :class:`~pyroflows.transforms.Planar` layers, then an elementwise affine map
    ``y = x * exp(s) + b`` (an inverted :class:`~pyroflows.transforms.ActNorm`) so the flow can shift and
    scale (``AutoNormalizingFlow``'s base is a fixed standard normal).

    :param int input_dim: the event size ``D``.
    :param int num_layers: number of planar layers.

    Example::

        >>> from functools import partial
        >>> import pyroflows
        >>> flow = pyroflows.planar_flow(2, num_layers=4)
        >>> len(flow)
        5
        >>> init_fn = partial(pyroflows.planar_flow, num_layers=8)  # for AutoNormalizingFlow(model, init_fn)
    """
    dim = _vector_dim(input_dim, "planar_flow")
    if num_layers < 1:
        raise ValueError(f"planar_flow: num_layers must be >= 1, got {num_layers!r}")
    return Compose([Planar(dim) for _ in range(num_layers)] + [_output_affine(dim)])


def realnvp(
    input_dim_or_shape: int | Sequence[int],
    num_layers: int = 8,
    hidden: Sequence[int] | None = None,
    scale_bound: float = 3.0,
) -> Compose:
    """RealNVP for vectors: ``num_layers`` × (ActNorm → AffineCoupling), masks alternating between the first
    half and the second half of the coordinates, a fixed random permutation after every second coupling
    (for ``D > 2``) so that every coordinate conditions every other, and a final elementwise affine map
    ``y = x * exp(s) + b`` (an inverted ActNorm).

    Every coordinate is transformed (unlike ``iterated(n, affine_coupling)`` in Pyro, which never moves
    coordinate 0), and the final affine layer lets the flow shift and scale its fixed standard-normal base.
    In the density direction (data to latent) the first ActNorm normalises the data by its data-dependent
    init.

    :param int input_dim_or_shape: the event size ``D`` (or the shape ``(D,)``).
    :param int num_layers: number of coupling layers.
    :param hidden: conditioner hidden sizes; default ``(max(64, 4D),) * 2``.
    :param float scale_bound: bound on each coupling's absolute log-scale.

    Example::

        >>> import torch, pyroflows
        >>> flow = pyroflows.realnvp(3, num_layers=4)
        >>> x = torch.randn(5, 3)
        >>> flow.log_abs_det_jacobian(x, flow(x)).shape
        torch.Size([5])
    """
    dim = _vector_dim(input_dim_or_shape, "realnvp")
    if num_layers < 1:
        raise ValueError(f"realnvp: num_layers must be >= 1, got {num_layers!r}")
    hidden = tuple(hidden) if hidden is not None else (max(64, 4 * dim),) * 2
    half = make_mask("half", dim)
    parts = []
    for i in range(num_layers):
        # With D = 1 there is nothing to condition on: every layer is a learned elementwise affine map.
        mask = half if (i % 2 == 0 or dim == 1) else ~half
        parts += [ActNorm(dim), AffineCoupling(dim, mask=mask, hidden=hidden, scale_bound=scale_bound)]
        if dim > 2 and i % 2 == 1 and i < num_layers - 1:
            parts.append(Permute(input_dim=dim))
    parts.append(_output_affine(dim))
    return Compose(parts)
