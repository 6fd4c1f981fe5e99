"""Renamed arguments: the old names keep working for one release, with a ``FutureWarning`` (see CHANGELOG.md)."""

from __future__ import annotations

import functools
import warnings

#: The release that removes the old names.
REMOVAL = "0.3"


def warn_renamed(where: str, old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is now called ``new`` in ``where``."""
    warnings.warn(
        f"{where}: {old!r} is renamed {new!r}; the old name will be removed in pyroflows {REMOVAL}",
        FutureWarning,
        stacklevel=stacklevel,
    )


def renamed_kwargs(**renames: str):
    """Decorate a function (or an ``__init__``) so that keyword ``old`` is accepted as ``new``, with a warning.

    Passing both names is a ``TypeError``. The wrapped function keeps its signature (``functools.wraps``).
    """

    def decorate(fn):
        where = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{where}: got both {old!r} (its old name) and {new!r}; pass {new!r} only")
                    warn_renamed(where, old, new)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate
