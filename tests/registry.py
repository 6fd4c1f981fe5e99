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
from pyroflows.transforms import (
    ActNorm,
    AffineAutoregressive,
    AffineCoupling,
    BatchNorm,
    Compose,
    ConditionalAffineCoupling,
    HeavyTails,
    Invertible1x1Conv,
    Logit,
    MultiScale,
    Permute,
    Planar,
    ResidualBlock,
    SplineCoupling,
    Squeeze,
)


def standard_normal(shape, generator):
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def unit_interval(shape, generator):
    return torch.rand(shape, generator=generator, dtype=torch.float64) * 0.98 + 0.01


@dataclass(frozen=True)
class Case:
    make: Callable[[tuple[int, ...]], torch.distributions.Transform]
    shape: tuple[int, ...] = (3,)
    vector: bool = True
    draw: Callable = standard_normal  # inputs in the forward direction (the domain)
    # latents for inverse-direction checks: standard normal, or images of domain draws when the codomain
    # is not the whole space (a squashed logit maps [0, 1] onto a bounded interval)
    latent_from_data: bool = False


def _alternating_tensor_mask(shape):
    return AffineCoupling(shape[0], mask=torch.arange(shape[0]) % 3 == 1, hidden=(8,))


def _mixed_compose(shape):
    # A plain torch transform among FlowTransforms: Compose must handle both in one pass.
    scale = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)  # plain transforms do not follow .to()
    return Compose([Planar(shape[0]), AffineTransform(0.3, scale, event_dim=1), Permute(shape=shape[0])])


def _batchnorm_eval(shape):
    """A BatchNorm in eval mode (the fixed affine map of its running averages), with running averages that are
    not the identity's: the training-mode map, whose statistics couple a batch's samples, has its own tests
    (tests/test_batchnorm.py)."""
    t = BatchNorm(shape if len(shape) == 1 else (shape[0], None, None))
    with torch.no_grad():
        t.running_mean.uniform_(-1.0, 1.0)
        t.running_var.uniform_(0.5, 2.0)
    return t.eval()


def _warmed_up_eval(flow, shape):
    """A flow with BatchNorm layers, its running averages learnt on a few training-mode batches, in eval mode."""
    with torch.no_grad():
        for _ in range(3):
            flow(0.5 + 2.0 * torch.randn((64,) + tuple(shape)))
    return flow.eval()


# A fixed context: conditional layers join the suite through ``layer.condition(context)``, an ordinary FlowTransform
# whose Jacobian is in x for that context (tests/test_conditional.py checks per-example contexts and gradients).
_CONTEXT = torch.tensor([0.7, -1.3])


def _perturbed_hyper(flow):
    """A conditional flow for the fixed context, its context maps moved off zero (build() perturbs the parameters
    too, but this makes the context's part of the map non-trivial whatever the scale)."""
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "hyper" in name or "context_net" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return flow.condition(_CONTEXT)


CASES: dict[str, Case] = {
    "planar": Case(lambda s: Planar(s[0])),
    "affine_coupling_half": Case(lambda s: AffineCoupling(s[0], mask="half", hidden=(8,))),
    "affine_coupling_alternate": Case(lambda s: AffineCoupling(s[0], mask="alternate", hidden=(8, 8))),
    "affine_coupling_tensor_mask": Case(_alternating_tensor_mask),
    "actnorm": Case(lambda s: ActNorm(s[0])),
    "actnorm_image": Case(lambda s: ActNorm((s[0], None, None)), shape=(2, 3, 3), vector=False),
    "batchnorm": Case(_batchnorm_eval),
    "batchnorm_image": Case(_batchnorm_eval, shape=(2, 3, 3), vector=False),
    "realnvp_batchnorm": Case(
        lambda s: _warmed_up_eval(pyroflows.realnvp(s[0], num_layers=2, hidden=(8,), batch_norm=True), s)
    ),
    "conditional_coupling": Case(
        lambda s: ConditionalAffineCoupling(s[0], context_dim=2, mask="alternate", hidden=(8,)).condition(_CONTEXT)
    ),
    "conditional_realnvp": Case(
        lambda s: pyroflows.realnvp(s[0], num_layers=3, hidden=(8,), context_dim=2).condition(_CONTEXT)
    ),
    "conditional_spline_flow": Case(
        lambda s: pyroflows.spline_flow(s[0], num_layers=2, hidden=(8,), context_dim=2).condition(_CONTEXT)
    ),
    "conditional_autoregressive_flow": Case(
        lambda s: pyroflows.autoregressive_flow(s[0], num_layers=2, hidden=(8,), context_dim=2).condition(_CONTEXT)
    ),
    "conditional_planar_flow": Case(
        lambda s: _perturbed_hyper(pyroflows.planar_flow(s[0], num_layers=3, context_dim=2))
    ),
    "conditional_residual_flow": Case(
        lambda s: _perturbed_hyper(
            pyroflows.residual_flow(s[0], num_layers=2, hidden=(8,), logdet="exact", context_dim=2)
        )
    ),
    "conditional_residual_image": Case(
        lambda s: _perturbed_hyper(
            pyroflows.residual_flow(
                s, num_layers=1, hidden=4, levels=2, logdet="exact", logit_alpha=None, context_dim=2
            )
        ),
        shape=(1, 2, 2),
        vector=False,
    ),
    "conditional_coupling_image": Case(
        lambda s: ConditionalAffineCoupling((s[0], None, None), 2, mask="checkerboard", hidden=4).condition(_CONTEXT),
        shape=(2, 3, 3),
        vector=False,
    ),
    "conditional_coupling_channel": Case(
        lambda s: ConditionalAffineCoupling((s[0], None, None), 2, mask="channel", hidden=4).condition(_CONTEXT),
        shape=(3, 2, 2),
        vector=False,
    ),
    "permute": Case(lambda s: Permute(shape=s[0])),
    "heavy_tails": Case(lambda s: HeavyTails(s[0], init=0.15, max_weight=0.5)),
    # as AutoFlow builds a guide's flow: the tail layer on the base noise, then the builder's flow
    "heavy_tails_realnvp": Case(
        lambda s: Compose([HeavyTails(s[0]), pyroflows.realnvp(s[0], num_layers=2, hidden=(8,))])
    ),
    "compose_mixed": Case(_mixed_compose),
    "inverse_planar": Case(lambda s: pyroflows.inverse(Planar(s[0]))),
    "inverse_realnvp": Case(lambda s: pyroflows.inverse(pyroflows.realnvp(s[0], num_layers=2, hidden=(8,)))),
    "planar_flow": Case(lambda s: pyroflows.planar_flow(s[0], num_layers=4)),
    "realnvp": Case(lambda s: pyroflows.realnvp(s[0], num_layers=4, hidden=(16,))),
    "autoregressive": Case(lambda s: AffineAutoregressive(s[0], hidden=(8,))),
    "autoregressive_reversed": Case(
        lambda s: AffineAutoregressive(s[0], hidden=(8, 8), order=torch.arange(s[0]).flip(0))
    ),
    "spline_coupling": Case(lambda s: SplineCoupling(s[0], hidden=(8,))),
    "spline_flow": Case(lambda s: pyroflows.spline_flow(s[0], num_layers=2, hidden=(8,))),
    "autoregressive_flow": Case(lambda s: pyroflows.autoregressive_flow(s[0], num_layers=2, hidden=(8,))),
    "conv1x1_vector": Case(lambda s: Invertible1x1Conv(s)),
    # image layers, event shape (C, H, W)
    "conv1x1": Case(lambda s: Invertible1x1Conv(s), shape=(3, 2, 2), vector=False),
    "conv1x1_lu": Case(lambda s: Invertible1x1Conv(s, lu=True), shape=(3, 2, 2), vector=False),
    "coupling_checkerboard": Case(
        lambda s: AffineCoupling(s, mask="checkerboard", hidden=4), shape=(2, 3, 3), vector=False
    ),
    "coupling_checkerboard_flip": Case(
        lambda s: AffineCoupling(s, mask="checkerboard", hidden=4, flip=True), shape=(1, 3, 2), vector=False
    ),
    "coupling_channel": Case(lambda s: AffineCoupling(s, mask="channel", hidden=4), shape=(3, 2, 2), vector=False),
    "coupling_channel_additive": Case(
        lambda s: AffineCoupling(s, mask="channel", hidden=4, additive=True, flip=True),
        shape=(2, 2, 2),
        vector=False,
    ),
    "coupling_image_tensor_mask": Case(
        lambda s: AffineCoupling(s, mask=torch.rand(s) > 0.5, hidden=4), shape=(2, 2, 2), vector=False
    ),
    "squeeze": Case(lambda s: Squeeze(), shape=(2, 2, 4), vector=False),
    "multiscale": Case(
        lambda s: MultiScale(
            s, Compose([Squeeze(), AffineCoupling((4 * (s[0] // 2), None, None), "channel", hidden=4)]), hidden=4
        ),
        shape=(2, 2, 2),
        vector=False,
    ),
    "logit": Case(lambda s: Logit(0.05), shape=(1, 2, 3), vector=False, draw=unit_interval, latent_from_data=True),
    "realnvp_image": Case(
        lambda s: pyroflows.realnvp(s, num_layers=1, hidden=4, levels=2, logit_alpha=None),
        shape=(1, 4, 4),
        vector=False,
    ),
    "realnvp_image_batchnorm": Case(
        lambda s: _warmed_up_eval(
            pyroflows.realnvp(s, num_layers=1, hidden=4, levels=2, logit_alpha=None, batch_norm=True), s
        ),
        shape=(1, 4, 4),
        vector=False,
    ),
    "glow": Case(
        lambda s: pyroflows.glow(s, levels=2, num_layers=1, hidden=4, logit_alpha=None),
        shape=(1, 4, 4),
        vector=False,
    ),
    "conditional_glow": Case(
        lambda s: pyroflows.glow(s, levels=2, num_layers=1, hidden=4, logit_alpha=None, context_dim=2).condition(
            _CONTEXT
        ),
        shape=(1, 4, 4),
        vector=False,
    ),
    "conditional_realnvp_image": Case(
        lambda s: pyroflows.realnvp(s, num_layers=1, hidden=4, levels=2, logit_alpha=None, context_dim=2).condition(
            _CONTEXT
        ),
        shape=(1, 4, 4),
        vector=False,
    ),
    "glow_no_prior": Case(
        lambda s: pyroflows.glow(s, levels=2, num_layers=1, hidden=4, logit_alpha=None, learned_prior=False),
        shape=(1, 4, 4),
        vector=False,
    ),
    "residual_mlp": Case(lambda s: ResidualBlock(s[0], hidden=(8, 8), coeff=0.9, logdet="exact")),
    "residual_conv": Case(
        lambda s: ResidualBlock(s, hidden=4, coeff=0.9, logdet="exact"), shape=(2, 3, 3), vector=False
    ),
    "residual_flow": Case(lambda s: pyroflows.residual_flow(s[0], num_layers=2, hidden=(8,), logdet="exact")),
    "residual_flow_image": Case(
        lambda s: pyroflows.residual_flow(s, num_layers=1, hidden=4, levels=2, logdet="exact", logit_alpha=None),
        shape=(1, 2, 2),
        vector=False,
    ),
    "glow_with_logit": Case(
        lambda s: pyroflows.glow(s, levels=1, num_layers=2, hidden=4, lu=False, additive=True),
        shape=(2, 2, 2),
        vector=False,
        draw=unit_interval,
        latent_from_data=True,
    ),
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
        t(case.draw((64,) + shape, torch.Generator().manual_seed(seed)).to(dtype))
        with torch.no_grad():
            for p in t.parameters():
                p.add_(scale * torch.randn_like(p))
    return t, shape
