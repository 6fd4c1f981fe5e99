"""Data for density models: integer-pixel image data sets (:mod:`pyroflows.data.images`) and 2-D toy densities
with exact log-density (:mod:`pyroflows.data.toy`)."""

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
