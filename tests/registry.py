"""The registry every public layer and builder joins: one line per case runs the whole generic suite
(tests/test_transforms_generic.py) on it.

A case builds a transform for an event shape. ``vector=True`` cases can be built for any ``(D,)`` and also
join the 2-D normalisation check and the ``AutoNormalizingFlow`` + SVI check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributions import AffineTransform

import pyroflows
from pyroflows.transforms import ActNorm, AffineCoupling, Compose, Permute, Planar


@dataclass(frozen=True)
class Case:
    make: Callable[[tuple[int, ...]], torch.distributions.Transform]
    shape: tuple[int, ...] = (3,)
    vector: bool = True


def _alternating_tensor_mask(shape):
    return AffineCoupling(shape[0], mask=torch.arange(shape[0]) % 3 == 1, hidden=(8,))


def _mixed_compose(shape):
    # A plain torch transform among FlowTransforms: Compose must handle both in one pass.
    scale = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)  # plain transforms do not follow .to()
    return Compose([Planar(shape[0]), AffineTransform(0.3, scale, event_dim=1), Permute(input_dim=shape[0])])


CASES: dict[str, Case] = {
    "planar": Case(lambda s: Planar(s[0])),
    "affine_coupling_half": Case(lambda s: AffineCoupling(s[0], mask="half", hidden=(8,))),
    "affine_coupling_alternate": Case(lambda s: AffineCoupling(s[0], mask="alternate", hidden=(8, 8))),
    "affine_coupling_tensor_mask": Case(_alternating_tensor_mask),
    "actnorm": Case(lambda s: ActNorm(s[0])),
    "actnorm_image": Case(lambda s: ActNorm(s[0], event_dim=3), shape=(2, 3, 3), vector=False),
    "permute": Case(lambda s: Permute(input_dim=s[0])),
    "compose_mixed": Case(_mixed_compose),
    "inverse_planar": Case(lambda s: pyroflows.inverse(Planar(s[0]))),
    "inverse_realnvp": Case(lambda s: pyroflows.inverse(pyroflows.realnvp(s[0], num_layers=2, hidden=(8,)))),
    "planar_flow": Case(lambda s: pyroflows.planar_flow(s[0], num_layers=4)),
    "realnvp": Case(lambda s: pyroflows.realnvp(s[0], num_layers=4, hidden=(16,))),
}


def build(case: Case, shape=None, dtype=torch.float64, scale: float = 0.3, seed: int = 0):
    """Build a case as a non-trivial map: warm it up (ActNorm's data-dependent init runs on a batch of
    standard-normal data), then perturb every floating parameter by ``scale`` × N(0, 1) so that no layer is
    left at its identity initialisation."""
    torch.manual_seed(seed)
    shape = tuple(shape or case.shape)
    t = case.make(shape)
    if isinstance(t, torch.nn.Module):
        t = t.to(dtype)
        t(torch.randn((64,) + shape, dtype=dtype))
        with torch.no_grad():
            for p in t.parameters():
                p.add_(scale * torch.randn_like(p))
    return t, shape
