"""Affine coupling: masks, identity init, bounded scale, argument checks."""

from __future__ import annotations

import pytest
import torch

from pyroflows.transforms import AffineCoupling, make_mask


def test_masks():
    assert make_mask("half", 5).tolist() == [True, True, False, False, False]
    assert make_mask("alternate", 5).tolist() == [True, False, True, False, True]
    assert make_mask(torch.tensor([0, 1, 1]), 3).tolist() == [False, True, True]


@pytest.mark.parametrize("mask", ["half", "alternate", torch.tensor([True, False, False, True, False])])
def test_conditioning_coordinates_pass_unchanged(mask):
    torch.manual_seed(0)
    t = AffineCoupling(5, mask=mask, hidden=(8,))
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(10, 5)
    y = t(x)
    keep = t.mask
    assert torch.equal(y[:, keep], x[:, keep])
    assert not torch.allclose(y[:, ~keep], x[:, ~keep])


def test_identity_at_init_and_bounded_scale():
    t = AffineCoupling(4, hidden=(8,), scale_bound=2.0)
    x = torch.randn(6, 4)
    assert torch.equal(t(x), x)
    with torch.no_grad():
        t.conditioner.net.layers[-1].bias.fill_(1e6)  # an exploding conditioner
    log_det = t.log_abs_det_jacobian(x, t(x))
    assert torch.all(log_det <= 2.0 * 2 + 1e-6)  # two transformed coordinates, |log-scale| <= 2


def test_one_dimensional_event_is_an_elementwise_affine_map():
    t = AffineCoupling(1, mask="half")
    with torch.no_grad():
        t.conditioner.net.layers[-1].bias.copy_(torch.tensor([0.5, 0.2]))
    x = torch.randn(4, 1)
    assert torch.allclose(t(x), x * torch.exp(torch.tanh(torch.tensor(0.2 / 3)) * 3) + 0.5)


def test_rejects_bad_masks():
    with pytest.raises(ValueError, match="shape"):
        AffineCoupling(3, mask=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="none is transformed"):
        AffineCoupling(2, mask=torch.tensor([True, True]))
    with pytest.raises(ValueError, match="mask must be one of"):
        AffineCoupling(3, mask="checkers")
    with pytest.raises(ValueError, match="only 0 and 1"):
        AffineCoupling(3, mask=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="shape must be a positive int"):
        AffineCoupling(0)
    with pytest.raises(ValueError, match="is a vector mask, but shape"):
        AffineCoupling((2, 4, 4), mask="half")
    with pytest.raises(ValueError, match="is an image mask, but shape"):
        AffineCoupling((4,), mask="channel")
    with pytest.raises(ValueError, match="0 < split < C=1"):
        AffineCoupling((1, None, None), mask="channel")
    with pytest.raises(ValueError, match="split"):
        AffineCoupling((4, None, None), mask="channel", split=4)
    with pytest.raises(ValueError, match=r"shape \(1 or C, H, W\)"):
        AffineCoupling((3, None, None), mask=torch.rand(2, 4, 4) > 0.5)
    with pytest.raises(ValueError, match="every pixel"):
        AffineCoupling((3, None, None), mask=torch.ones(1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("dim", [2, 5, 8])
def test_block_mask_fast_path_matches_the_gather_path(dim, flip):
    """A mask of two contiguous blocks splits by views; it must give what the general index gather gives,
    values, log-dets and gradients, forward and inverse."""
    torch.manual_seed(0)
    fast = AffineCoupling(dim, mask=make_mask("half", dim, flip=flip), hidden=(8,)).double()
    assert fast._blocks is not None and fast._blocks[0] == flip
    for p in fast.conditioner.parameters():  # leave the zero init, so that the map is not the identity
        torch.nn.init.normal_(p, std=0.3)
    slow = AffineCoupling(dim, mask=make_mask("half", dim, flip=flip), hidden=(8,)).double()
    slow.load_state_dict(fast.state_dict())
    slow._blocks = None
    x = torch.randn(6, dim, dtype=torch.float64, requires_grad=True)
    outs = []
    for t in (fast, slow):
        y, ld = t.forward_and_log_det(x)
        x_back, ld_inv = t.inverse_and_log_det(y)
        (gx,) = torch.autograd.grad((y.sin().sum() + ld.sum()), x)
        outs.append((y, ld, x_back, ld_inv, gx))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(outs[0][2], x, rtol=0, atol=1e-12)
    assert AffineCoupling(dim, mask="alternate")._blocks is None or dim == 2


@pytest.mark.parametrize(
    "in_features, hidden, activation, batch",
    [
        (3, (16, 16), None, (6,)),
        (5, (8,), torch.nn.Tanh(), (2, 4)),
        (0, (4, 4), None, (3,)),
        (2, (7, 5, 3), torch.nn.ELU(), ()),
    ],
)
def test_mlp_runs_its_densenns_layers_as_densenn_does(in_features, hidden, activation, batch):
    """MLP runs its pyro DenseNN's layers in its own loop (no per-call ModuleList slice): values and the input's
    and parameters' gradients are those of the DenseNN's own forward, bit for bit (float64), for any activation,
    depth, batch shape and an empty input; under bfloat16 autocast too."""
    from pyroflows.nn import MLP, set_compute_dtype

    torch.manual_seed(1)
    net = MLP(in_features, 4, hidden=hidden, activation=activation).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(*batch, in_features, dtype=torch.float64, requires_grad=True)
    ours = net(x)
    theirs = net.net(x).reshape(ours.shape)  # DenseNN.forward
    assert ours.shape == (*batch, 4)
    assert torch.equal(ours, theirs) and ours.abs().sum() > 0
    g1 = torch.autograd.grad(ours.square().sum(), [x, *net.parameters()], allow_unused=True)
    g2 = torch.autograd.grad(theirs.square().sum(), [x, *net.parameters()], allow_unused=True)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2))
    net = net.float()
    set_compute_dtype(net, torch.bfloat16)
    xf = x.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = net.net(xf).float().reshape(-1, 4)
    assert net(xf).dtype == torch.float32
    assert torch.equal(net(xf).reshape(-1, 4), reference)


@pytest.mark.parametrize("kind", ["mlp", "convnet", "made"])
def test_the_default_in_place_relu_gives_the_plain_relus_values_and_gradients(kind):
    """The conditioners' default ReLU overwrites each layer's output in place: the values, the parameters' and the
    input's gradients are those of the same network with a plain ReLU (float64, bit for bit), and torch.func's
    batched Jacobians go through it."""
    import copy

    from torch.func import jacrev, vmap

    from pyroflows.nn import MADE, MLP, ConvNet

    torch.manual_seed(0)
    net, x = {
        "mlp": (lambda: MLP(3, 4, hidden=(16, 16)), torch.randn(6, 3)),
        "convnet": (lambda: ConvNet(2, 4, hidden_channels=8), torch.randn(3, 2, 5, 5)),
        "made": (lambda: MADE(4, hidden=(16, 16)), torch.randn(6, 4)),
    }[kind]
    net = net().double()
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in net.modules())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    plain = copy.deepcopy(net)
    for m in plain.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    x = x.double().requires_grad_(True)
    grads = []
    for model in (net, plain):
        out = model(x)
        grads.append((out, *torch.autograd.grad(out.square().sum(), [x, *model.parameters()])))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    if kind != "convnet":
        jac = vmap(jacrev(lambda v: net(v)))(x.detach())
        assert torch.equal(jac, vmap(jacrev(lambda v: plain(v)))(x.detach()))
        assert jac.abs().sum() > 0


def test_convnet_on_the_cpu_runs_channels_last_with_the_default_layouts_values(monkeypatch):
    """ConvNet copies its input into the channels-last layout on the CPU (faster oneDNN convolutions) and its output
    back: values and the input's and parameters' gradients agree with the default layout's (float64 to 1e-12,
    float32 to 1e-5), the output is in the default layout, a batch of any leading shape works, and inside
    torch.func.vmap (which has no channels-last copy) it falls back to the default layout with the same Jacobian."""
    from torch.func import jacrev, vmap

    from pyroflows.nn import ConvNet, conditioners

    torch.manual_seed(0)
    net = ConvNet(3, 4, hidden_channels=16)
    with torch.no_grad():
        net.net[-1].weight.normal_(0.0, 0.1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        net = net.to(dtype)
        x = torch.randn(2, 5, 3, 6, 6, dtype=dtype, requires_grad=True)
        results = {}
        for flag in (True, False):
            monkeypatch.setattr(conditioners, "CHANNELS_LAST_ON_CPU", flag)
            out = net(x)
            assert out.shape == (2, 5, 4, 6, 6) and out.is_contiguous()
            results[flag] = (out, *torch.autograd.grad(out.square().sum(), [x, *net.parameters()]))
        for a, b in zip(results[True], results[False]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert results[True][0].abs().sum() > 0
    monkeypatch.setattr(conditioners, "CHANNELS_LAST_ON_CPU", True)
    assert conditioners._nhwc_on_cpu(x.detach()[0]) is not None
    net = net.double()
    small = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    jac = vmap(jacrev(net))(small)
    monkeypatch.setattr(conditioners, "CHANNELS_LAST_ON_CPU", False)
    torch.testing.assert_close(jac, vmap(jacrev(net))(small), rtol=1e-12, atol=1e-12)
