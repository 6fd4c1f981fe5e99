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
passes for Pyro's inverse autoregressive layers; pyroflows' planar and autoregressive layers and residual blocks
start their solve from the input they remember from the draw (``warm_start_inverse``), so it takes one pass. On the
example models a step took 1.5 to 1.9 times a ``Trace_ELBO`` step for coupling and spline flows, 1.6 to 1.8 for
planar, 1.9 to 2.0 for residual and 2.0 to 2.5 for autoregressive flows (``python benchmarks/stl_cost.py``).

:class:`TraceIW_ELBO` is the importance-weighted bound of Burda, Grosse & Salakhutdinov (2016) over the particles,
with the doubly reparameterised gradient of Tucker, Lawson, Gu & Maddison (2019), the same held-fixed
:math:`\log q` again: the option for guides that should cover the posterior's mass (lower Pareto k̂).
"""

from __future__ import annotations

import math
import warnings
import weakref

import pyro.distributions as dist
import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO
from torch import nn
from torch.distributions.utils import _sum_rightmost

from .autoguide import FlowMixture
from .run import check_number

__all__ = ["SampleDependentError", "TraceIW_ELBO", "TraceRenyi_ELBO", "TraceSTL_ELBO", "fixed_log_prob"]


def _modules(fn) -> list[nn.Module]:
    """Every ``nn.Module`` among the transforms of ``fn`` and its base distributions, and all their submodules,
    each once (a composition and its parts share their submodules: walking each of them separately would visit
    a layer once per module above it, at every step)."""
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
        elif isinstance(d, FlowMixture):
            for component in d.component_distributions():
                visit(component)

    visit(fn)
    memo: set = set()  # one walk for all of them, so no submodule is visited twice
    return [sub for m in found.values() for _, sub in m.named_modules(memo=memo)]


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
    if isinstance(fn, FlowMixture):
        return fn.mix((_log_prob(component, value, avoid) for component in fn.component_distributions()), fixed=True)
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
    if isinstance(fn, torch.distributions.LowRankMultivariateNormal):  # Pyro's AutoLowRankMultivariateNormal
        return type(fn)(fn.loc.detach(), fn.cov_factor.detach(), fn.cov_diag.detach()).log_prob(value)
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
    ``TransformModule``\ s, and their inverses or compositions; their parameters' ``requires_grad`` is off while the
    log-density is computed, so a conditional flow keeps its dependence on the context) or parameter-free
    bijections, over a parameter-free base or one of the families below; :class:`~pyroflows.FlowMixture` (of such
    flows); ``Independent``; ``Normal``,
    ``MultivariateNormal``, ``LowRankMultivariateNormal``, ``LogNormal``, ``Laplace``, ``StudentT``, ``Cauchy``,
    ``Gamma``, ``Beta``, whose parameter tensors are detached whole. That is right when they are functions of the
    guide's parameters alone (every Pyro autoguide), not when a hand-written guide computes them from its earlier
    samples: give those samples' autograd nodes as ``avoid`` and such a parameter raises
    :class:`SampleDependentError`. Anything else raises ``NotImplementedError``.

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
    live = {id(p): p for m in modules for p in m.parameters(recurse=False) if p.requires_grad}
    for p in live.values():
        p.requires_grad_(False)
    try:
        return _log_prob(fn, copy, avoid)
    finally:
        for p in live.values():
            p.requires_grad_(True)


def _agrees(fixed: torch.Tensor, log_prob: torch.Tensor) -> bool:
    """Whether the held-fixed log-density equals the draw's, as it must at the same point and parameters: to
    1e-3 relative (float32 round trips through a flow's inverse stay far inside it) plus 1e-2 absolute."""
    gap = (fixed.detach() - log_prob.detach()).abs()
    return bool((gap <= 1e-2 + 1e-3 * log_prob.detach().abs()).all())


def _random_log_det(fn) -> bool:
    """Whether a layer of ``fn``'s flow estimates its log-det at random (a residual flow in training mode): the
    held-fixed log q is then another draw of an unbiased estimate, not comparable with the draw's own."""
    return any(getattr(m, "random_log_det", False) for m in _modules(fn))


class TraceSTL_ELBO(Trace_ELBO):
    r"""Pyro's ``Trace_ELBO`` with the sticking-the-landing gradient for reparameterised guide sites: the guide's
    :math:`\log q` enters the surrogate through :func:`fixed_log_prob`, so its gradient is the path derivative
    alone. The ELBO's value is unchanged; non-reparameterised sites keep their score-function terms.

    A site whose distribution cannot be held fixed (a family :func:`fixed_log_prob` does not know, or parameters
    computed from the guide's earlier samples, as in a hand-written structured guide) keeps the reparameterised
    gradient, which is unbiased too; a ``UserWarning`` names it once, and :attr:`fallback_sites` lists it. So does a
    step where the held-fixed log-density, computed through the flow's inverse, differs from the draw's own (it
    must be equal: same point, same parameters); an inverse that misses would otherwise bias the gradient.
    :attr:`inexact_steps` counts such steps per site. Flows whose log-det is a random estimate (residual flows in
    training mode, :attr:`~pyroflows.transforms.FlowTransform.random_log_det`) are not compared: the two values
    are independent draws of an unbiased estimate, and the path derivative of the held-fixed one is unbiased.

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

    #: a :class:`~pyroflows.FlowMixture`'s weights are trained through their score function (Pyro's surrogate)
    _mixture_weights_by_score = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: names of the sites that kept the reparameterised gradient, with the reason
        self.fallback_sites: dict[str, str] = {}
        #: per site, the steps whose held-fixed log q disagreed with the draw's (an inexact inverse), which used
        #: the reparameterised gradient instead
        self.inexact_steps: dict[str, int] = {}

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
                    self._cannot_hold_fixed(name, e)
                else:
                    fixed = scale_and_mask(fixed, site["scale"], site["mask"])
                    # (the agreement first: for a flow with an exact log-det it settles it without walking the
                    # flow's modules)
                    if _agrees(fixed, log_prob) or _random_log_det(site["fn"]):
                        if self._mixture_weights_by_score and isinstance(_unwrap(site["fn"]), FlowMixture):
                            # keep the share of the weights' score function that FlowMixture puts there
                            fixed = fixed + (site["score_parts"].entropy_term - log_prob)
                        site["score_parts"] = ScoreParts(log_prob, score_function, entropy_term=fixed)
                    else:  # the inverse did not reproduce the draw's log-density: STL would be biased here
                        self.inexact_steps[name] = self.inexact_steps.get(name, 0) + 1
                        if self.inexact_steps[name] == 1:
                            warnings.warn(
                                f"TraceSTL_ELBO: at site {name!r} the held-fixed log q (through the flow's inverse) "
                                "differs from the draw's; such steps use the reparameterised gradient "
                                "(counted in inexact_steps)",
                                UserWarning,
                                stacklevel=2,
                            )
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                earlier.add(value.grad_fn)
        return model_trace, guide_trace

    def _cannot_hold_fixed(self, name: str, error: NotImplementedError) -> None:
        """Site ``name``'s distribution cannot be held fixed: it keeps the reparameterised gradient, named once."""
        if name not in self.fallback_sites:
            self.fallback_sites[name] = str(error)
            warnings.warn(
                f"TraceSTL_ELBO: site {name!r} keeps the reparameterised gradient ({error})", UserWarning, stacklevel=3
            )


class TraceIW_ELBO(TraceSTL_ELBO):
    r"""The importance-weighted bound over ``num_particles`` :math:`K` draws,
    :math:`\mathcal L_K = \mathbb E\,\log \frac1K \sum_k w_k` with :math:`w_k = p(x, z_k) / q_\phi(z_k)`
    (Burda et al. 2016), trained with the doubly reparameterised gradient (DReG, Tucker et al. 2019):

    .. math::

        \nabla_\phi \mathcal L_K = \mathbb E \sum_k \tilde w_k^2\,
        \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi},
        \qquad \tilde w_k = w_k / \textstyle\sum_j w_j ,

    computed as the gradient of :math:`\sum_k \operatorname{sg}(\tilde w_k^2) \log \bar w_k`, where
    :math:`\log \bar w_k` uses the held-fixed :math:`\log q` of :func:`fixed_log_prob` (the path derivative only,
    as :class:`TraceSTL_ELBO`). It is unbiased for the bound's gradient, and zero for every draw when :math:`q` is
    the posterior. With :math:`K = 1` it is the STL gradient of the ELBO.

    The bound is tighter than the ELBO for :math:`K > 1`, and maximising it favours a guide that covers the
    posterior's mass (its importance weights have lighter tails: lower Pareto k̂) over one that fits the
    posterior's bulk closely (lower KL(q‖p)). :meth:`loss` returns :math:`-\mathcal L_K`'s estimate, not the
    ELBO's. :func:`pyroflows.infer.fit` uses it with ``estimator="iw"``.

    Requirements, each refused with an error naming it: every guide site reparameterised and one that
    :func:`fixed_log_prob` can hold fixed; no parameters in the model (their gradient would need the weights
    :math:`\tilde w_k`, not :math:`\tilde w_k^2`: train them with :class:`TraceSTL_ELBO`); no subsampling (a
    site scaled by a ``plate``'s ``subsample_size`` or ``poutine.scale``), since the bound of a subsample is not
    the bound of the data.

    Takes the arguments of ``Trace_ELBO``; ``vectorize_particles=True`` draws the :math:`K` particles in one pass.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import Trace_ELBO
        >>> def model():  # log Z = 0
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def guide():  # too wide: KL(q||p) = 0.81
        ...     pyro.sample("z", dist.Normal(0.0, 2.0))
        >>> options = dict(num_particles=1000, vectorize_particles=True, max_plate_nesting=0)
        >>> pyro.set_rng_seed(0)
        >>> bound = -TraceIW_ELBO(**options).loss(model, guide)
        >>> elbo = -Trace_ELBO(**{**options, "num_particles": 20000}).loss(model, guide)
        >>> round(elbo, 1), abs(bound) < 0.1  # the K = 1000 bound is nearly log Z; the ELBO is log Z - KL
        (-0.8, True)
    """

    # the bound's surrogate has no score functions: a FlowMixture's weights are not trained by it
    _mixture_weights_by_score = False

    def _cannot_hold_fixed(self, name: str, error: NotImplementedError) -> None:
        """Refused: DReG needs the held-fixed log q at every site (the reparameterised term would bias it)."""
        raise NotImplementedError(f"TraceIW_ELBO: site {name!r} cannot be held fixed ({error})") from error

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        guide_params = {n for n, s in guide_trace.nodes.items() if s["type"] == "param"}
        for name, site in model_trace.nodes.items():
            if site["type"] == "param" and name not in guide_params:
                raise ValueError(
                    f"TraceIW_ELBO trains guides only, and the model has the parameter {name!r}; "
                    "use TraceSTL_ELBO (estimator='stl') to fit model parameters"
                )
        for trace, which in ((model_trace, "model"), (guide_trace, "guide")):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                scale = site["infer"].get("untempered_scale", site["scale"])  # fit(anneal=...) tempers on purpose
                if not (isinstance(scale, (int, float)) and scale == 1):
                    raise ValueError(
                        f"TraceIW_ELBO: {which} site {name!r} is scaled (subsampled?); the importance-weighted bound "
                        "needs every site at full weight"
                    )
                if which == "guide" and not site["is_observed"] and not site["fn"].has_rsample:
                    raise NotImplementedError(
                        f"TraceIW_ELBO: guide site {name!r} is not reparameterised ({type(site['fn']).__name__})"
                    )
        return model_trace, guide_trace

    def _per_particle(self, log_prob: torch.Tensor, k: int) -> torch.Tensor:
        """A site's log-density summed to one figure per particle (shape ``(k,)``)."""
        if not isinstance(log_prob, torch.Tensor) or log_prob.dim() == 0:
            return torch.as_tensor(log_prob).expand(k) if k > 1 else torch.as_tensor(log_prob).reshape(1)
        if k == 1:
            return log_prob.sum().reshape(1)
        dim = log_prob.dim() - self.max_plate_nesting  # the particle plate's dim, counted from the left
        if dim < 0:
            return log_prob.sum().expand(k)
        moved = log_prob.movedim(dim, 0)
        return moved.reshape(moved.shape[0], -1).sum(1).expand(k)

    def _log_weights(self, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log w, log w̄)`` per particle: with the full and with the held-fixed log-density of the guide."""
        full, path = [], []
        k = self.num_particles if self.vectorize_particles else 1  # particles per trace
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            log_p = sum(
                self._per_particle(s["log_prob"], k) for s in model_trace.nodes.values() if s["type"] == "sample"
            )
            log_q, log_q_fixed = 0.0, 0.0
            for site in guide_trace.nodes.values():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                log_q = log_q + self._per_particle(site["log_prob"], k)
                log_q_fixed = log_q_fixed + self._per_particle(site["score_parts"].entropy_term, k)
            full.append(log_p - log_q)
            path.append(log_p - log_q_fixed)
        return torch.cat(full), torch.cat(path)

    #: the Rényi order: 0 is the importance-weighted bound (:class:`TraceRenyi_ELBO` takes others)
    alpha = 0.0
    #: the ELBO's share of the objective (:class:`TraceRenyi_ELBO` takes others)
    elbo_weight = 0.0

    def _bound(self, log_w: torch.Tensor) -> torch.Tensor:
        beta = 1.0 - self.alpha
        if beta == 0:  # the ELBO, the limit alpha -> 1
            bound = log_w.mean(0)
        else:
            bound = (torch.logsumexp(beta * log_w, 0) - math.log(log_w.shape[0])) / beta
        if self.elbo_weight:
            bound = torch.lerp(bound, log_w.mean(0), self.elbo_weight)
        return bound

    def _path_weights(self, log_w: torch.Tensor) -> torch.Tensor:
        r"""Each particle's weight in the doubly reparameterised gradient: :math:`\alpha v_k + (1 - \alpha) v_k^2`
        with :math:`v = \operatorname{softmax}((1 - \alpha) \log w)`; :math:`v_k^2` at :math:`\alpha = 0`; mixed
        with the ELBO's :math:`1/K` by ``elbo_weight``."""
        v = torch.softmax((1.0 - self.alpha) * log_w, 0)
        weights = self.alpha * v + (1.0 - self.alpha) * v.square()
        if self.elbo_weight:
            weights = torch.lerp(weights, torch.full_like(weights, 1.0 / weights.shape[0]), self.elbo_weight)
        return weights

    def loss(self, model, guide, *args, **kwargs) -> float:
        r""":math:`-\mathcal L_K`, estimated from one set of :math:`K` particles."""
        with torch.no_grad():
            log_w, _ = self._log_weights(model, guide, args, kwargs)
        return -float(self._bound(log_w))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        r""":math:`-\mathcal L_K`'s estimate; the DReG gradient accumulated into the guide's parameters."""
        log_w, log_w_path = self._log_weights(model, guide, args, kwargs)
        surrogate = -(self._path_weights(log_w.detach()) * log_w_path).sum()
        if surrogate.requires_grad:
            surrogate.backward()
        return -float(self._bound(log_w.detach()))


class TraceRenyi_ELBO(TraceIW_ELBO):
    r"""The Rényi variational bound of order :math:`\alpha` over ``num_particles`` :math:`K` draws (Li & Turner
    2016), between the ELBO and the importance-weighted bound:

    .. math::

        \mathcal L_{\alpha, K} = \frac{1}{1 - \alpha}\,
        \mathbb E \log \frac1K \sum_k w_k^{1 - \alpha}, \qquad w_k = p(x, z_k) / q_\phi(z_k),

    :math:`\alpha = 0` is :class:`TraceIW_ELBO`'s bound, :math:`\alpha \to 1` the ELBO. Pyro's ``RenyiELBO`` has
    the same value; its gradient is the reparameterised one. Here it is doubly reparameterised, as
    :class:`TraceIW_ELBO`'s (derived the same way, Tucker et al. 2019): with
    :math:`v = \operatorname{softmax}((1 - \alpha) \log w)`,

    .. math::

        \nabla_\phi \mathcal L_{\alpha, K} = \mathbb E \sum_k \big(\alpha v_k + (1 - \alpha) v_k^2\big)\,
        \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi},

    since the score term :math:`-\mathbb E \sum_k v_k \nabla_\phi \log q_\phi(z_k)` equals
    :math:`-\mathbb E \sum_k (1 - \alpha) v_k (1 - v_k)\, \partial_{z_k} \log w_k\, \partial_\phi z_k` (the
    reparameterisation identity applied to :math:`v_k` as a function of :math:`z_k`). The weights are
    :math:`v_k^2` at :math:`\alpha = 0` (DReG) and :math:`1/K` at :math:`\alpha = 1` (the sticking-the-landing
    gradient of the ELBO); the gradient is zero for every draw when :math:`q` is the posterior.

    An order between 0 and 1 trades the two ends' properties: the smaller :math:`\alpha`, the more the guide covers
    the posterior's mass (lower Pareto k̂) at the cost of KL(q‖p). The requirements are
    :class:`TraceIW_ELBO`'s, refused with the same errors. :func:`pyroflows.infer.fit` uses it with
    ``estimator="renyi"`` and its ``alpha``.

    **Mixed with the ELBO** (``elbo_weight`` :math:`\lambda > 0`): the objective
    :math:`\lambda\,\mathrm{ELBO} + (1 - \lambda)\,\mathcal L_{\alpha, K}`, whose gradient mixes the two
    gradients' weights the same way. Since :math:`\mathcal L_{\alpha, K} \le \log Z` for :math:`\alpha < 1`, the
    objective is at most :math:`\log Z - \lambda\,\mathrm{KL}(q\|p)`: it caps KL(q‖p), which the bound alone does
    not (a bound over :math:`K` draws stays tight while one draw lands in the posterior's bulk, so a guide trained
    on it alone may spread much of its mass where the posterior has little). Measured in the docs' "Variational
    inference" guide.

    :param float alpha: the order, in ``[0, 1]``.
    :param float elbo_weight: the ELBO's share :math:`\lambda` of the objective, in ``[0, 1]`` (default 0: the
        bound alone).

    Takes the other arguments of ``Trace_ELBO``.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import RenyiELBO
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(0.5, 2.0))
        >>> options = dict(num_particles=16, vectorize_particles=True, max_plate_nesting=0)
        >>> pyro.set_rng_seed(0)
        >>> ours = TraceRenyi_ELBO(alpha=0.5, **options).loss(model, guide)
        >>> pyro.set_rng_seed(0)
        >>> abs(ours - RenyiELBO(alpha=0.5, **options).loss(model, guide)) < 1e-5  # the same draws, the same value
        True
    """

    def __init__(self, alpha: float = 0.5, elbo_weight: float = 0.0, **kwargs):
        for name, value in (("alpha", alpha), ("elbo_weight", elbo_weight)):
            check_number("TraceRenyi_ELBO", name, value, 0, 1, low_open=False, high_open=False)
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.elbo_weight = float(elbo_weight)
