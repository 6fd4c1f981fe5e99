r"""Image data sets as integer pixels: scikit-learn's digits (embedded), MNIST and CIFAR-10 from a local directory.

An :class:`ImageDataset` holds the pixels as integers in ``[0, n_bins)``; a training loop dequantises each batch
with :func:`dequantize`, :math:`\tilde x = (x + u) / n_{bins}`, :math:`u \sim U[0, 1)^D`, which is what
:meth:`pyroflows.FlowDensity.bits_per_dim` assumes. Nothing here ever downloads: MNIST and CIFAR-10 are read
from files the user already has (the layouts of the original distributions and of ``torchvision``).
"""

from __future__ import annotations

import functools
import gzip
import importlib
import math
import numbers
import pickle
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "ImageDataset",
    "as_image_dataset",
    "check_pixels",
    "dequantize",
    "get_dataset",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "read_idx",
    "reduce_bits",
]

SPLITS = ("train", "test", "all")


def _storage_dtype(n_bins: int) -> torch.dtype:
    if n_bins <= 256:
        return torch.uint8
    if n_bins <= 2**15:
        return torch.int16
    return torch.int32


def _as_tensor(data) -> torch.Tensor:
    """A tensor sharing memory with ``data`` where possible (read-only arrays are copied)."""
    if isinstance(data, torch.Tensor):
        return data
    array = np.asarray(data)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def check_n_bins(n_bins, name: str) -> None:
    """``ValueError`` naming ``name`` unless ``n_bins`` (intensity levels) is an int >= 2: one level carries no
    information, and a fractional count has no pixels.

    Example::

        >>> check_n_bins(17.5, "mine")
        Traceback (most recent call last):
          ...
        ValueError: mine: n_bins must be an int >= 2 (intensity levels), got 17.5
    """
    if not isinstance(n_bins, numbers.Integral) or isinstance(n_bins, bool) or n_bins < 2:
        raise ValueError(f"{name}: n_bins must be an int >= 2 (intensity levels), got {n_bins!r}")


def check_pixels(x: torch.Tensor, n_bins: int, name: str) -> None:
    """The one check of integer pixels: ``ValueError`` naming ``name`` unless ``x`` holds integer values (an integer
    dtype, or a floating one holding finite whole numbers) in ``[0, n_bins)``.

    :param x: the pixels, any shape (an empty tensor passes).
    :param int n_bins: number of intensity levels.
    :param str name: who checks, for the message (``"ImageDataset"``, ``"FlowDensity.bits_per_dim"``, ...).

    Example::

        >>> import torch
        >>> check_pixels(torch.tensor([0, 16]), 17, "mine")
        >>> check_pixels(torch.tensor([0.5]), 17, "mine")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        ValueError: mine: pixels must be integer-valued, got non-integer values (they look like intensities ...)
    """
    check_n_bins(n_bins, name)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name}: pixels must be integer-valued numbers, got dtype {x.dtype}")
    if not x.numel():
        return
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: pixels contain NaN or infinite values")
        if not bool((x == torch.round(x)).all()):
            hint = (
                " (they look like intensities scaled to [0, 1]: pass the integer pixels, e.g. without "
                "torchvision's ToTensor)"
                if float(x.max()) <= 1.0
                else ""
            )
            raise ValueError(f"{name}: pixels must be integer-valued, got non-integer values{hint}")
    low, high = x.min().item(), x.max().item()
    if low < 0 or high >= n_bins:
        raise ValueError(
            f"{name}: pixel values must lie in [0, n_bins) = [0, {n_bins}) (integer-valued pixels in "
            f"[0, {n_bins - 1}]), got range [{low:g}, {high:g}]"
        )


class ImageDataset(Dataset):
    r"""Integer-valued images ``(N, C, H, W)`` with ``n_bins`` intensity levels ``0, ..., n_bins - 1``.

    Pixels are stored as ``uint8`` (``int16`` when ``n_bins > 256``). Items are the integer images alone,
    shape ``(C, H, W)``, so a ``DataLoader`` yields integer batches for the training loop to :func:`dequantize`;
    labels, when known, are in ``labels``.

    :param images: tensor or array ``(N, C, H, W)``, or ``(N, H, W)`` for one channel, of integer values
        (an integer dtype, or a floating dtype holding whole numbers) in ``[0, n_bins)``.
    :param int n_bins: number of intensity levels (256 for 8-bit images, 17 for scikit-learn's digits).
    :param labels: optional integer labels, shape ``(N,)``.
    :raises ValueError: on a wrong number of dimensions, non-integer values or values outside ``[0, n_bins)``.

    :ivar torch.Tensor images: the pixels, ``(N, C, H, W)``, ``uint8`` or ``int16``.
    :ivar int n_bins: the number of intensity levels.
    :ivar labels: ``(N,)`` int64 labels, or ``None``.

    Example::

        >>> import torch
        >>> data = ImageDataset(torch.randint(0, 17, (10, 8, 8)), n_bins=17)
        >>> len(data), data.shape, data[0].dtype
        (10, (1, 8, 8), torch.uint8)
    """

    def __init__(self, images, n_bins: int = 256, labels=None):
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
            raise ValueError(f"ImageDataset: n_bins must be an integer >= 2, got {n_bins!r}")
        n_bins = int(n_bins)
        images = _as_tensor(images)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise ValueError(
                f"ImageDataset: images must have shape (N, C, H, W) or (N, H, W), got {tuple(images.shape)}"
            )
        check_pixels(images, n_bins, "ImageDataset")
        self.images = images.to(_storage_dtype(n_bins)).contiguous()
        self.n_bins = n_bins
        if labels is not None:
            labels = _as_tensor(labels)
            if labels.shape != (len(self.images),):
                raise ValueError(
                    f"ImageDataset: labels must have shape ({len(self.images)},), got {tuple(labels.shape)}"
                )
            labels = labels.long()
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i) -> torch.Tensor:
        return self.images[i]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The event shape ``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def reduce_bits(self, n_bits: int) -> ImageDataset:
        """A new data set with ``2 ** n_bits`` levels (see :func:`reduce_bits`); labels are kept.

        :param int n_bits: bits per pixel to keep, ``1 .. 8``; ``n_bins`` must be a power of two.

        Example::

            >>> import torch
            >>> ImageDataset(torch.tensor([[[0, 255]]]), 256).reduce_bits(5).images.flatten().tolist()
            [0, 31]
        """
        return ImageDataset(reduce_bits(self.images, n_bits, self.n_bins), 2**n_bits, self.labels)

    def __repr__(self) -> str:
        labels = "" if self.labels is None else ", labelled"
        return f"ImageDataset(N={len(self)}, shape={self.shape}, n_bins={self.n_bins}{labels})"


# --------------------------------------------------------------------------------------------- data-side ops
def dequantize(
    x: torch.Tensor, n_bins: int, generator: torch.Generator | None = None, *, check: bool = True
) -> torch.Tensor:
    r"""Uniform dequantisation :math:`\tilde x = (x + u) / n_{bins}`, :math:`u \sim U[0, 1)`, a point of
    :math:`[0, 1)^D`.

    The noise comes from torch's RNG (or ``generator``, whose device it is drawn on). The result is float32 for
    integer ``x`` and keeps the dtype of floating ``x``. Rounding can push :math:`(x + u)/n_{bins}` onto the next
    bin's edge (e.g. ``255 + u`` rounds to 256 in float32 for ``u`` near 1); such entries are moved down (or up)
    by a few ulps, so that ``floor(dequantize(x) * n_bins) == x`` holds exactly in the output dtype.

    :param x: integer-valued pixels in ``[0, n_bins)``, any shape (checked, one device synchronisation, while
        torch's distribution validation is on, as by default and after ``pyro.enable_validation()``).
    :param int n_bins: number of intensity levels (an int >= 2).
    :param generator: optional torch generator.
    :param bool check: ``False`` skips the pixel check (and its device synchronisation) for pixels the caller has
        already checked, as the trainers do once when they load the data.

    Example::

        >>> import torch
        >>> x = torch.tensor([0, 3, 16])
        >>> y = dequantize(x, 17)
        >>> y.dtype, torch.equal(torch.floor(y * 17).long(), x)
        (torch.float32, True)
    """
    check_n_bins(n_bins, "dequantize")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if generator is None:
        u = torch.rand(x.shape, dtype=dtype, device=x.device)
    else:
        u = torch.rand(x.shape, generator=generator, dtype=dtype, device=generator.device).to(x.device)
    xf = x.to(dtype)
    validate = torch.distributions.Distribution._validate_args  # torch's flag (pyro.enable_validation sets it)
    if check and validate and xf.numel() and bool(((xf < 0) | (xf >= n_bins) | (xf != xf.floor())).any()):
        raise ValueError(f"dequantize: pixels must be whole numbers in [0, {n_bins}), got values in "
                         f"[{float(xf.min())}, {float(xf.max())}]")  # fmt: skip
    y = (xf + u) / n_bins
    for _ in range(8):  # almost never runs more than once; each pass moves the offending entries by one ulp
        k = torch.floor(y * n_bins)
        low, high = k < xf, k > xf
        if not bool((low | high).any()):
            break
        y = torch.where(high, torch.nextafter(y, torch.zeros_like(y)), y)
        y = torch.where(low, torch.nextafter(y, torch.ones_like(y)), y)
    return y


def reduce_bits(x: torch.Tensor, n_bits: int, n_bins: int = 256) -> torch.Tensor:
    r"""Keep the ``n_bits`` most significant bits: :math:`\lfloor x / 2^{\log_2 n_{bins} - n_{bits}} \rfloor`.

    The result has ``x``'s dtype and values in ``[0, 2 ** n_bits)``, i.e. ``2 ** n_bits`` levels: pass
    ``n_bins=2 ** n_bits`` to :func:`dequantize` and to ``bits_per_dim`` afterwards (Glow's 5-bit CelebA uses
    ``n_bits=5``).

    :param x: integer-valued pixels in ``[0, n_bins)``.
    :param int n_bits: bits to keep, ``1 .. 8``.
    :param int n_bins: the current number of levels, a power of two ``>= 2 ** n_bits``.

    Example::

        >>> import torch
        >>> reduce_bits(torch.tensor([0, 7, 8, 255]), n_bits=5).tolist()
        [0, 0, 1, 31]
    """
    if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)) or not 1 <= n_bits <= 8:
        raise ValueError(f"reduce_bits: n_bits must be an integer in 1..8, got {n_bits!r}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 2 or n_bins & (n_bins - 1):
        raise ValueError(f"reduce_bits: n_bins must be a power of two, got {n_bins!r}")
    if n_bins < 2**n_bits:
        raise ValueError(f"reduce_bits: n_bins = {n_bins} has fewer than n_bits = {n_bits} bits")
    shift = int(math.log2(n_bins)) - int(n_bits)
    return torch.div(x, 2**shift, rounding_mode="floor")


# --------------------------------------------------------------------------------------------- generic wrapping
def _to_chw(image) -> np.ndarray | torch.Tensor:
    """One image as ``(C, H, W)``: PIL images are ``(H, W[, C])``, tensors/arrays ``(H, W)`` or ``(C, H, W)``."""
    if isinstance(image, torch.Tensor):
        return image.unsqueeze(0) if image.dim() == 2 else image
    if not isinstance(image, np.ndarray):  # a PIL image (anything with the array interface)
        array = np.asarray(image)
        return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    return image[None] if image.ndim == 2 else image


def as_image_dataset(data, n_bins: int | None = None) -> ImageDataset:
    """Wrap images into an :class:`ImageDataset`, materialising them in memory.

    :param data: an :class:`ImageDataset` (returned as is), a tensor or array ``(N, C, H, W)`` / ``(N, H, W)``,
        or any map-style ``torch.utils.data.Dataset`` whose items are images or ``(image, label)`` pairs; an image
        is a tensor or array ``(C, H, W)`` / ``(H, W)`` or a PIL image (``(H, W, C)`` layout, e.g. a
        ``torchvision`` data set without ``transform``).
    :param n_bins: number of intensity levels; ``None`` means the data set's own for an :class:`ImageDataset`,
        else 256.
    :raises ValueError: see :class:`ImageDataset`; also when ``n_bins`` disagrees with an :class:`ImageDataset`'s.

    Example::

        >>> import torch
        >>> pairs = [(torch.randint(0, 256, (3, 4, 4)), 1) for _ in range(5)]
        >>> as_image_dataset(pairs)
        ImageDataset(N=5, shape=(3, 4, 4), n_bins=256, labelled)
    """
    if isinstance(data, ImageDataset):
        if n_bins is not None and n_bins != data.n_bins:
            raise ValueError(f"as_image_dataset: n_bins = {n_bins} but the data set has n_bins = {data.n_bins}")
        return data
    n_bins = 256 if n_bins is None else n_bins
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return ImageDataset(data, n_bins)
    images, labels = [], []
    for i in range(len(data)):
        item = data[i]
        if isinstance(item, (tuple, list)):
            images.append(_to_chw(item[0]))
            labels.append(item[1] if len(item) > 1 else None)
        else:
            images.append(_to_chw(item))
            labels.append(None)
    if not images:
        raise ValueError("as_image_dataset: the data set is empty")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"as_image_dataset: images of different shapes {sorted(shapes)[:4]}")
    stacked = torch.stack([_as_tensor(im) for im in images])
    have_labels = all(label is not None for label in labels)
    return ImageDataset(stacked, n_bins, [int(label) for label in labels] if have_labels else None)


# --------------------------------------------------------------------------------------------- digits
def _check_split(split: str, choices: Sequence[str] = SPLITS) -> str:
    if split not in choices:
        raise ValueError(f"split must be one of {', '.join(map(repr, choices))}, got {split!r}")
    return split


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, read once per process: images ``(1797, 8, 8)`` and labels (read-only arrays)."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images, target = np.array(digits.images), np.array(digits.target)
    images.flags.writeable = target.flags.writeable = False
    return images, target


def _digits_indices(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices of scikit-learn's digits: a stratified 80/20 split (1437 / 360)."""
    from sklearn.model_selection import train_test_split

    target = _digits_arrays()[1]
    idx = np.arange(len(target))
    train_idx, test_idx = train_test_split(idx, test_size=0.2, random_state=seed, stratify=target)
    return train_idx, test_idx


def load_digits(split: str = "train", seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled handwritten digits (no download): 1797 images ``1x8x8``, pixels ``0..16``
    (``n_bins = 17``), labels ``0..9``.

    The split is ``train_test_split(arange(1797), test_size=0.2, random_state=seed, stratify=labels)``:
    1437 train / 360 test images for the default ``seed = 0``, the split of ``benchmarks/image_flows.py``
    (keep it for comparable figures). ``"all"`` is the 1797 images in scikit-learn's order.

    :param str split: ``"train"``, ``"test"`` or ``"all"``.
    :param int seed: ``random_state`` of the split.

    Example::

        >>> train = load_digits("train")
        >>> len(train), train.shape, train.n_bins
        (1437, (1, 8, 8), 17)
    """
    _check_split(split)
    images, labels = _digits_arrays()
    if split != "all":
        train_idx, test_idx = _digits_indices(seed)
        rows = train_idx if split == "train" else test_idx
        images, labels = images[rows], labels[rows]
    return ImageDataset(images, n_bins=17, labels=labels)


# --------------------------------------------------------------------------------------------- file readers
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed.

    Header: two zero bytes, a type code (``0x08`` unsigned byte, ``0x09`` signed byte, ``0x0B`` int16, ``0x0C``
    int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then each dimension as a big-endian
    uint32; the big-endian data follow.

    :param path: file path; gzip is recognised by its magic bytes, whatever the name.
    :returns: an array in native byte order with the header's shape.
    :raises ValueError: on a corrupted or truncated gzip stream, a bad magic number or a size that does not match
        the header.

    Example::

        >>> import os, struct, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "images-idx3-ubyte")
        >>> with open(path, "wb") as f:  # two 2x3 images of unsigned bytes
        ...     _ = f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 2, 3) + bytes(range(12)))
        >>> read_idx(path).shape
        (2, 2, 3)
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: corrupted or truncated gzip file ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    payload = raw[4 + 4 * ndim :]
    if len(payload) != expected:
        raise ValueError(f"{path}: IDX header announces shape {dims} ({expected} bytes), found {len(payload)} bytes")
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find(dirs: Sequence[Path], name: str) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _torchvision(cls_name: str, root: Path, train: bool):
    """``torchvision.datasets.<cls_name>(root, train=train, download=False)``, or ``None`` if unavailable."""
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError:
        return None
    try:
        return getattr(datasets, cls_name)(str(root), train=train, download=False)
    except (RuntimeError, OSError, ValueError):
        return None


def _from_torchvision(ds, n_bins: int, channels_last: bool) -> ImageDataset:
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if data is None:
        return as_image_dataset(ds, n_bins)
    data = _as_tensor(data)
    if channels_last and data.dim() == 4:
        data = data.permute(0, 3, 1, 2)
    return ImageDataset(data, n_bins, None if targets is None else _as_tensor(targets))


def _concat(parts: list[ImageDataset]) -> ImageDataset:
    if len(parts) == 1:
        return parts[0]
    labels = None
    if all(p.labels is not None for p in parts):
        labels = torch.cat([p.labels for p in parts])
    return ImageDataset(torch.cat([p.images for p in parts]), parts[0].n_bins, labels)


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _load_splits(load_split, root, split: str) -> ImageDataset:
    """``load_split(root, s)`` for ``split``, or for train then test when ``split == "all"``."""
    _check_split(split)
    root = Path(root).expanduser()
    return _concat([load_split(root, s) for s in (("train", "test") if split == "all" else (split,))])


def _load_mnist_split(root: Path, split: str) -> ImageDataset:
    dirs = [root, root / "MNIST" / "raw"]
    image_name, label_name = _MNIST_FILES[split]
    image_path = _find(dirs, image_name)
    if image_path is None:
        ds = _torchvision("MNIST", root, split == "train")
        if ds is not None:
            return _from_torchvision(ds, 256, channels_last=False)
        raise FileNotFoundError(
            f"MNIST {split} images not found in {root} nor in {root / 'MNIST' / 'raw'}: expected {image_name} "
            f"(or {image_name}.gz) and {label_name}[.gz]; pyroflows never downloads, fetch them yourself "
            "(or with torchvision.datasets.MNIST(root, download=True))"
        )
    images = read_idx(image_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    label_path = _find(dirs, label_name)
    labels = None
    if label_path is not None:
        labels = read_idx(label_path)
        if labels.shape != (len(images),):
            raise ValueError(f"{label_path}: {labels.shape[0] if labels.ndim else 0} labels for {len(images)} images")
    return ImageDataset(images, 256, labels)


def load_mnist(root, split: str = "train") -> ImageDataset:
    """MNIST from a local directory: ``1x28x28`` images, ``n_bins = 256``, labels ``0..9``. Never downloads.

    Reads the IDX files ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (``"train"``) or
    ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte`` (``"test"``), plain or ``.gz``, from ``root`` or
    ``root/MNIST/raw`` (torchvision's layout); labels are left out (``None``) if their file is missing. If the
    images are not there and ``torchvision`` is installed, ``torchvision.datasets.MNIST(root, train=...,
    download=False)`` gets a try (it also knows older processed layouts).

    :param root: the directory.
    :param str split: ``"train"`` (60000), ``"test"`` (10000) or ``"all"`` (both, train first).
    :raises FileNotFoundError: naming the directory and the expected files.

    Example::

        >>> train = load_mnist("~/data/mnist", "train")  # doctest: +SKIP
    """
    return _load_splits(_load_mnist_split, root, split)


_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: a CIFAR-10 batch needs nothing else, and a pickle that
    asks for anything else (code to run) is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only arrays and plain containers)")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(
            f"{path}: not a CIFAR-10 python batch (corrupted or truncated? {type(e).__name__}: {e})"
        ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with keys b'data' and b'labels'")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None:
        raise ValueError(f"{path}: no b'data' entry")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
    return data.reshape(-1, 3, 32, 32), None if labels is None else np.asarray(labels)


def _load_cifar_split(root: Path, split: str) -> ImageDataset:
    names = _CIFAR_FILES[split]
    for d in (root / "cifar-10-batches-py", root):
        if all((d / name).is_file() for name in names):
            batches = [_read_cifar_batch(d / name) for name in names]
            images = np.concatenate([b[0] for b in batches])
            labels = None
            if all(b[1] is not None for b in batches):
                labels = np.concatenate([b[1] for b in batches])
            return ImageDataset(images, 256, labels)
    ds = _torchvision("CIFAR10", root, split == "train")
    if ds is not None:
        return _from_torchvision(ds, 256, channels_last=True)
    raise FileNotFoundError(
        f"CIFAR-10 {split} batches not found in {root / 'cifar-10-batches-py'} nor in {root}: expected "
        f"{', '.join(names)} (the python version, cifar-10-python.tar.gz, extracted); pyroflows never downloads, "
        "fetch it yourself (or with torchvision.datasets.CIFAR10(root, download=True))"
    )


def load_cifar10(root, split: str = "train") -> ImageDataset:
    """CIFAR-10 from a local directory: ``3x32x32`` images, ``n_bins = 256``, labels ``0..9``. Never downloads.

    Reads the pickled batches of the python version (``data_batch_1`` .. ``data_batch_5`` for ``"train"``,
    ``test_batch`` for ``"test"``: dicts with ``b"data"``, ``(N, 3072)`` uint8 in channel-major order, and
    ``b"labels"``) from ``root/cifar-10-batches-py`` or from ``root`` itself. If they are not there and
    ``torchvision`` is installed, ``torchvision.datasets.CIFAR10(root, train=..., download=False)`` gets a try.
    The batches are pickles: only read files you trust.

    :param root: the directory.
    :param str split: ``"train"`` (50000), ``"test"`` (10000) or ``"all"`` (both, train first).
    :raises FileNotFoundError: naming the directory and the expected files.

    Example::

        >>> test = load_cifar10("~/data/cifar10", "test")  # doctest: +SKIP
    """
    return _load_splits(_load_cifar_split, root, split)


#: Names accepted by :func:`get_dataset`.
DATASETS = ("digits", "mnist", "cifar10")


def get_dataset(name: str, split: str = "train", root=None) -> ImageDataset:
    """An image data set by name: ``"digits"`` (embedded, ``root`` ignored), ``"mnist"`` or ``"cifar10"``
    (read from the directory ``root``).

    :param str name: one of ``DATASETS``, ``"digits"``, ``"mnist"``, ``"cifar10"``, case-insensitive.
    :param str split: ``"train"``, ``"test"`` or ``"all"``.
    :param root: directory holding the files (MNIST, CIFAR-10).
    :raises ValueError: for an unknown name, or MNIST/CIFAR-10 without ``root``.

    Example::

        >>> get_dataset("digits", "test")
        ImageDataset(N=360, shape=(1, 8, 8), n_bins=17, labelled)
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if key == "digits":
        return load_digits(split)
    if root is None:
        raise ValueError(f"data set {name!r} is read from a local directory: pass root=<directory with the files>")
    return load_mnist(root, split) if key == "mnist" else load_cifar10(root, split)
