r"""Out-of-distribution scores from a trained density model (Nalisnick et al. 2019; Chen et al. 2019, §5.2).

Every score is *higher for inputs that look out of distribution*, so all of them go through :func:`roc_auc` the
same way:

* :func:`nll_scores`: the negative log-likelihood per input (bits/dim for integer pixels, nats otherwise). Flows are
  known to give *higher* likelihood to some foreign data (constant or low-variance images): the raw likelihood
  then fails.
* :func:`typicality_scores`: the typicality test of Nalisnick et al. (2019). A model's typical set is where the
  negative log-likelihood is near its entropy :math:`H`, estimated by the mean NLL of training data; the score of a
  batch of :math:`M` inputs is :math:`|\frac1M \sum_m \mathrm{NLL}(x_m) - \hat H|` (``batch_size=1``: per input).
  Too likely is as suspicious as too unlikely.
* :func:`open_set_predict` with :func:`likelihood_threshold`: the open-set rule of a
  :class:`~pyroflows.HybridDensity` (Residual Flows §5.2): predict the class :math:`\arg\max_y p(y \mid x)`, or
  "unknown" (label :math:`K`) when :math:`\log p(x) < \tau`, with :math:`\tau` the ``quantile`` of the
  log-likelihoods of held-out in-distribution data.
* :func:`roc_auc` / :func:`roc_curve`: how well a score separates in-distribution from out-of-distribution inputs
  (1 = perfectly, 0.5 = chance); :func:`pyroflows.plots.plot_roc` draws the curves.
"""

from __future__ import annotations

import math
import numbers

import torch


def _scores(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().double().reshape(-1).cpu()
    if t.numel() == 0:
        raise ValueError(f"{name}: no scores")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: the scores contain NaN or inf")
    return t


def _scored(model, data, n_bins, batch_size, seed, caller: str, classes: bool = False):
    """``per_example_nll`` of every input of ``data`` (with the class log-probabilities when ``classes``)."""
    from .data.images import ImageDataset
    from .train.evaluation import _as_data, per_example_nll

    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"{caller}: batch_size must be an int >= 1, got {batch_size!r}")
    x = data if isinstance(data, ImageDataset) else torch.as_tensor(data)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and n_bins is None:
        x = x.to(model._loc.dtype)  # continuous data in the model's dtype
    elif isinstance(x, torch.Tensor) and n_bins is None:
        raise ValueError(f"{caller}: integer pixels need n_bins (or pass an ImageDataset)")
    d = _as_data(x, n_bins, model.event_shape, model._loc.device, "the data", caller)
    out = per_example_nll(model, d, torch.arange(len(d), device=d.x.device), int(batch_size), seed, classes)
    return tuple(t.cpu() for t in out) if classes else out.cpu()


@torch.no_grad()
def nll_scores(model, data, n_bins: int | None = None, batch_size: int = 500, seed: int = 0) -> torch.Tensor:
    """The negative log-likelihood of each input under ``model``, in eval mode: bits/dim for integer pixels (the
    dequantisation of :meth:`~pyroflows.FlowDensity.bits_per_dim`, its noise seeded by ``seed``), nats for
    continuous data.

    :param model: a trained :class:`~pyroflows.FlowDensity`.
    :param data: an :class:`~pyroflows.data.ImageDataset`, integer pixels (with ``n_bins``), or a float tensor.
    :param int n_bins: intensity levels of integer pixels given as a tensor (an ImageDataset knows its own).
    :param int batch_size: inputs per pass.
    :param int seed: seed of the dequantisation noise (and of a residual flow's estimators), as in
        :func:`pyroflows.train.evaluate`.
    :returns: a float64 tensor, one score per input (on the CPU).

    Example::

        >>> import torch, pyroflows
        >>> model = pyroflows.FlowDensity(pyroflows.realnvp(2, num_layers=2), (2,))
        >>> nll_scores(model, torch.randn(5, 2)).shape
        torch.Size([5])
    """
    return _scored(model, data, n_bins, batch_size, seed, "nll_scores")


@torch.no_grad()
def hybrid_scores(
    model, data, n_bins: int | None = None, batch_size: int = 500, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A hybrid model's two views of each input from one pass over the same dequantised input: the NLL of
    :func:`nll_scores` and :math:`\\log p(y \\mid x)` of every class (``(N, K)``). ``-class_log_probs.max(-1)`` is the
    maximum-softmax score, the usual classifier-only out-of-distribution baseline.

    :param model: a :class:`~pyroflows.HybridDensity`.
    :param data: the inputs, as for :func:`nll_scores`.
    :param int n_bins: intensity levels of integer pixels given as a tensor.
    :param int batch_size: inputs per pass.
    :param int seed: seed of the dequantisation noise.
    :returns: ``(nll, class_log_probs)``, float64 on the CPU.

    Example::

        >>> import torch, pyroflows
        >>> model = pyroflows.HybridDensity(pyroflows.realnvp(2, num_layers=2), (2,), num_classes=3)
        >>> nll, log_py = hybrid_scores(model, torch.randn(5, 2))
        >>> nll.shape, log_py.shape
        (torch.Size([5]), torch.Size([5, 3]))
    """
    from .hybrid import HybridDensity

    if not isinstance(model, HybridDensity):
        raise TypeError(f"hybrid_scores: model must be a pyroflows.HybridDensity, got {type(model).__name__}")
    return _scored(model, data, n_bins, batch_size, seed, "hybrid_scores", classes=True)


@torch.no_grad()
def likelihood_threshold(
    model, data, quantile: float = 0.05, n_bins: int | None = None, batch_size: int = 500, seed: int = 0
) -> float:
    r"""The open-set threshold :math:`\tau` from held-out in-distribution ``data``, in the units of
    :func:`nll_scores`: the NLL exceeded by a share ``quantile`` of ``data`` (so :math:`\log p(x) < \tau` for that
    share, and :func:`open_set_predict` calls that share "unknown": ``quantile`` is the false-rejection rate one
    accepts on data like it).

    :param model: a trained :class:`~pyroflows.FlowDensity` (a :class:`~pyroflows.HybridDensity` for the rule).
    :param data: held-out in-distribution inputs, as for :func:`nll_scores`.
    :param float quantile: in ``(0, 1)``.
    :param int n_bins: intensity levels of integer pixels given as a tensor.
    :param int batch_size: inputs per pass.
    :param int seed: seed of the dequantisation noise.

    Example::

        >>> import torch, pyroflows
        >>> model = pyroflows.FlowDensity(pyroflows.realnvp(2, num_layers=2), (2,))
        >>> tau = likelihood_threshold(model, torch.randn(1000, 2), quantile=0.1)
        >>> abs(tau - 4.14) < 0.2  # a fresh flow is the identity: the 90 % NLL quantile of N(0, I) is 4.14 nats
        True
    """
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0 < quantile < 1:
        raise ValueError(f"likelihood_threshold: quantile must lie in (0, 1), got {quantile!r}")
    nll = _scored(model, data, n_bins, batch_size, seed, "likelihood_threshold")
    return float(torch.quantile(nll, 1.0 - float(quantile)))


@torch.no_grad()
def open_set_predict(
    model, data, threshold: float, n_bins: int | None = None, batch_size: int = 500, seed: int = 0
) -> torch.Tensor:
    r"""The open-set rule of a hybrid model: :math:`\hat y(x) = K` ("unknown") if the NLL of :math:`x` exceeds
    ``threshold`` (i.e. :math:`\log p(x) < \tau`), else :math:`\arg\max_y p(y \mid x)`; both from one pass over the
    same dequantised input.

    :param model: a trained :class:`~pyroflows.HybridDensity` with :math:`K` classes.
    :param data: the inputs, as for :func:`nll_scores`.
    :param float threshold: :math:`\tau` in NLL units (:func:`likelihood_threshold`).
    :param int n_bins: intensity levels of integer pixels given as a tensor.
    :param int batch_size: inputs per pass.
    :param int seed: seed of the dequantisation noise.
    :returns: int64 labels in ``[0, K]``, on the CPU.

    Example::

        >>> import torch, pyroflows
        >>> model = pyroflows.HybridDensity(pyroflows.realnvp(2, num_layers=2), (2,), num_classes=3)
        >>> x = torch.tensor([[0.0, 0.0], [8.0, 8.0]])
        >>> open_set_predict(model, x, threshold=likelihood_threshold(model, torch.randn(500, 2)))
        tensor([0, 3])
    """
    from .hybrid import HybridDensity

    if not isinstance(model, HybridDensity):
        raise TypeError(f"open_set_predict: model must be a pyroflows.HybridDensity, got {type(model).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"open_set_predict: threshold must be a finite number, got {threshold!r}")
    nll, log_py = _scored(model, data, n_bins, batch_size, seed, "open_set_predict", classes=True)
    return torch.where(nll > threshold, model.num_classes, log_py.argmax(-1))


def typicality_scores(nll, entropy: float, batch_size: int = 1) -> torch.Tensor:
    r"""Nalisnick et al.'s typicality statistic, :math:`|\overline{\mathrm{NLL}}_M - \hat H|`, for consecutive
    batches of ``batch_size`` inputs (a trailing partial batch is dropped).

    :param nll: per-input negative log-likelihoods (e.g. :func:`nll_scores`), in the units of ``entropy``.
    :param float entropy: :math:`\hat H`, the model's entropy estimate: the mean NLL of training data (use
        :func:`nll_scores` on held-out in-distribution data for an unbiased one).
    :param int batch_size: :math:`M`; 1 scores every input alone.
    :returns: one score per batch.

    Example::

        >>> typicality_scores(torch.tensor([1.0, 3.0, 2.5, 2.5]), entropy=2.0, batch_size=2)
        tensor([0.0000, 0.5000], dtype=torch.float64)
    """
    scores = _scores(nll, "typicality_scores")
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"typicality_scores: batch_size must be an int >= 1, got {batch_size!r}")
    n = scores.numel() // batch_size
    if n == 0:
        raise ValueError(f"typicality_scores: {scores.numel()} inputs make no batch of {batch_size}")
    means = scores[: n * batch_size].reshape(n, batch_size).mean(-1)
    return (means - float(entropy)).abs()


def roc_curve(in_scores, out_scores) -> tuple[torch.Tensor, torch.Tensor]:
    """False and true positive rates of flagging ``score >= threshold`` as out of distribution, over every threshold
    (the positives are the out-of-distribution inputs): ``(fpr, tpr)``, each from 0 to 1.

    :param in_scores: scores of in-distribution inputs.
    :param out_scores: scores of out-of-distribution inputs.

    Example::

        >>> fpr, tpr = roc_curve([0.1, 0.2], [0.3, 0.4])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0, 1.0])
    """
    inside, outside = _scores(in_scores, "roc_curve"), _scores(out_scores, "roc_curve")
    thresholds = torch.cat([inside, outside]).unique().flip(0)  # descending
    fpr = torch.stack([(inside >= t).double().mean() for t in thresholds])
    tpr = torch.stack([(outside >= t).double().mean() for t in thresholds])
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fpr]), torch.cat([zero, tpr])


def roc_auc(in_scores, out_scores) -> float:
    """Area under the ROC curve: the probability that an out-of-distribution input scores higher than an
    in-distribution one, ties counting one half (the Mann-Whitney statistic). 1 separates perfectly, 0.5 is
    chance, below 0.5 the score points the wrong way.

    :param in_scores: scores of in-distribution inputs.
    :param out_scores: scores of out-of-distribution inputs.

    Example::

        >>> roc_auc([0.1, 0.2, 0.3], [0.25, 0.4])
        0.8333333333333334
    """
    inside, outside = _scores(in_scores, "roc_auc"), _scores(out_scores, "roc_auc")
    greater = (outside[:, None] > inside[None, :]).double().sum()
    ties = (outside[:, None] == inside[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (inside.numel() * outside.numel()))


__all__ = [
    "hybrid_scores",
    "likelihood_threshold",
    "nll_scores",
    "open_set_predict",
    "roc_auc",
    "roc_curve",
    "typicality_scores",
]
