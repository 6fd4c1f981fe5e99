r"""Invertible residual blocks (Behrmann et al., 2019, i-ResNet; Chen et al., 2019, Residual Flows)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..logdet import LOGDET_MODES, differentiable_inputs, exact_log_det, roulette_coefficients, series_log_det
from ..nn.lipschitz import (
    SpectralConv2d,
    _check_coeff,
    _checked,
    _mlp_apply,
    _mlp_layers,
    _PowerIteration,
    frozen_power_iteration,
    has_closed_form_jacobian,
    lipschitz_cnn,
    lipschitz_mlp,
    mlp_value_and_jacobian,
)
from ._shapes import count, hidden_sizes, positive
from .base import FlowTransform
from .conditional import broadcast_context


@contextlib.contextmanager
def full_precision(x: torch.Tensor):
    """No TF32 inside: on CUDA, convolutions use TF32 by default (10-bit mantissa), which leaves the fixed-point
    iteration a residual of ~1e-5 that it can never push under a float32 tolerance of 1e-6."""
    if x.device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cudnn = torch.backends.cudnn
        with cudnn.flags(
            enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


class _FixedPointInverse(torch.autograd.Function):
    """``x`` with ``x + g(x) = y`` (:meth:`ResidualBlock._solve`); backward by the implicit-function theorem:
    ``grad_y = u`` with ``u (I + J) = grad_x`` (solved directly where the Jacobian is known in closed form, else by
    the iteration ``u <- grad_x - u J``), and ``grad_theta = -u dg/dtheta``."""

    @staticmethod
    def forward(ctx, y, block, g, *params):
        with torch.no_grad(), frozen_power_iteration():
            x = block._solve(y, g)
        ctx.block, ctx.g = block, g
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad_x):
        (x,) = ctx.saved_tensors
        block, g = ctx.block, ctx.g
        inputs = differentiable_inputs(g)
        params = [p for p in inputs if p.requires_grad]
        with torch.enable_grad(), frozen_power_iteration(), full_precision(x):
            x_ = x.detach().requires_grad_()
            if block._closed_form_solves(g):  # the Jacobian in closed form: solve u (I + J) = grad_x directly
                gx, jac = block._value_and_jacobian(x_, g)
                eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
                u = torch.linalg.solve(eye + jac.detach(), grad_x.unsqueeze(-2), left=False).squeeze(-2)
            else:
                gx = g(x_)
                u = grad_x
                for _ in range(block.max_iter):
                    u_new = grad_x - torch.autograd.grad(gx, x_, u, retain_graph=True)[0]
                    done = bool(((u_new - u).abs() <= block._tolerance(u_new)).all())
                    u = u_new
                    if done:
                        break
            grads = torch.autograd.grad(gx, params, -u, allow_unused=True) if params else ()
        it = iter(grads)
        param_grads = tuple(next(it) if p.requires_grad else None for p in inputs)
        return (u, None, None) + param_grads


class _Shifted(nn.Module):
    """A residual branch with a per-example shift added after its first layer: ``g(x; c) = rest(first(x) + s(c))``.
    The shift does not depend on ``x``, so the Lipschitz constant in ``x`` is the branch's own. ``shift`` is an
    explicit differentiable input of the block's autograd functions (:func:`~pyroflows.logdet.differentiable_inputs`),
    so the context gets its gradient even where ``g`` is recomputed in backward."""

    def __init__(self, net: nn.Sequential, shift: torch.Tensor, event_dim: int):
        super().__init__()
        self.net, self.shift, self.event_dim = net, shift, event_dim

    @property
    def extra_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.shift,)

    def shift_for(self, batch_shape: torch.Size) -> torch.Tensor:
        """The shift for inputs of ``batch_shape`` (the batch may arrive flattened)."""
        return self.shift.reshape(batch_shape + self.shift.shape[-1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shift_for(x.shape[: x.dim() - self.event_dim])
        if self.event_dim == 3:
            s = s[..., None, None]
        h = self.net[0](x) + s
        for layer in self.net[1:]:
            h = layer(h)
        return h


#: ``logdet="auto"`` in training: the exact log-det (closed-form Jacobian) up to this event size, else the unbiased
#: estimator. One training step of a block (hidden 128, one thread, forward and backward) measured 1.4 to 2.4 times
#: as fast exact as unbiased at D <= 10 and 1 to 256 samples, 1.2 to 1.7 times at D = 16 (0.9 times at 1024
#: samples); beyond, the D x D Jacobian's cost grows with the batch (0.55 times at D = 32 and 256 samples).
TRAIN_EXACT_MAX_DIM = 16
#: ... and up to ``exact_max_dim`` for a batch of ``n`` samples with ``n * D**2`` at most this (8 samples at D = 64,
#: 32 at D = 32, a variational guide's few draws per step): there the exact step was still 1.2 and 1.1 times as fast.
TRAIN_EXACT_MAX_WORK = 2**15


class ResidualBlock(FlowTransform):
    r"""Invertible residual block :math:`y = x + g(x)` with :math:`\mathrm{Lip}(g) \le c < 1`.

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right| = \log\det(I + J_g(x))
        = \sum_{k \ge 1} \frac{(-1)^{k+1}}{k} \operatorname{tr}(J_g^k),

    estimated as chosen by ``logdet`` (see :mod:`pyroflows.logdet`): ``"exact"`` (full Jacobian),
    ``"series"`` (truncated, ``n_terms``), ``"unbiased"`` (Russian roulette) or ``"auto"`` (the default): exact for
    vectors of ``D <= 16`` (:data:`TRAIN_EXACT_MAX_DIM`) with the default network, and up to ``exact_max_dim`` for
    batches of ``n`` samples with ``n * D**2 <= 2**15`` (a guide's few draws: 8 at ``D = 64``), whose Jacobian
    :math:`W_2 \operatorname{diag}(\phi'(h)) W_1` is computed in closed form
    (:func:`~pyroflows.nn.mlp_value_and_jacobian`), which there costs less than the estimator; unbiased otherwise.
    The exact log-det has no estimator noise, and a guide's log-density is then the same at every evaluation
    (which sticking-the-landing gradients need). With the series estimators the value in training is the log-det
    estimate and the gradient the Neumann-series estimator; ``memory_efficient`` recomputes ``g`` in the
    backward pass instead of keeping graphs (same values and gradients).
    Evaluation uses ``eval_logdet``: ``"auto"`` is exact for event size ``D <= exact_max_dim``, otherwise
    the unbiased estimator with ``eval_n_exact_terms`` exact terms (the figures it gives are estimates:
    :func:`pyroflows.train.evaluate_with_error` reports one with its standard error).

    The inverse solves :math:`x = y - g(x)` by fixed-point iteration from :math:`x_0 = y - g(y)` (a contraction,
    so it converges), per sample to ``|x_{k+1} - x_k| <= atol + rtol |x_{k+1}|``; if any sample has not
    converged after ``max_iter`` iterations it raises ``RuntimeError`` with the residual reached (or warns,
    with ``on_fail="warn"``). With ``inverse="auto"`` (the default), vector blocks of ``D <= 16`` with the default
    network switch to safeguarded Newton steps when the iteration contracts slowly. Gradients through the inverse
    use the implicit-function theorem. The inverse's
    log-det is evaluated at the recovered ``x``.

    References: Behrmann et al., *Invertible Residual Networks*, ICML 2019; Chen et al., *Residual Flows for
    Invertible Generative Modeling*, NeurIPS 2019.

    :param shape: ``D`` (vectors: ``g`` is a :func:`~pyroflows.nn.lipschitz_mlp`) or ``(C, H, W)`` (images:
        a :func:`~pyroflows.nn.lipschitz_cnn`; ``H``, ``W`` may be ``None``).
    :param hidden: hidden sizes (vectors) or hidden channels (images).
    :param float coeff: Lipschitz bound of ``g``, in ``(0, 1)``.
    :param torch.nn.Module net: a custom ``g`` (you guarantee its Lipschitz bound); replaces the default.
    :param str logdet: ``"auto"``, ``"exact"``, ``"series"`` or ``"unbiased"`` (training; before 0.2 the default
        was ``"unbiased"``).
    :param int n_terms: terms of the ``"series"`` estimator.
    :param int n_exact_terms: always-kept terms of the ``"unbiased"`` estimator.
    :param float geom_p: success probability of the geometric roulette.
    :param str roulette: ``"geometric"`` or ``"poisson"`` (with ``poisson_lam``).
    :param float poisson_lam: mean number of extra terms of the Poisson roulette.
    :param int n_samples: Hutchinson probes per estimate.
    :param str probe: ``"gaussian"`` or ``"rademacher"``.
    :param bool memory_efficient: backward-in-forward (recompute) instead of ordinary autograd graphs.
    :param str eval_logdet: estimator in eval mode: ``"auto"``, ``"exact"``, ``"series"``, ``"unbiased"``.
    :param int eval_n_exact_terms: exact terms of the eval-mode unbiased estimator (default 2; was 20 before 0.2).
        On a trained 28x28 model (1000 images, 2 repeats, batches of 25; ``benchmarks/residual_eval.py``) 2 terms
        gave a standard error of 0.0013 bits/dim in 0.74 times the time of 4 (0.0007) and 0.18 times that of one
        evaluation with 20; 1 term 0.0066. Raise it for a tighter error bar at the same number of repeats.
    :param int exact_max_dim: ``"auto"`` uses the exact log-det up to this event size.
    :param float atol: inverse tolerance (default: 1e-6 in float32, 1e-12 in float64).
    :param float rtol: inverse relative tolerance (default: same as ``atol``).
    :param int max_iter: inverse iteration limit.
    :param str on_fail: ``"raise"`` or ``"warn"`` when the inverse does not converge.
    :param str inverse: ``"fixed_point"``, ``"newton"`` (vectors with the default network) or ``"auto"`` (the
        default): the fixed-point iteration, which for vectors of ``D <= 16`` with the default network hands over
        to Newton's method when its observed contraction is slow, and whose gradient there is one linear solve.
    :param bool learn_p: vectors: learn the orders of the hidden norms (induced mixed norms, Chen et al. 2019);
        the block's bound stays ``coeff`` in the 2-norm.
    :param int context_dim: a conditional block (0: none): the context, through a zero-initialised linear map, shifts
        the outputs of ``g``'s first layer, :math:`g(x; c) = g_2(W_1 x + b_1 + V c)`, which leaves the Lipschitz
        constant in ``x`` at ``coeff`` (invertibility in ``x`` for every context). The context is an explicit input
        of the memory-efficient backward and of the inverse's implicit gradients, so it gets exact gradients. Use
        it through :class:`~pyroflows.transforms.ConditionalResidualBlock`.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ResidualBlock
        >>> block = ResidualBlock(2, hidden=(16,), logdet="exact")
        >>> x = torch.randn(4, 2)
        >>> torch.allclose(block.inv(block(x).clone()), x, atol=1e-5)
        True
    """

    def __init__(
        self,
        shape: int | Sequence[int | None],
        hidden: int | Sequence[int] | None = None,
        coeff: float = 0.98,
        net: nn.Module | None = None,
        *,
        logdet: str = "auto",
        n_terms: int = 5,
        n_exact_terms: int = 2,
        geom_p: float = 0.5,
        roulette: str = "geometric",
        poisson_lam: float = 2.0,
        n_samples: int = 1,
        probe: str = "gaussian",
        memory_efficient: bool = True,
        eval_logdet: str = "auto",
        eval_n_exact_terms: int = 2,
        exact_max_dim: int = 64,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int = 1000,
        on_fail: str = "raise",
        inverse: str = "auto",
        learn_p: bool = False,
        context_dim: int = 0,
    ):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) not in (1, 3):
            raise ValueError(f"ResidualBlock: shape must be D or (C, H, W), got {shape!r}")
        _check_coeff(coeff, "ResidualBlock")
        if logdet not in LOGDET_MODES + ("auto",):
            raise ValueError(f"ResidualBlock: logdet must be 'auto' or one of {LOGDET_MODES}, got {logdet!r}")
        if eval_logdet not in LOGDET_MODES + ("auto",):
            raise ValueError(f"ResidualBlock: eval_logdet must be 'auto' or one of {LOGDET_MODES}, got {eval_logdet!r}")
        if on_fail not in ("raise", "warn"):
            raise ValueError(f"ResidualBlock: on_fail must be 'raise' or 'warn', got {on_fail!r}")
        if inverse not in ("auto", "newton", "fixed_point"):
            raise ValueError(f"ResidualBlock: inverse must be 'auto', 'newton' or 'fixed_point', got {inverse!r}")
        where = "ResidualBlock"
        for name, value, low in (("n_terms", n_terms, 1), ("n_samples", n_samples, 1), ("max_iter", max_iter, 1),
                                 ("n_exact_terms", n_exact_terms, 0), ("eval_n_exact_terms", eval_n_exact_terms, 0),
                                 ("exact_max_dim", exact_max_dim, 0)):  # fmt: skip
            count(value, name, where, low)
        positive(geom_p, "geom_p", where, high=1.0)
        positive(poisson_lam, "poisson_lam", where)
        for name, value in (("atol", atol), ("rtol", rtol)):
            if value is not None:
                positive(value, name, where, closed=True)
        super().__init__(event_dim=len(shape), event_shape=shape)
        self.coeff = coeff
        if net is None:
            if len(shape) == 1:
                net = lipschitz_mlp(shape[0], hidden_sizes(hidden, (128,), where), coeff, learn_p=learn_p)
            else:
                net = lipschitz_cnn(
                    shape[0], 64 if hidden is None else count(hidden, "hidden (channels)", where), coeff
                )
        self.net = net
        self.context_dim = count(context_dim, "context_dim", where, 0)
        self.context_net = None
        if self.context_dim:
            if not isinstance(net, nn.Sequential) or not hasattr(net[0], "weight"):
                raise ValueError("ResidualBlock: context_dim needs the default Lipschitz network (net=None)")
            width = net[0].weight.shape[0]  # the first layer's outputs: the context shifts them
            self.context_net = nn.Linear(self.context_dim, width)
            nn.init.zeros_(self.context_net.weight)  # a fresh conditional block is the plain one
            nn.init.zeros_(self.context_net.bias)
        self.logdet, self.n_terms, self.n_exact_terms = logdet, n_terms, n_exact_terms
        self.geom_p, self.roulette, self.poisson_lam = geom_p, roulette, poisson_lam
        self.n_samples, self.probe, self.memory_efficient = n_samples, probe, memory_efficient
        self.eval_logdet, self.eval_n_exact_terms, self.exact_max_dim = eval_logdet, eval_n_exact_terms, exact_max_dim
        self.atol, self.rtol, self.max_iter, self.on_fail = atol, rtol, max_iter, on_fail
        if inverse == "newton" and (len(shape) != 1 or not has_closed_form_jacobian(net)):  # checked once, here
            raise ValueError(
                "ResidualBlock: inverse='newton' needs a vector block whose branch has a closed-form Jacobian "
                "(the default network; see pyroflows.nn.has_closed_form_jacobian)"
            )
        self.inverse = inverse
        self.last_inverse_iterations: int | None = None  # iterations of the last inverse (diagnostics)
        if roulette not in ("geometric", "poisson"):
            raise ValueError(f"ResidualBlock: roulette must be 'geometric' or 'poisson', got {roulette!r}")

    # ----------------------------------------------------------------- log-det
    def _mode(self, x) -> tuple[str, int]:
        if self.training:
            return self._train_mode(math.prod(x.shape[: x.dim() - self._event_dim])), self.n_exact_terms
        return self._eval_mode(math.prod(x.shape[x.dim() - self._event_dim :])), self.eval_n_exact_terms

    def _train_mode(self, samples: int | None = None) -> str:
        """``logdet`` with ``"auto"`` resolved for a batch of ``samples`` (``None``: not known): exact where the
        Jacobian is known in closed form and small (``D <= TRAIN_EXACT_MAX_DIM``), or small enough for this batch
        (``D <= exact_max_dim`` and ``samples * D**2 <= TRAIN_EXACT_MAX_WORK``: a guide's few draws)."""
        if self.logdet != "auto":
            return self.logdet
        shape = self.event_shape
        if len(shape) != 1 or shape[0] is None or not has_closed_form_jacobian(self.net):
            return "unbiased"
        dim = shape[0]
        if dim <= TRAIN_EXACT_MAX_DIM:
            return "exact"
        few = samples is not None and dim <= self.exact_max_dim and samples * dim * dim <= TRAIN_EXACT_MAX_WORK
        return "exact" if few else "unbiased"

    def _eval_mode(self, dim: int | None) -> str:
        """``eval_logdet`` with ``"auto"`` resolved for an event of ``dim`` values (``None``: not known)."""
        if self.eval_logdet != "auto":
            return self.eval_logdet
        return "exact" if dim is not None and dim <= self.exact_max_dim else "unbiased"

    @property
    def random_log_det(self) -> bool:
        """Whether the log-det in the current mode may be a random estimate (every mode but ``"exact"``; ``"auto"``
        is exact in eval mode up to ``exact_max_dim`` dimensions when the event shape is fully known, and in training
        up to ``TRAIN_EXACT_MAX_DIM``; between the two a training call's choice depends on its batch, so this says
        ``True``)."""
        if self.training:
            return self._train_mode() != "exact"
        shape = self.event_shape
        known = shape is not None and all(s is not None for s in shape)
        return self._eval_mode(math.prod(shape) if known else None) != "exact"

    def _coefficients(self, mode: str, n_exact: int) -> list[float]:
        if mode == "series":
            return [1.0] * self.n_terms
        return roulette_coefficients(n_exact, self.roulette, self.geom_p, self.poisson_lam)

    @contextlib.contextmanager
    def _refreshed(self, x: torch.Tensor):
        """Bring every Lipschitz layer's power iteration up to date (a no-op unless the weights changed or the
        mode switched), so the frozen evaluations that follow (Jacobians, fixed-point iterations, recomputation
        in backward) all use the normalisation of this call; the evaluations inside the context skip the check
        (a fingerprint of the weight per layer and evaluation), which has just been made."""
        for m in self.net.modules():
            if isinstance(m, SpectralConv2d):
                m._ensure_vectors(x)
            if isinstance(m, _PowerIteration):
                m._update()
        with _checked():
            yield

    def _branch(self, x: torch.Tensor, context) -> tuple[torch.Tensor, nn.Module]:
        """``(x, g)``: the residual branch for ``context`` (``x`` broadcast against it), or the plain one."""
        if not self.context_dim:
            return x, self.net
        x, context = broadcast_context(x, context, self._event_dim, self.context_dim, "ResidualBlock")
        return x, _Shifted(self.net, self.context_net(context.to(x.dtype)), self._event_dim)

    def forward_and_log_det(self, x, context=None):
        x, g = self._branch(x, context)
        with self._refreshed(x):
            mode, n_exact = self._mode(x)
            if mode == "exact":
                closed = self._value_and_jacobian(x, g)
                if closed is not None:
                    gx, jac = closed
                    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
                    return x + gx, torch.linalg.slogdet(eye + jac).logabsdet
                gx = g(x)
                return x + gx, exact_log_det(g, x, self._event_dim)
            coeffs = self._coefficients(mode, n_exact)
            return series_log_det(g, x, self._event_dim, coeffs, self.n_samples, self.probe, self.memory_efficient)

    @staticmethod
    def _net_and_shift(g: nn.Module, batch_shape: torch.Size | None = None) -> tuple[nn.Module, torch.Tensor | None]:
        """The network of a branch and its context shift (``None`` for a plain branch), the shift shaped for a batch
        of ``batch_shape`` (not reshaped without one)."""
        if not isinstance(g, _Shifted):
            return g, None
        return g.net, g.shift if batch_shape is None else g.shift_for(batch_shape)

    def _value_and_jacobian(self, x: torch.Tensor, g: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(g(x), J_g(x))`` in closed form for a vector block whose branch is a Lipschitz MLP (the default one,
        shifted by a context or not), else ``None``."""
        if self._event_dim != 1:
            return None
        net, shift = self._net_and_shift(g, x.shape[:-1])
        return mlp_value_and_jacobian(net, x, shift)

    lazy_log_det = True  # the log-det (a Jacobian or a series of vector-Jacobian products) dwarfs x + g(x)

    def forward_only(self, x):
        if self.context_dim:  # needs a context: the full call (which names a missing one)
            return self.forward_and_log_det(x)[0]
        with self._refreshed(x):
            return x + self.net(x)

    def inverse_only(self, y, context=None):
        y, g = self._branch(y, context)
        with self._refreshed(y):
            return _FixedPointInverse.apply(y, self, g, *differentiable_inputs(g))

    # ----------------------------------------------------------------- inverse
    def _tolerance(self, x: torch.Tensor) -> torch.Tensor:
        default = 1e-12 if x.dtype == torch.float64 else 1e-6
        atol = default if self.atol is None else self.atol
        rtol = default if self.rtol is None else self.rtol
        return atol + rtol * x.abs()

    def _solve(self, y: torch.Tensor, g: nn.Module | None = None) -> torch.Tensor:
        with full_precision(y):
            return self._iterate(y, self.net if g is None else g)

    def _closed_form_solves(self, g: nn.Module) -> bool:
        """Whether this block may solve with its Jacobian (Newton steps, the implicit gradient by one linear solve):
        ``inverse="newton"``, or ``"auto"`` for vectors of at most ``TRAIN_EXACT_MAX_DIM`` values whose branch has a
        closed-form Jacobian (beyond, the Jacobian costs more than the iterations it saves)."""
        if self.inverse == "fixed_point" or self._event_dim != 1:
            return False
        if not has_closed_form_jacobian(self._net_and_shift(g)[0]):  # (a net replaced after construction)
            return False
        dim = self.event_shape[0]
        return self.inverse == "newton" or (dim is not None and dim <= TRAIN_EXACT_MAX_DIM)

    def _iterate(self, y: torch.Tensor, g: nn.Module) -> torch.Tensor:
        """The solve, on one frozen map: for the default vector network its normalised weights are taken once
        (:func:`~pyroflows.nn.lipschitz._mlp_layers`), not at every evaluation."""
        net, _ = self._net_and_shift(g)
        if self._event_dim == 1 and has_closed_form_jacobian(net):
            layers, shift = _mlp_layers(net), self._net_and_shift(g, y.shape[:-1])[1]

            def branch(x):
                return _mlp_apply(layers, x, shift)[0]

            def with_jacobian(x):
                return _mlp_apply(layers, x, shift, jacobian=True)

        else:
            branch, with_jacobian = g, None
        start = self._warm_start(y)
        if start is None:
            start = y - branch(y)
        if self.inverse == "newton":
            return self._newton(y, branch, with_jacobian, start, 0)
        switch = with_jacobian if self._closed_form_solves(g) else None
        return self._fixed_point(y, branch, switch, start, 0)

    @property
    def warm_start_inverse(self) -> bool:
        """Vector blocks: yes (in a guide, the sticking-the-landing gradient inverts a copy of each draw, and a
        :class:`Compose` remembers this block's pair so that the solve starts from its input). Image blocks: no (a
        density model's inverse draws new points, so a remembered pair would only hold memory between steps)."""
        return self._event_dim == 1

    def _warm_start(self, y: torch.Tensor) -> torch.Tensor | None:
        """Where the solve starts when ``y`` is (to the solve's tolerance) the output of the remembered pair: its
        input, the answer under the same parameters (the sticking-the-landing gradient inverts a copy of each draw,
        and the inverse of a later block returns its input to the tolerance). ``None`` for any other ``y``, whose
        solve starts from ``y - g(y)``: a remembered input of another point would be a worse start."""
        return self.remembered_input(y, within=self._tolerance)

    def _newton(self, y, branch, with_jacobian, x: torch.Tensor, done: int) -> torch.Tensor:
        """Newton's method on ``F(x) = x + g(x) - y`` from ``x``: ``x <- x - (I + J_g(x))^{-1} F(x)``. It converges
        quadratically near the solution, where the fixed-point iteration gains a factor of at most ``Lip(g)`` per
        step. Safeguarded: a sample whose residual a Newton step did not reduce takes the fixed-point step from the
        previous iterate instead, which reduces it by a factor ``Lip(g) < 1`` (in the 2-norm); after half the
        iterations left the fixed-point iteration takes over. ``branch`` is ``g``, ``with_jacobian`` gives
        ``(g(x), J_g(x))``."""
        gx, jac = with_jacobian(x)
        r = x + gx - y
        norm = torch.linalg.vector_norm(r, dim=-1)
        eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
        budget = done + max(1, (self.max_iter - done) // 2)
        for k in range(done, budget):
            x_new = x - torch.linalg.solve(eye + jac, r.unsqueeze(-1)).squeeze(-1)
            step = (x_new - x).abs() - self._tolerance(x_new)
            if bool((step <= 0).all()):
                self.last_inverse_iterations = k + 1
                return x_new
            gx_new, jac_new = with_jacobian(x_new)
            r_new = x_new + gx_new - y
            norm_new = torch.linalg.vector_norm(r_new, dim=-1)
            worse = ~(norm_new < norm)  # NaN counts as worse
            if bool(worse.any()):
                x_fp = y - gx  # the fixed-point step from x
                gx_fp, jac_fp = with_jacobian(x_fp)
                keep = worse.unsqueeze(-1)
                x_new, gx_new = torch.where(keep, x_fp, x_new), torch.where(keep, gx_fp, gx_new)
                jac_new = torch.where(keep.unsqueeze(-1), jac_fp, jac_new)
                r_new = x_new + gx_new - y
                norm_new = torch.linalg.vector_norm(r_new, dim=-1)
            x, gx, jac, r, norm = x_new, gx_new, jac_new, r_new, norm_new
        return self._fixed_point(y, branch, None, x, budget)

    def _fixed_point(self, y, branch, switch, x: torch.Tensor, done: int) -> torch.Tensor:
        """The fixed-point iteration ``x <- y - g(x)`` from ``x`` (``branch`` is ``g``), ``done`` iterations having
        been spent. With ``switch`` (a function giving ``(g(x), J_g(x))``), it hands over to Newton's method when
        the contraction it observes is so slow that the iterations left would cost more than a few Newton steps:
        from the ratio ``rho`` of successive steps (each relative to the tolerance), ``log(step / tol) / -log(rho)``
        iterations remain, against 3 Newton steps that each cost about ``1 + D`` iterations (the Jacobian's ``D``
        columns; on few samples, where overheads dominate, less)."""
        batch_dims = y.dim() - self._event_dim
        step, previous = None, None
        newton_cost = 3 * (1 + y.shape[-1])
        for k in range(done, self.max_iter):
            x_new = y - branch(x)
            diff, tol = (x_new - x).abs(), self._tolerance(x_new)
            step = diff - tol
            x = x_new
            if bool((step <= 0).all()):
                self.last_inverse_iterations = k + 1
                return x
            if switch is not None and k - done >= 2:  # the first steps do not show the rate yet
                size = float((diff / tol).max())  # > 1 here: the worst element is still above its tolerance
                if previous is not None:
                    rate = size / previous
                    remaining = math.inf if not rate < 1 else math.log(size) / -math.log(rate)
                    if remaining > newton_cost:
                        return self._newton(y, branch, switch, x, k + 1)
                previous = size
        if step is None:  # no iteration left: measure the last one
            step = (y - branch(x) - x).abs() - self._tolerance(x)
        self.last_inverse_iterations = self.max_iter
        residual = (x + branch(x) - y).abs().reshape(y.shape[:batch_dims] + (-1,)).amax(-1)
        unsettled = ~(step <= 0)  # NaN (a diverged iterate) counts as not converged
        n_bad = int(unsettled.reshape(y.shape[:batch_dims] + (-1,)).any(-1).sum())
        message = (
            f"ResidualBlock inverse did not converge in max_iter={self.max_iter} iterations: "
            f"{n_bad} sample(s) above tolerance, max residual |x + g(x) - y| = {float(residual.max()):.3e}"
        )
        scale = 1.0 + float(y.abs().max())
        if not bool(torch.isfinite(x).all()) or float(residual.max()) > 1e6 * scale:
            message += (
                "; the iteration diverged (iterates blew up): g is not a contraction, so a custom net must have "
                "a Lipschitz constant below 1 (the built-in ones are bounded by coeff)"
            )
        if self.on_fail == "raise":
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        return x

    def inverse_and_log_det(self, y, context=None):
        x = self.inverse_only(y, context)
        _, log_det = self.forward_and_log_det(x, context)
        return x, -log_det

    def extra_repr(self) -> str:
        return f"shape={self.event_shape}, coeff={self.coeff}, logdet={self.logdet!r}, eval_logdet={self.eval_logdet!r}"
