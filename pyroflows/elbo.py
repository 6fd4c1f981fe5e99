r"""The sticking-the-landing gradient (Roeder, Wu & Duvenaud 2017) for Pyro guides: :class:`TraceSTL_ELBO`.

The reparameterised ELBO gradient has two parts: the *path* derivative, through the sample :math:`z = T_\phi(\epsilon)`,
and the *score* :math:`\nabla_\phi \log q_\phi(z)` at fixed :math:`z`. The score's expectation is zero, so dropping it
leaves the gradient unbiased; and where :math:`q` equals the posterior the path derivative is exactly zero for every
draw, so the estimator's variance vanishes as the guide converges. That is the gradient Agrawal, Sheldon & Domke
(2020) found to matter most for flow guides.

Dropping the score means evaluating :math:`\log q` at the sampled :math:`z` with the guide's parameters *held fixed*
but differentiable in :math:`z`: :func:`fixed_log_prob`. For a flow guide it runs the flow's inverse on a copy of
:math:`z` (so no remembered pair is reused), with every parameter of the flow's modules held fixed. That costs one
inverse pass per step: as cheap as the forward for couplings, a fixed-point solve for residual flows, :math:`D`
passes for Pyro's inverse autoregressive layers.
"""

from __future__ import annotations

import warnings
import weakref

import pyro.distributions as dist
import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO
from torch import nn
from torch.distributions.utils import _sum_rightmost

__all__ = ["SampleDependentError", "TraceSTL_ELBO", "fixed_log_prob"]


def _modules(fn) -> list[nn.Module]:
    """Every ``nn.Module`` among the transforms of ``fn`` and its base distributions (deduplicated)."""
    found: dict[int, nn.Module] = {}

    def visit(d):
        if isinstance(d, torch.distributions.Independent):
            visit(d.base_dist)
        elif isinstance(d, torch.distributions.TransformedDistribution):
            for t in d.transforms:
                for part in getattr(t, "parts", [t]):  # a ComposeTransform's parts, or the transform itself
                    inner = getattr(part, "_inv", None)  # an _InverseTransform wraps the module it inverts
                    inner = inner() if isinstance(inner, weakref.ref) else inner
                    # a conditioned Pyro transform is no module itself but holds its network as an attribute
                    held = [v for v in vars(part).values() if isinstance(v, nn.Module)]
                    for m in (part, inner, *held):
                        if isinstance(m, nn.Module):
                            found.setdefault(id(m), m)
            visit(d.base_dist)

    visit(fn)
    return list(found.values())


def _unwrap(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


class SampleDependentError(NotImplementedError):
    """A distribution's parameter tensors depend on other samples of the guide: detaching them would drop part of
    the path derivative, so :func:`fixed_log_prob` refuses (and :class:`TraceSTL_ELBO` keeps that site's
    reparameterised gradient).

    Example::

        >>> import torch, pyro.distributions as dist
        >>> w = torch.ones(1, requires_grad=True)
        >>> z1 = dist.Normal(w, 1.0).rsample()
        >>> fixed_log_prob(dist.Normal(2 * z1, 1.0), torch.zeros(1), avoid=[z1.grad_fn])
        Traceback (most recent call last):
          ...
        pyroflows.elbo.SampleDependentError: the parameters of this Normal are computed from other samples of the guide
    """


def _depends_on(t: torch.Tensor, nodes: frozenset, limit: int = 20_000) -> bool:
    """Whether the autograd graph of ``t`` reaches one of ``nodes`` (``True`` also past ``limit`` nodes)."""
    if not nodes or t.grad_fn is None:
        return False
    stack, seen = [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node in nodes:
            return True
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > limit:
            return True
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return False


def _log_prob(fn, value: torch.Tensor, avoid: frozenset = frozenset()) -> torch.Tensor:
    """``fn.log_prob(value)`` recomputed from ``value`` (no cached inverse), parameters as they are now."""
    if isinstance(fn, torch.distributions.Independent):
        return _sum_rightmost(_log_prob(fn.base_dist, value, avoid), fn.reinterpreted_batch_ndims)
    if isinstance(fn, torch.distributions.TransformedDistribution):
        y = value
        log_prob = 0.0
        event_dim = len(fn.event_shape)
        for t in reversed(fn.transforms):
            x = t.inv(y)
            event_dim += t.domain.event_dim - t.codomain.event_dim
            log_prob = log_prob - _sum_rightmost(t.log_abs_det_jacobian(x, y), event_dim - t.domain.event_dim)
            y = x
        base = _log_prob(fn.base_dist, y, avoid)
        return log_prob + _sum_rightmost(base, event_dim - len(fn.base_dist.event_shape))
    params = {k: getattr(fn, k) for k in fn.arg_constraints if k in vars(fn)}
    live = [p for p in params.values() if isinstance(p, torch.Tensor) and p.requires_grad]
    if not live:
        return fn.log_prob(value)  # nothing to hold fixed (e.g. a flow's standard-normal base)
    if any(_depends_on(p, avoid) for p in live):
        raise SampleDependentError(
            f"the parameters of this {type(fn).__name__} are computed from other samples of the guide"
        )
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return type(fn)(fn.loc.detach(), scale_tril=fn.scale_tril.detach()).log_prob(value)
    if type(fn).__name__ in ("Normal", "LogNormal", "Laplace", "StudentT", "Cauchy", "Gamma", "Beta"):
        return type(fn)(**{k: v.detach() for k, v in params.items()}).log_prob(value)
    raise NotImplementedError(
        f"TraceSTL_ELBO cannot hold the parameters of a {type(fn).__name__} fixed; use Trace_ELBO for this guide"
    )


def fixed_log_prob(fn, value: torch.Tensor, avoid=()) -> torch.Tensor:
    r""":math:`\log q_{\bar\phi}(z)`: ``fn.log_prob(value)`` with every parameter of ``fn`` held fixed (detached), still
    differentiable in ``value``. The value is copied first, so a flow's remembered ``(x, y)`` pair is not reused and
    its inverse really runs (under the fixed parameters).

    Supported: ``TransformedDistribution`` whose transforms are ``nn.Module`` flows (pyroflows layers, Pyro's
    ``TransformModule``\ s, and their inverses or compositions; their parameters' ``requires_grad`` is off while
    the log-density is computed, so a conditional flow keeps its dependence on the context) or parameter-free
    bijections, over a parameter-free base or one of the families below; ``Independent``; ``Normal``,
    ``MultivariateNormal``, ``LogNormal``, ``Laplace``, ``StudentT``, ``Cauchy``, ``Gamma``, ``Beta``, whose
    parameter tensors are detached whole. That is right when they are functions of the guide's parameters alone
    (every Pyro autoguide), not when a hand-written guide computes them from its earlier samples: give those
    samples' autograd nodes as ``avoid`` and such a parameter raises :class:`SampleDependentError`. Anything else
    raises ``NotImplementedError``.

    :param fn: the guide site's distribution.
    :param torch.Tensor value: the sampled value.
    :param avoid: autograd nodes (``grad_fn``) of other samples the parameters must not depend on.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> loc = torch.zeros(2, requires_grad=True)
        >>> z = torch.tensor([0.5, -1.0], requires_grad=True)
        >>> lp = fixed_log_prob(dist.Normal(loc, 1.0).to_event(1), z)
        >>> lp.backward()
        >>> loc.grad is None, z.grad.tolist()  # a gradient for the sample, none for the parameter
        (True, [-0.5, 1.0])
    """
    modules = _modules(fn)
    copy = value.clone()
    avoid = frozenset(avoid)
    # Held fixed by switching their requires_grad off while the log-density is computed: the ops record no
    # dependence on them, as with detached copies, without rebuilding the modules' parameter dicts (what
    # torch.func.functional_call does) at every step. The graphs recorded before (the draw) are unaffected.
    live = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}
    for p in live.values():
        p.requires_grad_(False)
    try:
        return _log_prob(fn, copy, avoid)
    finally:
        for p in live.values():
            p.requires_grad_(True)


class TraceSTL_ELBO(Trace_ELBO):
    r"""Pyro's ``Trace_ELBO`` with the sticking-the-landing gradient for reparameterised guide sites: the guide's
    :math:`\log q` enters the surrogate through :func:`fixed_log_prob`, so its gradient is the path derivative
    alone. The ELBO's value is unchanged; non-reparameterised sites keep their score-function terms.

    A site whose distribution cannot be held fixed (a family :func:`fixed_log_prob` does not know, or parameters
    computed from the guide's earlier samples, as in a hand-written structured guide) keeps the reparameterised
    gradient, which is unbiased too; a ``UserWarning`` names it once, and :attr:`fallback_sites` lists it.

    Takes the arguments of ``Trace_ELBO`` (``num_particles``, ``vectorize_particles``, ``max_plate_nesting``, ...).
    :func:`pyroflows.infer.fit` uses it by default (``estimator="stl"``).

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(1.0, 0.5))
        >>> pyro.clear_param_store()
        >>> guide = AutoNormal(model)
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceSTL_ELBO(num_particles=4))
        >>> for _ in range(300):
        ...     _ = svi.step()
        >>> round(float(pyro.param("AutoNormal.locs.z")), 1), round(float(pyro.param("AutoNormal.scales.z")), 1)
        (1.0, 0.5)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: names of the sites that kept the reparameterised gradient, with the reason
        self.fallback_sites: dict[str, str] = {}

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        earlier: set = set()
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            value = site["value"]
            if site["fn"].has_rsample and not isinstance(_unwrap(site["fn"]), dist.Delta):
                # (Delta: AutoContinuous's unpacked sites, functions of its one latent sample alone)
                log_prob, score_function, _ = site["score_parts"]
                try:
                    fixed = fixed_log_prob(site["fn"], value, avoid=earlier)
                except NotImplementedError as e:
                    if name not in self.fallback_sites:
                        self.fallback_sites[name] = str(e)
                        warnings.warn(
                            f"TraceSTL_ELBO: site {name!r} keeps the reparameterised gradient ({e})",
                            UserWarning,
                            stacklevel=2,
                        )
                else:
                    fixed = scale_and_mask(fixed, site["scale"], site["mask"])
                    site["score_parts"] = ScoreParts(log_prob, score_function, entropy_term=fixed)
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                earlier.add(value.grad_fn)
        return model_trace, guide_trace
