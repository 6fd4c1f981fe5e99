"""pyroflows.plots: image grids (shape, padding, placement), PNG grids enlarged to ``min_size``, 2-D densities."""

import math

import matplotlib.figure
import matplotlib.image as mpimg
import pytest
import torch

from pyroflows.plots import _pyplot as pyplot
from pyroflows.plots import image_grid, plot_density_2d, save_image_grid

plt = pyplot()  # Agg without a display, as the library chooses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ image_grid
@pytest.mark.parametrize(
    "n, c, h, w, nrow, padding, expected",
    [
        (6, 1, 8, 8, 3, 1, (19, 28, 1)),  # 2 rows of 3
        (5, 1, 8, 8, None, 1, (19, 28, 1)),  # default nrow = ceil(sqrt(5)) = 3, last row partly empty
        (4, 3, 5, 7, None, 2, (16, 20, 3)),  # 2x2 of 5x7 RGB images
        (1, 1, 8, 8, None, 0, (8, 8, 1)),
        (3, 1, 4, 4, 5, 1, (6, 26, 1)),  # nrow larger than n: one row with empty slots
    ],
)
def test_image_grid_shape(n, c, h, w, nrow, padding, expected):
    grid = image_grid(torch.zeros(n, c, h, w), nrow=nrow, padding=padding)
    assert tuple(grid.shape) == expected
    rows = math.ceil(n / (nrow or math.ceil(math.sqrt(n))))
    assert grid.shape[0] == rows * (h + padding) + padding


def test_image_grid_padding_and_empty_slots_are_white():
    h = w = 4
    grid = image_grid(torch.zeros(5, 1, h, w), nrow=3, padding=2)  # 2 rows x 3 columns, slot (1, 2) empty
    assert tuple(grid.shape) == (2 * 6 + 2, 3 * 6 + 2, 1)
    white = torch.ones_like(grid, dtype=torch.bool)
    for i in range(5):
        r, k = divmod(i, 3)
        top, left = 2 + r * 6, 2 + k * 6
        white[top : top + h, left : left + w] = False
    assert (grid[white] == 1).all()
    assert (grid[~white] == 0).all()
    assert int((~white).sum()) == 5 * h * w


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_image_grid_places_a_known_pixel(padding):
    n, h, w, nrow = 7, 8, 6, 3
    images = torch.zeros(n, 3, h, w)
    images[4, :, 2, 5] = torch.tensor([0.25, 0.5, 0.75])  # image 4: row 1, column 1 of the grid
    grid = image_grid(images, nrow=nrow, padding=padding)
    y, x = padding + 1 * (h + padding) + 2, padding + 1 * (w + padding) + 5
    torch.testing.assert_close(grid[y, x], torch.tensor([0.25, 0.5, 0.75]))
    assert int((grid == 0.5).sum()) == 1  # it appears nowhere else


def test_image_grid_keeps_each_image_intact():
    images = torch.rand(5, 2, 3, 4)
    grid = image_grid(images, nrow=2, padding=1)
    for i in range(5):
        r, k = divmod(i, 2)
        top, left = 1 + r * 4, 1 + k * 5
        torch.testing.assert_close(grid[top : top + 3, left : left + 4], images[i].permute(1, 2, 0))


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (2, 1, 1, 8, 8)])
def test_image_grid_rejects_non_4d(shape):
    with pytest.raises(ValueError, match="image_grid"):
        image_grid(torch.zeros(shape))


# ------------------------------------------------------------------------------------------------ save_image_grid
@pytest.mark.parametrize(
    "n, nrow, min_size, expected",
    [
        (16, None, 256, (37 * 7, 37 * 7)),  # 4x4 grid of 8x8: 37 px, factor ceil(256 / 37) = 7
        (16, None, 74, (74, 74)),  # exactly twice
        (16, None, 75, (111, 111)),  # one pixel more: three times
        (16, None, 10, (37, 37)),  # min_size below the grid: never shrunk
        (6, 3, 100, (19 * 4, 28 * 4)),  # the longer side (28) sets the factor ceil(100 / 28) = 4
    ],
)
def test_save_image_grid_enlarges_by_an_integer_factor(tmp_path, n, nrow, min_size, expected):
    path = tmp_path / "grid.png"
    save_image_grid(torch.zeros(n, 1, 8, 8), path, nrow=nrow, min_size=min_size)
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.shape[:2] == expected


def test_save_image_grid_gray_is_nearest_neighbour_and_scaled_to_0_1(tmp_path):
    images = torch.zeros(4, 1, 8, 8)
    images[0, 0, 0, 0] = 1.0  # one white pixel in the first (black) image
    images[3] = 2.0  # out of range: clamped to white
    path = tmp_path / "nested" / "dir" / "gray.png"  # missing directories are created
    save_image_grid(images, path, min_size=95)  # 2x2 grid: 19 px, factor 5 (exactly)
    image = mpimg.imread(path)
    assert image.shape[:2] == (95, 95)
    gray = image[..., 0]
    assert (image[..., 1] == gray).all() and (image[..., 2] == gray).all()
    f = 5
    assert (gray[:f] == 1).all() and (gray[:, :f] == 1).all()  # top and left padding, enlarged
    assert (gray[f : 2 * f, f : 2 * f] == 1).all()  # the white pixel became a 5x5 block
    first = gray[f : f + 8 * f, f : f + 8 * f].copy()
    first[:f, :f] = 0
    assert (first == 0).all()  # the rest of image 0 is black
    last = gray[f + 9 * f : f + 17 * f, f + 9 * f : f + 17 * f]
    assert (last == 1).all()


def test_save_image_grid_rgb(tmp_path):
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0] = 1.0  # red
    images[1, 2] = 1.0  # blue
    path = tmp_path / "rgb.png"
    save_image_grid(images, path, nrow=2, min_size=19)  # 10 x 19 grid, factor 1
    image = mpimg.imread(path)
    assert image.shape[:2] == (10, 19) and image.shape[2] in (3, 4)
    assert tuple(image[1, 1, :3]) == (1.0, 0.0, 0.0)
    assert tuple(image[1, 10, :3]) == (0.0, 0.0, 1.0)
    assert tuple(image[0, 0, :3]) == (1.0, 1.0, 1.0)


def test_save_image_grid_accepts_gradients_and_doubles(tmp_path):
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    save_image_grid(images * 1, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (2, 2, 8, 8), (2, 5, 8, 8)])
def test_save_image_grid_rejects_bad_shapes(tmp_path, shape):
    with pytest.raises(ValueError):
        save_image_grid(torch.zeros(shape), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------------------------------ plot_density_2d
def _gaussian_at(mx, my):
    def log_prob(z):
        return -0.5 * ((z[:, 0] - mx) ** 2 + (z[:, 1] - my) ** 2) / 0.3**2

    return log_prob


def test_plot_density_2d_writes_png_and_returns_figure(tmp_path):
    path = tmp_path / "out" / "density.png"
    fig = plot_density_2d(_gaussian_at(2.0, -1.0), path, bounds=(-4.0, 4.0), grid=81, title="moons")
    try:
        assert isinstance(fig, matplotlib.figure.Figure)
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert mpimg.imread(path).ndim == 3
        assert len(fig.axes) == 1 and fig.axes[0].get_title() == "moons"
        density = fig.axes[0].images[0].get_array()
        assert density.shape == (81, 81)
        # rows are y (origin lower), columns x, on a 0.1 grid from -4: the mode (2, -1) is at row 30, column 60
        row, col = divmod(int(density.argmax()), 81)
        assert (row, col) == (30, 60)
        assert tuple(fig.axes[0].images[0].get_extent()) == (-4.0, 4.0, -4.0, 4.0)
    finally:
        plt.close(fig)


def test_plot_density_2d_with_samples_and_without_path(tmp_path):
    calls = []

    def log_prob(z):
        calls.append(z.shape[0])
        return _gaussian_at(0.0, 0.0)(z)

    samples = torch.randn(500, 2)
    fig = plot_density_2d(log_prob, None, grid=100, samples=samples)
    try:
        assert len(fig.axes) == 2 and fig.axes[1].get_title() == "samples"
        assert sum(calls) == 100 * 100 and max(calls) <= 4096  # evaluated in chunks
        assert plt.fignum_exists(fig.number)  # not saved, so left open for the caller
    finally:
        plt.close(fig)
    assert not any(tmp_path.iterdir())


def test_save_image_grid_default_makes_mnist_grids_readable(tmp_path):
    """64 samples of 28x28: a 233-pixel grid is written at 3x (699 px), not at its tiny native size."""
    save_image_grid(torch.rand(64, 1, 28, 28), tmp_path / "mnist.png")
    assert mpimg.imread(tmp_path / "mnist.png").shape[:2] == (699, 699)


@pytest.mark.parametrize("name", ["grid.xyz", "grid.jpg", "grid"])
def test_save_image_grid_writes_only_png(tmp_path, name):
    with pytest.raises(ValueError, match=r"save_image_grid: only PNG.*\.png"):
        save_image_grid(torch.rand(4, 1, 8, 8), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_save_image_grid_refuses_a_directory(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        save_image_grid(torch.rand(4, 1, 8, 8), tmp_path / "d.png")


def test_save_image_grid_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that fails half-way (disk full) raises OutputError naming the file and leaves the old grid."""
    import errno

    import matplotlib.pyplot as plt

    from pyroflows.run import OutputError

    path = tmp_path / "grid.png"
    save_image_grid(torch.zeros(4, 1, 8, 8), path)
    before = path.read_bytes()

    def full(f, *args, **kwargs):
        f.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plt, "imsave", full)
    with pytest.raises(OutputError, match="could not write image grid .*No space left on device.*unchanged") as info:
        save_image_grid(torch.ones(4, 1, 8, 8), path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_plot_density_2d_refuses_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match="cannot write a 'xyz' file"):
        plot_density_2d(lambda x: -x.pow(2).sum(-1), tmp_path / "d.xyz", grid=10)
    assert list(tmp_path.iterdir()) == []
