r"""MADE, the masked autoencoder of Germain et al. (2015): the conditioner of autoregressive flow layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _check_order(order, dim: int, where: str) -> torch.Tensor:
    """``order`` as a long tensor, a permutation of ``range(dim)``; ``ValueError`` naming ``order`` otherwise."""
    if order is None:
        return torch.arange(dim)
    try:
        tensor = torch.as_tensor(order)
    except (TypeError, ValueError, RuntimeError):
        tensor = None
    integer = tensor is not None and not tensor.is_floating_point() and not tensor.is_complex()
    ok = integer and tensor.dtype != torch.bool and tensor.dim() == 1 and tensor.numel() == dim
    if not (ok and torch.equal(torch.sort(tensor.detach().cpu().long()).values, torch.arange(dim))):
        raise ValueError(f"{where}: order must be a permutation of range({dim}), got {order!r}")
    return tensor.detach().cpu().long().clone()


def _hidden_degrees(width: int, dim: int, context: bool = False) -> torch.Tensor:
    """Degrees ``1, 2, ..., D-1, 1, 2, ...`` of a hidden layer's units (all 1 when ``D = 1``): deterministic, so
    rebuilding a network gives the same masks whatever the global RNG state. With a context the cycle is
    ``0, 1, ..., D-1``: units of degree 0 see only the context, and they are what the first coordinate in the order
    sees."""
    if context:
        return torch.arange(width) % dim
    return torch.arange(width) % max(1, dim - 1) + 1


def _slope(activation: nn.Module):
    """``f(pre, post) -> d post / d pre`` elementwise for the activations whose derivative is known here (ReLU, ELU,
    LeakyReLU, Tanh), else ``None``."""
    kind = type(activation)
    if kind is nn.ReLU:
        return lambda pre, post: (pre > 0).to(pre.dtype)
    if kind is nn.LeakyReLU:
        slope = activation.negative_slope
        return lambda pre, post: torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, slope))
    if kind is nn.ELU:
        alpha = activation.alpha
        return lambda pre, post: torch.where(pre > 0, torch.ones_like(post), post + alpha)
    if kind is nn.Tanh:
        return lambda pre, post: 1 - post * post
    return None


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015): a dense network
    :math:`\mathbb{R}^D \to \mathbb{R}^{K \times D}` whose outputs for coordinate :math:`i` depend only on the inputs
    :math:`x_j` with ``order[j] < order[i]``.

    Each input gets the degree ``order[j] + 1``, each hidden unit a degree in :math:`\{1, \dots, D-1\}` (cycled,
    not drawn, so a rebuilt network has the same masks), and a weight is kept only where it cannot carry
    information from a later coordinate to an earlier one: hidden unit of degree :math:`m` sees inputs of degree
    :math:`\le m`, output :math:`i` sees hidden units of degree :math:`< \text{order}[i] + 1`. The masks multiply the
    weights in every call (so masked weights get zero gradient) and are buffers, as is ``order``; they follow
    ``.to()`` and the ``state_dict``. The last layer's weight and bias start at zero, so every output starts at 0.
    The first coordinate in the order sees no input: its outputs are learnable constants (with ``D = 1`` all are).

    Reference: Germain, Gregor, Murray & Larochelle, *MADE: Masked Autoencoder for Distribution Estimation*,
    ICML 2015.

    :param int dim: the input size ``D``.
    :param hidden: hidden layer sizes (an int for one layer; an empty tuple gives a masked linear map).
    :param int num_outputs: outputs per coordinate ``K`` (2 for a shift and a log-scale).
    :param order: a permutation of ``range(D)``; coordinate ``i`` is the ``order[i]``-th in the autoregressive
        order. Default: the identity, ``x_i`` depends on ``x_0, ..., x_{i-1}``.
    :param torch.nn.Module activation: nonlinearity between layers (default ``ReLU``; ``ELU`` gives a smooth map).
    :param int context_dim: extra inputs every output may depend on (a conditional flow's context; degree 0).

    Example::

        >>> import torch
        >>> from pyroflows.nn.made import MADE
        >>> net = MADE(3, hidden=(16,), num_outputs=2, order=[2, 0, 1])
        >>> net(torch.randn(5, 3)).shape
        torch.Size([5, 2, 3])
        >>> net(torch.randn(5, 3)).abs().max().item()  # zero last layer: outputs start at 0
        0.0
        >>> net.connectivity()[1].sum().item()  # coordinate 1 is first in the order: it sees nothing
        0
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] | int = (64, 64),
        num_outputs: int = 2,
        order: Sequence[int] | torch.Tensor | None = None,
        activation: nn.Module | None = None,
        *,
        context_dim: int = 0,
    ):
        super().__init__()
        if not isinstance(context_dim, int) or isinstance(context_dim, bool) or context_dim < 0:
            raise ValueError(f"MADE: context_dim must be an int >= 0, got {context_dim!r}")
        self.context_dim = context_dim
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"MADE: dim must be a positive int, got {dim!r}")
        if not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(f"MADE: num_outputs must be a positive int, got {num_outputs!r}")
        sizes = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if not all(isinstance(h, int) and h >= 1 for h in sizes):
            raise ValueError(f"MADE: hidden must be an int or a sequence of ints >= 1, got {hidden!r}")
        order = _check_order(order, dim, "MADE")
        self.dim, self.hidden, self.num_outputs = dim, sizes, num_outputs
        self.register_buffer("order", order)
        # the default ReLU works in place on each layer's fresh output (no backward pass needs it); _run's Jacobian
        # reads the sign of the pre-activation from that overwritten tensor, which ReLU keeps
        self.activation = activation if activation is not None else nn.ReLU(inplace=True)

        in_degrees = order + 1
        # context inputs have degree 0: every hidden unit (and, without hidden layers, every output) may see them
        degrees = [torch.cat([in_degrees, torch.zeros(context_dim, dtype=in_degrees.dtype)])]
        degrees += [_hidden_degrees(h, dim, context_dim > 0) for h in sizes]
        widths = [dim + context_dim, *sizes]
        self.layers = nn.ModuleList()
        self._mask_names = []
        for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
            self.layers.append(nn.Linear(fan_in, fan_out))
            self._add_mask(i, degrees[i + 1][:, None] >= degrees[i][None, :])
        # Output row k * D + i (output k of coordinate i) sees units of degree < order[i] + 1.
        out_degrees = in_degrees.repeat(num_outputs)
        last = nn.Linear(widths[-1], num_outputs * dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.layers.append(last)
        self._add_mask(len(sizes), out_degrees[:, None] > degrees[-1][None, :])

    def _add_mask(self, i: int, mask: torch.Tensor) -> None:
        name = f"mask_{i}"
        self.register_buffer(name, mask.to(torch.get_default_dtype()))
        self._mask_names.append(name)

    def masks(self) -> list[torch.Tensor]:
        """The weight masks, first layer to last (0/1 tensors of the weights' shapes)."""
        return [getattr(self, name) for name in self._mask_names]

    def connectivity(self) -> torch.Tensor:
        """Per coordinate, which inputs its outputs may depend on: a ``(D, D)`` 0/1 long tensor, row ``i``
        marking the ``j`` with ``order[j] < order[i]`` (the connectivity of the masks, multiplied through)."""
        reach = None
        for mask in self.masks():
            m = (mask != 0).long()
            reach = m if reach is None else (m @ reach).clamp(max=1)
        return reach[: self.dim, : self.dim]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., D) -> (..., num_outputs, D)``; with ``context_dim``, ``context`` ``(..., context_dim)`` (same batch
        shape) feeds every output."""
        return self._run(x, context)[0]

    def _run(
        self, x: torch.Tensor, context: torch.Tensor | None, slope=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The outputs ``(..., num_outputs, D)`` and, given the activation's ``slope`` (:func:`_slope`), their Jacobian
        in ``x`` ``(..., num_outputs, D, D)`` without a graph (else ``None``): one loop over the layers for both."""
        h = x if context is None else torch.cat([x, context.to(x.dtype)], dim=-1)
        last = len(self.layers) - 1
        jac = None
        for i, (layer, mask) in enumerate(zip(self.layers, self.masks())):
            weight = layer.weight * mask
            h = F.linear(h, weight, layer.bias)
            if slope is not None:
                weight = weight.detach()
                jac = weight[:, : self.dim] if jac is None else torch.matmul(weight, jac)
            if i < last:
                pre = h
                h = self.activation(h)
                if slope is not None:
                    jac = slope(pre.detach(), h.detach())[..., None] * jac
        shape = x.shape[:-1] + (self.num_outputs, self.dim)
        if slope is None:
            return h.reshape(shape), None
        jac = jac.expand(x.shape[:-1] + jac.shape[-2:])  # no hidden layer: one matrix for the whole batch
        return h.reshape(shape), jac.reshape(shape + (self.dim,))

    def value_and_input_jacobian(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The outputs, as :meth:`forward` computes them (the same operations, with their graph), and their Jacobian
        in ``x`` in closed form, the masked weights multiplied through the activations' slopes (no graph):
        ``jac[..., k, i, j]`` is the derivative of output ``k`` of coordinate ``i`` in ``x_j``, zero unless
        ``order[j] < order[i]``. ``None`` for an activation whose slope is not known here (ReLU, LeakyReLU, ELU and
        Tanh are).

        :param torch.Tensor x: inputs ``(..., D)``.
        :param torch.Tensor context: with ``context_dim``, ``(..., context_dim)``.
        :returns: ``(out, jac)`` of shapes ``(..., num_outputs, D)`` and ``(..., num_outputs, D, D)``, or ``None``.

        Example::

            >>> import torch
            >>> from pyroflows.nn.made import MADE
            >>> net = MADE(3, hidden=(8,), order=[2, 0, 1])
            >>> _ = torch.nn.init.normal_(net.layers[-1].weight)
            >>> x = torch.randn(4, 3)
            >>> out, jac = net.value_and_input_jacobian(x)
            >>> auto = torch.func.vmap(torch.func.jacrev(net))(x)
            >>> torch.allclose(out, net(x)), torch.allclose(jac, auto, atol=1e-6)
            (True, True)
        """
        slope = _slope(self.activation)
        return None if slope is None else self._run(x, context, slope)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, num_outputs={self.num_outputs}"
