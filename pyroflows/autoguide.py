"""A flow guide that Pyro sees as one parameter: :class:`AutoFlow`, a drop-in for ``AutoNormalizingFlow``.

Pyro registers the flow inside ``AutoNormalizingFlow`` with ``pyro.module`` every time the guide reads it (twice a
step), and ``pyro.module`` sends every parameter tensor of the flow through the effect-handler stack as its own
``pyro.param`` site; ``pyro.optim`` then steps one optimiser per tensor. For a flow of a few dozen small tensors
that bookkeeping costs more than the flow. :class:`AutoFlow` keeps the flow's parameters in one flat tensor: the
layers' parameters are views of it (so the flow module always holds the current values and works on its own),
the guide emits one ``pyro.param`` site per call, and the layers' gradients are collected into the flat tensor's
``.grad`` in one addition at the end of each backward pass.

:class:`AutoFlowMixture` is the same guide with a mixture of flows (:class:`FlowMixture`, learned weights) in place of
one flow, for posteriors with several separated modes.
"""

from __future__ import annotations

import math
import warnings
import weakref

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.infer.reparam import NeuTraReparam

from .start import flow_output_affine
from .transforms import ActNorm, Compose, HeavyTails
from .transforms.base import has_random_log_det

__all__ = [
    "AutoFlow",
    "AutoFlowMixture",
    "FlowMixture",
    "MixtureFlows",
    "optimal_weights",
    "prune_components",
    "subset_elbo",
]

#: the name (under the guide's prefix) of the one param-store entry holding the flow's parameters
FLAT_NAME = "flow_params"

#: the id of the autograd pass running now (-1 outside one): a private torch function, so looked up defensively
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def share_with_store(store, name: str, p: torch.Tensor) -> None:
    """Make the param store hold ``p`` itself under ``name`` (the store and a module then share one tensor)."""
    store._params[name] = p
    store._param_to_name[p] = name


def parameter_like(value: torch.Tensor, like: torch.Tensor) -> torch.nn.Parameter:
    """``value`` (a tensor the param store holds) as an ``nn.Parameter`` of ``like``'s dtype and device: itself
    where it already is one, else a converted copy."""
    if isinstance(value, torch.nn.Parameter) and value.dtype == like.dtype and value.device == like.device:
        return value
    return torch.nn.Parameter(value.detach().to(like.device, like.dtype))


class AutoFlow(AutoNormalizingFlow):
    r"""``AutoNormalizingFlow`` with the flow's parameters in one tensor: the same guide, the same draws and the same
    updates, with one ``pyro.param`` site per step instead of one per parameter tensor.

    ``init_transform_fn(latent_dim)`` builds the flow as for ``AutoNormalizingFlow``, e.g.
    ``partial(pyroflows.realnvp, num_layers=8)`` (any Pyro ``TransformModule`` works). On first use the guide
    gathers the flow's trainable parameters into one tensor, the parameter ``flow_params`` (param-store name
    ``"<guide name>.flow_params"``), and turns each layer's parameter into a view of it: the flow module always
    holds the current values, so ``guide.transform`` can be used, saved and loaded on its own.

    Gradients: autograd still writes each layer parameter's gradient first; a hook takes it off the layer (its
    ``.grad`` is left ``None``) and, when the backward pass ends, all of them are added to ``flow_params.grad`` at
    once. An optimiser must therefore step ``flow_params``, as
    ``pyro.infer.SVI``, :func:`pyroflows.infer.fit` and ``torch.optim.Adam(guide.parameters())`` do; an optimiser
    built on ``guide.transform.parameters()`` alone would see no gradients.

    Per step with ``realnvp(8)`` on the eight-schools model this removes about 30% of ``SVI.step``'s time
    (``benchmarks/svi_step.py``). Elementwise optimisers (Adam, ``ClippedAdam``, SGD) make exactly the updates they
    make for ``AutoNormalizingFlow``; a global gradient clip sees the same norm (up to rounding: one tensor is
    summed in another order than many).

    The flow's :class:`~pyroflows.transforms.ActNorm` layers keep their initial identity
    (:meth:`~pyroflows.transforms.ActNorm.mark_initialized`): in a guide they see standard-normal noise, where the
    data-dependent init would only estimate the identity from the first draws (and warn when there is one).

    Values loaded into the param store (``pyro.get_param_store().load(...)``) under the guide's name are adopted at
    the next call; ``.to()``, ``.double()`` and ``load_state_dict`` keep the layers and ``flow_params`` one tensor.

    :param model: a Pyro model.
    :param init_transform_fn: a callable ``latent_dim -> Transform``, the flow from standard-normal noise to the
        model's unconstrained latent space.
    :param bool heavy_tails: put a :class:`~pyroflows.transforms.HeavyTails` layer on the base noise: the guide's
        flow is then ``Compose([HeavyTails(latent_dim), init_transform_fn(latent_dim)])``, drawing on noise whose
        left and right tails per coordinate are learned, from Gaussian towards a Student-t's with 5 degrees of
        freedom. An option, not the default (``False``: exactly ``AutoNormalizingFlow``'s guide): on the guide
        benchmark's posteriors it changed KL(q‖p) and k̂ within their run-to-run spread (docs: "Heavy tails for
        flow guides").

    Example::

        >>> import pyro, pyro.distributions as dist, pyroflows, torch
        >>> from functools import partial
        >>> from pyroflows import AutoFlow
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        >>> pyro.clear_param_store()
        >>> guide = AutoFlow(model, partial(pyroflows.realnvp, num_layers=2))
        >>> guide()["z"].shape
        torch.Size([3])
        >>> with pyro.poutine.trace(param_only=True) as tr:
        ...     _ = guide()
        >>> list(tr.trace.nodes)  # one parameter site for the whole flow
        ['AutoFlow.flow_params']
        >>> guide.flow_params.numel() == sum(p.numel() for p in guide.transform.parameters())
        True
    """

    def __init__(self, model, init_transform_fn, *, heavy_tails: bool = False):
        if heavy_tails not in (True, False):
            raise ValueError(f"AutoFlow: heavy_tails must be True or False, got {heavy_tails!r}")
        super().__init__(model, init_transform_fn)
        self.heavy_tails = heavy_tails
        # not registered as module state: the tensor the flow's parameters are views of, and per layer parameter
        # (parameter, start, end) in it
        self.__dict__["_linked"] = None
        self.__dict__["_slots"] = []
        # layer index -> gradient, collected during the backward pass ``_task`` (an autograd graph task id)
        self.__dict__["_pending"] = {}
        self.__dict__["_task"] = None

    # -- the flow ----------------------------------------------------------------------------------------------
    def _flow(self):
        """The flow, read without ``PyroModule.__getattr__`` (which would ``pyro.module`` it)."""
        return self._modules["transform"] if "transform" in self._modules else self.__dict__.get("transform")

    def get_transform(self, *args, **kwargs):
        """The flow from the base noise to the unconstrained latent (built on first use).

        :param args: the model's arguments (unused).
        :param kwargs: the model's keyword arguments (unused).
        :returns: the flow, a ``Transform``.
        """
        return self._flow()

    def get_posterior(self, *args, **kwargs):
        """The guide's distribution over the unconstrained latent vector: the base N(0, I) pushed through the flow.
        Emits the one ``pyro.param`` site of the flow's parameters.

        :param args: the model's arguments (unused).
        :param kwargs: the model's keyword arguments (unused).
        :returns: a ``TransformedDistribution``.
        """
        flow = self._current_flow()  # first: it sets the base's dtype and device
        return dist.TransformedDistribution(self.get_base_dist(), flow)

    def _current_flow(self):
        """The flow (built and flattened on first use), its parameters linked to what the param store holds; emits
        the one ``pyro.param`` site."""
        flow = self._flow()
        if flow is None:
            flow = self._build_flow()
            self.transform = flow
            self._flatten(flow)
        flat = self._parameters.get(FLAT_NAME)
        if flat is not None:
            value = pyro.param(self._pyro_get_fullname(FLAT_NAME), flat)
            if value is not self._linked:
                self._adopt(value)
            self._check_linked()
            self.__dict__["_prototype_tensor"] = self._linked  # the base's dtype and device
        return flow

    def _build_flow(self):
        flow = self._init_transform_fn(self.latent_dim)
        for module in flow.modules() if isinstance(flow, torch.nn.Module) else ():
            if isinstance(module, ActNorm):  # it sees the base noise, never data: no data-dependent init
                module.mark_initialized()
        if not self.heavy_tails:
            return flow
        tails = HeavyTails(self.latent_dim)
        like = next(flow.parameters(), None) if isinstance(flow, torch.nn.Module) else None
        if like is not None:
            tails = tails.to(dtype=like.dtype, device=like.device)
        return Compose([tails, flow])

    # -- one flat tensor -----------------------------------------------------------------------------------------
    def _flatten(self, flow) -> None:
        if not isinstance(flow, torch.nn.Module):
            return  # a transform without parameters
        # an empty parameter (a coupling's conditioner on 0 inputs, for a 1-D latent) holds nothing to link
        params = [p for p in flow.parameters() if p.requires_grad and p.numel() > 0]
        if not params:
            return
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(
                f"AutoFlow: the flow's parameters must share one dtype and device to live in one tensor, got "
                f"{sorted(str(k) for k in kinds)}; convert the flow (e.g. .double()) in init_transform_fn"
            )
        start = 0
        for p in params:
            self._slots.append((p, start, start + p.numel()))
            start += p.numel()
        # registered without PyroModule.__setattr__'s pyro.param: get_posterior's adopts what the store holds
        flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
        torch.nn.Module.register_parameter(self, FLAT_NAME, flat)
        self._install()

    def _install(self) -> None:
        """Link the layer parameters to ``flow_params`` and hook their gradients into its ``.grad``."""
        ref = weakref.ref(self)
        for index, (p, _, _) in enumerate(self._slots):
            p.register_post_accumulate_grad_hook(_collector(ref, index))
        self._link(self._parameters[FLAT_NAME])

    def _link(self, flat: torch.Tensor) -> None:
        """Make every layer parameter a view of ``flat`` (which then holds the values)."""
        total = self._slots[-1][2]
        if flat.dim() != 1 or flat.numel() != total:
            raise ValueError(
                f"AutoFlow: {FLAT_NAME} must be a vector of {total} values for this flow, got shape "
                f"{tuple(flat.shape)}; call pyro.clear_param_store() before building a different flow"
            )
        for p, start, end in self._slots:
            p.data = flat.data[start:end].view(p.shape)
        self.__dict__["_linked"] = flat

    def _check_linked(self) -> None:
        """Refuse to go on if a layer parameter no longer views the flat tensor (the flow was converted or loaded
        apart from the guide, e.g. ``guide.transform.double()``): its updates would never reach the flow."""
        flat = self._linked
        base, size = flat.data_ptr(), flat.element_size()
        for p, start, _ in self._slots:
            if p.data_ptr() != base + start * size or p.dtype != flat.dtype:
                raise RuntimeError(
                    "AutoFlow: the flow's parameters no longer share the guide's flow_params (was guide.transform "
                    "converted or given new parameters on its own?); convert the whole guide instead, e.g. "
                    "guide.to(torch.float64)"
                )

    def _adopt(self, value: torch.Tensor) -> None:
        """The param store returned another tensor than ours (values loaded into the store, or this guide converted
        with ``.to()`` after the store saw it): compute with the store's values, in the flow's dtype and device, and
        let the store and the guide share that one tensor."""
        value = parameter_like(value, self._parameters[FLAT_NAME])
        self._link(value)  # checks the size first
        self._parameters[FLAT_NAME] = value
        share_with_store(pyro.get_param_store(), self._pyro_get_fullname(FLAT_NAME), value)

    def _collect(self, index: int) -> None:
        """Take layer parameter ``index``'s new gradient off it. The first of a backward pass queues :meth:`_flush`,
        which adds them all to ``flow_params.grad`` when the pass ends: one addition, not one per tensor."""
        if _graph_task_id is not None:
            task = _graph_task_id()
            if task != self._task:
                self._flush()  # what a pass that raised before its end left (none after a pass that ended)
                self.__dict__["_task"] = task
                torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        p = self._slots[index][0]
        self._pending[index] = p.grad
        p.grad = None
        if _graph_task_id is None:  # a torch without the id: add each gradient as it comes
            self._flush()

    def _flush(self) -> None:
        pending, n = self._pending, len(self._slots)
        if not pending:
            return
        self.__dict__["_pending"] = {}
        flat = self._linked
        total = flat.grad
        if total is None:
            total = flat.grad = torch.zeros_like(flat, memory_format=torch.contiguous_format)
        with torch.no_grad():  # .grad never requires grad; a create_graph backward's gradients are added detached
            if len(pending) == n:
                total.add_(torch.cat([pending[i].reshape(-1) for i in range(n)]))
            else:
                for i, grad in pending.items():
                    _, start, end = self._slots[i]
                    total[start:end].add_(grad.reshape(-1))

    # -- point summaries --------------------------------------------------------------------------------------
    @torch.no_grad()
    def quantiles(self, quantiles, *args, num_samples: int = 10000, seed: int | None = 0, **kwargs) -> dict:
        """Posterior quantiles of every latent variable, estimated from ``num_samples`` draws of the guide.

        ``AutoNormalizingFlow`` has no ``median`` or ``quantiles`` (Pyro's raise ``NotImplementedError``: a flow has
        no closed-form quantiles). These are the empirical quantiles of each element of each site, taken in the
        model's constrained space, so they are the marginal quantiles under any support (a simplex or a Cholesky
        factor included, where transforming quantiles of the unconstrained coordinates would not be). The
        estimate's standard error is about ``sqrt(q (1 - q) / num_samples)`` divided by the marginal density at the
        quantile: for a normal marginal, 0.0125 standard deviations for the median at the default 10,000 draws.

        The draws come from a generator seeded by ``seed`` (default 0: the same figures at every call for the same
        guide) with the global random state saved and restored, so the caller's random streams do not move;
        ``seed=None`` draws from the global stream as it is.

        :param quantiles: the requested levels in ``[0, 1]`` (a list or tensor).
        :param args: the model's arguments (needed only before the guide's first use).
        :param int num_samples: guide draws (at least 1).
        :param seed: the draws' seed, or ``None``.
        :param kwargs: the model's keyword arguments.
        :returns: ``{site name: tensor of shape (len(quantiles),) + site shape}``, as Pyro's autoguides return.
        :raises ValueError: for a level outside ``[0, 1]`` or ``num_samples < 1``.

        Example::

            >>> import pyro, pyro.distributions as dist, pyroflows, torch
            >>> from functools import partial
            >>> def model():
            ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
            >>> pyro.clear_param_store()
            >>> guide = pyroflows.AutoFlow(model, partial(pyroflows.realnvp, num_layers=2))
            >>> q = guide.quantiles([0.1, 0.5, 0.9])  # a fresh guide is N(0, 1) in log s
            >>> q["s"].shape, torch.allclose(q["s"].log(), torch.tensor([-1.2816, 0.0, 1.2816]), atol=0.05)
            (torch.Size([3]), True)
            >>> guide.median()["s"].item() == q["s"][1].item()  # the 0.5 quantile of the same draws
            True
        """
        levels = torch.as_tensor(quantiles, dtype=torch.float64).reshape(-1)
        if levels.numel() == 0 or not bool(((levels >= 0) & (levels <= 1)).all()):
            raise ValueError(f"{type(self).__name__}.quantiles: levels must lie in [0, 1], got {quantiles!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"{type(self).__name__}.quantiles: num_samples must be an int >= 1, got {num_samples!r}")
        draws = self._constrained_draws(num_samples, seed, args, kwargs)
        out = {}
        for name, value in draws.items():
            flat = value.reshape(num_samples, -1)
            q = torch.quantile(flat.double(), levels.to(flat.device), dim=0).to(value.dtype)
            out[name] = q.reshape((levels.numel(),) + value.shape[1:])
        return out

    @torch.no_grad()
    def median(self, *args, num_samples: int = 10000, seed: int | None = 0, **kwargs) -> dict:
        """Posterior medians of every latent variable: :meth:`quantiles` at 0.5 (estimated from ``num_samples``
        draws, in the constrained space; ``seed`` as there).

        :param args: the model's arguments (needed only before the guide's first use).
        :param int num_samples: guide draws (at least 1).
        :param seed: the draws' seed, or ``None``.
        :param kwargs: the model's keyword arguments.
        :returns: ``{site name: tensor of the site's shape}``.
        """
        return {k: v[0] for k, v in self.quantiles([0.5], *args, num_samples=num_samples, seed=seed, **kwargs).items()}

    # -- HMC in the flow's base space ---------------------------------------------------------------------------
    def neutra_reparam(self, *args, **kwargs):
        r"""Pyro's ``NeuTraReparam`` for this fitted guide: HMC/NUTS then runs on the flow's base space, where the
        posterior pushed back through the flow is close to N(0, I), instead of on the model's own geometry
        (Hoffman et al. 2019, *NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using neural transport*).

        Use it as ``poutine.reparam(model, config=lambda _: reparam)`` and map the chain's draws of
        ``"<first site>_shared_latent"`` back with ``reparam.transform_sample(draws)``, which here takes them as
        MCMC returns them, shape ``(n, D)``, and gives ``(n,) + site shape`` per site also for a model with plates
        (Pyro's wants the draws' dimension left of the model's plates). ``NeuTraReparam(guide)`` works on an
        ``AutoFlow`` too; this method first puts the guide in evaluation mode with its parameters frozen, and
        refuses a flow whose log-determinant is still a random estimate there: HMC's potential includes the flow's
        log-det, and a noisy one would make it sample another distribution without any error. On the 10-D funnel of
        the examples (NUTS, 500 warm-up steps and 500 draws, ``realnvp(8)`` fitted by ``fit`` for 2,000 steps),
        the draws of ``v`` had mean -0.07 and sd 2.81 (exact 0 and 3), no divergences and an ESS of 452, where NUTS
        on the model itself gave 2.17 and 1.29, 4 divergences and an ESS of 4.

        :param args: the model's arguments (needed only before the guide's first use).
        :param kwargs: the model's keyword arguments.
        :returns: ``pyro.infer.reparam.NeuTraReparam``.
        :raises ValueError: when the flow's log-det is random in evaluation mode.

        Example::

            >>> import pyro, pyro.distributions as dist, pyroflows, torch
            >>> from functools import partial
            >>> from pyro import poutine
            >>> def model():
            ...     pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            >>> pyro.clear_param_store()
            >>> guide = pyroflows.AutoFlow(model, partial(pyroflows.realnvp, num_layers=2))
            >>> reparam = guide.neutra_reparam()  # (after fitting the guide)
            >>> trace = poutine.trace(poutine.reparam(model, config=lambda _: reparam)).get_trace()
            >>> [name for name in trace.stochastic_nodes]
            ['z_shared_latent']
        """
        self._ensure_built(args, kwargs)
        self.eval()
        self.requires_grad_(False)
        if has_random_log_det(self):
            raise ValueError(
                f"{type(self).__name__}.neutra_reparam: the flow's log-determinant is a random estimate even in "
                "evaluation mode, and HMC's potential includes it; use a flow with an exact log-det here (a "
                "residual flow built with eval_logdet='exact')"
            )
        return _FlowNeuTraReparam(self)

    def _ensure_built(self, args: tuple, kwargs: dict) -> None:
        """Run a guide never run yet once (no effects, no gradients): it finds the model's sites and builds its flow."""
        if self.prototype_trace is None:
            with pyro.poutine.block(), torch.no_grad():
                self(*args, **kwargs)

    def _constrained_draws(self, n: int, seed, args: tuple, kwargs: dict) -> dict:
        """``n`` guide draws per latent site, in the model's constrained space: ``{name: (n,) + site shape}``."""
        from .run import rng_state, set_rng_state

        state = rng_state() if seed is not None else None
        try:
            self._ensure_built(args, kwargs)
            if seed is not None:
                pyro.set_rng_seed(seed)
            with pyro.poutine.block(), self._pyro_context:  # (the store's names exist only inside the guide's call)
                latent = self.get_posterior(*args, **kwargs).sample((n,))
        finally:
            if state is not None:
                set_rng_state(state)
        return self._constrained_sites(latent)

    def _constrained_sites(self, latent: torch.Tensor) -> dict:
        """The model's latent sites, constrained, for unconstrained latent vectors of shape ``batch + (D,)``:
        ``{name: batch + site shape}``, plates or not (Pyro's unpacking wants the batch left of the plates)."""
        shapes = {name: site["value"].shape for name, site in self.prototype_trace.iter_stochastic_nodes()}
        depth = max((len(shape) for shape in shapes.values()), default=0)
        batch = latent.shape[:-1]
        flat = latent.reshape((-1,) + (1,) * depth + latent.shape[-1:])
        return {
            site["name"]: torch.distributions.biject_to(site["fn"].support)(value).reshape(batch + shapes[site["name"]])
            for site, value in self._unpack_latent(flat)
        }

    def _apply(self, fn, *args, **kwargs):
        # .to() / .double() / .cuda() give every parameter its own converted copy: make them views of the
        # converted flat tensor again
        out = super()._apply(fn, *args, **kwargs)
        if self._slots:
            self._link(self._parameters[FLAT_NAME])
        return out

    def __setstate__(self, state):
        # copy.deepcopy and pickle give the layers fresh parameters (no longer views, without hooks)
        super().__setstate__(state)
        # no gradients pending in the copy (and none kept by a guide pickled before they were collected per pass)
        self.__dict__["_pending"], self.__dict__["_task"] = {}, None
        if self._slots:
            self._install()


class _FlowNeuTraReparam(NeuTraReparam):
    """Pyro's ``NeuTraReparam`` whose :meth:`transform_sample` takes draws of the shared latent of any batch shape
    (``(n, D)`` as MCMC returns them) and returns ``batch shape + site shape`` per site, plates or not, also before
    the reparameterised model has run."""

    def transform_sample(self, latent):
        """The model's latent sites for draws ``latent`` of the shared latent, shape ``batch + (D,)``.

        :param torch.Tensor latent: draws of the shared latent.
        :returns: ``{site name: tensor of shape batch + site shape}``.
        """
        if self.transform is None:  # (Pyro sets it when the reparameterised model first runs)
            self.transform = self.guide.get_transform()
        return self.guide._constrained_sites(self.transform(latent))


def _collector(guide_ref, index: int):
    """The post-accumulate-grad hook of one layer parameter (a weak reference: the hook must not keep the guide)."""

    def hook(p):
        guide = guide_ref()
        if guide is not None:
            guide._collect(index)

    return hook


class FlowMixture(dist.TorchDistribution):
    r"""A mixture of flows over one base: :math:`q(z) = \sum_k \pi_k q_k(z)`, :math:`q_k` the base pushed through
    ``flows[k]``, weights :math:`\pi = \mathrm{softmax}(\text{logits})` (equal without logits). The distribution of
    :class:`AutoFlowMixture`.

    ``rsample`` allots the draws (every sample and batch position) to the components by systematic sampling, then
    shuffles them: each draw comes from component ``k`` with probability :math:`\pi_k`, and ``n`` draws give
    component ``k`` :math:`\lfloor n \pi_k \rfloor` or :math:`\lceil n \pi_k \rceil` of them (equal weights:
    ``n // K`` or ``n // K + 1``), so a mean over draws is unbiased with little variance from the choice of
    components. Each draw is a reparameterised sample of its component. The weights are learned through the
    component index: :meth:`score_parts` gives Pyro's ELBOs the score function :math:`\log \pi_k` of each draw's
    component (the usual gradient of a discrete choice), next to the path gradient. ``log_prob`` is the mixture's
    own density, ``logsumexp_k (log pi_k + log q_k(z))``: every component's inverse runs on every point (``K``
    inverse passes).

    :param base_dist: the base distribution (event dimension 1).
    :param flows: the components' transforms (each from the base's space to the same space).
    :param torch.Tensor logits: the weights' logits, one per flow (``None``: equal weights).
    :param bool auxiliary: the distribution of an auxiliary guide site (Pyro's ``AutoContinuous`` latent, as in
        :class:`AutoFlowMixture`), whose ``log q`` Pyro's ELBOs leave out of the per-draw weight of score functions:
        :meth:`score_parts` then adds that share itself.
    :param validate_args: as for torch distributions.

    Example::

        >>> import pyro.distributions as dist, torch
        >>> from pyroflows.transforms import ActNorm
        >>> flows = [ActNorm(2), ActNorm(2)]
        >>> for t, b in zip(flows, (-3.0, 3.0)):
        ...     t.mark_initialized()
        ...     _ = t.bias.data.fill_(b)  # ActNorm maps x to (x - b) * exp(-s): component means -b
        >>> q = FlowMixture(dist.Normal(torch.zeros(2), 1.0).to_event(1), flows)
        >>> z = q.rsample((4,))
        >>> sorted(z[:, 0].sign().tolist())  # two draws from each component
        [-1.0, -1.0, 1.0, 1.0]
        >>> q.log_prob(torch.zeros(2)).item() == q.component_distributions()[0].log_prob(torch.zeros(2)).item()
        True
    """

    arg_constraints: dict = {}
    support = dist.constraints.real_vector
    has_rsample = True

    def __init__(
        self, base_dist, flows, logits: torch.Tensor | None = None, *, auxiliary: bool = False, validate_args=None
    ):
        if len(base_dist.event_shape) != 1:
            raise ValueError(f"FlowMixture: the base must have one event dimension, got {tuple(base_dist.event_shape)}")
        self.flows = list(flows)
        if not self.flows:
            raise ValueError("FlowMixture: needs at least one flow")
        if logits is not None and tuple(logits.shape) != (len(self.flows),):
            raise ValueError(
                f"FlowMixture: logits must have shape ({len(self.flows)},), one per flow, got {tuple(logits.shape)}"
            )
        self.base_dist = base_dist
        self.logits = logits
        self.auxiliary = auxiliary
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None  # the last draw and its components
        self._active: list[int] | None = None  # the components of nonzero weight (read from the logits once)
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = FlowMixture(self.base_dist.expand(batch_shape), self.flows, self.logits, auxiliary=self.auxiliary)
        new._active = self._active
        return new

    @property
    def active(self) -> list[int]:
        """The indices of the components of nonzero weight (a logit of ``-inf`` is a weight of exactly zero: that
        component is never drawn from nor evaluated)."""
        if self._active is None:
            every = range(len(self.flows))
            alive = [True] * len(self.flows) if self.logits is None else (self.logits > -math.inf).tolist()
            self._active = [k for k in every if alive[k]]
            if not self._active:
                raise ValueError("FlowMixture: every component has weight zero (all logits are -inf)")
        return self._active

    def log_weights(self, like: torch.Tensor, fixed: bool = False) -> torch.Tensor:
        """``log pi``, one per flow, in ``like``'s dtype and device (``fixed``: detached from the logits)."""
        if self.logits is None:
            return like.new_full((len(self.flows),), -math.log(len(self.flows)))
        logits = self.logits.detach() if fixed else self.logits
        return torch.log_softmax(logits, dim=0).to(like)

    def component_distributions(self) -> list:
        """The components of nonzero weight (those :attr:`active` lists, in its order), each a
        ``TransformedDistribution`` of the base."""
        return [dist.TransformedDistribution(self.base_dist, self.flows[k]) for k in self.active]

    def component_indices(self, n: int, device=None) -> torch.Tensor:
        """Which component each of ``n`` draws comes from: systematic sampling by the weights, shuffled."""
        dtype = torch.get_default_dtype() if self.logits is None else self.logits.dtype
        weights = self.log_weights(torch.empty(0, dtype=dtype, device=device), fixed=True).exp()
        edges = torch.cumsum(weights, 0)
        points = (torch.rand((), device=device) + torch.arange(n, device=device)) / n * edges[-1]
        which = torch.searchsorted(edges, points, right=True).clamp_(max=len(self.flows) - 1)
        return which[torch.randperm(n, device=device)]

    def rsample(self, sample_shape=()):
        eps = self.base_dist.rsample(torch.Size(sample_shape))
        flat = eps.reshape(-1, eps.shape[-1])
        which = self.component_indices(flat.shape[0], flat.device)
        positions, parts = [], []
        for k in self.active:
            index = (which == k).nonzero().squeeze(-1)
            if index.numel():
                positions.append(index)
                parts.append(self.flows[k](flat[index]))
        order = torch.argsort(torch.cat(positions))
        value = torch.cat(parts)[order].reshape(eps.shape)
        self._drawn = (value, which.reshape(eps.shape[:-1]))
        return value

    def mix(self, log_probs, fixed: bool = False) -> torch.Tensor:
        """The mixture's log-density from its components' (a sequence of equal-shape tensors, one per component of
        nonzero weight, in :attr:`active`'s order; ``fixed``: the weights held fixed)."""
        stacked = torch.stack(list(log_probs))
        log_w = self.log_weights(stacked, fixed)
        if len(self.active) < len(self.flows):
            log_w = log_w[self.active]
        log_w = log_w.reshape((-1,) + (1,) * (stacked.dim() - 1))
        return torch.logsumexp(stacked + log_w, dim=0)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return self.mix(c.log_prob(value) for c in self.component_distributions())

    def score_parts(self, value):
        """Pyro's ``ScoreParts``: the log-density, and as score function ``log pi_k`` of the component each draw
        came from (when ``value`` is this distribution's last draw and the logits are learned; else 0)."""
        log_prob = self.log_prob(value)
        score, entropy = 0, log_prob
        drawn = self._drawn
        if drawn is not None and drawn[0] is value and self.logits is not None and self.logits.requires_grad:
            score = self.log_weights(log_prob)[drawn[1]]
            if self.auxiliary:
                # The ELBOs weigh the score function by log p - log q per draw, without the log q of auxiliary
                # sites (AutoContinuous's latent): its share, -log q * score, enters through the entropy term.
                entropy = log_prob + log_prob.detach() * score
        return ScoreParts(log_prob=log_prob, score_function=score, entropy_term=entropy)


class AutoFlowMixture(AutoFlow):
    r"""A guide that is a mixture of ``components`` flows with learned weights (:class:`FlowMixture`), for
    posteriors with several separated modes, of which one flow trained on the ELBO covers only one.

    Each component is built by ``init_transform_fn`` as for :class:`AutoFlow` (all of them, and the weights' logits,
    in one flat parameter tensor, ``flow_params``), and starts with its output location ``b`` (pyroflows' builders
    end in the affine map ``y = x * exp(s) + b``) at its own draw from ``N(0, spread² I)``: the components start
    apart, and each goes to a mode near its start. The mixture's entropy term pushes components that share a mode
    apart (where a draw of one is likely under another, ``-log q`` is lower than under that component alone).

    The weights start equal and are learned (``learn_weights=True``) through the score function of each draw's
    component (:meth:`FlowMixture.score_parts`), which Pyro's ``Trace_ELBO`` and
    :class:`~pyroflows.elbo.TraceSTL_ELBO` use; the multi-sample bounds (``TraceIW_ELBO``, ``TraceRenyi_ELBO``,
    and ``fit``'s ``anneal_alpha`` during its annealing steps) leave them where they are. With
    ``learn_weights=False`` they stay equal: a mode found by ``j`` of the ``K`` components then carries ``j / K`` of
    the guide's mass. Draws are allotted to the components by systematic sampling, so with ``num_particles`` of at
    least ``K`` every component with a weight above ``1 / num_particles`` gets draws at every step.

    Cost per step: every component's forward pass on its share of the draws, plus ``K`` inverse passes over all of
    them for ``log q``: cheap for couplings and splines (``realnvp``, ``spline_flow``), ``K`` times the usual
    inverse for autoregressive and residual flows. :func:`~pyroflows.start.gaussian_start` (``fit``'s ``start=``)
    places every component on its Gaussian candidate, each at its start offset in units of the candidate's
    standard deviations.

    Components that do not pay for themselves (two on one mode, one on a mode of negligible mass) can be removed:
    :meth:`select_components` gives them weight zero, after which they cost nothing. Call it once the components
    have settled (after fitting, before sampling or evaluating many densities), or let :func:`~pyroflows.infer.fit`
    call it after ``select_after`` of its steps. It is not done by default: on a unimodal posterior two components
    do not share the mode but split it between them, each alone a poor fit, so both are kept, and where one was
    removed the survivor, half a fit, did worse than one flow trained from the start (docs: "Variational
    inference").

    :param model: a Pyro model.
    :param init_transform_fn: ``latent_dim -> Transform``, as for :class:`AutoFlow`, with an exact log-det (not a
        residual flow's stochastic estimate); it must end in pyroflows' output affine map unless ``spread=0``.
    :param int components: the number of flows ``K`` (at least 1).
    :param float spread: the standard deviation of the components' starting locations (0: all start at the
        origin, identical but for their layers' random initialisation).
    :param bool learn_weights: learn the weights (else they stay equal).
    :param bool heavy_tails: each component on learned heavy-tailed noise, as for :class:`AutoFlow`.
    :param select_after: in :func:`~pyroflows.infer.fit`, call :meth:`select_components` once, after this share
        (in ``[0, 1)``) of the steps that follow fit's annealing (``0.5``: halfway through them); ``None`` (the
        default): never.
    :param float min_gain: :meth:`select_components`' threshold: the ELBO, in nats, a component must add to be kept.

    Example::

        >>> import pyro, pyro.distributions as dist, pyroflows, torch
        >>> from functools import partial
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> pyro.clear_param_store()
        >>> guide = pyroflows.AutoFlowMixture(model, partial(pyroflows.realnvp, num_layers=2), components=3)
        >>> with pyro.plate("particles", 6, dim=-1):
        ...     guide()["z"].shape
        torch.Size([6, 2])
        >>> len(guide.transform)  # the three component flows
        3
    """

    def __init__(
        self,
        model,
        init_transform_fn,
        *,
        components: int = 2,
        spread: float = 1.0,
        learn_weights: bool = True,
        heavy_tails: bool = False,
        select_after: float | None = None,
        min_gain: float = 0.1,
    ):
        from .run import check_number

        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"AutoFlowMixture: components must be an integer >= 1, got {components!r}")
        if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not 0 <= spread < math.inf:
            raise ValueError(f"AutoFlowMixture: spread must be a finite number >= 0, got {spread!r}")
        if learn_weights not in (True, False):
            raise ValueError(f"AutoFlowMixture: learn_weights must be True or False, got {learn_weights!r}")
        check_number("AutoFlowMixture", "select_after", select_after, 0, 1, low_open=False, optional=True)
        check_number("AutoFlowMixture", "min_gain", min_gain, 0, low_open=False)
        super().__init__(model, init_transform_fn, heavy_tails=heavy_tails)
        self.components = components
        self.spread = float(spread)
        self.learn_weights = learn_weights
        self.select_after = None if select_after is None else float(select_after)
        self.min_gain = float(min_gain)

    @torch.no_grad()
    def select_components(self, *args, num_draws: int = 4000, min_gain: float | None = None, **kwargs) -> dict:
        r"""Keep only the components that pay for themselves: remove, one at a time, the component whose removal
        lowers the ELBO least, while that loss is below ``min_gain`` nats; the removed get weight zero (logit
        ``-inf``: never drawn from nor evaluated again, so each step costs what the kept components cost). With
        ``learn_weights=True`` every subset is weighed by its :func:`optimal_weights` (the kept components get
        theirs); else the weights are renormalised over it.

        The ELBO of every subset ``S`` of the components, :math:`\sum_{k \in S} \pi^S_k\,
        \mathbb E_{q_k}[\log p(x, z) - \log q_S(z)]`, is estimated from the same ``num_draws`` draws of the guide,
        split equally between its components (each draw's own component gives the expectations), in eval mode, the
        random state left as it was (in one plate, or one draw at a time, slower and with a warning, for a model
        that mixes or fails on vectorised draws). Components that share a mode add next to nothing to the ELBO and
        all but one go; components on separate modes stay: dropping one of two equal modes costs about
        :math:`\log 2 \approx 0.69` nats, and one holding a share :math:`m` of the posterior's mass about
        :math:`-\log(1 - m)`.
        :func:`~pyroflows.infer.fit` calls this once when the guide's ``select_after`` is set, after that share of
        the steps that follow its annealing; with a plain ``SVI`` loop call it yourself.

        :param args: the model's arguments.
        :param int num_draws: draws of the guide for the estimates.
        :param float min_gain: the ELBO gain, in nats, a component must bring to be kept (default: the guide's
            ``min_gain``).
        :param kwargs: the model's keyword arguments.
        :returns: ``{"kept": [...], "removed": [(k, loss, se), ...], "weights": [...], "elbo": ...,
            "elbo_kept": ...}``: the kept components' indices, the removed ones in order with the ELBO each removal
            cost and its standard error (``nan`` for one removed without draws), the kept components' weights, the
            ELBO of the guide before and after.
        """
        from .infer import _ensure_built
        from .run import check_int, check_number

        check_int("select_components", "num_draws", num_draws, 2)
        min_gain = self.min_gain if min_gain is None else min_gain
        check_number("select_components", "min_gain", min_gain, 0, low_open=False)
        _ensure_built(self, *args, **kwargs)
        log_target, log_q, which, weights, active, _ = self._component_draws(num_draws, args, kwargs)
        every = list(range(len(active)))
        elbo = subset_elbo(log_target, log_q, which, weights, every)[0]
        # with learned weights every subset is judged at its best weights, not where the noisy gradient left them
        kept, removed = prune_components(log_target, log_q, which, weights, min_gain, optimise=self.learn_weights)
        kept_weights = optimal_weights(log_target, log_q, which, kept) if self.learn_weights else weights[kept]
        self._set_weights(active, kept, kept_weights)
        return {
            "kept": [active[a] for a in kept],
            "removed": [(active[a], loss, se) for a, loss, se in removed],
            "weights": [float(w) for w in kept_weights / kept_weights.sum()],
            "elbo": elbo,
            "elbo_kept": subset_elbo(log_target, log_q, which, kept_weights, list(range(len(kept))), rows=kept)[0],
        }

    @torch.no_grad()
    def fit_weights(self, *args, num_draws: int = 4000, **kwargs) -> dict:
        r"""Set the weights to those that maximise the ELBO for the components as they are
        (:func:`optimal_weights`, from ``num_draws`` draws split equally between the components), instead of where
        their noisy stochastic gradient left them. :func:`~pyroflows.infer.fit` does this after its last step (with
        ``learn_weights=True``): the score-function gradient of the weights is noisy, and Adam, which scales its
        steps to the gradient's size, lets the logits wander near their optimum (two modes of equal mass ended at
        weights 0.41 / 0.59 in one run, a KL(q‖p) of 0.018 from the weights alone).

        :param args: the model's arguments.
        :param int num_draws: draws of the guide for the estimate.
        :param kwargs: the model's keyword arguments.
        :returns: ``{"before": [...], "after": [...], "elbo_before": ..., "elbo_after": ...}``: the weights of the
            components of nonzero weight, and the ELBO with each, estimated from the same draws.
        """
        from .infer import _ensure_built
        from .run import check_int

        check_int("fit_weights", "num_draws", num_draws, 2)
        _ensure_built(self, *args, **kwargs)
        log_target, log_q, which, weights, active, _ = self._component_draws(num_draws, args, kwargs)
        every = list(range(len(active)))
        best = optimal_weights(log_target, log_q, which, every)
        self._set_weights(active, every, best)
        return {
            "before": [float(w) for w in weights],
            "after": [float(w) for w in best],
            "elbo_before": subset_elbo(log_target, log_q, which, weights, every)[0],
            "elbo_after": subset_elbo(log_target, log_q, which, best, every)[0],
        }

    def _set_weights(self, active: list[int], kept: list[int], weights: torch.Tensor) -> None:
        """Give the active components at positions ``kept`` the ``weights`` (renormalised), every other weight 0."""
        flows = self._flow()
        logits = torch.full_like(flows.logits, -math.inf)
        logits[[active[a] for a in kept]] = (weights / weights.sum()).log().to(logits)
        with torch.no_grad():
            flows.logits.copy_(logits)

    @torch.no_grad()
    def _component_draws(self, n: int, args: tuple, kwargs: dict):
        """``n`` draws of the guide with the model replayed on them (eval mode, the random state left as it was):
        per draw ``log p(x, z)`` of the unconstrained latent (float64), every active component's ``log q_k(z)``
        (rows), the position of the draw's component among the active, their weights, the active components'
        indices, and the draws ``z`` themselves, shape ``(n, latent_dim)``. The draws run in one plate; where the
        model gives a draw another density there than alone (or fails), one at a time, with a warning (as the
        diagnostics do)."""
        from .diagnostics import _first_line, _vectorized_mismatch
        from .infer import max_plate_nesting, replayed_traces
        from .run import rng_state, set_rng_state

        was_training, state = self.training, rng_state()
        logits = self._flow().logits
        saved = logits.detach().clone()
        active = [k for k in range(len(saved)) if saved[k] > -math.inf]
        self.eval()
        try:
            # equal shares of the draws for the components of nonzero weight: expectations under each are
            # estimated alike, whatever its weight
            logits.copy_(torch.where(saved > -math.inf, 0.0, -math.inf).to(saved))
            dim = -(max_plate_nesting(self.model, self, *args, **kwargs) + 1)
            try:
                parts, model_tr = self._draws_in_plate(n, dim, active, args, kwargs)
                alone = replayed_traces(self.model, self, *args, **kwargs)[1]
                problem = _vectorized_mismatch(self.model, model_tr, alone, n, dim, args, kwargs, draws=(0,))
            except Exception as e:  # noqa: BLE001  whatever fails vectorised is retried one draw at a time
                problem = f"{type(e).__name__}: {_first_line(e)}"
            if problem is not None:
                warnings.warn(
                    f"{type(self).__name__}: the model cannot be run with its {n} draws vectorised ({problem}); "
                    "drawing them one at a time instead, which is slower",
                    UserWarning,
                    stacklevel=5,  # the caller of select_components / fit_weights (each with its no_grad frame)
                )
                runs = [self._draws_in_plate(1, dim, active, args, kwargs)[0] for _ in range(n)]
                parts = [torch.cat(column, dim=0 if i == 3 else -1) for i, column in enumerate(zip(*runs))]
        finally:
            logits.copy_(saved)
            set_rng_state(state)
            self.train(was_training)
        log_target, log_q, which, z = parts
        return log_target, log_q, which, torch.softmax(saved[active].double(), 0), active, z

    def _draws_in_plate(self, n: int, dim: int, active: list[int], args: tuple, kwargs: dict):
        """``(log_target, log_q, which, z)`` of ``n`` draws in one plate at ``dim`` (see :meth:`_component_draws`),
        and the model's trace."""
        from .diagnostics import _DRAW_PLATE, _is_deterministic, _log_density_per_draw
        from .infer import replayed_traces

        def vectorised(fn):
            def run(*a, **k):
                with pyro.plate(_DRAW_PLATE, n, dim=dim):
                    return fn(*a, **k)

            return run

        guide_tr, model_tr = replayed_traces(vectorised(self.model), vectorised(self), *args, **kwargs)
        q = guide_tr.nodes[f"_{self._pyro_name}_latent"]["fn"]
        z, which = q._drawn  # shaped as the plate made them (the draws' dim, then the model's plates)
        log_q = torch.stack([c.log_prob(z).reshape(n) for c in q.component_distributions()]).double().cpu()
        log_p = _log_density_per_draw(model_tr, n, dim, keep=lambda s: not _is_deterministic(s))
        # the guide's other sites are AutoContinuous's Deltas: log |dz/dθ| of the constraining maps
        log_jacobian = _log_density_per_draw(guide_tr, n, dim, keep=lambda s: not s["infer"].get("is_auxiliary"))
        position = {k: a for a, k in enumerate(active)}
        which = torch.tensor([position[int(k)] for k in which.reshape(n).cpu()])
        return (log_p - log_jacobian, log_q, which, z.reshape(n, -1).double().cpu()), model_tr

    def get_transform(self, *args, **kwargs):
        """A mixture of flows is not one bijection from the base noise: refused (``NeuTraReparam``, which asks for
        it, needs a single flow; :meth:`get_posterior` is the mixture's distribution).

        :raises NotImplementedError: always.
        """
        raise NotImplementedError(
            f"{type(self).__name__}: a mixture of flows has no single transform from the base noise (NeuTraReparam "
            "needs one); use the components' flows (guide.transform[k]) or an AutoFlow"
        )

    def neutra_reparam(self, *args, **kwargs):
        """Refused: see :meth:`get_transform`.

        :raises NotImplementedError: always.
        """
        return self.get_transform()

    def get_posterior(self, *args, **kwargs):
        """The guide's distribution over the unconstrained latent vector: a :class:`FlowMixture` of the component
        flows over the base N(0, I). Emits the one ``pyro.param`` site of the flows' parameters.

        :param args: the model's arguments (unused).
        :param kwargs: the model's keyword arguments (unused).
        :returns: a :class:`FlowMixture`.
        """
        flows = self._current_flow()
        return FlowMixture(self.get_base_dist(), flows, flows.logits, auxiliary=True)

    def _build_flow(self):
        built = [super(AutoFlowMixture, self)._build_flow() for _ in range(self.components)]
        flows = MixtureFlows(built, self.latent_dim)
        if has_random_log_det(flows):
            raise ValueError(
                "AutoFlowMixture: the flow estimates its log-det at random (a residual flow beyond its exact "
                "dimension), and the log of a mixture of such estimates is biased; use a flow with an exact log-det"
            )
        like = next(flows[0].parameters(), None)
        if like is not None:
            flows.to(like.device, like.dtype)
        flows.logits.requires_grad_(self.learn_weights)
        if self.spread == 0:
            return flows
        for flow, offset in zip(flows, flows.offsets):
            affine = flow_output_affine(flow, self.latent_dim)
            if affine is None:
                raise ValueError(
                    "AutoFlowMixture: init_transform_fn's flow does not end in pyroflows' output affine map, so the "
                    "components cannot be started apart; use a pyroflows vector builder, or spread=0"
                )
            bias = affine.bias
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, dtype=bias.dtype, device=bias.device) * self.spread)
                offset.copy_(bias)
        return flows


class MixtureFlows(torch.nn.ModuleList):
    """The component flows of :class:`AutoFlowMixture` (a ``ModuleList``), their weights' ``logits`` (a
    parameter, zeros at the start: equal weights) and the ``offsets`` their output locations started at (a buffer,
    one row per flow, where :func:`~pyroflows.start.gaussian_start` places them around its candidate).

    :param flows: the component flows.
    :param int dim: the number of coordinates they act on.

    Example::

        >>> import pyroflows
        >>> flows = MixtureFlows([pyroflows.realnvp(2, num_layers=1) for _ in range(3)], 2)
        >>> len(flows), flows.logits.tolist(), tuple(flows.offsets.shape)
        (3, [0.0, 0.0, 0.0], (3, 2))
    """

    def __init__(self, flows, dim: int):
        super().__init__(flows)
        self.logits = torch.nn.Parameter(torch.zeros(len(self)))
        self.register_buffer("offsets", torch.zeros(len(self), dim))


def subset_elbo(log_target, log_q, which, weights, subset, rows=None) -> tuple[float, torch.Tensor]:
    r"""The ELBO of the mixture of the components ``subset`` (positions, weights renormalised over them), from draws
    of the whole mixture: :math:`\sum_{k \in S} \pi^S_k\, \overline{(\log p - \log q_S)}_k`, the bar a mean over
    the draws of component ``k``; and ``log p - log q_S`` per draw (draws of components outside ``subset`` too).

    :param torch.Tensor log_target: ``log p(x, z)`` per draw, shape ``(n,)``.
    :param torch.Tensor log_q: ``log q_k(z)`` per component and draw, shape ``(K, n)``.
    :param torch.Tensor which: the component (position) of each draw, shape ``(n,)``.
    :param torch.Tensor weights: the components' weights, shape ``(K,)``.
    :param subset: positions of the kept components, each with draws.
    :param rows: where ``weights`` holds only the subset's weights (in its order): the positions of its components
        in ``log_q`` and ``which`` (``None``: ``weights`` has one per row of ``log_q``, ``subset`` indexes both).
    :returns: ``(elbo, per_draw)``.

    Example::

        >>> import torch
        >>> log_q = torch.tensor([[-1.0, -1.0, -9.0, -9.0], [-9.0, -9.0, -1.0, -1.0]])
        >>> log_target = torch.full((4,), -1.0)
        >>> which, weights = torch.tensor([0, 0, 1, 1]), torch.tensor([0.5, 0.5])
        >>> round(subset_elbo(log_target, log_q, which, weights, [0, 1])[0], 3)  # each covers its own mode
        0.693
        >>> round(subset_elbo(log_target, log_q, which, weights, [0])[0], 3)
        0.0
    """
    idx = list(subset) if rows is None else list(rows)
    w = weights[list(subset)]
    w = w / w.sum()
    per_draw = log_target - torch.logsumexp(log_q[idx] + w.log()[:, None], dim=0)
    elbo = sum(float(w[i]) * float(per_draw[which == k].mean()) for i, k in enumerate(idx))
    return elbo, per_draw


def prune_components(
    log_target, log_q, which, weights, min_gain: float, optimise: bool = False
) -> tuple[list[int], list[tuple]]:
    """Backward elimination of mixture components by their ELBO gain (:meth:`AutoFlowMixture.select_components`):
    components without draws go first; then, while more than one is left, the one whose removal lowers the ELBO
    (:func:`subset_elbo`) least goes if that loss is below ``min_gain``.

    :param torch.Tensor log_target: ``log p(x, z)`` per draw, shape ``(n,)``.
    :param torch.Tensor log_q: ``log q_k(z)`` per component and draw, shape ``(K, n)``.
    :param torch.Tensor which: the component (position) of each draw, shape ``(n,)``.
    :param torch.Tensor weights: the components' weights, shape ``(K,)``.
    :param float min_gain: the smallest ELBO loss, in nats, that keeps a component.
    :param bool optimise: weigh every subset by its :func:`optimal_weights` (the ELBO the other components reach
        with their weights relearned) instead of renormalising ``weights`` over it.
    :returns: ``(kept, removed)``: kept positions, and ``(position, loss, standard error)`` per removal in order.

    Example::

        >>> import torch
        >>> log_q = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])  # two identical components
        >>> kept, removed = prune_components(torch.full((4,), -1.0), log_q, torch.tensor([0, 1, 0, 1]),
        ...                                  torch.tensor([0.5, 0.5]), min_gain=0.05)
        >>> kept, [(k, round(loss, 6)) for k, loss, _ in removed]
        ([1], [(0, 0.0)])
    """

    def weigh(subset):
        if optimise:
            return optimal_weights(log_target, log_q, which, subset)
        return weights[subset] / weights[subset].sum()

    def per_draw(subset, w):
        return subset_elbo(log_target, log_q, which, w, range(len(subset)), rows=subset)[1]

    kept = [k for k in range(len(weights)) if bool((which == k).any())]
    removed = [(k, math.nan, math.nan) for k in range(len(weights)) if k not in kept]
    while len(kept) > 1:
        w_full = weigh(kept)
        d_full = per_draw(kept, w_full)
        best = None
        for j in kept:
            rest = [k for k in kept if k != j]
            w_rest = weigh(rest)
            d_rest = per_draw(rest, w_rest)
            loss, var = 0.0, 0.0
            for i, k in enumerate(kept):  # per-draw shares of ELBO(S) - ELBO(S - j), by component
                share = w_full[i] * d_full[which == k]
                if k != j:
                    share = share - w_rest[rest.index(k)] * d_rest[which == k]
                loss += float(share.mean())
                var += float(share.var()) / share.numel() if share.numel() > 1 else 0.0
            if not math.isnan(loss) and (best is None or loss < best[1]):
                best = (j, loss, math.sqrt(var))
        if best is None or best[1] >= min_gain:
            break
        kept.remove(best[0])
        removed.append(best)
    return kept, removed


def optimal_weights(log_target, log_q, which, subset, iterations: int = 500, tol: float = 1e-10) -> torch.Tensor:
    r"""The weights of the components ``subset`` that maximise the mixture's ELBO, the components held as they are.

    The ELBO is concave in the weights :math:`\pi`; its gradient along the simplex is
    :math:`g_k = \mathbb E_{q_k}[\log p(x, z) - \log q_\pi(z)]` up to a constant, equal for every component of
    nonzero weight at the maximum. The exponentiated-gradient step :math:`\pi_k \leftarrow \pi_k e^{g_k} / Z` (an
    EM step: for components with disjoint supports it gives the maximum, :math:`\pi_k \propto e^{\mathrm{ELBO}_k}`,
    at once) is repeated until the weights stop moving. The expectations are means over each component's draws.

    :param torch.Tensor log_target: ``log p(x, z)`` per draw, shape ``(n,)``.
    :param torch.Tensor log_q: ``log q_k(z)`` per component and draw, shape ``(K, n)``.
    :param torch.Tensor which: the component (position) of each draw, shape ``(n,)``.
    :param subset: positions of the components to weigh, each with draws.
    :param int iterations: the most steps.
    :param float tol: stop when no weight moves by more than this.
    :returns: the weights, one per component of ``subset``, summing to 1 (float64).

    Example::

        >>> import torch
        >>> # two components on disjoint modes of mass 0.8 and 0.2, each fitting its mode exactly
        >>> log_q = torch.tensor([[0.0, 0.0, -60.0, -60.0], [-60.0, -60.0, 0.0, 0.0]])
        >>> log_target = torch.tensor([0.8, 0.8, 0.2, 0.2]).log()
        >>> [round(w, 6) for w in optimal_weights(log_target, log_q, torch.tensor([0, 0, 1, 1]), [0, 1]).tolist()]
        [0.8, 0.2]
    """
    idx = list(subset)
    rows = log_q[idx].double()
    masks = [which == k for k in idx]
    w = torch.full((len(idx),), 1.0 / len(idx), dtype=torch.float64)
    for _ in range(iterations):
        per_draw = log_target.double() - torch.logsumexp(rows + w.log()[:, None], dim=0)
        g = torch.stack([per_draw[m].mean() for m in masks])
        new = torch.softmax(w.log() + g - g.max(), 0)
        if not bool(torch.isfinite(new).all()):
            break
        moved = float((new - w).abs().max())
        w = new
        if moved < tol:
            break
    return w
