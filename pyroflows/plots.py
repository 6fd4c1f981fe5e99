"""Figures a training run writes: image sample grids and 2-D densities (matplotlib, ``plots`` extra)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'pyroflows[plots]'") from e
    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo") and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> torch.Tensor:
    r"""Tile ``images`` ``(N, C, H, W)`` (values in ``[0, 1]``) into one ``(H', W', C)`` array, ``nrow`` per row.

    :param torch.Tensor images: ``(N, C, H, W)``.
    :param int nrow: images per row (default: about :math:`\sqrt N`).
    :param int padding: pixels of white (1.0) between and around the images.
    :returns: a tensor ``(rows * (H + padding) + padding, nrow * (W + padding) + padding, C)``.

    Example::

        >>> import torch
        >>> image_grid(torch.zeros(6, 1, 8, 8), nrow=3).shape
        torch.Size([19, 28, 1])
    """
    if images.dim() != 4:
        raise ValueError(f"image_grid: expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    if nrow is not None and nrow < 1:
        raise ValueError(f"image_grid: nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"image_grid: padding must be >= 0, got {padding}")
    n, c, h, w = images.shape
    nrow = nrow if nrow is not None else max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = images.new_ones(c, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid.permute(1, 2, 0)


def check_png_path(path: str | os.PathLike, where: str) -> None:
    """``ValueError`` naming ``where`` unless ``path`` can name a PNG file: not a directory, ending in ``.png``
    (what :func:`save_image_grid` writes; the command line checks it before loading a model).

    Example::

        >>> check_png_path("grid.jpg", "--out")
        Traceback (most recent call last):
          ...
        ValueError: --out: only PNG is written; give a file name ending in .png, got 'grid.jpg'
    """
    if os.path.isdir(path):
        raise ValueError(f"{where}: {os.fspath(path)!r} is a directory; give a file name ending in .png")
    if not os.fspath(path).lower().endswith(".png"):
        raise ValueError(f"{where}: only PNG is written; give a file name ending in .png, got {os.fspath(path)!r}")


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, min_size: int = 512
) -> None:
    r"""Save ``images`` ``(N, C, H, W)`` in ``[0, 1]`` (1 or 3 channels) as one PNG grid.

    A 5-D tensor ``(K, R, C, H, W)``, as :meth:`pyroflows.FlowDensity.sample` returns for ``R`` contexts (or
    :meth:`~pyroflows.FlowDensity.manipulate` for ``R`` images), is laid out as ``R`` rows of ``K`` images.

    Small grids (8x8 digits, 28x28 MNIST) are enlarged by the smallest integer factor, nearest-neighbour, that
    makes the longer side at least ``min_size`` pixels, so the file is readable in an image viewer (64 MNIST
    samples: a 233-pixel grid, written at 3x, 699 pixels). The file is written atomically
    (:func:`pyroflows.run.atomic_write`): a failed write (disk full, read-only directory) leaves no partial file
    and raises :class:`~pyroflows.run.OutputError`.

    :param torch.Tensor images: ``(N, C, H, W)`` or ``(K, R, C, H, W)`` with ``C`` 1 (grey) or 3 (RGB); values are
        clipped to ``[0, 1]``.
    :param path: the PNG file (its name must end in ``.png``); its directory is created if needed.
    :param int nrow: images per row (default: about :math:`\sqrt N`; ``K`` for a 5-D tensor).
    :param int min_size: the enlarged grid's longer side, at least, in pixels (a grid is never shrunk).
    :raises ValueError: for images of another shape, or a path that is a directory or does not end in ``.png``.
    :raises OutputError: the file could not be written.

    Example::

        >>> import os, tempfile, torch
        >>> import matplotlib.image as mpimg
        >>> path = os.path.join(tempfile.mkdtemp(), "grid.png")
        >>> save_image_grid(torch.rand(64, 1, 28, 28), path)
        >>> mpimg.imread(path).shape[:2]
        (699, 699)
    """
    from .run import atomic_write

    if images.dim() == 5:  # (K, R, C, H, W): one row of K images per R
        nrow = images.shape[0] if nrow is None else nrow
        images = images.transpose(0, 1).reshape((-1,) + images.shape[2:])
    if images.dim() != 4 or images.shape[0] < 1 or images.shape[1] not in (1, 3):
        raise ValueError(
            "save_image_grid: expected (N >= 1, C in {1, 3}, H, W) or (K, R, C, H, W) images, got shape "
            f"{tuple(images.shape)}"
        )
    check_png_path(path, "save_image_grid")
    if int(min_size) < 1:
        raise ValueError(f"save_image_grid: min_size must be >= 1, got {min_size}")
    plt = _pyplot()
    grid = image_grid(images.detach().float().clamp(0, 1).cpu(), nrow)
    factor = max(1, math.ceil(int(min_size) / max(grid.shape[0], grid.shape[1])))
    grid = grid.repeat_interleave(factor, 0).repeat_interleave(factor, 1).numpy()
    if grid.shape[-1] == 1:
        write = lambda f: plt.imsave(f, grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, format="png")  # noqa: E731
    else:
        write = lambda f: plt.imsave(f, grid, format="png")  # noqa: E731
    atomic_write(path, write, what="image grid")


def _save_figure(fig, path: str | os.PathLike, caller: str, what: str) -> None:
    """Write ``fig`` atomically in the format its suffix names (PNG by default), then close it; ``ValueError`` naming
    ``caller`` for a format matplotlib cannot write (the figure is closed either way)."""
    from .run import atomic_write

    kind = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    try:
        if kind not in fig.canvas.get_supported_filetypes():
            raise ValueError(f"{caller}: cannot write a {kind!r} file; use e.g. .png, .pdf or .svg")
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format=kind), what=what)
    finally:
        _pyplot().close(fig)


def plot_density_2d(
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    path: str | os.PathLike | None = None,
    bounds: tuple[float, float] = (-4.0, 4.0),
    grid: int = 200,
    samples: torch.Tensor | None = None,
    title: str | None = None,
):
    """Plot ``exp(log_prob)`` on a square grid (and optionally samples); save to ``path`` if given.

    :param log_prob: a function from points ``(n, 2)`` to log-densities ``(n,)``, e.g. a 2-D
        :meth:`pyroflows.FlowDensity.log_prob` or :meth:`pyroflows.data.ToyDensity.log_prob`.
    :param path: where to save the figure (the figure is then closed); ``None`` keeps it open.
    :param bounds: ``(low, high)`` of both axes.
    :param int grid: evaluation points per axis.
    :param torch.Tensor samples: optional ``(n, 2)`` points, shown as a 2-D histogram beside the density.
    :param str title: the density panel's title.
    :returns: the matplotlib figure, so it can be restyled.

    Example::

        >>> import matplotlib.pyplot as plt
        >>> from pyroflows.data import get_toy
        >>> toy = get_toy("eight_gaussians")
        >>> fig = plot_density_2d(toy.log_prob, bounds=(-4, 4), grid=50, samples=toy.sample(500))
        >>> len(fig.axes)
        2
        >>> plt.close(fig)
    """
    plt = _pyplot()
    lo, hi = bounds
    axis = torch.linspace(lo, hi, grid)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    with torch.no_grad():
        density = torch.cat([log_prob(chunk).exp().cpu() for chunk in pts.split(4096)]).reshape(grid, grid)
    ncols = 1 if samples is None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 4), squeeze=False)
    axes[0, 0].imshow(density.numpy(), origin="lower", extent=(lo, hi, lo, hi), cmap="viridis")
    axes[0, 0].set_title(title or "density")
    if samples is not None:
        s = samples.detach().cpu()
        axes[0, 1].hist2d(s[:, 0].numpy(), s[:, 1].numpy(), bins=100, range=[[lo, hi], [lo, hi]], cmap="viridis")
        axes[0, 1].set_title("samples")
    for ax in axes[0]:
        ax.set_aspect("equal")
    fig.tight_layout()
    if path is not None:
        _save_figure(fig, path, "plot_density_2d", "density plot")
    return fig


def plot_roc(curves: dict, path: str | os.PathLike | None = None, title: str | None = None):
    """ROC curves of out-of-distribution scores, one line per score, labelled with its AUROC.

    :param dict curves: ``{name: (in_scores, out_scores)}`` (see :mod:`pyroflows.ood`; higher = more OOD).
    :param path: where to save the figure (PNG, PDF, SVG; written atomically, the figure then closed).
    :param str title: the plot's title.
    :returns: the matplotlib figure.

    Example::

        >>> import matplotlib.pyplot as plt
        >>> fig = plot_roc({"nll": ([0.1, 0.5, 0.2], [0.4, 0.9])})
        >>> fig.axes[0].get_legend().get_texts()[0].get_text()
        'nll (AUROC 0.83)'
        >>> plt.close(fig)
    """
    from .ood import roc_auc, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for i, (name, (inside, outside)) in enumerate(curves.items()):
        fpr, tpr = roc_curve(inside, outside)
        style = ("-", "--", ":", "-.")[(i // 10) % 4]  # the colour cycle has 10 colours: then a new line style
        ax.plot(fpr.numpy(), tpr.numpy(), style, label=f"{name} (AUROC {roc_auc(inside, outside):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("false positive rate (in-distribution flagged)")
    ax.set_ylabel("true positive rate (OOD flagged)")
    ax.set_title(title or "out-of-distribution detection")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    if path is not None:
        _save_figure(fig, path, "plot_roc", "ROC plot")
    return fig


__all__ = ["check_png_path", "image_grid", "plot_density_2d", "plot_roc", "save_image_grid"]
