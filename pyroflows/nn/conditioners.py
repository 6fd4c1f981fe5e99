"""Conditioner networks for coupling layers: their last layer starts at zero, so a fresh flow is the identity."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from pyro.nn import DenseNN
from torch import nn


def _run(net, x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """``net(x)`` (a module or any callable), under autocast to ``compute_dtype`` when one is set; the result in
    ``x``'s dtype."""
    if compute_dtype is None or compute_dtype == x.dtype:
        return net(x)
    with torch.autocast(device_type=x.device.type, dtype=compute_dtype):
        out = net(x)
    return out.to(x.dtype)


def set_compute_dtype(module: nn.Module, dtype: torch.dtype | None) -> int:
    """Run every conditioner network (:class:`MLP`, :class:`ConvNet`) inside ``module`` under autocast to
    ``dtype`` (``torch.bfloat16`` or ``torch.float16``; ``None`` switches it off).

    Only the conditioners change precision: their outputs are cast back to the input's dtype before they
    become shifts and scales, so every log-det, 1x1-convolution ``slogdet``, ActNorm and residual block stays in
    float32/float64.

    :param torch.nn.Module module: a flow, a :class:`~pyroflows.FlowDensity`, or any module containing conditioners.
    :param dtype: ``torch.bfloat16``, ``torch.float16`` or ``None``.
    :returns: the number of conditioners switched.

    Example::

        >>> import torch, pyroflows
        >>> from pyroflows.nn import set_compute_dtype
        >>> flow = pyroflows.realnvp(4, num_layers=2)
        >>> set_compute_dtype(flow, torch.bfloat16)
        2
        >>> y = flow(torch.randn(3, 4))
        >>> y.dtype, flow.log_abs_det_jacobian(torch.randn(3, 4), y).dtype
        (torch.float32, torch.float32)
    """
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"set_compute_dtype: dtype must be torch.bfloat16, torch.float16 or None, got {dtype!r}")
    count = 0
    for m in module.modules():
        if isinstance(m, (MLP, ConvNet)):
            m.compute_dtype = dtype
            count += 1
    return count


class MLP(nn.Module):
    """A dense network ``R^in -> R^out`` built on :class:`pyro.nn.DenseNN`, with a zero-initialised last layer.

    With ``in_features == 0`` the output is a learnable constant (the network sees no input), which lets a
    coupling layer with nothing to condition on act as an elementwise affine map.

    :param int in_features: input size (may be 0).
    :param int out_features: output size.
    :param hidden: hidden layer sizes.
    :param torch.nn.Module activation: nonlinearity between layers (default ``ReLU``, applied in place).
    :param bool zero_init: zero the last layer's weight and bias.

    Example::

        >>> import torch
        >>> from pyroflows.nn import MLP
        >>> net = MLP(3, 4, hidden=(16,))
        >>> net(torch.randn(7, 3)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: nn.Module | None = None,
        zero_init: bool = True,
    ):
        super().__init__()
        hidden = list(hidden)
        if in_features < 0 or out_features < 1:
            raise ValueError(f"MLP: need in_features >= 0 and out_features >= 1, got {in_features}, {out_features}")
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"MLP: hidden must be a non-empty list of positive sizes, got {hidden!r}")
        self.in_features = in_features
        self.out_features = out_features
        with warnings.catch_warnings():  # Linear(0, h) warns that initialising an empty weight is a no-op
            warnings.simplefilter("ignore", UserWarning)
            # the default ReLU works in place: it overwrites the fresh output of the layer before it, which no
            # backward pass needs (a linear map's gradient uses its input), saving one hidden-sized tensor per layer
            # (a sampling pass of 4096 draws through 256-wide layers took 1.4x less time)
            activation = activation or nn.ReLU(inplace=True)
            self.net = DenseNN(in_features, hidden, param_dims=[out_features], nonlinearity=activation)
        if zero_init:
            last = self.net.layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    compute_dtype: torch.dtype | None = None  # see set_compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _run(self._layers, x, self.compute_dtype)
        return out.reshape(x.shape[:-1] + (self.out_features,))

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        """The ``DenseNN``'s layers on ``x``: what its ``forward`` computes for one output block, without the
        ``ModuleList`` it builds at every call to slice off the last layer (a tenth of a millisecond per
        conditioner call, several percent of a small guide's SVI step)."""
        layers, f = self.net.layers, self.net.f
        last = len(layers) - 1
        h = x
        for i, layer in enumerate(layers):
            h = layer(h) if i == last else f(layer(h))
        return h


class ConvNet(nn.Module):
    """A small CNN ``(..., C_in, H, W) -> (..., C_out, H, W)`` for image couplings: conv 3x3 → ReLU →
    conv 1x1 → ReLU → conv 3x3, the last convolution zero-initialised (Glow's ``Conv2dZeros`` idea), so a
    fresh coupling is the identity. Any number of leading batch dims.

    :param int in_channels: input channels.
    :param int out_channels: output channels.
    :param int hidden_channels: width of the hidden layers.
    :param bool zero_init: zero the last convolution's weight and bias.

    Example::

        >>> import torch
        >>> from pyroflows.nn import ConvNet
        >>> net = ConvNet(2, 4, hidden_channels=8)
        >>> net(torch.randn(3, 2, 5, 5)).shape, net(torch.randn(3, 2, 5, 5)).abs().max().item()
        (torch.Size([3, 4, 5, 5]), 0.0)
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, zero_init: bool = True):
        super().__init__()
        if min(in_channels, out_channels, hidden_channels) < 1:
            raise ValueError(
                f"ConvNet: channel counts must be positive, got {in_channels}, {out_channels}, {hidden_channels}"
            )
        self.out_channels = out_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.ReLU(inplace=True),  # in place on the convolution's fresh output (see MLP)
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, 3, padding=1),
        )
        if zero_init:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    compute_dtype: torch.dtype | None = None  # see set_compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-3]
        flat = x.reshape((-1,) + x.shape[-3:])
        nhwc = _nhwc_on_cpu(flat)
        out = _run(self.net, flat if nhwc is None else nhwc, self.compute_dtype)
        if nhwc is not None:
            out = out.contiguous()  # back to the layout the rest of the flow uses
        return out.reshape(batch + out.shape[-3:])


#: run ConvNet's convolutions in the channels-last layout on the CPU (see :func:`_nhwc_on_cpu`)
CHANNELS_LAST_ON_CPU = True


def _nhwc_on_cpu(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` (a batch of images) copied into the channels-last layout when it is on the CPU, else ``None``.

    torch's CPU convolutions (oneDNN) run faster on channels-last inputs, and the layers after the first follow the
    layout of their input: a training step of a 3x16x16 Glow of width 128 took 1.28 times less time, of a realnvp
    1.37 times (same process, batch 64), for one copy of the input and one of the output per network call. On a GPU
    the layout is left as it is (not measured there). Values agree with the default layout to rounding (float64:
    to 1e-12 in the tests). Inside ``torch.func.vmap`` a channels-last copy is not supported: the default layout.
    """
    if not CHANNELS_LAST_ON_CPU or x.device.type != "cpu" or x.dim() != 4:
        return None
    try:
        return x.contiguous(memory_format=torch.channels_last)
    except RuntimeError:  # inside torch.func.vmap, which supports only the default layout
        return None
