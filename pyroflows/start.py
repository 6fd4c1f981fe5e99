"""A Gaussian start for a guide: placed on a Laplace approximation of the posterior when it starts out of reach.

pyroflows' vector builders end in an elementwise affine map ``y = x * exp(s) + b`` on the guide's standard-normal
base, and start as (or near) the identity: the guide starts as N(0, I) in the model's unconstrained space. Pyro's
Gaussian autoguides start at their ``init_loc_fn`` point (a prior median or a feasible point) with scale 0.1. An
optimiser moves a location or a log scale by about its learning rate per step, so a posterior far from that start
(an intercept near 1000 with a N(0, 100²) prior, or one a hundred times narrower than the start in every
coordinate) is out of reach of a run of a few thousand steps.

:func:`gaussian_start` finds Gaussian approximations of the posterior by damped, saddle-free Newton steps on the log
joint density in unconstrained space, from the guide's centre (the origin for a flow): every iterate where the
negative Hessian ``H`` is positive definite is a candidate ``N(z, H⁻¹)``. Each candidate is scored by the
importance-weighted bound of the guide placed on it: a flow's output affine map gets ``b = z`` and the marginal
standard deviations (the rest of the flow is kept; each component of a mixture of flows the same, around ``z``),
Pyro's ``AutoNormal`` and ``AutoDiagonalNormal`` the same
location and scales, ``AutoMultivariateNormal`` the whole covariance, ``AutoLowRankMultivariateNormal`` its
probabilistic PCA. The best is kept when it beats the guide as built by more than ``margin`` nats per latent
coordinate (``mode="auto"``, what :func:`pyroflows.infer.fit` does), or always (``mode="gaussian"``).

Why a margin and not "whenever it is better": on hierarchical (funnel-shaped) posteriors the mode lies in the
neck and the best Gaussian there beats the origin by a few nats, yet a flow started from it ends worse than one
started from the origin. The start is for posteriors that the run cannot otherwise reach; there the margin is
hundreds to hundreds of thousands of nats per coordinate, while on the guide benchmark's posteriors, and on a
31-coefficient logistic regression, it was at most 3.2 (``python benchmarks/start_gate.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch.distributions import biject_to, transform_to

from .transforms import ActNorm, Inverse

__all__ = ["START_MARGIN", "START_MAX_DIM", "flow_output_affine", "gaussian_start", "output_affine"]

#: ``mode="auto"`` takes the Gaussian start when its importance-weighted bound beats the guide as built by more
#: than this many nats per latent coordinate
START_MARGIN = 10.0
#: ``mode="auto"`` leaves guides of more latent coordinates as built (each Newton step computes the Hessian: one
#: batched backward pass per :data:`HESSIAN_CHUNK` coordinates)
START_MAX_DIM = 256
#: coordinates per batched backward pass of the Newton run's Hessians
HESSIAN_CHUNK = 16
#: the narrowest candidate standard deviation, in units in the last place of the location (see ``_resolvable``)
MIN_SPREAD_ULPS = 10
#: Newton steps at most, and importance draws per candidate
MAX_NEWTON_STEPS = 50
IW_DRAWS = 256
MODES = ("auto", "gaussian")


def output_affine(guide) -> ActNorm | None:
    """The guide's output affine map ``y = x * exp(s) + b`` (the ``ActNorm`` it inverts), or ``None``.

    It is the last layer of the flow that pyroflows' vector builders (``planar_flow``, ``realnvp``,
    ``autoregressive_flow``, ``spline_flow``, ``residual_flow``) put on a guide's base; the guide must be built
    (:func:`pyroflows.infer.sync_param_store`, or one call). Found through nested ``Compose`` layers (so also under
    ``AutoFlow(..., heavy_tails=True)``).

    :param guide: an ``AutoNormalizingFlow`` (or :class:`~pyroflows.AutoFlow`).
    :returns: the ``ActNorm`` whose ``bias`` is ``b`` and ``log_scale`` is ``s``, or ``None``.

    Example::

        >>> import pyro, pyro.distributions as dist, pyroflows
        >>> from functools import partial
        >>> from pyroflows.infer import sync_param_store
        >>> from pyroflows.start import output_affine
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        >>> pyro.clear_param_store()
        >>> guide = pyroflows.AutoFlow(model, partial(pyroflows.realnvp, num_layers=2))
        >>> _ = sync_param_store(guide)
        >>> output_affine(guide).bias.shape
        torch.Size([3])
    """
    t = (getattr(guide, "_modules", None) or {}).get("transform") or getattr(guide, "__dict__", {}).get("transform")
    return flow_output_affine(t, getattr(guide, "latent_dim", -1))


def flow_output_affine(flow, dim: int) -> ActNorm | None:
    """The output affine map of a vector flow on ``dim`` coordinates (see :func:`output_affine`), or ``None``.

    :param flow: a transform.
    :param int dim: the number of coordinates the map must act on.
    :returns: the ``ActNorm`` whose ``bias`` is ``b`` and ``log_scale`` is ``s``, or ``None``.

    Example::

        >>> import pyroflows
        >>> flow_output_affine(pyroflows.realnvp(3, num_layers=2), 3).bias.shape
        torch.Size([3])
    """
    t = flow
    while getattr(t, "parts", None):
        t = t.parts[-1]
    if not (isinstance(t, Inverse) and isinstance(t.base, ActNorm)):
        return None
    affine = t.base
    return affine if tuple(affine.bias.shape) == (dim,) else None


def _log_joint(model, sites, args: tuple, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``z -> log p(x, T(z)) + log|det T'(z)|`` for a point ``z`` of a guide's unconstrained latent space (``sites(z)``
    yields each latent site with its unconstrained value): the density the guide approximates. The model runs with a
    fixed torch seed, so a subsampled plate sees one minibatch at every point."""
    from pyro import poutine

    def f(z: torch.Tensor) -> torch.Tensor:
        values, log_jac = {}, z.new_zeros(())
        for site, u in sites(z):
            t = biject_to(site["fn"].support)
            v = t(u)
            log_jac = log_jac + t.log_abs_det_jacobian(u, v).sum()
            values[site["name"]] = v
        with torch.random.fork_rng(devices=[]), poutine.block():
            torch.manual_seed(0)
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
            return trace.log_prob_sum() + log_jac

    return f


def _assign(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a parameter of a ``PyroModule`` (constrained or not; ``name`` may be dotted) in place, so the param
    store, which holds the same tensor, sees it too."""
    *path, leaf = name.split(".")
    for part in path:
        module = module._modules[part]
    constraint = getattr(module, "_pyro_params", {}).get(leaf, (None,))[0]
    if constraint is not None:
        target, value = module._parameters[leaf + "_unconstrained"], transform_to(constraint).inv(value)
    else:
        target = module._parameters[leaf]
    with torch.no_grad():
        target.copy_(value.to(target))


def _at(value: torch.Tensor, init: float) -> bool:
    return bool(torch.allclose(value.detach(), torch.full_like(value, init), rtol=1e-5, atol=0.0))


class _Start:
    """What :func:`gaussian_start` needs of one kind of guide: its latent sites, where it is centred, whether it is
    still as built, and how to place it on ``N(z, cov)``."""

    def __init__(self, guide):
        self.guide = guide

    def sites(self, z: torch.Tensor):
        return self.guide._unpack_latent(z)

    def origin(self) -> torch.Tensor:
        return self.guide.loc.detach().clone()

    def at_start(self) -> bool:
        return _at(self.guide.scale, self.guide._init_scale)

    def place(self, z: torch.Tensor, cov: torch.Tensor) -> None:
        _assign(self.guide, "loc", z)
        _assign(self.guide, "scale", cov.diagonal().sqrt())

    def resolvable(self, z: torch.Tensor, cov: torch.Tensor) -> bool:
        """Whether ``N(z, cov)`` placed on the guide is representable (:func:`_resolvable`): a diagonal guide draws
        each coordinate on its own, with its marginal standard deviation around its own location."""
        return _resolvable(z, cov.diagonal().sqrt(), z.abs())

    @property
    def dim(self) -> int:
        return int(self.guide.latent_dim)


class _FlowStart(_Start):
    """Flow guides ending in pyroflows' output affine map: one flow, or the components of a mixture of flows
    (:class:`pyroflows.AutoFlowMixture`). Each map gets the candidate's scales and the location ``z + sd * offset``,
    its start offset (0 for one flow; for a mixture's component, where it started, a draw from
    ``N(0, spread² I)``) in units of the candidate's standard deviations; the rest (layers, weights) is kept."""

    def __init__(self, guide, affines: list[ActNorm], offsets: torch.Tensor):
        super().__init__(guide)
        self.affines, self.offsets = affines, offsets

    def origin(self) -> torch.Tensor:
        return self.offsets.new_zeros(self.dim)

    def at_start(self) -> bool:
        return all(
            torch.equal(a.bias.detach(), o) and not bool(a.log_scale.detach().any())
            for a, o in zip(self.affines, self.offsets)
        )

    def place(self, z: torch.Tensor, cov: torch.Tensor) -> None:
        sd = cov.diagonal().sqrt()
        with torch.no_grad():
            for affine, offset in zip(self.affines, self.offsets):
                affine.bias.copy_((z + sd * offset.to(z)).to(affine.bias))
                affine.log_scale.copy_(sd.log().to(affine.log_scale))


class _MultivariateStart(_Start):
    """Pyro's ``AutoMultivariateNormal``: ``scale[:, None] * scale_tril`` (unit lower triangular) is the Cholesky
    factor of the whole inverse negative Hessian."""

    def at_start(self) -> bool:
        tril = self.guide.scale_tril.detach()
        return super().at_start() and bool(torch.equal(tril, torch.eye(self.dim, dtype=tril.dtype)))

    def resolvable(self, z: torch.Tensor, cov: torch.Tensor) -> bool:
        """A full covariance is scored along its principal axes, each of which mixes every coordinate: its
        narrowest standard deviation against the largest ``|z|``."""
        spreads = torch.linalg.eigvalsh(cov).clamp(min=0.0).sqrt()
        return _resolvable(z, spreads, z.abs().max().expand_as(spreads))

    def place(self, z: torch.Tensor, cov: torch.Tensor) -> None:
        chol = torch.linalg.cholesky(cov)
        scale = chol.diagonal()
        _assign(self.guide, "loc", z)
        _assign(self.guide, "scale", scale)
        _assign(self.guide, "scale_tril", chol / scale[:, None])


class _LowRankStart(_MultivariateStart):
    """Pyro's ``AutoLowRankMultivariateNormal``: covariance ``diag(s) (F Fᵀ + I) diag(s)`` with ``F`` of ``rank``
    columns. Placed by probabilistic PCA (Tipping & Bishop 1999) of the correlation matrix ``R`` of ``cov``:
    ``R ≈ W Wᵀ + σ² I`` with ``σ²`` the mean of the eigenvalues left out and ``W = U (Λ - σ²)^½`` on the ``rank``
    largest, then ``s = σ`` times the marginal standard deviations and ``F = W / σ``. Exact when ``rank`` is
    ``D - 1`` or the left-out eigenvalues are equal."""

    def at_start(self) -> bool:
        return _at(self.guide.scale, 0.5**0.5 * self.guide._init_scale)

    def place(self, z: torch.Tensor, cov: torch.Tensor) -> None:
        sd = cov.diagonal().sqrt()
        ev, vec = torch.linalg.eigh(cov / sd[:, None] / sd[None, :])  # ascending
        rank = self.guide.cov_factor.shape[-1]
        kept = min(rank, self.dim - 1)
        noise = ev[: self.dim - kept].mean().clamp(min=torch.finfo(ev.dtype).eps)
        w = vec[:, self.dim - kept :] * (ev[self.dim - kept :] - noise).clamp(min=0.0).sqrt()
        factor = torch.cat([w, w.new_zeros(self.dim, rank - kept)], -1) / noise.sqrt()
        _assign(self.guide, "loc", z)
        _assign(self.guide, "scale", sd * noise.sqrt())
        _assign(self.guide, "cov_factor", factor)


class _NormalStart(_Start):
    """Pyro's ``AutoNormal``: one ``locs.<site>`` and ``scales.<site>`` per latent site, in the prototype trace's
    order."""

    def __init__(self, guide):
        super().__init__(guide)
        self.names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
        self.nodes = dict(guide.prototype_trace.iter_stochastic_nodes())
        self.shapes = [self._get("locs", name).shape for name in self.names]

    def _get(self, group: str, name: str) -> torch.Tensor:
        from operator import attrgetter

        return attrgetter(name)(getattr(self.guide, group)).detach()

    def sites(self, z: torch.Tensor):
        start = 0
        for name, shape in zip(self.names, self.shapes):
            size = shape.numel()
            yield self.nodes[name], z[..., start : start + size].reshape(z.shape[:-1] + shape)
            start += size

    def origin(self) -> torch.Tensor:
        return torch.cat([self._get("locs", name).reshape(-1) for name in self.names])

    def at_start(self) -> bool:
        return all(_at(self._get("scales", name), self.guide._init_scale) for name in self.names)

    def place(self, z: torch.Tensor, cov: torch.Tensor) -> None:
        sd, start = cov.diagonal().sqrt(), 0
        for name, shape in zip(self.names, self.shapes):
            size = shape.numel()
            _assign(self.guide.locs, name, z[start : start + size].reshape(shape))
            _assign(self.guide.scales, name, sd[start : start + size].reshape(shape))
            start += size

    @property
    def dim(self) -> int:
        return sum(shape.numel() for shape in self.shapes)


def _adapter(guide) -> _Start | str:
    """The guide's :class:`_Start`, or why it has none."""
    from pyro.infer.autoguide import (
        AutoDiagonalNormal,
        AutoLowRankMultivariateNormal,
        AutoMultivariateNormal,
        AutoNormal,
    )

    affine = output_affine(guide)
    if affine is not None:
        return _FlowStart(guide, [affine], torch.zeros_like(affine.bias.detach())[None])
    flows = (getattr(guide, "_modules", None) or {}).get("transform")
    if isinstance(getattr(flows, "offsets", None), torch.Tensor):  # AutoFlowMixture's MixtureFlows
        affines = [flow_output_affine(flow, getattr(guide, "latent_dim", -1)) for flow in flows]
        if all(a is not None for a in affines):
            return _FlowStart(guide, affines, flows.offsets)
    kinds = {
        AutoNormal: _NormalStart,
        AutoDiagonalNormal: _Start,
        AutoMultivariateNormal: _MultivariateStart,
        AutoLowRankMultivariateNormal: _LowRankStart,
    }
    if type(guide) in kinds:
        if any(
            (f.full_size or f.size) != f.size
            for _, site in guide.prototype_trace.iter_stochastic_nodes()
            for f in site["cond_indep_stack"]
        ):
            return "a latent site is in a subsampled plate (each step sees other locs and scales)"
        return kinds[type(guide)](guide)
    return (
        "the guide is neither a flow (or a mixture of flows) ending in pyroflows' output affine map nor Pyro's "
        "AutoNormal, "
        "AutoDiagonalNormal, AutoMultivariateNormal or AutoLowRankMultivariateNormal"
    )


def _resolvable(z: torch.Tensor, spreads: torch.Tensor, magnitudes: torch.Tensor) -> bool:
    """Whether a Gaussian at ``z`` with standard deviations ``spreads`` can be drawn from and scored in ``z``'s
    dtype (the guide's: the Newton run keeps its start's): each at least :data:`MIN_SPREAD_ULPS` units in the last
    place of its ``magnitudes`` (at least 1). A narrower one (the Laplace approximation far down a funnel's neck,
    1e-10 wide around values of order 1) rounds its draws onto a few points, and its importance-weighted bound comes
    out far above ``log Z``: not a bound at all."""
    return bool((spreads >= MIN_SPREAD_ULPS * torch.finfo(z.dtype).eps * magnitudes.clamp(min=1.0)).all())


def _value(f, z: torch.Tensor) -> float:
    """``f(z)`` as a float, ``-inf`` where the model fails or is not finite there."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a probe far out (Pyro's "Encountered NaN"): scored -inf below
            v = float(f(z))
    except (ValueError, RuntimeError, AssertionError):
        return -math.inf
    return v if math.isfinite(v) else -math.inf


def _grad_and_hessian(f, z: torch.Tensor, chunk: int = HESSIAN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``∇f(z)`` and ``∇²f(z)`` (float64) from one forward pass: the gradient with its graph, then its
    Hessian-vector products ``chunk`` basis vectors at a time (batched backward passes, ``is_grads_batched``).
    Where an operation of the model has no batched rule, one backward pass per coordinate."""
    x = z.detach().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in _value: a non-finite gradient ends the Newton run
        g = torch.autograd.grad(f(x), x, create_graph=True)[0]
    basis = torch.eye(len(x), dtype=x.dtype, device=x.device)
    if not g.requires_grad:  # f is linear in z
        return g.detach().double(), torch.zeros_like(basis, dtype=torch.float64)
    try:
        rows = [torch.autograd.grad(g, x, e, retain_graph=True, is_grads_batched=True)[0] for e in basis.split(chunk)]
    except RuntimeError:  # no batched rule for an operation of the model (vmap)
        rows = [torch.autograd.grad(g, x, e, retain_graph=True)[0][None] for e in basis]
    return g.detach().double(), torch.cat(rows).detach().double()


def _newton(f, z: torch.Tensor, max_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Saddle-free damped Newton ascent on ``f`` from ``z``: the step ``V diag(1/(|λ| + μ)) Vᵀ g`` on the
    eigen-decomposition of the negative Hessian (Dauphin et al. 2014), ``μ`` raised until the step improves
    ``f``. Returns ``(z, cov)`` at every iterate whose negative Hessian is positive definite, ``cov`` its inverse
    (float64)."""
    out = []
    fz, converged = _value(f, z), False
    if fz == -math.inf:
        return out
    mu = 1e-4  # a quadratic log density is maximised by the first step; raised where a step does not improve f
    for step in range(max_steps + 1):
        try:
            g, h = _grad_and_hessian(f, z)
        except (ValueError, RuntimeError, AssertionError):
            break
        if not (torch.isfinite(g).all() and torch.isfinite(h).all()):
            break
        ev, vec = torch.linalg.eigh(-(h + h.T) / 2)
        if ev.min() > 0:
            out.append((z.detach().clone(), (vec / ev) @ vec.T))
        if converged or step == max_steps:
            break
        gv = vec.T @ g
        for _ in range(40):
            trial = z + (vec @ (gv / (ev.abs() + mu))).to(z.dtype)
            new = _value(f, trial)
            if new > fz:
                converged = new - fz <= 1e-7 * max(1.0, abs(fz))
                z, fz, mu = trial, new, max(mu / 3.0, 1e-8)
                break
            mu *= 4.0
        else:
            break  # no step improves f: a maximum to the precision of f, or a direction Newton cannot follow
    return out


def _iw_bound(model, guide, args: tuple, kwargs: dict) -> float:
    from .diagnostics import importance_weighted_elbo

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the diagnostics' notes (a subsampled plate, a one-at-a-time fallback)
            # the same draws of the base noise for every candidate (common random numbers): compared, not estimated
            return importance_weighted_elbo(model, guide, IW_DRAWS, args, kwargs, seed=0)
    except (ValueError, RuntimeError, NotImplementedError):
        return -math.inf


def gaussian_start(model, guide, *args, mode: str = "auto", margin: float = START_MARGIN, **kwargs) -> dict:
    r"""Place a guide on a Gaussian approximation of the posterior, where its start is out of the optimiser's
    reach.

    Damped saddle-free Newton steps on the log joint density (in the guide's unconstrained space, from the guide's
    centre) give candidates ``N(z, H⁻¹)`` at every iterate where the negative Hessian ``H`` is positive definite;
    each is scored by the importance-weighted bound (256 draws) of the guide placed on it, except one too narrow to
    draw from in the guide's dtype (a standard deviation under :data:`MIN_SPREAD_ULPS` units in the last place of
    its location: far down a funnel's neck), whose bound would not be a bound. ``mode="auto"`` keeps the
    best candidate when its bound exceeds the guide's as built by more than ``margin`` nats per latent coordinate
    (:data:`START_MARGIN`, 10: a posterior about 4.5 standard deviations off, or five times narrower, in every
    coordinate), and leaves guides of more than :data:`START_MAX_DIM` coordinates as built; ``mode="gaussian"``
    keeps the best candidate in any case. :func:`pyroflows.infer.fit` calls it with ``mode="auto"`` (its
    ``start=``).

    Which guides are placed, and how:

    * a flow guide whose flow ends in pyroflows' output affine map (every pyroflows vector builder, under
      ``AutoFlow`` or ``AutoNormalizingFlow``, heavy tails or not): the map gets ``b = z`` and ``s`` the log marginal
      standard deviations, the rest of the flow is kept;
    * :class:`pyroflows.AutoFlowMixture`: every component's map likewise, its location ``b = z + sd * offset``
      (``offset``: where it started, a draw from ``N(0, spread² I)``, so the components keep their spread in units
      of the candidate's standard deviations ``sd``);
    * Pyro's ``AutoNormal`` and ``AutoDiagonalNormal``: their locations and scales likewise;
    * Pyro's ``AutoMultivariateNormal``: the whole covariance ``H⁻¹``;
    * Pyro's ``AutoLowRankMultivariateNormal``: the marginal standard deviations, and probabilistic PCA of the
      correlation matrix of ``H⁻¹`` in its ``rank`` factors (exact for ``rank = D - 1``).

    Only a guide at its start is moved: a flow's map still at ``b = 0``, ``s = 0`` (a mixture's at ``b = offset``); a
    Pyro guide's scales still at its ``init_scale`` (``√½ · init_scale`` for the low-rank guide, and
    ``AutoMultivariateNormal``'s ``scale_tril`` the identity). A guide that has been trained (or loaded) is left
    alone, and so is one of another kind, or a Pyro guide with a latent site in a subsampled plate (with
    ``mode="auto"``; ``mode="gaussian"`` raises ``ValueError`` for it). A guide left alone is as it was bit for
    bit, and the global random state is left as it was.

    :param model: the Pyro model.
    :param guide: one of the guides above; built here if it is not yet.
    :param args: the model's positional arguments.
    :param str mode: ``"auto"`` or ``"gaussian"``.
    :param float margin: ``mode="auto"``'s threshold, nats per latent coordinate.
    :param kwargs: the model's keyword arguments.
    :returns: ``{"used": bool, "reason": str, "bound_identity": float, "bound_gaussian": float}`` (the bounds
        ``nan`` where not computed).

    Example::

        >>> import pyro, pyro.distributions as dist, pyroflows, torch
        >>> from functools import partial
        >>> from pyroflows.start import gaussian_start, output_affine
        >>> def model(y):
        ...     a = pyro.sample("a", dist.Normal(0.0, 1000.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(a, 1.0), obs=y)
        >>> y = 500.0 + torch.randn(100, generator=torch.Generator().manual_seed(0))
        >>> pyro.clear_param_store()
        >>> guide = pyroflows.AutoFlow(model, partial(pyroflows.realnvp, num_layers=2))
        >>> info = gaussian_start(model, guide, y)
        >>> info["used"], round(float(output_affine(guide).bias.detach()), 1) == round(float(y.mean()), 1)
        (True, True)
    """
    from .infer import sync_param_store
    from .run import check_choice, check_number, rng_state, set_rng_state

    check_choice("gaussian_start", "mode", mode, MODES)
    check_number("gaussian_start", "margin", margin, 0, low_open=False)
    report = {"used": False, "reason": "", "bound_identity": math.nan, "bound_gaussian": math.nan}
    state = rng_state()
    try:
        sync_param_store(guide, *args, **kwargs)
        start = _adapter(guide)
        if isinstance(start, str):
            report["reason"] = start
            if mode == "gaussian":
                raise ValueError(f"gaussian_start: {start}; got {type(guide).__name__}")
            return report
        if not start.at_start():
            report["reason"] = "the guide is not at its start (trained or loaded): left as it is"
            return report
        dim = start.dim
        if mode == "auto" and dim > START_MAX_DIM:
            report["reason"] = f"{dim} latent coordinates, more than START_MAX_DIM={START_MAX_DIM}"
            return report
        origin = start.origin()
        candidates = _newton(_log_joint(model, start.sites, args, kwargs), origin, MAX_NEWTON_STEPS)
        saved = {k: v.detach().clone() for k, v in guide.state_dict().items()}
        report["bound_identity"] = _iw_bound(model, guide, args, kwargs)
        best, best_bound, narrow = None, -math.inf, 0
        for z, cov in candidates:
            if not start.resolvable(z, cov):
                narrow += 1
                continue
            try:
                start.place(z, cov)
            except (ValueError, RuntimeError):  # torch.linalg.cholesky of a nearly singular covariance
                continue
            bound = _iw_bound(model, guide, args, kwargs)
            if bound > best_bound:
                best, best_bound = (z, cov), bound
        report["bound_gaussian"] = best_bound
        if best is None and narrow:
            report["reason"] = (
                f"no Gaussian approximation was found: the {narrow} found were too narrow to draw from in "
                f"{origin.dtype} (a funnel's neck?)"
            )
        elif best is None:
            report["reason"] = "no Gaussian approximation was found (no point where the log density is concave)"
        elif mode == "gaussian" or best_bound - report["bound_identity"] > margin * dim:
            start.place(*best)
            report["used"] = True
            gain = best_bound - report["bound_identity"]
            report["reason"] = f"the Gaussian start's bound is {gain:.4g} nats above the guide's as built"
            return report
        else:
            report["reason"] = f"the guide as built is within {margin:g} nats per coordinate of the Gaussian start"
        with torch.no_grad():  # as built, bit for bit
            for k, v in guide.state_dict().items():
                v.copy_(saved[k])
        return report
    finally:
        set_rng_state(state)
