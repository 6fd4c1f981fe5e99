r"""Activation normalisation (Kingma & Dhariwal, 2018): a per-feature affine map with data-dependent init."""

from __future__ import annotations

import warnings

import torch
from pyro.poutine.runtime import am_i_wrapped
from torch import nn

from .._deprecation import renamed_kwargs
from ._shapes import legacy_event_dim, parse_shape, positive
from .base import FlowTransform


def _as_feature(stat: torch.Tensor, x: torch.Tensor, event_dim: int) -> torch.Tensor:
    """A per-feature statistic ``(C,)`` shaped to broadcast against ``x`` (feature dim ``x.dim() - event_dim``)."""
    return stat.reshape(stat.shape + (1,) * (event_dim - 1))


def _distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is running."""
    import torch.distributed as torch_dist

    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


class ActNorm(FlowTransform):
    r"""Per-feature (vectors) or per-channel (images) affine map :math:`y = (x - b) \odot e^{-s}`.

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right| = -P \sum_c s_c,

    with :math:`P = 1` for vectors and :math:`P = H W` for images. On the first forward call in training
    mode, ``b`` and ``s`` are set from that batch so the output has zero mean and unit variance per feature
    (statistics over every batch and spatial position); afterwards they are ordinary parameters. The init
    happens only if the layer's first training-mode call is a forward call with at least two positions per
    feature: a first inverse call (or a single sample, with a warning) keeps the identity and marks the layer
    initialised, so a map that has been used is never re-initialised later. Call :meth:`initialize` to force an
    init. A feature that is constant in the init batch (standard deviation below ``eps`` relative to its mean) is
    centred but not scaled, with a warning: dividing by a vanishing spread would blow it up by ``1/eps``.
    The ``initialized`` buffer records this and is part of the ``state_dict``, so a loaded model is not
    re-initialised. A fresh layer is the identity.

    Reference: Kingma & Dhariwal, *Glow: Generative Flow with Invertible 1x1 Convolutions*, NeurIPS 2018.

    :param shape: ``D`` or ``(D,)`` for vectors ``(..., D)``; ``(C, H, W)`` for images ``(..., C, H, W)``
        (``H``, ``W`` may be ``None``: any size).
    :param int event_dim: deprecated: ``3`` with an int ``shape`` means ``(C, None, None)``.
    :param float eps: relative spread below which the init treats a feature as constant (> 0).

    Example::

        >>> import torch
        >>> from pyroflows.transforms import ActNorm
        >>> t = ActNorm(3)
        >>> y = t(5.0 + 2.0 * torch.randn(1000, 3))
        >>> bool(y.mean(0).abs().max() < 1e-5), bool((y.std(0, unbiased=False) - 1).abs().max() < 1e-4)
        (True, True)
    """

    sign = +1  # elementwise and increasing, as torch's ``sign`` asks

    @renamed_kwargs(num_features="shape")
    def __init__(self, shape: int | tuple, event_dim: int | None = None, *, eps: float = 1e-6):
        event_shape = legacy_event_dim(shape, event_dim, "ActNorm")
        event_dim, num_features = len(event_shape), event_shape[0]
        shape = (num_features,) if event_dim == 1 else (num_features, 1, 1)
        super().__init__(event_dim=event_dim, event_shape=event_shape)
        self.num_features = num_features
        self.eps = positive(eps, "eps", "ActNorm")
        self.bias = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False  # python mirror of the buffer: no device sync per call

    def _is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False

    @torch.no_grad()
    def mark_initialized(self) -> None:
        """Skip the data-dependent init: the layer keeps its current ``bias`` and ``log_scale`` (the identity, when
        new). For a flow that never sees data, e.g. a variational guide's, whose first layers see standard-normal
        noise: there the init would only estimate the identity from the first batch.

        Example::

            >>> import torch
            >>> from pyroflows.transforms import ActNorm
            >>> layer = ActNorm(3)
            >>> layer.mark_initialized()
            >>> x = torch.randn(5, 3) * 4.0 + 1.0
            >>> torch.equal(layer(x), x)  # still the identity: the first batch did not standardise it
            True
        """
        self.initialized.fill_(True)
        self._known_initialized = True

    def _reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """All dims but the feature/channel dim."""
        feature_dim = x.dim() - self._event_dim
        return tuple(d for d in range(x.dim()) if d != feature_dim)

    def init_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-feature ``(mean, variance, count)`` of ``x``, in two passes (the variance of the centred values, so
        that a constant feature has variance 0, not the rounding error of ``E[x²] - mean²``).

        Under ``torch.distributed`` (an initialised process group with more than one rank) the statistics are
        all-reduced, so every rank initialises from the union of the ranks' batches and all hold the same
        parameters: the first training forward must then run on every rank, as it does under DDP.
        """
        dims = self._reduce_dims(x)
        count = x.numel() // self.num_features
        mean = x.mean(dims)
        if not _distributed():
            return mean, (x - _as_feature(mean, x, self._event_dim)).square().mean(dims), count
        import torch.distributed as torch_dist

        packed = torch.cat([mean * count, mean.new_tensor([float(count)])])
        torch_dist.all_reduce(packed)
        total = packed[-1]
        mean = packed[:-1] / total
        spread = (x - _as_feature(mean, x, self._event_dim)).square().sum(dims)
        torch_dist.all_reduce(spread)
        return mean, spread / total, int(total.item())

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``b``, ``s`` so that ``x`` maps to zero mean, unit variance per feature; mark initialised."""
        self._check_features(x)
        mean, var, count = self.init_statistics(x.detach())
        if count >= 2:
            std = var.clamp_min(0.0).sqrt()
            constant = std <= self.eps * (1.0 + mean.abs())
            if bool(constant.any()):
                warnings.warn(
                    f"ActNorm: {int(constant.sum())} of {self.num_features} features are constant in the init batch; "
                    "they are centred but not scaled",
                    UserWarning,
                    stacklevel=3,
                )
            std = torch.where(constant, torch.ones_like(std), std)
            self.bias.copy_(mean.reshape(self.bias.shape))
            self.log_scale.copy_(std.log().reshape(self.log_scale.shape))
        elif not am_i_wrapped():
            # (inside a Pyro model or guide no warning: there a single row is typically the one unvectorised draw
            # that Pyro's ELBO makes to count plates, through an AutoNormalizingFlow guide's flow, for which the
            # identity is the right start, as AutoFlow chooses; see mark_initialized)
            warnings.warn(
                "ActNorm: the first training batch has one value per feature, too few for the data-dependent init; "
                "the layer keeps the identity (call initialize(x) with a larger batch to initialise it)",
                UserWarning,
                stacklevel=3,
            )
        self.mark_initialized()

    def _check_features(self, x: torch.Tensor) -> None:
        """A wrong feature/channel count would otherwise broadcast or fail deep inside torch."""
        dim = x.dim() - self._event_dim
        if dim < 0 or x.shape[dim] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_features} "
                f"{'channels' if self._event_dim == 3 else 'features'} at dim {dim} of an input of event_dim "
                f"{self._event_dim}, got shape {tuple(x.shape)}"
            )

    def forward_and_log_det(self, x):
        self._check_features(x)
        if self.training and not self._is_initialized():
            self.initialize(x)
        y = (x - self.bias) * torch.exp(-self.log_scale)
        log_det = -self.log_scale.sum() * self._positions(x)
        return y, log_det.expand(x.shape[: x.dim() - self._event_dim])

    def inverse_and_log_det(self, y):
        self._check_features(y)
        if self.training and not self._is_initialized():
            # The map has now been used: a later data-dependent init would silently change it.
            self.mark_initialized()
        x = y * torch.exp(self.log_scale) + self.bias
        log_det = self.log_scale.sum() * self._positions(y)
        return x, log_det.expand(y.shape[: y.dim() - self._event_dim])

    def extra_repr(self) -> str:
        return f"shape={self.event_shape}"


class BatchNorm(FlowTransform):
    r"""Batch normalisation as a flow layer (Dinh et al., 2017): per feature (vectors) or per channel (images)

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\, e^{\gamma} + \beta, \qquad
        \log\left|\det \frac{\partial y}{\partial x}\right|
            = P \sum_c \Big(\gamma_c - \tfrac12 \log(\sigma_c^2 + \epsilon)\Big),

    with :math:`P = 1` for vectors and :math:`P = H W` for images, learned :math:`\gamma` (log-scale) and
    :math:`\beta` (shift), and statistics :math:`(\mu, \sigma^2)` that depend on the mode:

    * **training mode**, a forward call on at least two samples: the mean and (biased) variance of this batch,
      over every batch dim (and every spatial position, for images). The log-det is the exact one of the affine
      map with those statistics; gradients flow through them, as in ordinary batch normalisation. The running
      averages are updated, ``running ← (1 - momentum) · running + momentum · batch`` (the unbiased batch
      variance), and the batch statistics are held: a training-mode inverse applies the map of the last
      training batch, so ``t.inv(t(x)) == x`` in either mode.
    * **eval mode**: the running averages: a fixed affine map, whose log-probabilities are a normalised density
      and whose samples are independent.
    * training mode on a single sample (no batch variance exists): the running averages, without an update. (Pyro
      runs a guide once on a single draw to set up vectorised particles; that run is not an error.)

    In a training-mode call the samples of a batch are coupled through the statistics: the log-det of one sample
    depends on the others. This is what maximum-likelihood training by batches wants; for a density you report or
    samples you analyse, use eval mode. **In an** ``AutoNormalizingFlow`` **guide** the batch is the set of
    particles (draws of the base noise): train with ``Trace_ELBO(num_particles=N, vectorize_particles=True)``,
    ``N ≥ 2`` (the ELBO and its gradient are then those of the batch-coupled map, and the running averages learn
    the map the guide will use), and put the guide in eval mode (``guide.eval()``) before drawing posterior samples
    or computing diagnostics such as importance weights or PSIS k̂, which assume independent draws from one fixed
    density. (Pyro's ``BatchNorm`` transform, by contrast, maps with the running averages but computes its
    training-mode log-det from the output batch's variance, so in a guide its ``log q`` is not the density of its
    samples.) Under ``torch.distributed`` each rank normalises with its own batch (as ``torch.nn.BatchNorm``
    does); DistributedDataParallel broadcasts rank 0's running averages.

    Reference: Dinh, Sohl-Dickstein & Bengio, *Density estimation using Real NVP*, ICLR 2017 (§3.7); Ioffe &
    Szegedy, *Batch normalization*, ICML 2015.

    :param shape: ``D`` or ``(D,)`` for vectors ``(..., D)``; ``(C, H, W)`` for images ``(..., C, H, W)``
        (``H``, ``W`` may be ``None``: any size).
    :param float momentum: weight of each batch in the running averages, in ``(0, 1)``.
    :param float eps: added to the variance, ``> 0``.

    Example::

        >>> import torch
        >>> from pyroflows.transforms import BatchNorm
        >>> t = BatchNorm(2)
        >>> x = 3.0 + 2.0 * torch.randn(500, 2)
        >>> y = t(x)  # training mode: normalised by this batch's statistics
        >>> bool(y.mean(0).abs().max() < 1e-5), bool(torch.allclose(t.inv(y.clone()), x, atol=1e-4))
        (True, True)
        >>> t.running_mean.shape, bool(t.eval().running_mean.abs().max() > 0.1)  # moved towards the data's mean
        (torch.Size([2]), True)
    """

    sign = +1

    def __init__(self, shape: int | tuple, momentum: float = 0.05, eps: float = 1e-5):
        event_shape = parse_shape(shape, "BatchNorm")
        event_dim, num_features = len(event_shape), event_shape[0]
        param_shape = (num_features,) if event_dim == 1 else (num_features, 1, 1)
        super().__init__(event_dim=event_dim, event_shape=event_shape)
        self.num_features = num_features
        self.momentum = positive(momentum, "momentum", "BatchNorm", high=1.0)
        self.eps = positive(eps, "eps", "BatchNorm")
        self.log_gamma = nn.Parameter(torch.zeros(param_shape))
        self.beta = nn.Parameter(torch.zeros(param_shape))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # the statistics of the last training batch: the map a training-mode inverse applies (not saved)
        self.register_buffer("batch_mean", None, persistent=False)
        self.register_buffer("batch_var", None, persistent=False)

    _check_features = ActNorm._check_features
    _reduce_dims = ActNorm._reduce_dims

    def _feature(self, stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _as_feature(stat, x, self._event_dim)

    def _statistics(self, x: torch.Tensor, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, variance)`` per feature for a call in ``direction`` (see the class docstring)."""
        if not self.training:
            return self.running_mean, self.running_var
        if direction == "inverse":
            if self.batch_mean is not None:
                return self.batch_mean, self.batch_var
            return self.running_mean, self.running_var
        count = x.numel() // self.num_features
        if count < 2:
            return self.running_mean, self.running_var
        dims = self._reduce_dims(x)
        mean = x.mean(dims)
        var = (x - self._feature(mean, x)).square().mean(dims)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            unbiased = var.detach() * (count / (count - 1))
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        self.batch_mean, self.batch_var = mean.detach(), var.detach()
        return mean, var

    def _log_det(self, var: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        per_position = self.log_gamma.sum() - 0.5 * torch.log(var + self.eps).sum()
        return (per_position * self._positions(v)).expand(v.shape[: v.dim() - self._event_dim])

    def forward_and_log_det(self, x):
        self._check_features(x)
        mean, var = self._statistics(x, "forward")
        scale = torch.exp(self.log_gamma) / self._feature(torch.sqrt(var + self.eps), x)
        y = (x - self._feature(mean, x)) * scale + self.beta
        return y, self._log_det(var, x)

    def inverse_and_log_det(self, y):
        self._check_features(y)
        mean, var = self._statistics(y, "inverse")
        x = (y - self.beta) * torch.exp(-self.log_gamma) * self._feature(torch.sqrt(var + self.eps), y)
        x = x + self._feature(mean, y)
        return x, -self._log_det(var, y)

    def extra_repr(self) -> str:
        return f"shape={self.event_shape}, momentum={self.momentum}, eps={self.eps}"
