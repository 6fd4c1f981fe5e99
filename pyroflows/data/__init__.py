r"""Data for density models, all from local files: nothing here ever downloads.

Images are integer pixels in ``[0, n_bins)`` held by an :class:`ImageDataset`: scikit-learn's digits, embedded
(:func:`load_digits`), and MNIST and CIFAR-10 read from files the user already has, in the layouts of the original
distributions and of ``torchvision`` (:func:`load_mnist`, :func:`load_cifar10`, :func:`get_dataset`). A training
loop dequantises each batch with :func:`dequantize`, :math:`\tilde x = (x + u) / n_{bins}`,
:math:`u \sim U[0, 1)^D`, which is what :meth:`pyroflows.FlowDensity.bits_per_dim` assumes.

Two-dimensional toy densities (:class:`ToyDensity`, :func:`get_toy`) have an exact ``log_prob`` and exact
sampling, so a trained flow can be scored by :math:`\mathrm{KL}(p \,\|\, q) = \mathbb E_p[\log p - \log q]`.
"""

from .images import (
    DATASETS,
    ImageDataset,
    as_image_dataset,
    dequantize,
    get_dataset,
    load_cifar10,
    load_digits,
    load_mnist,
    read_idx,
    reduce_bits,
)
from .toy import TOYS, Checkerboard, EightGaussians, IsotropicMixture, Pinwheel, Rings, ToyDensity, TwoMoons, get_toy

__all__ = [
    "DATASETS",
    "TOYS",
    "Checkerboard",
    "EightGaussians",
    "ImageDataset",
    "IsotropicMixture",
    "Pinwheel",
    "Rings",
    "ToyDensity",
    "TwoMoons",
    "as_image_dataset",
    "dequantize",
    "get_dataset",
    "get_toy",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "read_idx",
    "reduce_bits",
]
