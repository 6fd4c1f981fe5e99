r"""Lipschitz-constrained networks for residual flows (Behrmann et al., 2019; Chen et al., 2019).

A layer's weight is rescaled in every forward, :math:`W \leftarrow W / \max(1, \hat\sigma / c)`, with
:math:`\hat\sigma` an estimate of the operator norm from power iteration kept in persistent buffers. In
training the iterations run on the first forward after each change of the weight (each optimiser step), so the
bound holds after every step without any call from the user, and all calls between two steps see one function;
in eval mode they run to a tolerance. Convolutions are normalised as the
operator they are at the input's spatial size (power iteration through ``conv2d`` / ``conv_transpose2d``),
not as a reshaped kernel matrix.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

_FROZEN = [0]
# inside _checked(): the caller has just brought every Lipschitz layer it evaluates up to date (_update), so those
# evaluations skip the check for a changed weight (a fingerprint and a comparison per layer and call)
_CHECKED = [0]
#: training mode, on the CPU: skip the power iteration when the weight has not changed since the last one (on an
#: accelerator it always runs and a ``torch.where`` keeps or discards it, so that no call waits on the device)
_SKIP_UNCHANGED_ON_CPU = True
_INPUT_GRADIENTS_ONLY = [0]


@contextlib.contextmanager
def input_gradients_only():
    """Within this context the networks may drop their parameters from the graph, for code that differentiates
    only in the input, such as an evaluation-mode log-det, series or exact (today: LipSwish then uses a backward
    that keeps its elementwise derivative across vector-Jacobian products, without its slope's gradient).

    Example::

        >>> import torch
        >>> from pyroflows.nn import LipSwish, input_gradients_only
        >>> act, x = LipSwish(), torch.ones(2, requires_grad=True)
        >>> with input_gradients_only():
        ...     y = act(x)
        >>> y.requires_grad, torch.autograd.grad(y.sum(), act.raw_beta, allow_unused=True)[0] is None
        (True, True)
    """
    _INPUT_GRADIENTS_ONLY[0] += 1
    try:
        yield
    finally:
        _INPUT_GRADIENTS_ONLY[0] -= 1


@contextlib.contextmanager
def frozen_power_iteration():
    """Within this context no Lipschitz layer updates its power-iteration vectors, so repeated evaluations of a
    network (Jacobians, recomputation in a memory-efficient backward, fixed-point iterations) all see the same
    normalised weights as the forward pass they belong to.

    Example::

        >>> import torch
        >>> from pyroflows.nn import SpectralLinear, frozen_power_iteration
        >>> layer = SpectralLinear(3, 3)
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(2.0)  # a changed weight: the next forward would iterate again
        >>> u = layer.u.clone()
        >>> with frozen_power_iteration():
        ...     _ = layer(torch.randn(2, 3))
        >>> torch.equal(layer.u, u)
        True
    """
    _FROZEN[0] += 1
    try:
        yield
    finally:
        _FROZEN[0] -= 1


@contextlib.contextmanager
def _checked():
    """Private: evaluations inside skip :meth:`_PowerIteration._update`'s check for a changed weight, because the
    caller has just run it for every Lipschitz layer it evaluates (a residual block, once per call, before its map,
    Jacobian or fixed-point solve). Unlike :func:`frozen_power_iteration` the norm estimate buffer ``sigma`` is
    still written."""
    _CHECKED[0] += 1
    try:
        yield
    finally:
        _CHECKED[0] -= 1


def _check_coeff(coeff: float, name: str) -> float:
    if not 0.0 < coeff < 1.0:
        raise ValueError(f"{name}: the Lipschitz coefficient coeff must lie in (0, 1), got {coeff!r}")
    return float(coeff)


def _normalize_p(x: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    return x / flat.abs().pow(p).sum().pow(1.0 / p).clamp_min(1e-12)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` over its 2-norm (the ``p = 2`` case of :func:`_normalize_p`, in fewer operations)."""
    return x / torch.linalg.vector_norm(x).clamp_min(1e-12)


def _dual(x: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """The unit vector of the dual norm aligned with ``x``: ``sign(x) |x|^{p-1} / ||x||_p^{p-1}``."""
    x = _normalize_p(x, p)
    return torch.sign(x) * x.abs().pow(p - 1)


class _PowerIteration(nn.Module):
    """Shared machinery: persistent ``u``/``v`` buffers, iterations per training step, tolerance at eval.

    "Has the weight changed?" is answered by a fingerprint of the weight (its dot product with a fixed random
    vector), not by the tensor's version counter: Pyro's ``ClippedAdam`` updates parameters through ``.data``,
    which no version counter sees. In training the candidate iteration is always computed and kept only if
    the fingerprint changed (``torch.where``, no device synchronisation).
    """

    def __init__(self, coeff: float, n_iterations: int, atol: float, rtol: float, max_eval_iterations: int):
        super().__init__()
        self.coeff = _check_coeff(coeff, type(self).__name__)
        if n_iterations < 1:
            raise ValueError(f"{type(self).__name__}: n_iterations must be >= 1, got {n_iterations!r}")
        self.n_iterations = n_iterations
        self.atol, self.rtol, self.max_eval_iterations = atol, rtol, max_eval_iterations
        self.register_buffer("sigma", torch.ones(()))
        # persistent, so that a resumed run iterates exactly when the uninterrupted one would
        self.register_buffer("_train_fp", torch.tensor(float("nan")))
        # the fingerprint for which the eval-mode estimate has converged (NaN: none), saved so that a loaded layer
        # in eval mode does not iterate once more and compute a slightly different map than the one saved;
        # _eval_fp is its python mirror (no device sync per call)
        self.register_buffer("_eval_mark", torch.tensor(float("nan")))
        self._eval_fp = None

    @property
    def _eval_fp(self) -> float | None:
        return self.__dict__.get("_eval_fp_value")

    @_eval_fp.setter
    def _eval_fp(self, value: float | None) -> None:
        if "_eval_fp_value" in self.__dict__ and self.__dict__["_eval_fp_value"] == value:
            return  # every training call sets None: no fill (a kernel launch) when nothing changes
        self.__dict__["_eval_fp_value"] = value
        if "_eval_mark" in self._buffers:
            self._eval_mark.fill_(float("nan") if value is None else value)

    def _init_fingerprint(self) -> None:
        # a fixed probe (not drawn from the global RNG): every build of the layer fingerprints alike
        probe = torch.randn(self.weight.shape, generator=torch.Generator().manual_seed(20190604))
        self.register_buffer("_fp_probe", probe, persistent=False)

    def _fingerprint(self) -> torch.Tensor:
        return (self.weight.detach() * self._fp_probe).sum()

    def _iterate(self, n: int) -> None:
        raise NotImplementedError

    # A conversion (.to(), .double(), .float(), .cuda()) rounds the weight, so its fingerprint changes although the
    # function does not: vectors that were up to date before stay up to date (re-stamped), or the next call would
    # iterate again and the converted layer would compute another map than the original.
    def _apply(self, fn, *args, **kwargs):
        if "_fp_probe" not in self._buffers:
            return super()._apply(fn, *args, **kwargs)
        with torch.no_grad():
            fp = self._fingerprint()
            marks = self._current_marks(fp)
        self._convert_extra(fn)
        out = super()._apply(fn, *args, **kwargs)
        with torch.no_grad():
            self._restamp(marks, self._fingerprint())
        return out

    def _convert_extra(self, fn) -> None:
        """Convert state kept outside parameters and buffers (nothing here)."""

    def _current_marks(self, fp: torch.Tensor) -> dict:
        return {"train": bool(fp == self._train_fp), "eval": self._eval_fp is not None and self._eval_fp == float(fp)}

    def _restamp(self, marks: dict, fp: torch.Tensor) -> None:
        if marks["train"]:
            self._train_fp.copy_(fp)
        if marks["eval"]:
            self._eval_fp = float(fp)

    def _sigma(self, v: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    # The power-iteration vectors are part of the map: a loaded layer must not iterate again before its weight
    # changes, or it would compute a (slightly) different function than the one that was saved. The saved
    # fingerprint says when the vectors were last iterated; a state_dict without one (older files) counts as
    # "iterated for the loaded weight".
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        has_fp = prefix + "_train_fp" in state_dict
        mark = state_dict.get(prefix + "_eval_mark")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        if not has_fp:
            if prefix + "_train_fp" in missing_keys:
                missing_keys.remove(prefix + "_train_fp")
            with torch.no_grad():
                self._train_fp.copy_(self._fingerprint())
        if prefix + "_eval_mark" in missing_keys:  # files written before the mark was saved
            missing_keys.remove(prefix + "_eval_mark")
        self._eval_fp = None if mark is None or not bool(torch.isfinite(mark)) else float(mark)

    @torch.no_grad()
    def _update(self) -> None:
        """Iterate if the weight changed since the last iteration (training) or the estimate has not converged
        for this weight (eval); a no-op inside :func:`frozen_power_iteration`."""
        if _FROZEN[0] or _CHECKED[0]:
            return
        fp = self._fingerprint()
        if self.training:
            # Once per change of the weight (i.e. per optimiser step), not per call: every forward, inverse
            # and log-det evaluation between two steps sees the same normalised weight, the same function.
            if self._eval_fp is not None:  # (a test first: setting goes through Module.__setattr__)
                self._eval_fp = None
            changed = fp != self._train_fp  # NaN at first: always "changed"
            if _SKIP_UNCHANGED_ON_CPU and changed.device.type == "cpu":
                # on the CPU reading the flag costs no device sync: iterate only when the weight changed, with
                # no copies to fall back to
                if bool(changed):
                    self._iterate(self.n_iterations)
                    self._train_fp.copy_(fp)
                return
            u, v = self.u.clone(), self.v.clone()
            self._iterate(self.n_iterations)
            self.u.copy_(torch.where(changed, self.u, u))
            self.v.copy_(torch.where(changed, self.v, v))
            self._train_fp.copy_(fp)
            return
        fp = float(fp)
        if self._eval_fp == fp:
            return
        self._converge()
        self._eval_fp = fp

    def _converged(self, previous: float, current: float) -> bool:
        return abs(current - previous) <= self.atol + self.rtol * abs(current)

    def _converge(self) -> None:
        """Eval mode: iterate until the estimate of the norm settles (at most ``max_eval_iterations`` times)."""
        previous = float(self._sigma().detach())
        for _ in range(self.max_eval_iterations):
            self._iterate(1)
            current = float(self._sigma().detach())
            if self._converged(previous, current):
                break
            previous = current

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(1, sigma / coeff)``, differentiable in ``W`` (the power-iteration vectors are constants)."""
        self._update()
        with torch.no_grad():  # the graph keeps a copy: later in-place updates of v must not invalidate it
            v = self.v.clone()
        sigma = self._sigma(v)
        if not _FROZEN[0]:
            self.sigma.copy_(sigma.detach())
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)


class LearnableNorm(nn.Module):
    r"""A learnable norm order :math:`p = p_{min} + (p_{max} - p_{min})\,\sigma(r)`, shared by the layers it
    joins (the codomain of one linear layer and the domain of the next), as in Residual Flows' learned
    induced mixed norms. Gradients reach ``r`` through the norm estimate :math:`\|W v\|_q`.

    :param float init: initial ``p``.
    :param float p_min: lower bound (> 1).
    :param float p_max: upper bound.

    Example::

        >>> import torch
        >>> from pyroflows.nn import LearnableNorm, SpectralLinear
        >>> p = LearnableNorm(init=3.0)
        >>> round(float(p().detach()), 4)
        3.0
        >>> first, second = SpectralLinear(4, 8, codomain=p), SpectralLinear(8, 4, domain=p)  # p joins them
        >>> second(first(torch.randn(2, 4))).shape
        torch.Size([2, 4])
    """

    def __init__(self, init: float = 2.0, p_min: float = 1.1, p_max: float = 8.0):
        super().__init__()
        if not 1.0 < p_min < init < p_max:
            raise ValueError(f"LearnableNorm: need 1 < p_min < init < p_max, got {p_min}, {init}, {p_max}")
        self.p_min, self.p_max = p_min, p_max
        frac = (init - p_min) / (p_max - p_min)
        self.raw = nn.Parameter(torch.tensor(math.log(frac / (1 - frac))))

    def forward(self) -> torch.Tensor:
        return self.p_min + (self.p_max - self.p_min) * torch.sigmoid(self.raw)


def _order(p) -> torch.Tensor | float:
    return p() if isinstance(p, nn.Module) else p


class SpectralLinear(_PowerIteration):
    r"""A linear layer with :math:`\|W\|_{p \to q} \le c`: the induced norm from the ``domain`` p-norm to the
    ``codomain`` q-norm (``2, 2``: the spectral norm), estimated by the generalised power method.

    :param int in_features: input size.
    :param int out_features: output size.
    :param float coeff: the bound :math:`c \in (0, 1)`.
    :param domain: ``p`` of the input norm (a float, or a shared :class:`LearnableNorm`).
    :param codomain: ``q`` of the output norm (a float, or a shared :class:`LearnableNorm`).
    :param int n_iterations: power iterations per training forward.
    :param float atol: eval mode iterates until the estimate changes by less than ``atol + rtol * sigma``.
    :param float rtol: see ``atol``.
    :param int max_eval_iterations: cap for the eval-mode iteration.
    :param bool bias: add a learnable bias (which does not affect the Lipschitz constant).

    Example::

        >>> import torch
        >>> from pyroflows.nn import SpectralLinear
        >>> layer = SpectralLinear(4, 5, coeff=0.9).eval()
        >>> bool(torch.linalg.matrix_norm(layer.normalized_weight(), 2) <= 0.9 + 1e-4)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coeff: float = 0.97,
        domain: float | LearnableNorm = 2.0,
        codomain: float | LearnableNorm = 2.0,
        n_iterations: int = 1,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        max_eval_iterations: int = 500,
        bias: bool = True,
    ):
        super().__init__(coeff, n_iterations, atol, rtol, max_eval_iterations)
        for order in (domain, codomain):
            if not isinstance(order, LearnableNorm) and order < 1:
                raise ValueError(f"SpectralLinear: norms need p >= 1, got domain={domain}, codomain={codomain}")
        self.in_features, self.out_features = in_features, out_features
        # A shared LearnableNorm is registered (once) by the layer whose codomain it is; the next layer, whose
        # domain it is, only refers to it (a tuple entry, not a submodule).
        self._orders = (
            domain if isinstance(domain, LearnableNorm) else float(domain),
            codomain if isinstance(codomain, LearnableNorm) else float(codomain),
        )
        if isinstance(codomain, LearnableNorm):
            self.codomain_norm = codomain
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._init_fingerprint()
        self.register_buffer("u", _normalize_p(torch.randn(out_features), 2.0))
        self.register_buffer("v", _normalize_p(torch.randn(in_features), self.domain))
        self.register_buffer("_fp_orders", torch.zeros(2), persistent=False)
        with torch.no_grad():
            self._iterate(20)

    @property
    def domain(self) -> float:
        p = self._orders[0]
        return p if type(p) is float else float(torch.as_tensor(_order(p)).detach())

    @property
    def codomain(self) -> float:
        q = self._orders[1]
        return q if type(q) is float else float(torch.as_tensor(_order(q)).detach())

    @property
    def _spectral(self) -> bool:
        """Both norms the fixed 2-norm (the default): the power method's plain form, fewer operations."""
        return self._orders == (2.0, 2.0)

    def _fingerprint(self) -> torch.Tensor:
        # the orders shape the normalisation too: a change of a learnable p re-runs the iteration
        return super()._fingerprint() + 1e3 * (self.domain + math.pi * self.codomain)

    def _iterate(self, n: int) -> None:
        w = self.weight.detach()
        if self._spectral:  # the dual map of the 2-norm is the identity on unit vectors
            v = self.v
            for _ in range(n):
                v = _unit(w.T @ _unit(w @ v))
            self.v.copy_(v)
            self.u.copy_(_unit(w @ v))
            return
        p, q = self.domain, self.codomain
        p_star = p / (p - 1.0) if p > 1 else math.inf
        v = self.v
        for _ in range(n):
            u = w @ v
            z = w.T @ _dual(u, q)
            v = _normalize_p(torch.sign(z) * z.abs().pow(p_star - 1.0), p) if math.isfinite(p_star) else None
            if v is None:  # p = 1: the maximising input is a coordinate vector
                v = torch.zeros_like(z)
                v[z.abs().argmax()] = 1.0
        self.v.copy_(v)
        self.u.copy_(_normalize_p(w @ v, q))

    def _sigma(self, v: torch.Tensor | None = None) -> torch.Tensor:
        v = self.v if v is None else v
        if self._spectral:
            return torch.linalg.vector_norm(self.weight @ v)
        q = _order(self._orders[1])  # a tensor for a learnable norm: the gradient reaches its order
        return (self.weight @ v).abs().pow(q).sum().pow(1.0 / q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, coeff={self.coeff}, "
            f"domain={self.domain}, codomain={self.codomain}"
        )


class SpectralConv2d(_PowerIteration):
    r"""A 2-D convolution whose operator norm (2-norm, at the input's spatial size) is at most ``coeff``.

    Power iteration runs on the convolution itself, :math:`u = \mathrm{conv}(v)`,
    :math:`v = \mathrm{conv}^\top(u)` (``conv_transpose2d``), with ``u``/``v`` of the output/input image shapes,
    so the bound is the true Lipschitz constant of the layer (the reshaped-kernel spectral norm can be off by a
    factor of up to the kernel size). The vectors are created on the first call at each spatial size and kept per
    size, so the layer computes the same function at every size between two changes of the weight, whatever the
    order of the sizes it sees; ``u``/``v`` (and the ``state_dict``) hold those of the size seen last.

    :param int in_channels: input channels.
    :param int out_channels: output channels.
    :param int kernel_size: square kernel size (odd, padding keeps the size).
    :param float coeff: the bound :math:`c \in (0, 1)`.
    :param int n_iterations: power iterations per training forward.
    :param float atol: eval mode iterates until the estimate changes by less than ``atol + rtol * sigma``.
    :param float rtol: see ``atol``.
    :param int max_eval_iterations: cap for the eval-mode iteration.

    Example::

        >>> import torch
        >>> from pyroflows.nn import SpectralConv2d
        >>> conv = SpectralConv2d(2, 3, 3, coeff=0.9)
        >>> conv(torch.randn(4, 2, 6, 6)).shape
        torch.Size([4, 3, 6, 6])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        coeff: float = 0.97,
        n_iterations: int = 1,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        max_eval_iterations: int = 500,
    ):
        super().__init__(coeff, n_iterations, atol, rtol, max_eval_iterations)
        if kernel_size % 2 != 1:
            raise ValueError(f"SpectralConv2d: kernel_size must be odd, got {kernel_size!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self._init_fingerprint()
        self.register_buffer("v", torch.empty(0))
        self.register_buffer("u", torch.empty(0))
        # (H, W) -> (v, u, training fingerprint, eval fingerprint) of the sizes seen before the current one
        self._other_sizes: dict[tuple[int, int], tuple] = {}

    def _ensure_vectors(self, x: torch.Tensor) -> None:
        size = (self.in_channels,) + tuple(x.shape[-2:])
        if tuple(self.v.shape) == size:
            return
        with torch.no_grad():
            if self.v.numel():  # put the current size's state aside, to resume it when that size comes back
                self._other_sizes[tuple(self.v.shape[1:])] = (self.v, self.u, self._train_fp.clone(), self._eval_fp)
            saved = self._other_sizes.pop(size[1:], None)
            if saved is not None:
                self.v, self.u, train_fp, self._eval_fp = saved
                self._train_fp.copy_(train_fp)
                return
            # a size never seen has no function to keep yet: its vectors start here, frozen or not
            self.v = _unit(torch.randn(size, dtype=x.dtype, device=x.device))
            self.u = torch.zeros((self.out_channels,) + size[1:], dtype=x.dtype, device=x.device)
            self._train_fp.fill_(float("nan"))
            self._eval_fp = None
            self._iterate(20)

    def _convert_extra(self, fn) -> None:
        # .to(), .double(), .cuda() move the vectors of the other sizes too
        self._other_sizes = {k: (fn(v), fn(u), fn(fp), eval_fp) for k, (v, u, fp, eval_fp) in self._other_sizes.items()}

    def _current_marks(self, fp: torch.Tensor) -> dict:
        marks = super()._current_marks(fp)
        marks["sizes"] = {k: (bool(e[2] == fp), e[3] == float(fp)) for k, e in self._other_sizes.items()}
        return marks

    def _restamp(self, marks: dict, fp: torch.Tensor) -> None:
        super()._restamp(marks, fp)
        for k, (train, evaluated) in marks["sizes"].items():
            v, u, train_fp, eval_fp = self._other_sizes[k]
            if train:
                train_fp.copy_(fp)
            self._other_sizes[k] = (v, u, train_fp, float(fp) if evaluated else eval_fp)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # u and v are sized for the input's spatial size, which a freshly built layer does not know yet.
        for name in ("u", "v"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved))
        self._other_sizes = {}  # the loaded weight is another function: vectors of other sizes are stale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _iterate(self, n: int) -> None:
        w = self.weight.detach()
        v = self.v
        for _ in range(n):
            u = _unit(F.conv2d(v[None], w, padding=self.padding)[0])
            v = _unit(F.conv_transpose2d(u[None], w, padding=self.padding)[0])
        self.v.copy_(v)
        self.u.copy_(_unit(F.conv2d(v[None], w, padding=self.padding)[0]))

    def _sigma(self, v: torch.Tensor | None = None) -> torch.Tensor:
        v = self.v if v is None else v
        return F.conv2d(v[None], self.weight, padding=self.padding).norm()

    def _converge(self) -> None:
        # The base loop's iterations and checks, each convolution once: W v is both the next u (normalised) and the
        # estimate ||W v|| (the base loop convolves v again for u after each step and once more for the check).
        w = self.weight.detach()
        v = self.v
        wv = F.conv2d(v[None], w, padding=self.padding)[0]
        previous = float(wv.norm())
        for _ in range(self.max_eval_iterations):
            u = _unit(wv)
            v = _unit(F.conv_transpose2d(u[None], w, padding=self.padding)[0])
            wv = F.conv2d(v[None], w, padding=self.padding)[0]
            current = float(wv.norm())
            if self._converged(previous, current):
                break
            previous = current
        self.v.copy_(v)
        self.u.copy_(_unit(wv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_vectors(x)
        batch = x.shape[:-3]
        out = F.conv2d(x.reshape((-1,) + x.shape[-3:]), self.normalized_weight(), self.bias, padding=self.padding)
        return out.reshape(batch + out.shape[-3:])

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, coeff={self.coeff}"


def _lipswish_derivatives(x: torch.Tensor, raw_beta: torch.Tensor, wrt_beta: bool):
    r"""``(d, e)``: the elementwise derivatives of :math:`x \sigma(\beta x) / 1.1` in ``x`` and in the raw
    parameter :math:`b` (:math:`\beta = \mathrm{softplus}(b)`, :math:`d\beta/db = \sigma(b)`); ``e`` is ``None``
    unless ``wrt_beta``."""
    beta = F.softplus(raw_beta)
    s = torch.sigmoid(beta * x)
    t = s * (1 - s)
    d = (s + beta * x * t) / 1.1
    e = x * x * t * (torch.sigmoid(raw_beta) / 1.1) if wrt_beta else None
    return d, e


def _lipswish_in_place(x: torch.Tensor, raw_beta: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(softplus(raw_beta) * x) / 1.1`` with the same operations in the same order (the same bits),
    in place on one fresh tensor instead of a new tensor per operation: for code that records no graph, where on
    CPU the fresh tensors mostly cost page faults (residual flows' sampling: 1.6x as fast)."""
    out = torch.mul(F.softplus(raw_beta), x)
    return out.sigmoid_().mul_(x).div_(1.1)


class _LipSwishFunction(torch.autograd.Function):
    """LipSwish with a backward that reuses its elementwise derivative: the evaluation-mode log-det (series or
    exact) takes many vector-Jacobian products through one forward graph, and autograd's own backward of
    ``x * sigmoid(beta * x) / 1.1`` re-derives the derivative (six passes over the activation) at every one. Here
    the first product computes it, the others multiply by it. :class:`LipSwish` uses it within
    :func:`input_gradients_only` only, with the slope detached; the slope's gradient is still exact when asked. Under
    ``create_graph`` the derivative is recomputed from the saved input, so double backward is exact; forward-mode
    AD and ``torch.func`` transforms are supported (``jvp``, a generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, raw_beta):  # autograd records no graph inside a Function's forward
        return _lipswish_in_place(x, raw_beta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, raw_beta = inputs
        ctx.save_for_backward(x, raw_beta)
        ctx.save_for_forward(x, raw_beta)
        ctx.derivatives = None

    @staticmethod
    def backward(ctx, grad):
        x, raw_beta = ctx.saved_tensors
        need_x, need_beta = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiable derivatives, recomputed
            d, e = _lipswish_derivatives(x, raw_beta, need_beta)
        else:
            if ctx.derivatives is None or (need_beta and ctx.derivatives[1] is None):
                ctx.derivatives = _lipswish_derivatives(x, raw_beta, need_beta)
            d, e = ctx.derivatives
        grad_x = grad * d if need_x else None
        grad_beta = (grad * e).sum().reshape(raw_beta.shape) if need_beta else None
        return grad_x, grad_beta

    @staticmethod
    def jvp(ctx, x_tangent, raw_tangent):
        x, raw_beta = ctx.saved_tensors
        d, e = _lipswish_derivatives(x, raw_beta, raw_tangent is not None)
        out = x_tangent * d if x_tangent is not None else torch.zeros_like(x)
        return out + e * raw_tangent if raw_tangent is not None else out


class LipSwish(nn.Module):
    r"""LipSwish (Chen et al., 2019): :math:`x \sigma(\beta x) / 1.1`, :math:`\beta = \mathrm{softplus}(b)`.

    The derivative of :math:`x\sigma(\beta x)` is at most about 1.0998 for every :math:`\beta > 0`, so the
    activation is 1-Lipschitz and smooth: unlike ReLU, it keeps :math:`J^k` informative for the log-det series.
    Within :func:`input_gradients_only` (the evaluation-mode log-det, series or exact) its backward keeps the
    elementwise derivative from the first vector-Jacobian product for the next ones, the many products sharing
    one forward.

    :param float beta_init: initial :math:`\beta` (learned through :math:`b = \mathrm{softplus}^{-1}(\beta)`).

    Example::

        >>> import torch
        >>> from pyroflows.nn import LipSwish
        >>> LipSwish()(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.6646], grad_fn=<DivBackward0>)
    """

    def __init__(self, beta_init: float = 1.0):
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(math.log(math.expm1(beta_init))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _INPUT_GRADIENTS_ONLY[0]:
            return _LipSwishFunction.apply(x, self.raw_beta.detach())
        if not torch.is_grad_enabled():  # no graph (sampling, fixed-point inverses): the same bits, in place
            return _lipswish_in_place(x, self.raw_beta)
        # autograd's own backward where parameter gradients may be wanted: there the kept derivative did not pay
        # (a training step of the benchmark's residual flows, one thread: 0.85 to 0.89 times as fast)
        return x * torch.sigmoid(F.softplus(self.raw_beta) * x) / 1.1


def lipschitz_mlp(
    dim: int,
    hidden: int | tuple[int, ...] = 128,
    coeff: float = 0.97,
    n_iterations: int = 1,
    norm_p: float = 2.0,
    hidden_norm_p: float | None = None,
    learn_p: bool = False,
) -> nn.Sequential:
    r"""An MLP ``R^dim -> R^dim`` with Lipschitz constant at most ``coeff`` in the ``norm_p`` norm: spectral
    (or induced mixed-norm) linear layers with LipSwish between them.

    :param int dim: input and output size.
    :param hidden: hidden sizes: an int for one hidden layer, a tuple for several.
    :param float coeff: bound on each linear layer, hence on the network.
    :param int n_iterations: power iterations per training forward.
    :param float norm_p: the norm of the input and output (2: spectral norms).
    :param float hidden_norm_p: the norm used between layers (default ``norm_p``); each layer's codomain norm is
        the next layer's domain norm, so the product bound holds in ``norm_p``.
    :param bool learn_p: learn the hidden norms' orders (:class:`LearnableNorm`, initialised at ``hidden_norm_p``).

    Example::

        >>> import torch
        >>> from pyroflows.nn import lipschitz_mlp
        >>> g = lipschitz_mlp(2, hidden=(16, 16), coeff=0.9).eval()
        >>> x, y = torch.randn(100, 2), torch.randn(100, 2)
        >>> ratio = (g(x) - g(y)).norm(dim=-1) / (x - y).norm(dim=-1)
        >>> bool(ratio.max() <= 0.9 + 1e-4)
        True
    """
    _check_coeff(coeff, "lipschitz_mlp")
    sizes = [dim] + list((hidden,) if isinstance(hidden, int) else hidden) + [dim]
    hp = norm_p if hidden_norm_p is None else hidden_norm_p
    hidden_norms = [LearnableNorm(hp if hp > 1.1 else 2.0) if learn_p else hp for _ in range(len(sizes) - 2)]
    norms = [norm_p] + hidden_norms + [norm_p]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(SpectralLinear(sizes[i], sizes[i + 1], coeff, norms[i], norms[i + 1], n_iterations))
        if i < len(sizes) - 2:
            layers.append(LipSwish())
    return nn.Sequential(*layers)


def lipschitz_cnn(
    channels: int, hidden_channels: int = 64, coeff: float = 0.97, n_iterations: int = 1, kernel_size: int = 3
) -> nn.Sequential:
    """A CNN ``(C, H, W) -> (C, H, W)`` with 2-norm Lipschitz constant at most ``coeff``: conv k×k → LipSwish →
    conv 1×1 → LipSwish → conv k×k, each a :class:`SpectralConv2d` (the Residual Flows block shape).

    :param int channels: input and output channels ``C``.
    :param int hidden_channels: channels of the two hidden layers.
    :param float coeff: bound on each convolution, hence on the network, in ``(0, 1)``.
    :param int n_iterations: power iterations per training forward.
    :param int kernel_size: odd size of the first and last kernels.

    Example::

        >>> import torch
        >>> from pyroflows.nn import lipschitz_cnn
        >>> g = lipschitz_cnn(2, hidden_channels=8, coeff=0.9)
        >>> g(torch.randn(3, 2, 6, 6)).shape
        torch.Size([3, 2, 6, 6])
    """
    _check_coeff(coeff, "lipschitz_cnn")
    return nn.Sequential(
        SpectralConv2d(channels, hidden_channels, kernel_size, coeff, n_iterations),
        LipSwish(),
        SpectralConv2d(hidden_channels, hidden_channels, 1, coeff, n_iterations),
        LipSwish(),
        SpectralConv2d(hidden_channels, channels, kernel_size, coeff, n_iterations),
    )


def has_closed_form_jacobian(net: nn.Module) -> bool:
    """Whether :func:`mlp_value_and_jacobian` computes ``net``'s Jacobian: an ``nn.Sequential`` of
    :class:`SpectralLinear` (or ``nn.Linear``) and :class:`LipSwish` modules of exactly these types, starting and
    ending with a linear layer (as :func:`lipschitz_mlp` builds).

    :param torch.nn.Module net: a residual branch.

    Example::

        >>> from pyroflows.nn import has_closed_form_jacobian, lipschitz_cnn, lipschitz_mlp
        >>> has_closed_form_jacobian(lipschitz_mlp(3)), has_closed_form_jacobian(lipschitz_cnn(3))
        (True, False)
    """
    if not isinstance(net, nn.Sequential) or len(net) == 0:
        return False
    if not all(type(m) in (SpectralLinear, nn.Linear, LipSwish) for m in net):
        return False
    return type(net[0]) is not LipSwish and type(net[-1]) is not LipSwish  # the product starts and ends on weights


def mlp_value_and_jacobian(
    net: nn.Module, x: torch.Tensor, shift: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    r"""``(g(x), J_g(x))`` in closed form for an MLP ``g`` of linear layers and LipSwish activations, or ``None``
    when ``net`` is not one (a custom network: use autograd instead).

    For :math:`g = W_L \circ \phi \circ \dots \circ \phi \circ W_1` the Jacobian at ``x`` is
    :math:`W_L\,\mathrm{diag}(\phi'(h_{L-1}))\cdots\mathrm{diag}(\phi'(h_1))\,W_1`, the :math:`h_i` being the
    pre-activations: one forward pass and a product of small matrices per sample, instead of ``D`` backward
    passes. Every operation is an ordinary differentiable one, so the result can be differentiated (also twice)
    in ``x`` and in the parameters. Each normalised weight is computed once.

    :param torch.nn.Module net: a network for which :func:`has_closed_form_jacobian` holds (exact types: a
        subclass may compute something else), as :func:`lipschitz_mlp` builds.
    :param torch.Tensor x: inputs, shape ``batch_shape + (D,)``.
    :param torch.Tensor shift: added to the first layer's outputs (a conditional branch's context term), shape
        broadcastable to them.
    :returns: ``g(x)`` of shape ``batch_shape + (D,)`` and ``J`` of shape ``batch_shape + (D, D)``
        (``J[..., i, j] = dg_i / dx_j``), or ``None``.

    Example::

        >>> import torch
        >>> from pyroflows.nn import frozen_power_iteration, lipschitz_mlp, mlp_value_and_jacobian
        >>> g = lipschitz_mlp(3, hidden=(8,), coeff=0.9)
        >>> x = torch.randn(5, 3)
        >>> gx, jac = mlp_value_and_jacobian(g, x)
        >>> with frozen_power_iteration():  # the normalisation held as it is: torch.func wants a pure function
        ...     auto = torch.func.vmap(torch.func.jacrev(g))(x)
        >>> torch.allclose(gx, g(x), atol=1e-6), torch.allclose(jac, auto, atol=1e-6)
        (True, True)
    """
    if not has_closed_form_jacobian(net) or x.dim() < 1:
        return None
    return _mlp_apply(_mlp_layers(net), x, shift, jacobian=True)


def _mlp_layers(net: nn.Sequential) -> list[tuple[torch.Tensor, ...]]:
    """The layers of a network for which :func:`has_closed_form_jacobian` holds, with every normalised weight
    computed once: ``(weight, bias)`` for a linear layer, ``(raw_beta,)`` for a LipSwish. An iterative solve that
    evaluates one frozen map many times (:class:`~pyroflows.transforms.ResidualBlock`'s inverse) takes them once,
    instead of a :meth:`~_PowerIteration.normalized_weight` call (and its check for a changed weight) per layer and
    evaluation.

    :param torch.nn.Sequential net: the network.
    :returns: a list for :func:`_mlp_apply`.
    """
    layers: list[tuple[torch.Tensor, ...]] = []
    for layer in net:
        if type(layer) is LipSwish:
            layers.append((layer.raw_beta,))
        else:
            weight = layer.normalized_weight() if type(layer) is SpectralLinear else layer.weight
            layers.append((weight, layer.bias))
    return layers


def _mlp_apply(
    layers: list[tuple[torch.Tensor, ...]], x: torch.Tensor, shift: torch.Tensor | None = None, jacobian: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(g(x), J_g(x) or None)`` for the layers of :func:`_mlp_layers`, with the same operations as the modules
    (the same bits; without a graph LipSwish works in place, as the module does). See
    :func:`mlp_value_and_jacobian`.

    :param list layers: from :func:`_mlp_layers`.
    :param torch.Tensor x: inputs, shape ``batch_shape + (D,)``.
    :param torch.Tensor shift: added to the first layer's outputs.
    :param bool jacobian: also compute the Jacobian.
    """
    h, factors = x, []
    in_place = not jacobian and not torch.is_grad_enabled()
    for i, layer in enumerate(layers):
        if len(layer) == 1:  # LipSwish
            (raw_beta,) = layer
            if in_place:
                h = _lipswish_in_place(h, raw_beta)
                continue
            beta_h = F.softplus(raw_beta) * h
            s = torch.sigmoid(beta_h)
            if jacobian:
                factors.append((True, (s + beta_h * s * (1 - s)) / 1.1))  # the slope at h
            h = h * s / 1.1  # LipSwish's own operations, in its order: the same bits
            continue
        weight, bias = layer
        h = F.linear(h, weight, bias)
        if i == 0 and shift is not None:
            h = h + shift
        if jacobian:
            factors.append((False, weight))
    if not jacobian:
        return h, None
    batch = math.prod(x.shape[:-1])
    dim = x.shape[-1]
    if len(factors) == 3 and batch >= max(48, 4 * dim):
        # one hidden layer, many samples: J = sum_k s_k W2[:, k] W1[k, :] is one (batch, H) x (H, D * D) product
        # with the outer products of the weights' columns and rows (cheaper to differentiate than a batch of
        # D x H matrices; with few samples the outer products cost more than they save)
        (_, w1), (_, slope), (_, w2) = factors
        outer = (w2.T.unsqueeze(-1) * w1.unsqueeze(-2)).reshape(w1.shape[0], dim * dim)
        return h, (slope @ outer).reshape(x.shape[:-1] + (dim, dim))
    # the product from the output side: every step multiplies a batch of matrices by a shared weight (one GEMM),
    # where the other order would multiply a shared weight into a batch (a batched product)
    jac = factors.pop()[1]
    while factors:
        is_slope, factor = factors.pop()
        jac = jac * factor.unsqueeze(-2) if is_slope else jac @ factor
    if jac.dim() == 2:  # no activation: a linear map, the same Jacobian for every sample
        jac = jac.expand(x.shape[:-1] + jac.shape)
    return h, jac
