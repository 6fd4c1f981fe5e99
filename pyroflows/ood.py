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
* :func:`roc_auc` / :func:`roc_curve`: how well a score separates in-distribution from out-of-distribution inputs
  (1 = perfectly, 0.5 = chance); :func:`pyroflows.plots.plot_roc` draws the curves.
"""

from __future__ import annotations

import numbers

import torch


def _scores(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().double().reshape(-1).cpu()
    if t.numel() == 0:
        raise ValueError(f"{name}: no scores")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: the scores contain NaN or inf")
    return t


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
    from .data.images import ImageDataset
    from .train.evaluation import _as_data, per_example_nll

    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"nll_scores: batch_size must be an int >= 1, got {batch_size!r}")
    x = data if isinstance(data, ImageDataset) else torch.as_tensor(data)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and n_bins is None:
        x = x.to(model._loc.dtype)  # continuous data in the model's dtype
    elif isinstance(x, torch.Tensor) and n_bins is None:
        raise ValueError("nll_scores: integer pixels need n_bins (or pass an ImageDataset)")
    d = _as_data(x, n_bins, model.event_shape, model._loc.device, "the data", "nll_scores")
    return per_example_nll(model, d, torch.arange(len(d), device=d.x.device), int(batch_size), seed).cpu()


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


__all__ = ["nll_scores", "roc_auc", "roc_curve", "typicality_scores"]
