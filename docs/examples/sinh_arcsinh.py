"""A new flow layer in about 30 lines: the elementwise sinh-arcsinh map (Jones & Pewsey, 2009).

Shown in docs/new_layer.rst and checked by tests/test_docs_example.py (round trip, log-det against the autograd
Jacobian in float64, use as an ``AutoNormalizingFlow`` guide and inside a ``FlowDensity``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyroflows.transforms import FlowTransform


def _log_cosh(a: torch.Tensor) -> torch.Tensor:
    """``log(cosh(a))`` without overflow for large ``|a|``."""
    a = a.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)


class SinhArcsinh(FlowTransform):
    r"""Elementwise :math:`y = \sinh(\delta \operatorname{asinh}(x) - \epsilon)`, :math:`\delta = e^{d} > 0`:
    ``skew`` :math:`\epsilon` moves mass to one side, ``log_tail`` :math:`d` makes the tails heavier
    (:math:`\delta < 1`) or lighter (:math:`\delta > 1`). A fresh layer is the identity.

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right|
        = \sum_i \Big[d_i + \log\cosh(\delta_i \operatorname{asinh}(x_i) - \epsilon_i) - \tfrac12 \log(1 + x_i^2)\Big].

    :param int input_dim: the event size ``D``; inputs have shape ``(..., D)``.
    """

    def __init__(self, input_dim: int):
        if not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"SinhArcsinh: input_dim must be a positive int, got {input_dim!r}")
        super().__init__(event_dim=1, event_shape=(input_dim,))
        self.skew = nn.Parameter(torch.zeros(input_dim))
        self.log_tail = nn.Parameter(torch.zeros(input_dim))

    def forward_and_log_det(self, x):
        a = torch.exp(self.log_tail) * torch.asinh(x) - self.skew
        log_det = self.log_tail + _log_cosh(a) - 0.5 * torch.log1p(x * x)
        return torch.sinh(a), log_det.sum(-1)  # sum over the event dim: shape x.shape[:-1]

    def inverse_and_log_det(self, y):
        b = (torch.asinh(y) + self.skew) * torch.exp(-self.log_tail)
        log_det = -self.log_tail + _log_cosh(b) - 0.5 * torch.log1p(y * y)
        return torch.sinh(b), log_det.sum(-1)
