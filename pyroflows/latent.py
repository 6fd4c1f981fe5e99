r"""Latent-space tools for trained density models (Kingma & Dhariwal 2018, Glow §"interpolation and manipulation"):
paths between latents and attribute directions.

The methods that use them live on the model: :meth:`pyroflows.FlowDensity.encode`,
:meth:`~pyroflows.FlowDensity.decode`, :meth:`~pyroflows.FlowDensity.interpolate` and
:meth:`~pyroflows.FlowDensity.manipulate`.
"""

from __future__ import annotations

import numbers

import torch


def interpolate_latents(z0: torch.Tensor, z1: torch.Tensor, num: int = 8, path: str = "linear") -> torch.Tensor:
    r"""``num`` latents from ``z0`` to ``z1`` (ends included), stacked: shape ``(num, *z0.shape)``.

    ``"linear"``: :math:`(1 - t) z_0 + t z_1`. ``"slerp"``: :math:`\frac{\sin((1-t)\Omega)}{\sin\Omega} z_0 +
    \frac{\sin(t\Omega)}{\sin\Omega} z_1` with :math:`\cos\Omega = \hat z_0 \cdot \hat z_1` (linear when the two
    are parallel).

    :param torch.Tensor z0: a latent.
    :param torch.Tensor z1: a latent of the same shape.
    :param int num: points, ``>= 2``.
    :param str path: ``"linear"`` or ``"slerp"``.

    Example::

        >>> import torch
        >>> z = interpolate_latents(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), num=3, path="slerp")
        >>> torch.allclose(z.norm(dim=-1), torch.ones(3))
        True
    """
    if not isinstance(num, numbers.Integral) or isinstance(num, bool) or num < 2:
        raise ValueError(f"interpolate: num must be an int >= 2, got {num!r}")
    if path not in ("linear", "slerp"):
        raise ValueError(f"interpolate: path must be 'linear' or 'slerp', got {path!r}")
    if z0.shape != z1.shape:
        raise ValueError(f"interpolate: the two latents differ in shape, {tuple(z0.shape)} and {tuple(z1.shape)}")
    t = torch.linspace(0.0, 1.0, int(num), dtype=z0.dtype, device=z0.device).reshape((-1,) + (1,) * z0.dim())
    if path == "linear":
        return (1 - t) * z0 + t * z1
    a, b = z0.reshape(-1), z1.reshape(-1)
    cos = (a @ b) / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(omega.sin().abs()) < 1e-6:  # (anti)parallel: no unique great circle; the straight line
        return (1 - t) * z0 + t * z1
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


def attribute_direction(density, x: torch.Tensor, has_attribute, **encode_kwargs) -> torch.Tensor:
    """Glow's manipulation vector: the mean latent of the examples with an attribute minus the mean latent of those
    without, shape ``density.latent_shape``. Adding multiples of it to a latent moves an image towards (or away
    from) the attribute (:meth:`pyroflows.FlowDensity.manipulate`).

    :param density: a trained :class:`~pyroflows.FlowDensity`.
    :param torch.Tensor x: examples, shape ``(N, *event_shape)`` (integer pixels with ``n_bins=``).
    :param has_attribute: ``(N,)`` booleans (or 0/1); both groups must be non-empty.
    :param encode_kwargs: passed to :meth:`~pyroflows.FlowDensity.encode` (``n_bins``, ``generator``).

    Example::

        >>> import torch, pyroflows
        >>> model = pyroflows.FlowDensity(pyroflows.realnvp(2, num_layers=2), (2,))
        >>> x = torch.randn(10, 2)
        >>> attribute_direction(model, x, x[:, 0] > 0).shape
        torch.Size([2])
    """
    flags = torch.as_tensor(has_attribute, device=x.device)
    if flags.dim() != 1 or len(flags) != len(x):
        raise ValueError(f"attribute_direction: has_attribute must have shape ({len(x)},), got {tuple(flags.shape)}")
    if flags.dtype != torch.bool:
        if not bool(((flags == 0) | (flags == 1)).all()):
            raise ValueError("attribute_direction: has_attribute must hold booleans or 0/1")
        flags = flags.bool()
    n_with = int(flags.sum())
    if n_with == 0 or n_with == len(flags):
        raise ValueError(
            f"attribute_direction: need examples with and without the attribute, got {n_with} of {len(flags)} with it"
        )
    with density._evaluating():
        z = density.encode(x, **encode_kwargs)
    return z[flags].mean(0) - z[~flags].mean(0)


__all__ = ["attribute_direction", "interpolate_latents"]
