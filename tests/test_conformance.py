"""Pyro's and PyTorch's generic transform checks (tests/conformance.py) on every registered layer and builder
(tests/registry.py), in float64 and float32.

What tests/test_transforms_generic.py already covers in float64 (round trips, log-det against the autograd
Jacobian of single points, per-row batch consistency, the remembered pair, parameters, state dicts) is not
repeated for its own sake; the checks here follow the peers' methods (finite differences, cloned outputs, shape
functions, block-diagonal batched Jacobians, serialisation, constraints) and run in both precisions. Tolerances are
stated in tests/conformance.py.
"""

from __future__ import annotations

import copy
import os

import pyro.distributions as dist
import pytest
import torch
from conformance import (
    check_autodiff,
    check_batched_jacobian,
    check_copies,
    check_distribution_copies,
    check_domain_codomain,
    check_dtype_conversion,
    check_equality,
    check_forward_inverse,
    check_gradcheck,
    check_inv_inv,
    check_inverse_cloned,
    check_jacobian_finite_differences,
    check_logit_endpoints,
    check_shapes,
    check_sign,
    check_sign_cdf,
    check_transformed_distribution,
    check_with_cache,
    is_real,
    to_dtype,
)
from registry import CASES, build, unit_interval
from test_transforms_generic import _draw
from torch.distributions import AffineTransform

import pyroflows
from pyroflows.transforms import Compose, forward_and_log_det, inverse_and_log_det

DTYPES = [torch.float64, torch.float32]
BATCH_SHAPES = [(), (5,), (3, 4)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tensors here are tiny: one intra-op thread is as fast, and keeps the run time steady when another
    process shares the cores (two spinning threads per process on two cores slowed the file ~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(CASES))
def case_name(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["float64", "float32"])
def dtype(request):
    return request.param


def _build(case_name, dtype, shape=None):
    t, shape = build(CASES[case_name], shape=shape, dtype=dtype)
    return to_dtype(t, dtype), shape


def _x(case_name, batch_shape, shape, dtype, seed=1):
    """Inputs from the case's domain, in ``dtype``."""
    return _draw(case_name, batch_shape, shape, seed).to(dtype)


def _y(case_name, t, batch_shape, shape, dtype, seed=2):
    """Inverse-direction inputs: standard normal, or images of domain draws for bounded codomains (as
    test_transforms_generic's ``_latent``, in ``dtype``)."""
    if CASES[case_name].latent_from_data:
        with torch.no_grad():
            return t(_x(case_name, batch_shape, shape, dtype, seed)).clone()
    g = torch.Generator().manual_seed(seed)
    out_shape = tuple(t.forward_shape(shape))
    return torch.randn(tuple(batch_shape) + out_shape, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------ Pyro's checks
def test_jacobian_finite_differences(case_name, dtype):
    t, shape = _build(case_name, dtype)
    for seed in (10, 11):
        check_jacobian_finite_differences(t, _x(case_name, (), shape, dtype, seed), shape)


def test_inverse_cloned(case_name, dtype):
    t, shape = _build(case_name, dtype)
    check_inverse_cloned(t, _x(case_name, (4,), shape, dtype), _y(case_name, t, (4,), shape, dtype))


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
def test_shapes(case_name, dtype, batch_shape):
    t, shape = _build(case_name, dtype)
    check_shapes(t, _x(case_name, batch_shape, shape, dtype), _y(case_name, t, batch_shape, shape, dtype), shape)


def test_autodiff(case_name, dtype):
    t, shape = _build(case_name, dtype)
    check_autodiff(t, _x(case_name, (2,), shape, dtype), _y(case_name, t, (2,), shape, dtype))


def test_dtype_conversion(case_name, dtype):
    t, shape = _build(case_name, dtype)
    check_dtype_conversion(t, _x(case_name, (3,), shape, dtype))


def test_gradcheck(case_name):
    t, shape = _build(case_name, torch.float64)
    check_gradcheck(t, _x(case_name, (1,), shape, torch.float64))


# ----------------------------------------------------------------------------------------------- torch's checks
def test_inv_inv(case_name, dtype):
    t, _ = _build(case_name, dtype)
    check_inv_inv(t)


def test_equality(case_name, dtype):
    t, _ = _build(case_name, dtype)
    check_equality(t)


def test_with_cache(case_name, dtype):
    t, shape = _build(case_name, dtype)
    check_with_cache(t, _x(case_name, (4,), shape, dtype))


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_forward_inverse(case_name, dtype, cached):
    t, shape = _build(case_name, dtype)
    check_forward_inverse(t, _x(case_name, (4,), shape, dtype), cached)


def test_batched_jacobian(case_name, dtype):
    t, shape = _build(case_name, dtype)
    check_batched_jacobian(t, _x(case_name, (3,), shape, dtype), _y(case_name, t, (3,), shape, dtype))


def _domain_distribution(case_name, batch_shape, shape, dtype):
    """The distribution the case draws its inputs from (standard normal or uniform on [0.01, 0.99])."""
    full = tuple(batch_shape) + tuple(shape)
    if CASES[case_name].draw is unit_interval:
        base = dist.Uniform(torch.full(full, 0.01, dtype=dtype), torch.full(full, 0.99, dtype=dtype))
    else:
        base = dist.Normal(torch.zeros(full, dtype=dtype), 1.0)
    return base.to_event(len(shape))


def _distribution_parts(case_name, t, batch_shape, shape, dtype):
    """``(transform, base, event_shape)`` for ``TransformedDistribution(base, [transform])`` over the case.

    On the whole space: ``t`` itself over the case's input distribution. Otherwise (Logit's interval): the
    latent -> data direction, ``pyroflows.inverse(t)``, over a standard normal when ``t``'s codomain is the whole
    space, else over the image under ``t`` of the case's input distribution (a normal would leave a bounded
    codomain)."""
    if is_real(t.domain):
        return t, _domain_distribution(case_name, batch_shape, shape, dtype), tuple(t.forward_shape(shape))
    out_shape = tuple(t.forward_shape(shape))
    if is_real(t.codomain):
        latent = dist.Normal(torch.zeros(tuple(batch_shape) + out_shape, dtype=dtype), 1.0).to_event(len(out_shape))
    else:
        latent = dist.TransformedDistribution(_domain_distribution(case_name, batch_shape, shape, dtype), [t])
    return pyroflows.inverse(t), latent, tuple(shape)


@pytest.mark.parametrize("batch_shape", [(), (4,)], ids=str)
def test_transformed_distribution(case_name, dtype, batch_shape):
    t, shape = _build(case_name, dtype)
    transform, base, event_shape = _distribution_parts(case_name, t, batch_shape, shape, dtype)
    check_transformed_distribution(transform, base, event_shape, batch_shape)


SIGN_CASES = [
    ("Compose([AffineTransform(0., -2.)])", lambda: Compose([AffineTransform(0.0, -2.0)]), -1),
    ("Compose([AffineTransform(0., 2.)])", lambda: Compose([AffineTransform(0.0, 2.0)]), 1),
    (
        "Compose([AffineTransform(0., -2.), AffineTransform(1., -3.)])",
        lambda: Compose([AffineTransform(0.0, -2.0), AffineTransform(1.0, -3.0)]),
        1,
    ),
    ("pyroflows.inverse(AffineTransform(0., -2.))", lambda: pyroflows.inverse(AffineTransform(0.0, -2.0)), -1),
    (
        "pyroflows.inverse(Compose([AffineTransform(0., -2.)]))",
        lambda: pyroflows.inverse(Compose([AffineTransform(0.0, -2.0)])),
        -1,
    ),
]


@pytest.mark.parametrize("name, make, expected", [pytest.param(*c, id=c[0]) for c in SIGN_CASES])
def test_sign(name, make, expected):
    check_sign(make(), expected, name)


CDF_CASES = [
    # both push Normal(0, 1) forward to Normal(0, 2) through a decreasing map
    ("Compose([AffineTransform(0., -2.)])", lambda: Compose([AffineTransform(0.0, -2.0)])),
    ("pyroflows.inverse(AffineTransform(0., -0.5))", lambda: pyroflows.inverse(AffineTransform(0.0, -0.5))),
]


@pytest.mark.parametrize("name, make", [pytest.param(*c, id=c[0]) for c in CDF_CASES])
def test_sign_cdf(name, make):
    check_sign_cdf(make(), torch.distributions.Normal(0.0, 2.0), name)


def test_domain_codomain(case_name, dtype):
    t, shape = _build(case_name, dtype)
    check_domain_codomain(t, _x(case_name, (8,), shape, dtype), _y(case_name, t, (8,), shape, dtype))


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3, 0.01])
def test_logit_endpoints(alpha, dtype):
    check_logit_endpoints(alpha, dtype)


def test_copies(case_name, dtype):
    t, shape = _build(case_name, dtype)
    x = _x(case_name, (3,), shape, dtype)
    check_copies(t, x)
    transform, base, _ = _distribution_parts(case_name, t, (), shape, dtype)
    d = dist.TransformedDistribution(base, [transform])
    torch.manual_seed(0)
    check_distribution_copies(d, d.sample((3,)))


# ------------------------------------------------------------------------------------------- on an accelerator
# The cases below exist only on a machine with a GPU (CI has none): the same layer on the accelerator computes
# what it computes on the CPU, in both directions, and the device-independent checks hold there.
# PYROFLOWS_TEST_ACCELERATOR=cpu runs them against a CPU copy, to check the test itself on a machine without one.
ACCELERATORS = [os.environ["PYROFLOWS_TEST_ACCELERATOR"]] if os.environ.get("PYROFLOWS_TEST_ACCELERATOR") else []
ACCELERATORS += ["cuda"] if torch.cuda.is_available() and "cuda" not in ACCELERATORS else []


if ACCELERATORS:  # defined only where there is one: no skipped placeholders on a CPU machine

    @pytest.mark.parametrize("device", ACCELERATORS)
    def test_on_accelerator(case_name, dtype, device):
        t, shape = _build(case_name, dtype)
        x, y0 = _x(case_name, (4,), shape, dtype), _y(case_name, t, (4,), shape, dtype)
        with torch.no_grad():
            y_cpu, ld_cpu = forward_and_log_det(t, x)
            x0_cpu, ild_cpu = inverse_and_log_det(t, y0)
        g = to_dtype(copy.deepcopy(t), torch.device(device))
        xd, yd = x.to(device), y0.to(device)
        with torch.no_grad():
            y, ld = forward_and_log_det(g, xd)
            x0, ild = inverse_and_log_det(g, yd)
        # float32 on CUDA: cuDNN convolutions run in TF32 (10-bit mantissa) by default, hence the looser tolerance
        kw = dict(atol=1e-8, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-3, rtol=2e-3)
        for name, got, want in (
            ("y", y, y_cpu),
            ("log-det", ld, ld_cpu),
            ("x", x0, x0_cpu),
            ("inverse log-det", ild, ild_cpu),
        ):
            assert got.device.type == torch.device(device).type, f"{name} computed on {got.device}"
            torch.testing.assert_close(got.cpu(), want, **kw, msg=lambda m, n=name: f"{device} vs cpu, {n}: {m}")
        check_inverse_cloned(g, xd, yd)
        check_forward_inverse(g, xd, cached=True)
        check_with_cache(g, xd)
        check_domain_codomain(g, xd, yd)
        check_batched_jacobian(g, xd[:3], yd[:3])
        check_dtype_conversion(g, xd)
