"""Image layers: 1x1 convolutions (LU vs plain), squeeze layout, checkerboard/channel couplings, logit."""

from __future__ import annotations

import math

import pytest
import torch

from pyroflows.transforms import AffineCoupling, Compose, Invertible1x1Conv, Logit, Planar, Squeeze


def test_lu_and_plain_1x1_conv_give_the_same_map():
    torch.manual_seed(0)
    plain = Invertible1x1Conv((4, None, None)).double()
    with torch.no_grad():
        plain.weight.add_(0.3 * torch.randn(4, 4, dtype=torch.float64))
    lu = Invertible1x1Conv((4, None, None), lu=True).double()
    p, l, u = torch.linalg.lu(plain.weight.detach())
    s = torch.diagonal(u)
    with torch.no_grad():
        lu.perm.copy_(p), lu.lower.copy_(l), lu.upper.copy_(torch.triu(u, 1))
        lu.sign_s.copy_(torch.sign(s)), lu.log_s.copy_(torch.log(s.abs()))
    assert torch.allclose(lu.weight_matrix(), plain.weight, atol=1e-12)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    assert torch.allclose(lu(x), plain(x), atol=1e-12)
    assert torch.allclose(lu.log_abs_det_jacobian(x, lu(x)), plain.log_abs_det_jacobian(x, plain(x)), atol=1e-10)


@pytest.mark.parametrize("lu", [False, True])
def test_1x1_conv_log_det_is_positions_times_slogdet(lu):
    torch.manual_seed(1)
    t = Invertible1x1Conv((3, None, None), lu=lu).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    expected = 5 * 7 * torch.linalg.slogdet(t.weight_matrix())[1]
    assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), expected.expand(2), atol=1e-10)
    assert torch.allclose(
        torch.linalg.slogdet(Invertible1x1Conv((6, None, None), lu=lu).weight_matrix())[1], torch.zeros(()), atol=1e-5
    )


def test_squeeze_layout_and_errors():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    y = Squeeze()(x)
    assert y.shape == (1, 8, 2, 2)
    # output channel 4c + 2i + j holds input channel c at patch offset (i, j)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(y[0, 4 * c + 2 * i + j], x[0, c, i::2, j::2])
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        Squeeze().inv(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("flip", [False, True])
def test_checkerboard_keeps_its_conditioning_pixels(flip):
    torch.manual_seed(0)
    t = AffineCoupling((2, None, None), mask="checkerboard", hidden=8, flip=flip)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(3, 2, 4, 6)
    y = t(x)
    ii, jj = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    keep = (ii + jj) % 2 == (1 if flip else 0)
    assert torch.equal(y[..., keep], x[..., keep])
    assert not torch.allclose(y[..., ~keep], x[..., ~keep])


def test_channel_coupling_keeps_its_conditioning_channels():
    torch.manual_seed(0)
    t = AffineCoupling((5, None, None), mask="channel", hidden=8)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(2, 5, 3, 3)
    y = t(x)
    assert torch.equal(y[:, :2], x[:, :2]) and not torch.allclose(y[:, 2:], x[:, 2:])
    flipped = AffineCoupling((5, None, None), mask="channel", hidden=8, flip=True)
    assert torch.equal(flipped(x), x)  # zero-initialised: the identity
    with torch.no_grad():
        for p in flipped.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert torch.equal(flipped(x)[:, 2:], x[:, 2:])


def test_additive_coupling_preserves_volume():
    torch.manual_seed(0)
    t = AffineCoupling((4, None, None), mask="channel", hidden=8, additive=True)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(3, 4, 2, 2)
    assert torch.equal(t.log_abs_det_jacobian(x, t(x)), torch.zeros(3))


def test_logit_log_det_formula_and_domain():
    alpha = 0.05
    t = Logit(alpha).double()
    x = torch.rand(4, 1, 3, 3, dtype=torch.float64)
    p = alpha + (1 - 2 * alpha) * x
    expected = (math.log(1 - 2 * alpha) - torch.log(p) - torch.log1p(-p)).sum((-1, -2, -3))
    assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), expected, atol=1e-12)
    with pytest.raises(ValueError, match="outside the transform's domain"):
        t(torch.full((1, 1, 2, 2), 1.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha"):
        Logit(0.5)
    with pytest.raises(ValueError, match="outside the transform's domain"):  # a flow starting with Logit checks too
        Compose([Logit(alpha), Squeeze()])(torch.full((1, 1, 2, 2), -0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3, 0.01])
def test_logit_endpoints_of_the_data_range_are_inside_domain_and_round_trip(alpha, dtype):
    """Pixels 0 and 1 are in the domain; their images are in the codomain and invert (no validation error)."""
    t = Logit(alpha)
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype).reshape(1, 1, 2, 2)
    assert bool(t.domain.check(x).all())
    y = t(x)
    assert bool(t.codomain.check(y).all()) and torch.isfinite(y).all()
    back = t.inv(y.clone())
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    margin = alpha / (1 - 2 * alpha)  # the open domain: its ends map to -inf and +inf
    for outside in (-margin, 1 + margin, -margin - 0.01):
        with pytest.raises(ValueError, match="outside the transform's domain"):
            t(torch.full((1, 1, 2, 2), outside, dtype=dtype))
    z = torch.linspace(-30, 30, 61, dtype=torch.float64).reshape(1, 1, 1, 61)  # the codomain is the real line
    assert bool(t.domain.check(Logit(alpha).double().inv(z)).all())


def test_wrong_channel_count_is_named():
    t = AffineCoupling((3, None, None), mask="channel", hidden=4)
    with pytest.raises(ValueError, match=r"event shape \(3, \*, \*\)"):
        t(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="Planar.forward expects event shape"):
        Planar(3)(torch.randn(2, 4))
