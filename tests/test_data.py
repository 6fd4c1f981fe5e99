"""pyroflows.data: image readers (digits, MNIST IDX, CIFAR-10 pickles), data-side ops and 2-D toy densities."""

import gzip
import math
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import torch

from pyroflows.data import (
    TOYS,
    Checkerboard,
    EightGaussians,
    ImageDataset,
    as_image_dataset,
    dequantize,
    get_dataset,
    get_toy,
    load_cifar10,
    load_digits,
    load_mnist,
    read_idx,
    reduce_bits,
)
from pyroflows.data.images import _digits_indices


# --------------------------------------------------------------------------------------------- digits
def test_digits_shapes_split_and_determinism():
    train, test, full = load_digits("train"), load_digits("test"), load_digits("all")
    assert (len(train), len(test), len(full)) == (1437, 360, 1797)
    for d in (train, test, full):
        assert d.shape == (1, 8, 8) and d.n_bins == 17 and d.images.dtype == torch.uint8
        assert d[0].shape == (1, 8, 8) and int(d.images.max()) == 16
    train_idx, test_idx = _digits_indices()
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(1797))
    assert torch.equal(train.images, full.images[torch.as_tensor(train_idx)])
    assert torch.equal(test.labels, full.labels[torch.as_tensor(test_idx)])
    again = load_digits("train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    assert torch.equal(get_dataset("DIGITS", "test").images, test.images)


# --------------------------------------------------------------------------------------------- MNIST (IDX)
def _idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx(path, array, compress):
    data = _idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_idx_round_trip(tmp_path, compress, layout):
    rng = np.random.default_rng(0)
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, n in (("train", 5), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
        written[prefix] = images, labels
    for split, prefix in (("train", "train"), ("test", "t10k")):
        d = load_mnist(tmp_path, split)
        assert d.shape == (1, 28, 28) and d.n_bins == 256
        assert torch.equal(d.images[:, 0], torch.from_numpy(written[prefix][0]))
        assert torch.equal(d.labels, torch.from_numpy(written[prefix][1]).long())
    both = get_dataset("mnist", "all", root=tmp_path)
    assert len(both) == 8 and torch.equal(both.images[5:, 0], torch.from_numpy(written["t10k"][0]))


def test_read_idx_checks_header(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="announces shape"):
        read_idx(short)
    wide = tmp_path / "wide"
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    wide.write_bytes(struct.pack(">BBBB", 0, 0, 0x0C, 2) + struct.pack(">2I", 2, 3) + values.tobytes())
    assert np.array_equal(read_idx(wide), np.arange(6).reshape(2, 3))


# --------------------------------------------------------------------------------------------- CIFAR-10 (pickles)
@pytest.mark.parametrize("nested", [True, False])
def test_cifar_batches_round_trip(tmp_path, nested):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 2).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        batches[name] = data, labels
    train, test = load_cifar10(tmp_path, "train"), get_dataset("CIFAR10", "test", root=tmp_path)
    assert (len(train), len(test)) == (10, 2) and train.shape == (3, 32, 32) and train.n_bins == 256
    first = batches["data_batch_1"][0][0]  # channel-major: 1024 red, 1024 green, 1024 blue, rows of 32
    assert torch.equal(train.images[0], torch.from_numpy(first.reshape(3, 32, 32)))
    assert int(train.images[0, 1, 0, 5]) == first[1024 + 5] and int(train.images[0, 2, 31, 31]) == first[3071]
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert test.labels.tolist() == batches["test_batch"][1]


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "loader, names",
    [(load_mnist, ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]), (load_cifar10, ["data_batch_1"])],
)
def test_missing_files_raise_file_not_found(tmp_path, monkeypatch, loader, names):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # no torchvision fallback, installed or not
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        loader(missing, "train")
    assert str(missing) in str(info.value)
    for name in names:
        assert name in str(info.value)


def test_torchvision_fallback(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            self.data = torch.full((4, 28, 28), 7, dtype=torch.uint8)
            self.targets = torch.arange(4)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            self.data = np.zeros((3, 32, 32, 3), np.uint8)
            self.data[..., 2] = 9  # channels last, as torchvision keeps CIFAR-10
            self.targets = [0, 1, 2]

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST, datasets.CIFAR10 = FakeMNIST, FakeCIFAR10
    package = types.ModuleType("torchvision")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    mnist, cifar = load_mnist(tmp_path, "test"), load_cifar10(tmp_path, "train")
    assert mnist.shape == (1, 28, 28) and int(mnist.images.max()) == 7 and mnist.labels.tolist() == [0, 1, 2, 3]
    assert cifar.shape == (3, 32, 32) and int(cifar.images[:, 2].min()) == 9 and int(cifar.images[:, :2].max()) == 0
    assert calls == [(str(tmp_path), False, False), (str(tmp_path), True, False)]


def test_get_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="digits, mnist, cifar10"):
        get_dataset("imagenet")
    with pytest.raises(ValueError, match="directory"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")


@pytest.mark.parametrize(
    "images, n_bins, match",
    [
        (torch.full((2, 1, 4, 4), 17), 17, r"\[0, 17\)"),
        (torch.full((2, 1, 4, 4), -1), 256, "range"),
        (torch.full((2, 1, 4, 4), 0.5), 256, "integer-valued"),
        (torch.zeros(2, 1, 1, 4, 4), 256, "shape"),
        (torch.zeros(16), 256, "shape"),
        (torch.zeros(2, 4, 4), 1, "n_bins"),
    ],
)
def test_image_dataset_rejects_bad_input(images, n_bins, match):
    with pytest.raises(ValueError, match=match):
        ImageDataset(images, n_bins)


def test_image_dataset_storage_and_wrapping():
    d = ImageDataset(np.arange(2 * 3 * 3).reshape(2, 3, 3).astype(np.float64), n_bins=18, labels=[3, 4])
    assert d.shape == (1, 3, 3) and d.images.dtype == torch.uint8 and d.labels.tolist() == [3, 4]
    assert ImageDataset(torch.full((1, 1, 2, 2), 1000), n_bins=1024).images.dtype == torch.int16
    assert as_image_dataset(d) is d
    with pytest.raises(ValueError, match="n_bins"):
        as_image_dataset(d, n_bins=256)

    class PILLike:  # anything with the array interface, laid out (H, W, C) as PIL images are
        def __init__(self, array):
            self.array = array

        def __array__(self, dtype=None, copy=None):
            return self.array

    hwc = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    wrapped = as_image_dataset([(PILLike(hwc), 2), (PILLike(hwc), 5)])
    assert wrapped.shape == (3, 4, 5) and wrapped.labels.tolist() == [2, 5]
    assert torch.equal(wrapped[1], torch.from_numpy(hwc).permute(2, 0, 1))
    unlabelled = as_image_dataset([np.ones((4, 4), np.uint8)] * 3, n_bins=2)
    assert unlabelled.shape == (1, 4, 4) and unlabelled.labels is None and unlabelled.n_bins == 2
    loader = torch.utils.data.DataLoader(load_digits("test"), batch_size=32)
    assert next(iter(loader)).shape == (32, 1, 8, 8)


# --------------------------------------------------------------------------------------------- data-side ops
@pytest.mark.parametrize("n_bins", [2, 17, 256, 1024])
def test_dequantize_range_and_bins(n_bins):
    x = torch.arange(n_bins).repeat(50)
    y = dequantize(x, n_bins, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and float(y.min()) >= 0.0 and float(y.max()) < 1.0
    assert torch.equal(torch.floor(y * n_bins).long(), x)
    # the rounding corner: (255 + u) / 256 with u just below 1 rounds to 1.0 in float32 without the fix-up
    u_max = torch.tensor(1.0).nextafter(torch.tensor(0.0))
    edge = (torch.tensor(255.0) + u_max) / 256
    assert float(edge) == 1.0  # the problem is real
    gen = torch.Generator().manual_seed(0)
    y = dequantize(torch.full((200_000,), 255, dtype=torch.uint8), 256, gen)
    assert float(y.max()) < 1.0 and bool((torch.floor(y * 256) == 255).all())


def test_dequantize_keeps_float64_and_is_uniform_within_bins():
    x = torch.zeros(100_000, dtype=torch.float64)
    y = dequantize(x, 4, generator=torch.Generator().manual_seed(1))
    assert y.dtype == torch.float64
    mean, se = float(y.mean()), (1 / 8) / math.sqrt(12 * len(y))  # U[0, 1/4): mean 1/8, sd 1/(4 sqrt 12)
    assert abs(mean - 1 / 8) < 4 * se


def test_reduce_bits():
    x = torch.arange(256, dtype=torch.uint8)
    r5 = reduce_bits(x, 5)
    assert r5.dtype == torch.uint8 and r5.min() == 0 and r5.max() == 31
    assert torch.equal(r5, x // 8) and torch.equal(torch.bincount(r5.long()), torch.full((32,), 8))
    assert torch.equal(reduce_bits(x, 8), x)
    assert reduce_bits(torch.tensor([0.0, 1023.0]), 3, n_bins=1024).tolist() == [0.0, 7.0]
    for kwargs, match in [(dict(n_bits=0), "n_bits"), (dict(n_bits=9), "n_bits"), (dict(n_bits=4, n_bins=17), "power")]:
        with pytest.raises(ValueError, match=match):
            reduce_bits(x, **kwargs)
    with pytest.raises(ValueError, match="fewer"):
        reduce_bits(x, 5, n_bins=16)
    d = ImageDataset(x.reshape(4, 1, 8, 8), 256, labels=torch.arange(4)).reduce_bits(3)
    assert d.n_bins == 8 and int(d.images.max()) == 7 and d.labels.tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------- toy densities
def _grid(toy, h):
    """Midpoints of an ``h``-grid covering ``toy.bounds`` (aligned to multiples of ``h``), and the cell area."""
    (x0, x1), (y0, y1) = toy.bounds
    xs = torch.arange(math.floor(x0 / h), math.ceil(x1 / h), dtype=torch.float64) * h + h / 2
    ys = torch.arange(math.floor(y0 / h), math.ceil(y1 / h), dtype=torch.float64) * h + h / 2
    return torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1), h * h


# grid steps: at most sigma / 2 for the mixtures (the midpoint rule's error on a Gaussian of standard deviation
# sigma is about 2 exp(-2 pi^2 sigma^2 / h^2) < 1e-30); the checkerboard's grid is aligned with its squares
QUAD_STEP = {"checkerboard": 0.05, "eight_gaussians": 0.05, "two_moons": 0.05, "rings": 0.04, "pinwheel": 0.05}


def test_toy_registry():
    assert set(TOYS) == {"checkerboard", "eight_gaussians", "two_moons", "rings", "pinwheel"}
    assert isinstance(get_toy("Eight-Gaussians"), EightGaussians)
    with pytest.raises(ValueError, match="checkerboard, eight_gaussians"):
        get_toy("spiral")
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        Checkerboard().log_prob(torch.zeros(3, 3))


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_normalised_shapes_and_dtypes(name):
    toy = get_toy(name)
    grid, area = _grid(toy, QUAD_STEP[name])
    lp = toy.log_prob(grid)
    assert lp.shape == grid.shape[:-1] and lp.dtype == torch.float64
    total = float(lp.exp().sum()) * area
    assert abs(total - 1.0) < 1e-6, total  # quadrature error and the truncated tails are far below 1e-6
    x = toy.sample(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, 2) and x.dtype == torch.float32
    assert toy.log_prob(x).dtype == torch.float32 and toy.log_prob(x.reshape(7, 1, 2)).shape == (7, 1)
    assert bool(torch.isfinite(toy.log_prob(toy.sample(20_000, torch.Generator().manual_seed(1)))).all())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(toy.sample(10, g1), toy.sample(10, g2))


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_samples_follow_log_prob(name):
    """Binned chi-square test of 100k samples against bin probabilities integrated from ``log_prob`` (0.25-wide
    bins, 10x10 midpoint sub-grid each; bins with fewer than 5 expected counts pooled): the statistic must lie
    within 4 standard deviations of its mean, ``df + 4 sqrt(2 df)``."""
    toy, n, width, sub = get_toy(name), 100_000, 0.25, 10
    grid, area = _grid(toy, width / sub)
    nx, ny = grid.shape[0] // sub, grid.shape[1] // sub
    density = toy.log_prob(grid[: nx * sub, : ny * sub]).exp() * area
    probs = density.reshape(nx, sub, ny, sub).sum((1, 3)).flatten()
    x0, y0 = float(grid[0, 0, 0]) - width / sub / 2, float(grid[0, 0, 1]) - width / sub / 2
    x = toy.sample(n, torch.Generator().manual_seed(2)).double()
    ix, iy = torch.floor((x[:, 0] - x0) / width).long(), torch.floor((x[:, 1] - y0) / width).long()
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    counts = torch.bincount(ix[inside] * ny + iy[inside], minlength=nx * ny).double()
    big = probs * n >= 5
    observed = torch.cat([counts[big], (n - counts[big].sum()).reshape(1)])
    expected = torch.cat([probs[big] * n, ((1 - probs[big].sum()) * n).reshape(1)])
    keep = expected > 0
    if not bool(keep[-1]):  # nothing is expected outside the big bins (the checkerboard): nothing may land there
        assert float(observed[-1]) == 0
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    assert df > 50
    assert chi2 < df + 4 * math.sqrt(2 * df), (chi2, df)


@pytest.mark.parametrize("name", sorted(set(TOYS) - {"checkerboard"}))
def test_toy_entropy_monte_carlo_matches_quadrature(name):
    """``entropy`` (Monte Carlo over 100k samples) agrees with ``-sum p log p`` on a grid within 4 standard
    errors: this ties ``sample`` to ``log_prob`` once more, through the mean of ``log p`` under the samples."""
    toy = get_toy(name)
    grid, area = _grid(toy, QUAD_STEP[name])
    lp = toy.log_prob(grid)
    quad = float(-(lp.exp() * lp).sum()) * area
    estimate, se = toy.entropy(100_000, torch.Generator().manual_seed(3))
    assert 0 < se < 0.01
    assert abs(estimate - quad) < 4 * se, (estimate, quad, se)


def test_checkerboard_exact_entropy_and_closed_squares():
    toy = Checkerboard()
    assert toy.entropy() == (math.log(8.0), 0.0)
    # edges and corners of filled squares are in the support (float32 samples can round onto them)
    on_edges = torch.tensor([[2.0, 1.5], [-1.5, -1.0], [0.0, 0.0], [1.0, 0.5], [-2.0, -2.0], [2.0, 2.0]])
    assert torch.equal(toy.log_prob(on_edges), torch.full((6,), -math.log(8.0)))
    outside = torch.tensor([[0.5, -0.5], [2.01, 1.5], [0.5, 2.0], [-1.5, -0.5]])
    assert bool(torch.isneginf(toy.log_prob(outside)).all())
