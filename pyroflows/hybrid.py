r"""Hybrid models: one invertible network as both a density model and a classifier (Nalisnick et al. 2019).

A :class:`HybridDensity` is a :class:`~pyroflows.FlowDensity` whose latent :math:`z = f(x)` also feeds a
classifier head :math:`p(y \mid x) = \mathrm{softmax}(h(z))_y`. Training maximises

.. math:: \mathbb E\big[\lambda \log p(x) + \log p(y \mid x)\big],

so ``lam = 0`` is a plain (invertible) classifier, ``lam = 1`` the joint likelihood :math:`\log p(x, y)`, and
``lam = 1/D`` (Nalisnick et al.'s and Residual Flows' choice) weighs the density per dimension against the one
label. Because the features are invertible, the same network still gives an exact :math:`\log p(x)` for any
``lam``, which :func:`pyroflows.ood.open_set_predict` uses to refuse inputs the model finds unlikely.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .density import FlowDensity
from .transforms.base import forward_only

#: The classifier heads a :class:`HybridDensity` can put on the latent.
HEADS = ("linear", "pooled", "mlp")


def check_lam(lam, caller: str = "HybridDensity") -> float:
    """``lam`` as a float, or a ``ValueError`` naming it (it must be finite and ``>= 0``).

    :param lam: the weight of :math:`\\log p(x)` in a hybrid objective.
    :param str caller: named in the error.

    Example::

        >>> check_lam(1 / 64)
        0.015625
        >>> check_lam(-1)
        Traceback (most recent call last):
          ...
        ValueError: HybridDensity: lam must be a finite number >= 0 (0, 1/D or 1, say), got -1
    """
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{caller}: lam must be a finite number >= 0 (0, 1/D or 1, say), got {lam!r}")
    return float(lam)


class HybridDensity(FlowDensity):
    r"""A flow density :math:`p(x)` and a classifier :math:`p(y \mid x)` on its latent, trained jointly on
    :math:`\lambda \log p(x) + \log p(y \mid x)` by :func:`pyroflows.train.fit` (which then needs labels).

    The classifier head acts on the exact latent :math:`z = f(x)` of the whole flow
    (:meth:`~pyroflows.FlowDensity.encode`):

    * ``"linear"``: a linear map of the flattened latent (Nalisnick et al.'s generalised linear model);
    * ``"pooled"``: for an image latent :math:`(C, H, W)`, the channel means over the pixels, then a linear map
      (fewer parameters, translation invariant; for a vector latent the same as ``"linear"``);
    * ``"mlp"``: the flattened latent through one hidden layer of ``hidden`` ReLU units.

    The head starts at zero (uniform class probabilities), so a fresh model's density is its flow's.

    :param flow: an unconditional flow from data to latent (e.g. :func:`pyroflows.glow`).
    :param event_shape: the data event shape.
    :param int num_classes: the number of classes :math:`K \ge 2`; labels are ``0..K-1``.
    :param float lam: :math:`\lambda \ge 0`, the weight of :math:`\log p(x)` in the training objective.
    :param str head: ``"linear"``, ``"pooled"`` or ``"mlp"``.
    :param int hidden: hidden units of the ``"mlp"`` head (default 128).
    :param base: optional Pyro distribution over the latent (as for :class:`~pyroflows.FlowDensity`).

    Example::

        >>> import torch, pyroflows
        >>> flow = pyroflows.glow((1, 8, 8), levels=1, num_layers=1, hidden=8)
        >>> model = pyroflows.HybridDensity(flow, (1, 8, 8), num_classes=10, lam=1 / 64)
        >>> x = torch.rand(4, 1, 8, 8)
        >>> model.class_log_prob(x).shape, model.predict(x).shape
        (torch.Size([4, 10]), torch.Size([4]))
        >>> model.joint_log_prob(x, torch.tensor([0, 1, 2, 3])).shape
        torch.Size([4])
    """

    def __init__(
        self,
        flow,
        event_shape: Sequence[int],
        num_classes: int,
        lam: float = 1.0,
        head: str = "linear",
        hidden: int | None = None,
        base=None,
    ):
        super().__init__(flow, event_shape, base=base)
        if self.context_shape is not None:  # unreachable: FlowDensity refused a conditional flow without context
            raise ValueError("HybridDensity: the flow must be unconditional")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"HybridDensity: num_classes must be an int >= 2, got {num_classes!r}")
        if head not in HEADS:
            raise ValueError(f"HybridDensity: head must be one of {HEADS}, got {head!r}")
        if hidden is not None and head != "mlp":
            raise ValueError(f"HybridDensity: hidden= is the size of the 'mlp' head, not of {head!r}")
        hidden = 128 if hidden is None else hidden
        if isinstance(hidden, bool) or not isinstance(hidden, numbers.Integral) or hidden < 1:
            raise ValueError(f"HybridDensity: hidden must be an int >= 1, got {hidden!r}")
        self.num_classes = int(num_classes)
        self.lam = check_lam(lam)
        self.head_kind = head
        pooled = head == "pooled" and len(self.latent_shape) == 3
        features = self.latent_shape[0] if pooled else math.prod(self.latent_shape)
        self._pool = pooled
        last = nn.Linear(features if head != "mlp" else int(hidden), self.num_classes)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.head = nn.Sequential(nn.Linear(features, int(hidden)), nn.ReLU(), last) if head == "mlp" else last

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The classifier's logits from latents ``z`` (shape ``batch + latent_shape``): ``batch + (K,)``.

        :param torch.Tensor z: latents, e.g. from :meth:`~pyroflows.FlowDensity.encode`.
        """
        k = len(self.latent_shape)
        batch = z.shape[: z.dim() - k]
        features = z.mean(dim=(-2, -1)) if self._pool else z.reshape(batch + (-1,))
        return self.head(features)

    def log_prob_and_class_log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\log p(x)` (shape ``batch``) and :math:`\log p(y \mid x)` for every class (``batch + (K,)``)
        from one pass through the flow.

        :param torch.Tensor x: data in the flow's data space, shape ``batch + event_shape``.
        """
        self._check(x)
        z, log_px = self._latent_and_log_prob(x, self.flow)
        return log_px, torch.log_softmax(self.logits(z), dim=-1)

    def class_log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`\log p(y \mid x)`: for every class (shape ``batch + (K,)``), or for the labels ``y``
        (shape ``batch``). Only the latent is computed (no log-det); differentiable in the parameters.

        :param torch.Tensor x: data in the flow's data space, shape ``batch + event_shape``.
        :param torch.Tensor y: integer labels in ``[0, K)``, shape ``batch`` (optional).
        """
        self._check(x)
        log_p = torch.log_softmax(self.logits(forward_only(self.flow, x)), dim=-1)
        return log_p if y is None else self._pick(log_p, y, "class_log_prob")

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class of each input, shape ``batch`` (int64).

        :param torch.Tensor x: data in the flow's data space, shape ``batch + event_shape``.
        """
        return self.class_log_prob(x).argmax(-1)

    def joint_log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x, y) = \log p(x) + \log p(y \mid x)`, shape ``batch``.

        :param torch.Tensor x: data in the flow's data space.
        :param torch.Tensor y: integer labels in ``[0, K)``, shape ``batch``.
        """
        log_px, log_py = self.log_prob_and_class_log_prob(x)
        return log_px + self._pick(log_py, y, "joint_log_prob")

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""The per-example training objective :math:`\lambda \log p(x) + \log p(y \mid x)` (to maximise); with
        ``lam = 0`` the classifier's alone, computed without the log-det.

        :param torch.Tensor x: data in the flow's data space.
        :param torch.Tensor y: integer labels in ``[0, K)``, shape ``batch``.
        """
        if self.lam == 0:  # a classifier: no log-det to compute (a residual flow's is the expensive part)
            return self.class_log_prob(x, y)
        log_px, log_py = self.log_prob_and_class_log_prob(x)
        return self.lam * log_px + self._pick(log_py, y, "objective")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`objective` with labels (what :func:`pyroflows.train.fit` maximises), :meth:`log_prob` without."""
        return self.log_prob(x) if y is None else self.objective(x, y)

    def _pick(self, log_p: torch.Tensor, y: torch.Tensor, caller: str) -> torch.Tensor:
        y = check_labels(y, self.num_classes, f"HybridDensity.{caller}")
        if tuple(y.shape) != tuple(log_p.shape[:-1]):
            raise ValueError(
                f"HybridDensity.{caller}: labels of shape {tuple(y.shape)} for inputs of batch shape "
                f"{tuple(log_p.shape[:-1])}"
            )
        return log_p.gather(-1, y.to(log_p.device).unsqueeze(-1)).squeeze(-1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, lam={self.lam:g}, head={self.head_kind!r}"


def check_labels(y, num_classes: int, caller: str) -> torch.Tensor:
    """Integer class labels in ``[0, num_classes)`` as an int64 tensor, or a ``ValueError`` naming the problem.

    :param y: the labels (a tensor or a sequence of ints).
    :param int num_classes: the number of classes.
    :param str caller: named in the error.

    Example::

        >>> check_labels([0, 2, 1], 3, "demo")
        tensor([0, 2, 1])
        >>> check_labels([0, 3], 3, "demo")
        Traceback (most recent call last):
          ...
        ValueError: demo: labels must lie in [0, 3), got values from 0 to 3
    """
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{caller}: labels must be integers, got dtype {y.dtype}")
    if y.numel():
        low, high = (int(v) for v in torch.aminmax(y))  # one reduction: one device sync in a training step
        if low < 0 or high >= num_classes:
            raise ValueError(f"{caller}: labels must lie in [0, {num_classes}), got values from {low} to {high}")
    return y.long()


__all__ = ["HEADS", "HybridDensity", "check_labels", "check_lam"]
