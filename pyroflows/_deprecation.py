"""Renamed arguments: the old names keep working for one release, with a ``FutureWarning`` (see CHANGELOG.md)."""

from __future__ import annotations

import functools
import warnings

#: The release that removes the old names.
REMOVAL = "0.3"


def warn_renamed(where: str, old: str, new: str, stacklevel: int = 3, note: str = "") -> None:
    """Warn that ``old`` is now called ``new`` in ``where`` (``note``: added after the names)."""
    warnings.warn(
        f"{where}: {old!r} is renamed {new!r}{note}; the old name will be removed in pyroflows {REMOVAL}",
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


def renamed(caller: str, old: str, new: str, old_value, new_value, *, note: str = "", stacklevel: int = 3):
    """The value of a renamed keyword argument: ``new_value``, or ``old_value`` with a ``FutureWarning`` when the
    caller still uses the old name (``None`` means "not given"); both given is a ``ValueError``.

    :param str caller: the function to name in the messages.
    :param str old: the old keyword.
    :param str new: the new keyword.
    :param old_value: the value given under the old name (``None``: not given).
    :param new_value: the value given under the new name (``None``: not given).
    :param str note: added to the warning after the names (e.g. a change of meaning).
    :param int stacklevel: as for ``warnings.warn``; the default points at the caller of the function that asks.

    Example::

        >>> import warnings
        >>> from pyroflows._deprecation import renamed
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed("fit", "steps", "num_steps", 20, None)
        20
        >>> print(caught[0].category.__name__, caught[0].message)
        FutureWarning fit: 'steps' is renamed 'num_steps'; the old name will be removed in pyroflows 0.3
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise ValueError(f"{caller}: give {new}= (or its old name {old}=), not both")
    warn_renamed(caller, old, new, stacklevel=stacklevel + 1, note=note)
    return old_value
