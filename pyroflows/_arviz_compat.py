"""The one place that knows which ArviZ is installed.

ArviZ 0.x (``arviz`` 0.23 on Python 3.11) and ArviZ 1.x (``arviz`` >= 1 = ``arviz_base`` + ``arviz_stats`` +
``arviz_plots``, Python >= 3.12) differ in the calls pyroflows needs:

================  =========================================  ==============================================
need              0.x                                        1.x
================  =========================================  ==============================================
build from dicts  ``az.from_dict(posterior=..., ...)``       ``arviz_base.from_dict({"posterior": ...})``
PSIS              ``az.psislw(x)`` smooths ``exp(+x)``       ``arviz_stats.psislw(-x)`` (smooths ``exp(-x)``)
bundled data      ``az.load_arviz_data``                     ``arviz_base.load_arviz_data``
pair plot         ``az.plot_pair``                           :func:`scatter_matrix` (matplotlib)
================  =========================================  ==============================================

Everything else in pyroflows works on numpy arrays and on the groups as mappings of ``xarray`` objects,
which both versions provide (``InferenceData`` in 0.x, ``xarray.DataTree`` in 1.x).
"""

from __future__ import annotations

import warnings
from functools import cache
from importlib.metadata import version

import numpy as np

# read from the installed metadata: importing ArviZ (with SciPy, xarray and matplotlib) takes seconds, which
# ``fit`` and the diagnostics that need only numbers should not pay; it is imported at the first use instead
ARVIZ_VERSION = tuple(int(p) for p in version("arviz").split(".")[:2] if p.isdigit())
ARVIZ_1 = ARVIZ_VERSION >= (1, 0)


@cache
def _az():
    """The ``arviz`` module, imported on first use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 0.23 announces the 1.x refactor on import
        import arviz

    return arviz


def __getattr__(name: str):
    if name == "az":  # ``compat.az``: the arviz module
        return _az()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_dict(groups: dict[str, dict[str, np.ndarray]], coords: dict | None = None, dims: dict | None = None):
    """Build an ``InferenceData`` (0.x) or ``DataTree`` (1.x) from ``{group: {var: array}}``.

    Arrays of every group except ``observed_data`` / ``constant_data`` have leading ``(chain, draw)`` dims.
    """
    groups = {name: vars_ for name, vars_ in groups.items() if vars_}
    if ARVIZ_1:  # pragma: no cover - needs Python >= 3.12
        import arviz_base

        return arviz_base.from_dict(groups, coords=coords, dims=dims)
    return _az().from_dict(**groups, coords=coords, dims=dims)


def to_netcdf(data, path) -> None:
    """Write an ``InferenceData`` / ``DataTree`` to a NetCDF file (both versions: the object's ``to_netcdf``)."""
    data.to_netcdf(path)


def from_netcdf(path):
    """Read what :func:`to_netcdf` wrote: ``az.from_netcdf`` (0.x) or ``xarray.open_datatree`` (1.x)."""
    if ARVIZ_1:  # pragma: no cover - needs Python >= 3.12
        import xarray as xr

        return xr.open_datatree(path).load()
    return _az().from_netcdf(path)


def psislw(log_ratios: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, self-normalised log importance weights of ``exp(log_ratios)`` (1-D) and k̂."""
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    if ARVIZ_1:  # pragma: no cover - needs Python >= 3.12
        from arviz_stats.base import array_stats

        lw, khat = array_stats.psislw(-log_ratios, r_eff=1.0, axis=-1)  # 1.x negates its input
        return np.asarray(lw).reshape(-1), float(np.asarray(khat))
    lw, khat = _az().psislw(log_ratios, reff=1.0)
    return np.asarray(lw), float(khat)


def load_arviz_data(name: str):
    """ArviZ's bundled example data (``centered_eight``, ``non_centered_eight``, ...), offline."""
    if ARVIZ_1:  # pragma: no cover
        import arviz_base

        return arviz_base.load_arviz_data(name)
    return _az().load_arviz_data(name)


def group(data, name: str):
    """The ``xarray.Dataset`` of group ``name`` of an ``InferenceData`` / ``DataTree``, or ``None``.

    A bare ``xarray.Dataset`` (with ``chain`` and ``draw`` dims) counts as a posterior.
    """
    import xarray as xr

    if isinstance(data, xr.Dataset):
        return data if name == "posterior" else None
    if ARVIZ_1 and hasattr(data, "children"):  # pragma: no cover - needs Python >= 3.12
        if name in data.children:
            return data[name].to_dataset()
        # a group node itself (``tree.posterior`` is a DataTree in 1.x), as a bare Dataset counts
        leaf = not data.children and "chain" in data.dims and "draw" in data.dims
        return data.to_dataset() if leaf and name == "posterior" else None
    return getattr(data, name, None) if name in getattr(data, "groups", lambda: [])() else None


def group_names(data) -> list[str]:
    """The names of the groups of an ``InferenceData`` (0.x: the ``groups()`` method) or ``DataTree`` (1.x: its
    children)."""
    if ARVIZ_1 and hasattr(data, "children"):  # pragma: no cover - needs Python >= 3.12
        return list(data.children)
    return list(data.groups())


def flatten_draws(ds, var: str) -> tuple[list[str], np.ndarray]:
    """Labels ``var[label, ...]`` and draws ``(S, K)`` of one variable of a posterior ``Dataset`` (plain xarray:
    the same for both ArviZ versions)."""
    da = ds[var]
    extra = [d for d in da.dims if d not in ("chain", "draw")]
    values = np.asarray(da.transpose("chain", "draw", *extra)).reshape(da.sizes["chain"] * da.sizes["draw"], -1)
    if not extra:
        return [var], values
    grids = np.meshgrid(*[np.asarray(da[d].values) for d in extra], indexing="ij")
    labels = [f"{var}[{', '.join(str(g.flat[i]) for g in grids)}]" for i in range(values.shape[1])]
    return labels, values


def plot_pair(data, var_names, coords: dict | None = None):
    """A pair plot of the posterior's ``var_names`` (restricted to ``coords``); returns a matplotlib figure.

    0.x draws it with ``az.plot_pair``; with 1.x it is :func:`scatter_matrix` of the same variables.
    """
    if ARVIZ_1:  # pragma: no cover - needs Python >= 3.12
        post = group(data, "posterior")
        return scatter_matrix(post.sel(coords) if coords else post, var_names)
    axes = _az().plot_pair(
        data, var_names=var_names, coords=coords, kind="scatter", marginals=True, scatter_kwargs={"alpha": 0.15, "s": 2}
    )
    return np.ravel(axes)[0].figure


def scatter_matrix(post, var_names):
    """Histograms on the diagonal, pairwise scatter plots elsewhere, one row/column per component of
    ``var_names`` in the posterior ``Dataset`` ``post``; returns a matplotlib figure."""
    import matplotlib.pyplot as plt

    cols = {}
    for var in var_names:
        labels, values = flatten_draws(post, var)
        cols.update(zip(labels, values.T))
    names = list(cols)
    fig, axes = plt.subplots(len(names), len(names), figsize=(2 * len(names),) * 2, squeeze=False)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                axes[i, j].hist(cols[a], bins=40)
            else:
                axes[i, j].plot(cols[b], cols[a], ".", alpha=0.15, markersize=2)
        axes[i, 0].set_ylabel(a)
        axes[-1, i].set_xlabel(a)
    return fig
