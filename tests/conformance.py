"""The generic checks of Pyro's and PyTorch's own transform test suites, as plain functions.

Each ``check_*`` function takes a built transform (and the inputs, shapes or dtype it needs) and asserts, with a
message that starts with the name of the peer check it follows, e.g. ``[pyro _test_jacobian]``. They know nothing
about the registry; tests/test_conformance.py applies them to every case of tests/registry.py in float64 and
float32.

Peers (facts only; the code here is written for pyroflows):

* Pyro, ``tests/distributions/test_transforms.py``: ``_test_jacobian`` (log-det against a finite-difference
  Jacobian), ``_test_inverse`` (the inverse of a *cloned* output, so that no cache can answer), ``_test_shape``
  (``forward_shape`` / ``inverse_shape`` and sampled shapes) and ``_test_autodiff`` (a maximum-likelihood step
  backpropagates without error).
* PyTorch, ``test/distributions/test_transforms.py``: ``test_inv_inv``, ``test_equality``, ``test_with_cache``,
  ``test_forward_inverse`` (cached and uncached), ``test_jacobian`` (also batched), ``test_compose_transform_shapes``,
  ``test_transformed_distribution_shapes``, ``test_transform_sign``, ``test_save_load_transform`` and the
  domain / codomain checks of the inputs and outputs.

Tolerances (:func:`tol`):

* float64: round trips and log-dets against autograd ``atol=1e-8, rtol=0`` (the maps are O(1); the iterative
  inverses converge to ~1e-12 or better).
* float32: ``atol=1e-4, rtol=1e-4`` ("relative-ish": single precision carries ~6e-8 relative error per operation,
  and a log-det is a sum over up to ~50 elements).
* Finite-difference Jacobians (central differences): in float64 with step ``1e-6`` (truncation error O(step^2)
  ~ 1e-12, rounding O(1e-16 / step) ~ 1e-10 per Jacobian entry), log-det compared to ``atol=1e-6, rtol=1e-6``.
  A float32 transform is compared with float64 differences of ``copy.deepcopy(t)`` converted to float64, at the
  same point, to the float32 tolerance above (this checks the float32 log-det against the exact one, not only the
  method); :func:`check_dtype_conversion` checks that the converted copy is the same map.
* ``gradcheck`` (float64 only): ``eps=1e-6, atol=1e-6, rtol=1e-4``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pyro.distributions as dist
import torch
from torch.distributions import constraints

import pyroflows
from pyroflows.transforms import Compose, Inverse, Logit

FD_STEP = 1e-6


def tol(dtype: torch.dtype) -> dict:
    """``allclose`` tolerances for values computed in ``dtype`` (see the module docstring)."""
    return dict(atol=1e-8, rtol=0.0) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)


def fd_tol(dtype: torch.dtype) -> dict:
    """Tolerance of a ``dtype`` log-det against the float64 finite-difference one."""
    return dict(atol=1e-6, rtol=1e-6) if dtype == torch.float64 else tol(torch.float32)


def _max_err(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _close(a, b, dtype, what: str, check: str, **override) -> None:
    kw = {**tol(dtype), **override}
    assert a.shape == b.shape, f"[{check}] {what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.allclose(a.double(), b.double(), **kw), (
        f"[{check}] {what}: max |difference| {_max_err(a, b):.3e} above atol={kw['atol']}, rtol={kw['rtol']}"
    )


# ----------------------------------------------------------------------------------------------- dtype handling
def to_dtype(t, dtype: torch.dtype | torch.device | str):
    """``t.to(dtype)`` (or ``t.to(device)``), also converting the tensors of plain (non-``nn.Module``) torch
    transforms among the parts of any composition inside ``t`` (e.g. an ``AffineTransform`` scale), which ``.to()``
    does not reach. Without this a float32 build of a composition with a float64 plain part computes in float64 and
    its inverse then feeds float64 into float32 layers."""
    is_dtype = isinstance(dtype, torch.dtype)
    if isinstance(t, torch.nn.Module):
        t = t.to(dtype)
    stack, seen = [t], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        parts = getattr(m, "parts", None)
        if parts is not None:
            stack.extend(parts)
        if isinstance(m, Inverse):
            stack.append(m.base)
        if isinstance(m, torch.nn.Module):
            stack.extend(m.children())
            continue
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or not is_dtype):
                setattr(m, name, value.to(dtype))
    return t


def _params(t) -> list[torch.Tensor]:
    return list(t.parameters()) if isinstance(t, torch.nn.Module) else []


def _tensors(t) -> list[torch.Tensor]:
    if not isinstance(t, torch.nn.Module):
        return []
    return [v for v in list(t.parameters()) + list(t.buffers()) if v.numel()]


# ----------------------------------------------------------------------------------------------- Pyro's checks
def _fd_jacobian(fn, point: torch.Tensor, in_shape, step: float = FD_STEP) -> torch.Tensor:
    """Central-difference Jacobian of ``fn`` at ``point`` (shape ``in_shape``), all 2·D evaluations in one batch."""
    flat = point.reshape(-1)
    d = flat.numel()
    eye = torch.eye(d, dtype=flat.dtype) * step
    plus, minus = (flat + eye).reshape((d,) + tuple(in_shape)), (flat - eye).reshape((d,) + tuple(in_shape))
    with torch.no_grad():
        out = fn(torch.cat([plus, minus]))
    out = out.reshape(2 * d, -1)
    return ((out[:d] - out[d:]) / (2 * step)).T  # rows: outputs, columns: inputs


def check_jacobian_finite_differences(t, x: torch.Tensor, shape) -> None:
    """Pyro ``_test_jacobian``: ``log_abs_det_jacobian(x, t(x))`` equals ``log|det J|`` of a central-difference
    Jacobian at a single (unbatched) point ``x`` of event shape ``shape``.

    The differences are taken in float64 (step ``FD_STEP``), on a float64 deep copy when ``t`` is float32 (the same
    map: :func:`check_dtype_conversion`)."""
    check = "pyro _test_jacobian"
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert log_det.shape == (), f"[{check}] log-det of one event has shape {tuple(log_det.shape)}, not ()"
    kw = fd_tol(x.dtype)
    what = "log_abs_det_jacobian vs finite differences"
    if x.dtype == torch.float64:
        jac = _fd_jacobian(lambda v: t(v), x, shape)
    else:
        t64 = to_dtype(copy.deepcopy(t), torch.float64)
        jac = _fd_jacobian(lambda v: t64(v), x.double(), shape)
        what += " (float64 differences of a float64 copy)"
    assert jac.shape[0] == jac.shape[1], f"[{check}] the Jacobian is not square: {tuple(jac.shape)}"
    sign, expected = torch.linalg.slogdet(jac)
    assert sign != 0, f"[{check}] singular finite-difference Jacobian"
    _close(log_det, expected.to(log_det.dtype), x.dtype, what, check, **kw)


def check_dtype_conversion(t, x: torch.Tensor) -> None:
    """``nn.Module.to(dtype)`` keeps the function: a deep copy of ``t`` converted to the other floating dtype
    computes the same outputs and log-dets at ``x`` (to float32 tolerance). Not a peer check; it is the
    precondition of comparing a float32 transform with float64 differences of its float64 copy."""
    check = "dtype conversion"
    other = torch.float32 if x.dtype == torch.float64 else torch.float64
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    c = to_dtype(copy.deepcopy(t), other)
    xc = x.to(other)
    yc = c(xc)
    assert yc.dtype == other, f"[{check}] the {other} copy computes in {yc.dtype}"
    _close(yc, y, torch.float32, f"t(x) of the {other} copy vs the {x.dtype} original", check)
    _close(c.log_abs_det_jacobian(xc, yc), log_det, torch.float32, f"log-det of the {other} copy vs original", check)


def check_inverse_cloned(t, x: torch.Tensor, y0: torch.Tensor) -> None:
    """Pyro ``_test_inverse``: ``t.inv(t(x).clone()) ≈ x`` and ``t(t.inv(y0).clone()) ≈ y0``; the clones make sure
    neither the identity cache nor the remembered pair can answer."""
    check = "pyro _test_inverse"
    x2 = t.inv(t(x).clone())
    _close(x2, x, x.dtype, "t.inv(t(x).clone()) vs x", check)
    y2 = t(t.inv(y0).clone())
    _close(y2, y0, y0.dtype, "t(t.inv(y).clone()) vs y", check)


def check_shapes(t, x: torch.Tensor, y0: torch.Tensor, event_shape) -> None:
    """Pyro ``_test_shape`` (and torch's shape assertions in ``test_forward_inverse`` / ``test_jacobian``):
    ``forward_shape`` / ``inverse_shape`` of the event shape and of the full batched shape agree with the shapes the
    maps produce in both directions; log-dets have shape ``x.shape[:x.dim() - domain.event_dim]``; outputs keep the
    input dtype. For a composition also torch's ``test_compose_transform_shapes``: its domain / codomain event dims
    are those torch's ``ComposeTransform`` derives from the parts, and its ``forward_shape`` is the parts' chained."""
    check = "pyro _test_shape"
    event_shape = tuple(event_shape)
    n_in, n_out = t.domain.event_dim, t.codomain.event_dim
    assert len(event_shape) == n_in, f"[{check}] event shape {event_shape} has not domain.event_dim={n_in} dims"
    batch = tuple(x.shape[: x.dim() - n_in])
    out_event = tuple(t.forward_shape(event_shape))
    assert len(out_event) == n_out, f"[{check}] forward_shape{event_shape} = {out_event}: not {n_out} dims"
    assert tuple(t.inverse_shape(out_event)) == event_shape, (
        f"[{check}] inverse_shape(forward_shape{event_shape}) = {tuple(t.inverse_shape(out_event))}"
    )
    y = t(x)
    assert tuple(y.shape) == batch + out_event, f"[{check}] t(x).shape {tuple(y.shape)} != {batch + out_event}"
    assert tuple(t.forward_shape(x.shape)) == tuple(y.shape), (
        f"[{check}] forward_shape{tuple(x.shape)} = {tuple(t.forward_shape(x.shape))}, t(x) has {tuple(y.shape)}"
    )
    assert tuple(t.inverse_shape(y.shape)) == tuple(x.shape), (
        f"[{check}] inverse_shape{tuple(y.shape)} = {tuple(t.inverse_shape(y.shape))}, x has {tuple(x.shape)}"
    )
    assert y.dtype == x.dtype, f"[{check}] t(x) has dtype {y.dtype} for input dtype {x.dtype}"
    log_det = t.log_abs_det_jacobian(x, y)
    assert tuple(log_det.shape) == batch, f"[{check}] log-det shape {tuple(log_det.shape)} != {batch}"
    assert log_det.dtype == x.dtype, f"[{check}] log-det has dtype {log_det.dtype} for input dtype {x.dtype}"
    # the inverse direction
    assert tuple(y0.shape) == batch + out_event, f"[{check}] (test input) latent shape {tuple(y0.shape)}"
    x0 = t.inv(y0)
    assert tuple(x0.shape) == tuple(t.inverse_shape(y0.shape)) == batch + event_shape, (
        f"[{check}] t.inv(y).shape {tuple(x0.shape)}, inverse_shape gives {tuple(t.inverse_shape(y0.shape))}"
    )
    assert x0.dtype == y0.dtype, f"[{check}] t.inv(y) has dtype {x0.dtype} for input dtype {y0.dtype}"
    inv_log_det = t.inv.log_abs_det_jacobian(y0, x0)
    assert tuple(inv_log_det.shape) == batch, f"[{check}] t.inv log-det shape {tuple(inv_log_det.shape)} != {batch}"
    if isinstance(t, Compose):
        check = "torch test_compose_transform_shapes"
        reference = torch.distributions.ComposeTransform(list(t.parts))
        assert (t.domain.event_dim, t.codomain.event_dim) == (
            reference.domain.event_dim,
            reference.codomain.event_dim,
        ), f"[{check}] event dims differ from torch's ComposeTransform of the same parts"
        shape = event_shape
        for part in t.parts:
            shape = tuple(part.forward_shape(shape))
        assert shape == out_event, f"[{check}] chained parts give {shape}, Compose.forward_shape gives {out_event}"


def check_autodiff(t, x: torch.Tensor, y0: torch.Tensor) -> None:
    """Pyro ``_test_autodiff`` (forward and ``inverse=True``), made stricter: a loss built from the output and the
    log-det has finite gradients with respect to the input and to every parameter, in both directions, and at least
    one parameter gradient is non-zero."""
    check = "pyro _test_autodiff"
    params = _params(t)
    g = torch.Generator().manual_seed(7)
    for direction in ("forward", "inverse"):
        v = (x if direction == "forward" else y0).detach().clone().requires_grad_(True)
        if direction == "forward":
            out = t(v)
            log_det = t.log_abs_det_jacobian(v, out)
        else:
            out = t.inv(v)
            log_det = t.inv.log_abs_det_jacobian(v, out)
        w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        loss = (w * out).sum() + log_det.sum()
        grads = torch.autograd.grad(loss, [v] + params, allow_unused=True)
        assert grads[0] is not None, f"[{check}] {direction}: no gradient reaches the input"
        assert torch.isfinite(grads[0]).all(), f"[{check}] {direction}: non-finite input gradient"
        names = [n for n, _ in t.named_parameters()] if params else []
        missing = [n for n, gr in zip(names, grads[1:]) if gr is None]
        assert not missing, f"[{check}] {direction}: no gradient reaches parameter(s) {missing}"
        bad = [n for n, gr in zip(names, grads[1:]) if not torch.isfinite(gr).all()]
        assert not bad, f"[{check}] {direction}: non-finite gradient of parameter(s) {bad}"
        if params:
            assert any(bool(gr.abs().sum() > 0) for gr in grads[1:]), f"[{check}] {direction}: all gradients zero"


def check_gradcheck(t, x: torch.Tensor) -> None:
    """``torch.autograd.gradcheck`` (float64) of ``x -> (t(x), log|det dt/dx|)`` on a tiny input: the backward of
    the map and of its log-det agree with finite differences."""
    assert x.dtype == torch.float64, "gradcheck needs float64"

    def fn(v):
        y = t(v)
        return y, t.log_abs_det_jacobian(v, y)

    v = x.detach().clone().requires_grad_(True)
    try:
        ok = torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-6, rtol=1e-4)
    except Exception as e:  # gradcheck raises GradcheckError with the mismatching Jacobians
        raise AssertionError(f"[torch gradcheck] forward map / log-det: {str(e).splitlines()[0]}") from None
    assert ok, "[torch gradcheck] failed"


# ----------------------------------------------------------------------------------------------- torch's checks
def check_inv_inv(t) -> None:
    """torch ``test_inv_inv``: ``t.inv.inv is t``; for pyroflows' module-aware inverse also
    ``inverse(inverse(t)) is t``, including for an :class:`~pyroflows.transforms.Inverse` built directly."""
    check = "torch test_inv_inv"
    assert t.inv.inv is t, f"[{check}] t.inv.inv is not t"
    assert pyroflows.inverse(pyroflows.inverse(t)) is t, f"[{check}] pyroflows.inverse(pyroflows.inverse(t)) is not t"
    direct = Inverse(t)
    assert direct.inv.inv is direct, f"[{check}] Inverse(t).inv.inv is not Inverse(t)"
    assert pyroflows.inverse(direct) is t, f"[{check}] pyroflows.inverse(Inverse(t)) is not t"
    if isinstance(t, Inverse):
        # A double inverse built by hand: pyroflows.inverse unwraps an Inverse to its base, so
        # inverse(inverse(Inverse(Inverse(p)))) is inverse(Inverse(p)), i.e. p. (pyroflows.inverse never builds one.)
        assert pyroflows.inverse(pyroflows.inverse(direct)) is t.base, f"[{check}] a double inverse did not unwrap"
    else:
        assert pyroflows.inverse(pyroflows.inverse(direct)) is direct, (
            f"[{check}] pyroflows.inverse(pyroflows.inverse(d)) is not d for d = Inverse(t) built directly"
        )


def check_equality(t) -> None:
    """torch ``test_equality``: a transform equals itself and its torch inverse equals itself.

    ``pyroflows.inverse(t) == pyroflows.inverse(t)`` is asserted ``True``, as torch's own inverse transforms compare
    equal when their bases are equal (``_InverseTransform.__eq__``). ``Inverse`` keeps torch's ``Transform.__eq__``
    (identity), so this holds exactly when ``pyroflows.inverse`` hands back the same module for the same ``t``; two
    ``Inverse(t)`` built directly still compare unequal (not asserted: an open decision)."""
    check = "torch test_equality"
    assert t == t, f"[{check}] t != t"
    assert not (t != t), f"[{check}] t != t is True"
    assert t.inv == t.inv, f"[{check}] t.inv != t.inv"
    assert t.inv != t, f"[{check}] t.inv == t"
    assert pyroflows.inverse(t) == pyroflows.inverse(t), f"[{check}] pyroflows.inverse(t) != pyroflows.inverse(t)"


def check_with_cache(t, x: torch.Tensor) -> None:
    """torch ``test_with_cache``: ``t.with_cache(1)`` answers the inverse of its last output with the very input,
    ``with_cache(0)`` computes the same values, and (pyroflows' promise: "a forward call always computes") a call on
    the same input tensor after an in-place parameter change returns the new value, not a cached one. torch's own
    ``t(x) is t(x)`` under ``cache_size=1`` is deliberately not asserted: it contradicts that promise. The parameter
    part needs parameters and is left out for transforms without any."""
    check = "torch test_with_cache"
    t1 = t.with_cache(1)
    assert t1._cache_size == 1, f"[{check}] with_cache(1) has cache size {t1._cache_size}"
    y = t1(x)
    assert t1.inv(y) is x, f"[{check}] with_cache(1): t.inv(t(x)) is not x"
    t0 = t1.with_cache(0)
    assert t0._cache_size == 0, f"[{check}] with_cache(0) has cache size {t0._cache_size}"
    y0 = t0(x)
    assert y0 is not y, f"[{check}] with_cache(0) answered from the cache"
    _close(y0, y, x.dtype, "with_cache(0)(x) vs with_cache(1)(x)", check)
    _close(t0.log_abs_det_jacobian(x, y0), t1.log_abs_det_jacobian(x, y), x.dtype, "log-det, cache 0 vs 1", check)
    params = _params(t)
    if not params:
        return
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.add_(0.1)
    fresh = t.with_cache(0)(x.clone())
    assert not torch.allclose(fresh, y), f"[{check}] (precondition) the parameter change did not change t(x)"
    assert not torch.allclose(t.with_cache(1)(x), y), f"[{check}] a new with_cache(1) view returned the old y"
    y_after = t1(x)
    assert not torch.allclose(y_after, y), (
        f"[{check}] with_cache(1)(x) after an in-place parameter change returned the stale cached y "
        f"(max |stale - fresh| {_max_err(y_after, fresh):.3e})"
    )
    _close(y_after, fresh, x.dtype, "with_cache(1)(x) after a parameter change vs a fresh computation", check)


def check_forward_inverse(t, x: torch.Tensor, cached: bool) -> None:
    """torch ``test_forward_inverse``: ``x`` requires grad, ``y = t(x)`` has ``forward_shape(x.shape)``, and
    ``t.inv(y)`` (``cached``: the very tensor, which may be answered from memory; otherwise a clone) has
    ``inverse_shape(y.shape)`` and equals ``x``; ``t`` of that equals ``y``."""
    check = f"torch test_forward_inverse[{'cached' if cached else 'uncached'}]"
    x = x.detach().clone().requires_grad_(True)
    assert t.domain.check(x).all(), f"[{check}] (test input) x outside t.domain"
    y = t(x)
    assert tuple(y.shape) == tuple(t.forward_shape(x.shape)), f"[{check}] y.shape != forward_shape(x.shape)"
    x2 = t.inv(y) if cached else t.inv(y.clone())
    assert tuple(x2.shape) == tuple(t.inverse_shape(y.shape)), f"[{check}] x2.shape != inverse_shape(y.shape)"
    _close(x2.detach(), x.detach(), x.dtype, "t.inv(t(x)) vs x", check)
    _close(t(x2).detach(), y.detach(), x.dtype, "t(t.inv(t(x))) vs t(x)", check)


def _autograd_jacobian(fn, point: torch.Tensor) -> torch.Tensor:
    flat = point.detach().reshape(-1).clone()
    return torch.autograd.functional.jacobian(lambda v: fn(v.reshape(point.shape)).reshape(-1), flat)


def check_batched_jacobian(t, x: torch.Tensor, y0: torch.Tensor) -> None:
    """torch ``test_jacobian`` on a batch of shape ``(n,)``: the autograd Jacobian of the batched map is block
    diagonal (no row depends on another), each row's log-det equals ``log|det|`` of its diagonal block and the
    log-det computed on that row alone; the inverse direction's log-det of each row equals the row alone's."""
    check = "torch test_jacobian (batched)"
    n = x.shape[0]
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert tuple(log_det.shape) == (n,), f"[{check}] log-det shape {tuple(log_det.shape)} != {(n,)}"
    jac = _autograd_jacobian(lambda v: t(v), x)
    d_in, d_out = x[0].numel(), y[0].numel()
    blocks = jac.reshape(n, d_out, n, d_in)
    for i in range(n):
        off = torch.cat([blocks[i, :, j] for j in range(n) if j != i], dim=-1)
        assert bool((off.abs() <= tol(x.dtype)["atol"]).all()), (
            f"[{check}] output row {i} depends on other rows (max |dy_i/dx_j| {float(off.abs().max()):.3e})"
        )
        block = blocks[i, :, i]
        sign, expected = torch.linalg.slogdet(block.double())
        assert sign != 0, f"[{check}] row {i}: singular Jacobian block"
        _close(log_det[i], expected.to(log_det.dtype), x.dtype, f"row {i} log-det vs log|det| of its Jacobian", check)
        xi = x[i].clone()
        _close(log_det[i], t.log_abs_det_jacobian(xi, t(xi)), x.dtype, f"row {i} log-det vs the row alone", check)
    x0 = t.inv(y0)
    inv_log_det = t.inv.log_abs_det_jacobian(y0, x0)
    for i in range(n):
        yi = y0[i].clone()
        xi = t.inv(yi)
        _close(inv_log_det[i], t.inv.log_abs_det_jacobian(yi, xi), x.dtype, f"inverse row {i} vs the row alone", check)


def check_transformed_distribution(t, base, event_shape, batch_shape) -> None:
    """torch ``test_transformed_distribution_shapes`` and Pyro ``_test_shape``'s sampling:
    ``TransformedDistribution(base, [t])`` has ``batch_shape`` and event shape ``t.forward_shape(base event)``; its
    samples have the right shape and finite ``log_prob`` (the same for the sample and a clone of it, i.e. with and
    without the remembered pair); ``.expand((2,) + batch_shape)`` samples and scores with the expanded shape."""
    check = "torch test_transformed_distribution_shapes"
    batch_shape, event_shape = tuple(batch_shape), tuple(event_shape)
    d = dist.TransformedDistribution(base, [t])
    assert tuple(d.batch_shape) == batch_shape, f"[{check}] batch_shape {tuple(d.batch_shape)} != {batch_shape}"
    assert tuple(d.event_shape) == event_shape, f"[{check}] event_shape {tuple(d.event_shape)} != {event_shape}"
    torch.manual_seed(0)
    s = d.sample((2,))
    assert tuple(s.shape) == (2,) + batch_shape + event_shape, f"[{check}] sample shape {tuple(s.shape)}"
    lp = d.log_prob(s)
    assert tuple(lp.shape) == (2,) + batch_shape, f"[{check}] log_prob shape {tuple(lp.shape)}"
    assert torch.isfinite(lp).all(), f"[{check}] non-finite log_prob of samples: {lp.flatten().tolist()}"
    _close(d.log_prob(s.clone()), lp, s.dtype, "log_prob of a cloned sample vs of the sample", check)
    r = d.rsample()
    assert tuple(r.shape) == batch_shape + event_shape, f"[{check}] rsample shape {tuple(r.shape)}"
    expanded_shape = (2,) + batch_shape
    e = d.expand(expanded_shape)
    assert tuple(e.batch_shape) == expanded_shape, f"[{check}] expand: batch_shape {tuple(e.batch_shape)}"
    assert tuple(e.event_shape) == event_shape, f"[{check}] expand: event_shape {tuple(e.event_shape)}"
    es = e.sample()
    assert tuple(es.shape) == expanded_shape + event_shape, f"[{check}] expand: sample shape {tuple(es.shape)}"
    elp = e.log_prob(es)
    assert tuple(elp.shape) == expanded_shape, f"[{check}] expand: log_prob shape {tuple(elp.shape)}"
    assert torch.isfinite(elp).all(), f"[{check}] expand: non-finite log_prob of samples"
    elp2 = e.log_prob(s[0].clone())  # broadcast over the new leading batch dim
    assert tuple(elp2.shape) == expanded_shape, f"[{check}] expand: broadcast log_prob shape {tuple(elp2.shape)}"
    _close(elp2[0], lp[0], s.dtype, "expanded log_prob vs the original's", check)


def check_sign(t, expected: int, name: str) -> None:
    """torch ``test_transform_sign`` for an event-dim-0 map: ``t.sign`` is the sign of its derivative (torch's
    composition multiplies its parts' signs, its inverse keeps its base's sign)."""
    check = "torch test_transform_sign"
    x = torch.linspace(-2.0, 2.0, 5).requires_grad_(True)
    (derivative,) = torch.autograd.grad(t(x).sum(), [x])
    assert bool((derivative * expected > 0).all()), (
        f"[{check}] (test input) {name} is not monotone with sign {expected}"
    )
    assert t.sign == expected, f"[{check}] {name}.sign is {t.sign}, not {expected}"


def check_sign_cdf(t, expected, name: str) -> None:
    """``TransformedDistribution.cdf`` flips the base cdf by the transforms' sign: ``Normal(0, 1)`` pushed through
    ``t`` has the cdf of the ``expected`` distribution."""
    check = "torch test_transform_sign: cdf"
    value = torch.tensor(1.0)
    got = float(dist.TransformedDistribution(dist.Normal(0.0, 1.0), [t]).cdf(value))
    want = float(expected.cdf(value))
    assert abs(got - want) < 1e-6, (
        f"[{check}] TransformedDistribution(Normal(0, 1), [{name}]).cdf(1.0) = {got:.6f}, expected {want:.6f}"
    )


def check_domain_codomain(t, x: torch.Tensor, y0: torch.Tensor) -> None:
    """torch's domain / codomain assertions: drawn inputs lie in ``t.domain`` and their images in ``t.codomain``;
    latents lie in ``t.codomain`` and their preimages in ``t.domain``."""
    check = "torch domain/codomain"
    assert t.domain.check(x).all(), f"[{check}] (test input) drawn x outside t.domain {t.domain}"
    y = t(x)
    assert t.codomain.check(y).all(), f"[{check}] t(x) outside t.codomain {t.codomain}"
    assert t.codomain.check(y0).all(), f"[{check}] (test input) latent y outside t.codomain {t.codomain}"
    x0 = t.inv(y0.clone())
    assert t.domain.check(x0).all(), f"[{check}] t.inv(y) outside t.domain {t.domain}"


def check_logit_endpoints(alpha: float, dtype: torch.dtype) -> None:
    """torch's domain / codomain check at the closed ends of :class:`~pyroflows.transforms.Logit`'s domain: for
    ``x`` exactly 0 and 1, ``t(x)`` lies in ``t.codomain``, ``t.inv`` accepts it (a clone, so it is computed) and
    returns a point of ``t.domain`` close to ``x``."""
    check = f"torch domain/codomain: Logit({alpha}) endpoints, {dtype}"
    t = Logit(alpha)
    x = torch.tensor([0.0, 1.0], dtype=dtype).reshape(1, 1, 2)
    assert t.domain.check(x).all(), f"[{check}] (test input) 0 and 1 not in t.domain"
    y = t(x)
    assert torch.isfinite(y).all(), f"[{check}] t(x) not finite: {y.flatten().tolist()}"
    codomain = t.codomain
    ok = codomain.check(y)
    assert ok.all(), (
        f"[{check}] t(0), t(1) = {y.flatten().tolist()} outside the codomain "
        f"[{codomain.base_constraint.lower_bound}, {codomain.base_constraint.upper_bound}]"
    )
    try:
        x2 = t.inv(y.clone())
    except Exception as e:
        raise AssertionError(f"[{check}] t.inv(t(x).clone()) raised {type(e).__name__}: {e}") from None
    _close(
        x2,
        x,
        dtype,
        "t.inv(t(x)) vs x at the endpoints",
        check,
        **(dict(atol=1e-6, rtol=0) if dtype == torch.float32 else {}),
    )
    assert t.domain.check(x2).all(), f"[{check}] t.inv(t(x)) = {x2.flatten().tolist()} outside the domain [0, 1]"


def _round_trip(t, how: str):
    if how == "copy.deepcopy":
        return copy.deepcopy(t)
    if how == "pickle":
        return pickle.loads(pickle.dumps(t))
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def check_copies(t, x: torch.Tensor) -> None:
    """torch ``test_save_load_transform``, for each of ``copy.deepcopy``, ``pickle`` and ``torch.save`` /
    ``torch.load`` (BytesIO, ``weights_only=False``), taken after the transform was used (an output, its log-det
    and ``t.inv`` exist): the copy computes the same outputs, log-dets and inverse, and is a separate module (no
    storage in common; changing the copy's parameters changes neither the original's parameters nor its outputs).
    A ``TransformedDistribution`` over ``t`` survives the same round trips with the same ``log_prob``."""
    params = _params(t)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    inv = t.inv  # torch keeps the inverse in ``_inv``: it must not break serialisation
    assert inv.inv is t
    before = [p.detach().clone() for p in params]
    for how in ("copy.deepcopy", "pickle", "torch.save"):
        check = f"torch test_save_load_transform[{how}]"
        c = _round_trip(t, how)
        assert c is not t
        xc = x.clone()
        yc = c(xc)
        _close(yc, y, x.dtype, "copy's t(x) vs the original's", check, atol=0.0, rtol=0.0)
        _close(c.log_abs_det_jacobian(xc, yc), log_det, x.dtype, "copy's log-det vs the original's", check)
        _close(c.inv(yc.clone()), x, x.dtype, "copy's inverse of t(x) vs x", check)
        assert c.inv.inv is c, f"[{check}] the copy's c.inv.inv is not c"
        ptrs = {v.data_ptr() for v in _tensors(t)}
        aliased = [
            n for n, v in list(c.named_parameters()) + list(c.named_buffers()) if v.numel() and v.data_ptr() in ptrs
        ]
        assert not aliased, f"[{check}] the copy aliases the original's storage: {aliased}"
        if params:
            with torch.no_grad():
                for p in c.parameters():
                    p.add_(1.0)
            assert all(torch.equal(b, p) for b, p in zip(before, params)), (
                f"[{check}] changing the copy's parameters changed the original's"
            )
            _close(t(x.clone()), y, x.dtype, "original's t(x) after the copy was changed", check, atol=0.0, rtol=0.0)
            assert not torch.allclose(c(x.clone()), y), f"[{check}] (precondition) changing the copy changed nothing"


def check_distribution_copies(d, value: torch.Tensor) -> None:
    """torch ``test_save_load_transform`` proper: a ``TransformedDistribution`` that has evaluated ``log_prob``
    survives ``torch.save`` / ``torch.load`` and pickling with the same ``log_prob``."""
    lp = d.log_prob(value)
    for how in ("pickle", "torch.save"):
        check = f"torch test_save_load_transform[TransformedDistribution, {how}]"
        other = _round_trip(d, how)
        _close(other.log_prob(value.clone()), lp, value.dtype, "log_prob after the round trip", check)


def is_real(constraint) -> bool:
    """Whether ``constraint`` is the whole space (``real``, possibly reinterpreted as an event)."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint is constraints.real


def held_fixed_log_q(q, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sticking-the-landing gradient's held-fixed ``log q`` of a copy of ``value`` (parameters frozen, through
    the flow's inverse; :func:`pyroflows.elbo.fixed_log_prob`) and its gradient in the draw: what a warm-started
    inverse must reproduce from a cold solve."""
    from pyroflows.elbo import fixed_log_prob

    v = value.detach().requires_grad_()
    lp = fixed_log_prob(q, v)
    (grad,) = torch.autograd.grad(lp.sum(), v)
    return lp.detach(), grad
