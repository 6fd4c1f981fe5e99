r"""Training data held in (device) memory, and :func:`evaluate`: mean test bits/dim or NLL of a density model."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from ..data.images import ImageDataset, as_image_dataset, check_pixels, dequantize
from ..density import FlowDensity, to_bits_per_dim
from ..transforms.base import has_random_log_det


# ------------------------------------------------------------------------------------------------ data
@dataclass
class _Data:
    x: torch.Tensor  # (N, *event_shape) integer pixels or float values, on the training device
    n_bins: int | None  # None: continuous data (loss in nats)
    context: torch.Tensor | None = None  # (N, k) contexts of a conditional model, on the same device
    labels: torch.Tensor | None = None  # (N,) int64 class labels of a hybrid model, on the same device

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        xb = self.x[index]
        # checked once at load (_as_data): no per-step pixel check, so no extra device sync per step
        return xb if self.n_bins is None else dequantize(xb, self.n_bins, generator, check=False)

    def contexts(self, index: torch.Tensor) -> torch.Tensor | None:
        """The contexts of the examples ``index`` (``None`` for an unconditional model)."""
        return None if self.context is None else self.context[index]

    def model_args(self, index: torch.Tensor) -> tuple:
        """What the model's ``forward`` takes after the data for the examples ``index``: the contexts of a
        conditional model, the labels of a hybrid one, nothing otherwise."""
        if self.labels is not None:
            return (self.labels[index],)
        return () if self.context is None else (self.context[index],)


#: fewer batches than this (per process) make a residual flow's standard error imprecise: a warning says so
MIN_BATCHES = 10
#: the evaluation batch unless one is given
DEFAULT_BATCH = 500
#: the largest automatic batch of :func:`evaluate_with_error` for a model with a random eval-mode log-det
RANDOM_LOG_DET_BATCH = 100


def _as_data(
    data,
    n_bins: int | None,
    shape: tuple,
    device: torch.device,
    name: str,
    caller: str = "fit",
    context_shape=None,
    num_classes: int | None = None,
) -> _Data:
    """The data checked and held on ``device``: a ``(data, context)`` pair for a conditional model; for a hybrid
    model (``num_classes``) a ``(data, labels)`` pair or a labelled ``ImageDataset``."""
    context = labels = None
    if isinstance(data, tuple):
        second = "labels" if num_classes is not None else "context"
        if len(data) != 2:
            raise ValueError(f"{caller}: {name} given as a tuple must be (data, {second}), got {len(data)} items")
        data, other = data
        if num_classes is not None:
            labels = other
        else:
            context = other
    if isinstance(data, ImageDataset) or (isinstance(data, torch.Tensor) and not data.is_floating_point()):
        data = as_image_dataset(data, n_bins)
        x, n_bins = data.images, data.n_bins
    elif isinstance(data, torch.Tensor):
        if n_bins is not None:  # integer-valued pixels stored as floats
            check_pixels(data, n_bins, f"{caller}: {name} (n_bins={n_bins})")
            x = as_image_dataset(data, n_bins).images
        else:
            x = data
    else:  # any Dataset of images
        data = as_image_dataset(data, n_bins)
        x, n_bins = data.images, data.n_bins
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{caller}: {name} is empty")
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{caller}: {name} has items of shape {tuple(x.shape[1:])} but the model expects event shape {tuple(shape)}"
        )
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{caller}: {name} contains NaN or inf")
    context = _as_context(context, context_shape, len(x), device, name, caller)
    if num_classes is not None:
        if labels is None:
            labels = getattr(data, "labels", None)
        if labels is None:
            raise ValueError(
                f"{caller}: the model is a classifier too (HybridDensity): give {name} as a (data, labels) pair or "
                "a labelled ImageDataset"
            )
        from ..hybrid import check_labels

        labels = check_labels(labels, num_classes, f"{caller}: the labels of {name}")
        if tuple(labels.shape) != (len(x),):
            raise ValueError(f"{caller}: {name} has {len(x)} items but labels of shape {tuple(labels.shape)}")
        labels = labels.to(device)
    return _Data(x.to(device), n_bins, context, labels)


def _as_context(context, context_shape, n: int, device, name: str, caller: str) -> torch.Tensor | None:
    """The contexts of a conditional model's data, checked: a floating ``(N, *context_shape)`` tensor, finite."""
    if context_shape is None:
        if context is not None:
            raise ValueError(f"{caller}: {name} comes with contexts, but the model is not conditional")
        return None
    if context is None:
        raise ValueError(
            f"{caller}: the model is conditional (context shape {tuple(context_shape)}): give {name} as a "
            "(data, context) pair"
        )
    context = torch.as_tensor(context)
    if not context.is_floating_point():
        raise TypeError(f"{caller}: the contexts of {name} must be floating point (e.g. one-hot labels as floats)")
    if tuple(context.shape) != (n, *context_shape):
        raise ValueError(
            f"{caller}: the contexts of {name} have shape {tuple(context.shape)}, expected {(n, *context_shape)}"
        )
    if not bool(torch.isfinite(context).all()):
        raise ValueError(f"{caller}: the contexts of {name} contain NaN or inf")
    return context.to(device)


def _loss_units(data: _Data, dim: int):
    """Maps a (mean) log-density in nats, of the dequantised data, to the reported loss: bits/dim for images
    (:func:`~pyroflows.density.to_bits_per_dim`, the formula of ``FlowDensity.bits_per_dim``), nats otherwise."""
    if data.n_bins is None:
        return lambda log_prob: -log_prob
    n_bins = data.n_bins
    return lambda log_prob: to_bits_per_dim(log_prob, dim, n_bins)


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    model: FlowDensity,
    data,
    n_bins: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> float:
    """Mean test bits/dim (images) or negative log-likelihood in nats (float data) of ``model`` on ``data``.

    The dequantisation noise comes from a generator seeded with ``seed``, so repeated calls give the same
    figure and the global RNG is left untouched. Runs in eval mode (residual flows use their evaluation
    log-det settings). Under ``torchrun`` each rank evaluates its shard and the result is reduced over ranks.

    :param model: a :class:`~pyroflows.FlowDensity`.
    :param data: as for :func:`fit` (a ``(data, context)`` pair for a conditional model).
    :param n_bins: intensity levels, for integer pixels given as a plain tensor (default 256).
    :param int batch_size: evaluation batch size.
    :param int seed: seeds the dequantisation noise and the estimators' randomness (the global RNG is restored).
    :param device: where to evaluate (default: the model's device).

    Example::

        >>> import pyroflows
        >>> from pyroflows.data import load_digits
        >>> model = pyroflows.FlowDensity(pyroflows.glow((1, 8, 8), levels=1, num_layers=1, hidden=8),
        ...                               (1, 8, 8))
        >>> 0 < evaluate(model, load_digits("test"))
        True
    """
    runs, world = _evaluations(model, data, n_bins, batch_size, seed, device, 1, "evaluate")
    total, count = _sum_over_ranks(torch.stack([runs[0].sum(), _count(runs[0])]), world).tolist()
    return total / count


def _evaluations(model, data, n_bins, batch_size, seed, device, repeats: int, caller: str):
    """``(runs, world)``: this rank's per-example figures of ``repeats`` independent evaluations, shape
    ``(repeats, n)``, evaluation ``r`` seeded with ``seed + r * world + rank`` (the first is ``seed + rank``)."""
    d, index, rank, world = _shard(model, data, n_bins, batch_size, seed, device, caller)
    seeds = [seed + r * world + rank for r in range(repeats)]
    return torch.stack([per_example_nll(model, d, index, batch_size, s) for s in seeds]), world


@torch.no_grad()
def evaluate_with_error(
    model: FlowDensity,
    data,
    n_bins: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    repeats: int = 2,
) -> tuple[float, float]:
    r"""Mean test bits/dim (images) or NLL in nats (float data) of ``model`` on ``data`` and its standard error:
    ``(mean, se)`` from ``repeats`` independent evaluations of every example.

    Each evaluation scores every example as :func:`evaluate` does, with its own dequantisation noise and its own
    estimator randomness (a residual flow's probes and Russian roulette), so the figures :math:`a_{ri}` of example
    :math:`i` in evaluation :math:`r` are independent given the example. ``mean`` averages all of them;
    ``se`` is the standard error of that mean for these examples,
    :math:`\sqrt{\sum_i s_i^2 / R} \,/\, N` with :math:`s_i^2` the sample variance of example :math:`i`'s
    :math:`R` figures: the error bar of the stochastic estimators, not of the choice of test set. For a flow with
    an exact log-det only the dequantisation contributes. Where a layer's eval-mode log-det is random
    (``random_log_det``: a residual flow above ``exact_max_dim``), one roulette length is drawn per call and shared
    by the batch, so figures within a batch are correlated: the examples' variances are then replaced by the
    batches' (:func:`batch_sum_variance`), :math:`\sqrt{\sum_b v_b / R} \,/\, N`. That error bar is itself
    precise only with many batches: fewer than 10 (per process) give a ``UserWarning`` naming the batch size to use;
    smaller batches also give a smaller error for the same work.
    Cost: ``repeats`` evaluations; memory: one batch.

    :param model: a :class:`~pyroflows.FlowDensity`.
    :param data: as for :func:`evaluate`.
    :param n_bins: intensity levels, for integer pixels given as a plain tensor (default 256).
    :param int batch_size: evaluation batch size (bounds the memory). ``None`` (the default): 500, or for a model
        with a random eval-mode log-det the largest batch up to 100 that leaves 10 batches per process (on a
        28x28 residual model on CPU, batches of 100 also ran 2.8 times as fast as batches of 500:
        ``benchmarks/residual_eval.py``).
    :param int seed: seeds evaluation ``r`` with ``seed + r`` (under ``torchrun``, ``seed + r * world + rank``);
        the first is :func:`evaluate`'s with the same seed. The global RNG is restored.
    :param device: where to evaluate (default: the model's device).
    :param int repeats: independent evaluations, at least 2.
    :returns: ``(mean, se)``, floats.

    Example::

        >>> import pyroflows
        >>> from pyroflows.data import load_digits
        >>> model = pyroflows.FlowDensity(pyroflows.glow((1, 8, 8), levels=1, num_layers=1, hidden=8),
        ...                               (1, 8, 8))
        >>> mean, se = evaluate_with_error(model, load_digits("test"))
        >>> 0 < se < 0.01 * mean
        True
    """
    from ..run import check_int

    check_int("evaluate_with_error", "repeats", repeats, 2)
    # the unit of independent randomness: the batch where a layer's eval-mode log-det is random (shared within a
    # call), else the example (only its dequantisation noise)
    shared = _random_in_eval(model)
    if batch_size is None:
        batch_size = _error_batch_size(data) if shared else DEFAULT_BATCH
    runs, world = _evaluations(model, data, n_bins, batch_size, seed, device, repeats, "evaluate_with_error")
    batches = math.ceil(runs.shape[1] / batch_size)
    if shared and batches < MIN_BATCHES:
        warnings.warn(
            f"evaluate_with_error: the standard error comes from {batches} batch(es) "
            f"of {batch_size}: a residual flow draws one roulette length per batch, so the batches are the "
            f"independent units; pass batch_size <= {max(1, runs.shape[1] // MIN_BATCHES)} for a precise error bar",
            UserWarning,
            stacklevel=2,
        )
    variance = batch_sum_variance(runs, batch_size) if shared else runs.var(0).sum()
    sums = torch.stack([runs.mean(0).sum(), variance.to(runs.dtype), _count(runs[0])])
    total, var_sum, count = _sum_over_ranks(sums, world).tolist()
    return total / count, math.sqrt(var_sum / repeats) / count


def _error_batch_size(data) -> int:
    """The automatic batch for a random eval-mode log-det: the largest up to :data:`RANDOM_LOG_DET_BATCH` that
    leaves each process :data:`MIN_BATCHES` batches (the independent units of the error bar)."""
    world = torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1
    try:
        n = math.ceil(len(data) / world)
    except TypeError:  # no length: the largest automatic batch
        return RANDOM_LOG_DET_BATCH
    return max(1, min(RANDOM_LOG_DET_BATCH, n // MIN_BATCHES))


def _random_in_eval(model) -> bool:
    """Whether a layer of ``model`` estimates its log-det at random in eval mode (``random_log_det``)."""
    was_training = model.training
    model.eval()
    try:
        return has_random_log_det(model)
    finally:
        model.train(was_training)


def batch_sum_variance(runs: torch.Tensor, batch_size: int) -> torch.Tensor:
    r""":math:`\sum_b v_b`, with :math:`v_b` the sample variance over the ``R`` evaluations of batch :math:`b`'s sum of
    figures: the variance of one evaluation's total, estimated with the batch as the independent unit.

    The estimators' randomness is independent between batches but may be shared within one: a residual flow draws
    one Russian-roulette length per call, for the whole batch. Per-example variances would then miss the
    covariances inside a batch and understate the error; batch sums carry them. Where the randomness is per example
    the expectation is the same, :math:`\sum_i \sigma_i^2`.

    :param torch.Tensor runs: per-example figures, shape ``(R, n)``, example ``j`` in batch ``j // batch_size`` (the
        order in which :func:`per_example_nll` scores them).
    :param int batch_size: the evaluation batch size.
    :returns: a 0-d float64 tensor.

    Example::

        >>> import torch
        >>> shared = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # one offset per batch of 2
        >>> float(batch_sum_variance(shared, 2)), float(shared.var(0).sum())  # 2 * 2: the covariances count
        (4.0, 2.0)
    """
    repeats, n = runs.shape
    pad = (-n) % batch_size
    sums = torch.nn.functional.pad(runs, (0, pad)).reshape(repeats, -1, batch_size).sum(-1)
    return sums.var(0).sum().to(torch.float64)


@torch.no_grad()
def _shard(model, data, n_bins, batch_size, seed, device, caller: str, num_classes: int | None = None):
    """The checked data on the evaluation device and this rank's share of it: ``(data, index, rank, world)``."""
    from ..run import check_device, check_int, check_seed

    check_int(caller, "batch_size", batch_size, 1)
    check_seed(caller, seed)
    device = check_device(caller, device) if device is not None else next(model.parameters()).device
    d = _as_data(data, n_bins, model.event_shape, device, "evaluation data", caller, model.context_shape, num_classes)
    rank, world = 0, 1
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    return d, torch.arange(rank, len(d), world, device=device), rank, world


def _sum_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    """``t`` summed over the ranks (one collective; ``t`` itself when there is one process)."""
    if world > 1:
        torch_dist.all_reduce(t)
    return t


def _count(scores: torch.Tensor) -> torch.Tensor:
    """The number of scores, as a float64 tensor beside them (to be summed over ranks with them)."""
    return torch.tensor(float(len(scores)), dtype=torch.float64, device=scores.device)


@torch.no_grad()
def evaluate_hybrid(
    model,
    data,
    n_bins: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """Test figures of a :class:`~pyroflows.HybridDensity` from one pass over ``data``: mean bits/dim (images,
    ``"bpd"``) or NLL in nats (``"nll"``), classification ``"accuracy"``, and ``"class_nll"``, the mean
    :math:`-\\log p(y \\mid x)` in nats. Seeded and sharded over ranks as :func:`evaluate`, with the same
    dequantised inputs for both tasks.

    :param model: a :class:`~pyroflows.HybridDensity`.
    :param data: a labelled :class:`~pyroflows.data.ImageDataset`, or a ``(data, labels)`` pair.
    :param n_bins: intensity levels, for integer pixels given as a plain tensor.
    :param int batch_size: evaluation batch size.
    :param int seed: seeds the dequantisation noise and the estimators' randomness.
    :param device: where to evaluate (default: the model's device).

    Example::

        >>> import pyroflows
        >>> from pyroflows.data import load_digits
        >>> flow = pyroflows.glow((1, 8, 8), levels=1, num_layers=1, hidden=8)
        >>> model = pyroflows.HybridDensity(flow, (1, 8, 8), num_classes=10, lam=1 / 64)
        >>> figures = evaluate_hybrid(model, load_digits("test"))
        >>> sorted(figures), round(figures["accuracy"], 2)  # a fresh head: every class equally likely
        (['accuracy', 'bpd', 'class_nll'], 0.1)
    """
    from ..hybrid import HybridDensity

    if not isinstance(model, HybridDensity):
        raise TypeError(f"evaluate_hybrid: model must be a pyroflows.HybridDensity, got {type(model).__name__}")
    d, index, rank, world = _shard(model, data, n_bins, batch_size, seed, device, "evaluate_hybrid", model.num_classes)
    nll, log_py = per_example_nll(model, d, index, batch_size, seed + rank, classes=True)
    labels = d.labels[index]
    sums = torch.stack(
        [
            nll.sum(),
            (log_py.argmax(-1) == labels).double().sum(),
            -log_py.gather(-1, labels.unsqueeze(-1)).sum(),
            _count(nll),
        ]
    )
    total, correct, class_nll, count = _sum_over_ranks(sums, world).tolist()
    return {"bpd" if d.n_bins else "nll": total / count, "accuracy": correct / count, "class_nll": class_nll / count}


@torch.no_grad()
def per_example_nll(
    model: FlowDensity, d: _Data, index: torch.Tensor, batch_size: int, seed: int, classes: bool = False
):
    """The negative log-likelihood of each example ``d[index]`` in eval mode, float64: bits/dim of integer pixels
    (the dequantisation and formula of :meth:`~pyroflows.FlowDensity.bits_per_dim`), nats otherwise. With
    ``classes`` (a :class:`~pyroflows.HybridDensity`), also :math:`\\log p(y \\mid x)` of every class from the same
    pass and the same dequantised inputs: ``(nll, class_log_probs)``, the latter ``(len(index), K)``.

    The dequantisation noise comes from a generator seeded with ``seed``, and the estimators' randomness (a residual
    flow's probes) from the global RNG seeded with ``seed`` inside a fork, so the training RNG is untouched and a
    repeated call gives the same figures. :func:`evaluate` and :func:`pyroflows.ood.nll_scores` both score this way.
    """
    device = d.x.device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out, class_out = [], []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):  # estimators' probes must not move training's RNG
            torch.manual_seed(seed)
            for start in range(0, len(index), batch_size):
                chunk = index[start : start + batch_size]
                xb, cb = d.x[chunk], d.contexts(chunk)
                if d.n_bins is not None:  # the dequantisation of FlowDensity.bits_per_dim
                    xb = model._dequantized(xb, d.n_bins, generator, "evaluate")
                if classes:  # one pass for both tasks
                    log_px, log_py = model.log_prob_and_class_log_prob(xb)
                    class_out.append(log_py)
                else:
                    log_px = model.log_prob(xb, cb)
                out.append(-log_px if d.n_bins is None else to_bits_per_dim(log_px, model.dim, d.n_bins))
    finally:
        model.train(was_training)
    nll = torch.cat(out).double() if out else torch.zeros(0, dtype=torch.float64, device=device)
    if not classes:
        return nll
    k = getattr(model, "num_classes", 0)
    return nll, (torch.cat(class_out).double() if class_out else torch.zeros(0, k, dtype=torch.float64, device=device))


__all__ = ["evaluate", "evaluate_hybrid", "evaluate_with_error"]
