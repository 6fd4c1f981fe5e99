"""The run engine under both trainers, :func:`pyroflows.train.fit` (density maximum likelihood) and
:func:`pyroflows.infer.fit` (SVI): one set of conventions for a run of optimiser steps.

- **errors**: :class:`TrainingError` for a non-finite loss or gradient (:func:`check_finite`, called before every
  update), :class:`CheckpointError` for an unusable checkpoint, :class:`CheckpointExistsError` for a checkpoint
  that a run without ``resume`` would overwrite;
- **steps** are counted from 1: "step N" is the N-th optimiser update, and a checkpoint of step N holds the state
  after it;
- **checkpoints** are written atomically (:func:`atomic_torch_save`) and read with :func:`load_checkpoint`; a run
  resumes by one policy (:func:`resume_source`, :func:`check_settings`): an existing checkpoint without ``resume``
  is an error, so is resuming with changed settings; RNG states travel with them (:func:`rng_state`);
- **the optimiser** is built by :func:`make_optimizer` (torch's fused or multi-tensor update where it has one);
- **the learning rate** follows one schedule (:func:`lr_factor`): a linear warm-up, then constant, cosine,
  exponential or stable-then-cosine decay to a final factor;
- **progress** is one tqdm bar (:func:`progress_bar`): ``progress=None`` shows it when stderr is a terminal;
- **arguments** are checked in one place per run (the trainers' frozen configs) with :func:`check_int`,
  :func:`check_number` and :func:`check_choice`, and renamed keywords warn through :func:`renamed`.

This module imports only the standard library, NumPy (for its global RNG state), torch and tqdm: nothing from the
rest of pyroflows, so that the two trainers share it without importing each other.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import random
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # POSIX file locks; elsewhere run directories are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT = "pyroflows-checkpoint"
"""The ``"format"`` marker of density checkpoints, the default that :func:`load_checkpoint` expects."""
VERSION = 1
"""The checkpoint format version this release writes; :func:`load_checkpoint` refuses newer ones."""
CHECKPOINT = "checkpoint.pt"
"""The checkpoint's file name inside a run directory (``out``)."""
SCHEDULES = ("constant", "cosine", "exponential", "stable_cosine")
"""The learning-rate schedules of :func:`lr_factor`."""

STABLE_DECAY_FRACTION = 0.2
"""The share of the run over which ``"stable_cosine"`` decays (the last fifth)."""


# ------------------------------------------------------------------------------------------------ errors
class TrainingError(RuntimeError):
    """A run stopped on a non-finite loss or gradient, before the update (see :func:`check_finite`). The message
    names the step (counted from 1), says that the parameters keep their values after the step before, and names
    the last good checkpoint when there is one (left untouched).

    A subclass of ``RuntimeError``, raised by :func:`pyroflows.train.fit` and :func:`pyroflows.infer.fit`.

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.infer import fit
        >>> from pyroflows.train import TrainingError
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        ...     pyro.factor("impossible", torch.tensor(float("-inf")))  # p(x) = 0 everywhere: the loss is +inf
        >>> pyro.clear_param_store()
        >>> try:
        ...     fit(model, AutoNormal(model), num_steps=20, progress=False, seed=0)  # 10 skipped steps in a row
        ... except TrainingError as err:
        ...     print(str(err).split(";")[0])
        fit: the loss is inf at step 11
    """


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupted, not ours, for another architecture, written with other
    settings, or one that a run without ``resume`` would overwrite (:class:`CheckpointExistsError`).

    Example::

        >>> from pyroflows.train import CheckpointError, load_density
        >>> try:
        ...     load_density("no/such/checkpoint.pt")
        ... except CheckpointError as e:
        ...     print(e)
        no checkpoint at 'no/such/checkpoint.pt'
    """


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A run without ``resume`` found a checkpoint where it would write its own: never overwritten silently.

    Both a :class:`CheckpointError` and a ``FileExistsError``.

    Example::

        >>> import os, tempfile
        >>> from pyroflows.run import CheckpointExistsError, resume_source
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
        >>> open(path, "wb").close()
        >>> try:
        ...     resume_source(path, False, caller="fit")
        ... except CheckpointExistsError as err:
        ...     print(isinstance(err, FileExistsError), "already exists" in str(err))
        True True
    """


# ------------------------------------------------------------------------------------------------ arguments
def _describe(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"{'<' if high_open else '<='} {high}" if high is not None else "a number"


def check_number(
    caller: str,
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = True,
    high_open: bool = True,
    optional: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless ``value`` is a finite real number in the range
    (or ``None`` when ``optional``). ``bool`` is not a number here.

    :param str caller: the function to name in the message (``"fit"``).
    :param str name: the argument's name.
    :param value: the value to check.
    :param low: the lower bound (``None``: none); excluded when ``low_open``.
    :param high: the upper bound (``None``: none); excluded when ``high_open``.
    :param bool low_open: whether ``low`` itself is excluded.
    :param bool high_open: whether ``high`` itself is excluded.
    :param bool optional: whether ``None`` is allowed.

    Example::

        >>> check_number("fit", "lr", 1e-3, 0)
        >>> check_number("fit", "lr", 0.0, 0)
        Traceback (most recent call last):
          ...
        ValueError: fit: lr must be > 0 (a finite number), got 0.0
    """
    if value is None and optional:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        allowed = ("None or " if optional else "") + _describe(low, high, low_open, high_open)
        raise ValueError(f"{caller}: {name} must be {allowed} (a finite number), got {value!r}")


def check_int(caller: str, name: str, value, low: int | None = None, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless ``value`` is an integer ``>= low`` (or ``None``
    when ``optional``). ``bool`` is not an integer here.

    :param str caller: the function to name in the message.
    :param str name: the argument's name.
    :param value: the value to check.
    :param low: the smallest allowed value (``None``: any integer).
    :param bool optional: whether ``None`` is allowed.

    Example::

        >>> check_int("fit", "batch_size", 0, 1)
        Traceback (most recent call last):
          ...
        ValueError: fit: batch_size must be an int >= 1, got 0
    """
    if value is None and optional:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (low is not None and value < low):
        allowed = ("None or " if optional else "") + "an int" + (f" >= {low}" if low is not None else "")
        raise ValueError(f"{caller}: {name} must be {allowed}, got {value!r}")


SEED_LIMIT = 2**62
"""Seeds are ints in ``[0, SEED_LIMIT)``: torch's generators take 64-bit seeds, and the trainers add offsets."""


def check_seed(caller: str, value, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int in ``[0, 2**62)`` (or ``None`` when ``optional``).

    Example::

        >>> check_seed("fit", 2**70)
        Traceback (most recent call last):
          ...
        ValueError: fit: seed must be an int in [0, 2**62), got 1180591620717411303424
    """
    if value is None and optional:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{caller}: seed must be {'None or ' if optional else ''}an int in [0, 2**62), got {value!r}")


def check_device(caller: str, device) -> torch.device:
    """The ``torch.device`` a run asked for, checked: ``"auto"`` (or ``None``) is CUDA when available, else the
    CPU; an unknown name, CUDA without CUDA, or a CUDA index beyond the devices present is a ``ValueError`` naming
    it (before any checkpoint is read, so that it is not mistaken for a corrupted file).

    Example::

        >>> check_device("fit", "cpu")
        device(type='cpu')
        >>> check_device("fit", "gpu0")
        Traceback (most recent call last):
          ...
        ValueError: fit: unknown device 'gpu0'; use auto, cpu, cuda or cuda:N
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"{caller}: device must be a string or torch.device, got {device!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{caller}: unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{caller}: device {str(device)!r} was requested but this machine has no usable CUDA")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{caller}: device {str(device)!r} does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{caller}: device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def check_choice(caller: str, name: str, value, choices: Iterable) -> None:
    """Raise ``ValueError`` naming ``name``, ``value`` and the choices unless ``value`` is one of ``choices``.

    :param str caller: the function to name in the message.
    :param str name: the argument's name.
    :param value: the value to check.
    :param choices: the allowed values.

    Example::

        >>> check_choice("fit", "lr_schedule", "step", SCHEDULES)
        Traceback (most recent call last):
          ...
        ValueError: fit: lr_schedule must be one of ('constant', 'cosine', 'exponential', 'stable_cosine'), got 'step'
    """
    choices = tuple(choices)
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{caller}: {name} must be one of {choices}, got {value!r}")


def check_resume(caller: str, resume, target) -> None:
    """Check a ``resume`` argument: ``True``, ``False``, ``"auto"`` or a checkpoint path; ``True`` and ``"auto"``
    need a ``target`` (the checkpoint the run writes).

    :param str caller: the function to name in the message.
    :param resume: the value to check.
    :param target: the run's checkpoint file (``None`` when the run writes none).

    Example::

        >>> check_resume("fit", True, None)
        Traceback (most recent call last):
          ...
        ValueError: fit: resume=True needs out= (the run directory holding checkpoint.pt)
    """
    if not (isinstance(resume, (bool, str, os.PathLike))):
        raise ValueError(f"{caller}: resume must be True, False, 'auto' or a checkpoint path, got {resume!r}")
    if (resume is True or resume == "auto") and target is None:
        raise ValueError(f"{caller}: resume={resume!r} needs out= (the run directory holding {CHECKPOINT})")


# ------------------------------------------------------------------------------------------------ signals
class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM: it finished the step under way and wrote its checkpoint first.

    A ``KeyboardInterrupt`` (so code that stops on Ctrl-C stops on it too), with the message the command line prints
    and :attr:`exit_code`, ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM).

    :param str message: where the checkpoint is and how to resume.
    :param int signum: the signal.

    Example::

        >>> import signal
        >>> RunInterrupted("fit: stopped", signal.SIGTERM).exit_code
        143
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """``128 + signum``, the shell's convention for a process ended by a signal."""
        return 128 + self.signum


class StopRequest:
    """What :func:`stop_on_signals` yields: :attr:`signum` is ``None`` until SIGINT or SIGTERM arrives."""

    def __init__(self):
        self.signum: int | None = None

    def stop(self, caller: str, done: int, checkpoint, resume_hint: str) -> None:
        """Raise :class:`RunInterrupted` if a signal arrived: after step ``done``, with ``checkpoint`` (a path, or
        ``None`` when the run writes nothing) in the message."""
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        saved = f"checkpoint {str(checkpoint)!r}; {resume_hint}" if checkpoint else "nothing saved (no out=)"
        raise RunInterrupted(f"{caller}: stopped by {name} after step {done}; {saved}", self.signum)


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True):
    """While the block runs, SIGINT and SIGTERM ask the run to stop after the step under way (a
    :class:`StopRequest`) instead of killing it mid-step; a second SIGINT raises ``KeyboardInterrupt`` at once
    (atomic checkpoint writes leave the last good checkpoint intact). The previous handlers come back on exit.
    Only in the main thread (where Python runs signal handlers), and only when ``enabled``.

    :param bool enabled: install the handlers (``False``: a request that is never set, e.g. under DDP).

    Example::

        >>> import signal
        >>> with stop_on_signals() as request:
        ...     signal.raise_signal(signal.SIGTERM)
        >>> signal.Signals(request.signum).name
        'SIGTERM'
    """
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if request.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
            raise KeyboardInterrupt
        request.signum = signum

    for s in previous:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------ the run directory
class RunLockedError(CheckpointError):
    """Another process is writing a run into the same directory (it holds the directory's lock).

    A subclass of :class:`CheckpointError`; the command line reports it in one line and exits with 2.

    Example::

        >>> issubclass(RunLockedError, CheckpointError)
        True
    """


LOCK = ".lock"


@contextlib.contextmanager
def run_lock(directory, caller: str):
    """Hold an exclusive OS lock on ``directory`` (``flock`` on ``directory/.lock``) while a run writes there, so a
    second run into the same directory fails at once instead of overwriting the first one's checkpoints.

    The lock belongs to the open file: the OS releases it when the process ends, however it ends (no stale PID
    files after a crash or ``kill -9``). ``directory=None`` (a run that writes nothing) locks nothing; so does a
    platform without ``fcntl``.

    :param directory: the run directory (created if needed), or ``None``.
    :param str caller: the function to name in the error.
    :raises RunLockedError: when another process (or another open run in this one) holds the lock.
    :raises OutputError: when the directory cannot be created or written (read-only, a file of that name).

    Example::

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with run_lock(d, "fit"):
        ...     try:
        ...         with run_lock(d, "fit"):
        ...             pass
        ...     except RunLockedError as err:
        ...         print(str(err).split(";")[0].replace(d, "DIR"))
        fit: DIR is in use by another run
    """
    if directory is None or fcntl is None:
        yield
        return
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK, "a")  # noqa: SIM115 - held open for the whole run
    except OSError as e:
        error = OutputError(
            f"{caller}: cannot use {str(directory)!r} as the run directory: {e.strerror or e}"
            + (" (a file of that name exists)" if directory.is_file() else "")
        )
        error.errno = e.errno
        raise error from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunLockedError(
                f"{caller}: {directory} is in use by another run; wait for it to finish or choose another "
                "output directory"
            ) from None
        yield
    finally:
        handle.close()  # closing the file releases the lock


# ------------------------------------------------------------------------------------------------ checkpoints
def _default_mode(fd: int) -> None:
    """Give a ``mkstemp`` file (mode 0600) the mode a plain ``open`` would (0666 less the umask)."""
    if os.name != "posix":
        return
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a directory)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class OutputError(OSError):
    """A file of a run could not be written (disk full, read-only or missing directory, no permission).

    Raised by :func:`atomic_write` (and so :func:`atomic_torch_save` and :func:`pyroflows.plots.save_image_grid`):
    the message names the file and the operating system's reason, and says that the destination keeps its previous
    content and no partial file was left. The trainers add which checkpoint is the last good one; the command line
    prints the message on one line and exits with status 2. ``errno`` is the underlying error's.

    Example::

        >>> import os, tempfile
        >>> from pyroflows.run import OutputError, atomic_write
        >>> blocker = os.path.join(tempfile.mkdtemp(), "file")
        >>> open(blocker, "w").close()
        >>> try:  # the "directory" is a regular file
        ...     atomic_write(os.path.join(blocker, "out.txt"), lambda f: f.write(b"x"), what="notes")
        ... except OutputError as err:
        ...     print(str(err).startswith("could not write notes"), os.listdir(os.path.dirname(blocker)))
        True ['file']
    """


def _output_error(what: str, path: Path, err: OSError) -> OutputError:
    reason = err.strerror or str(err)
    error = OutputError(
        f"could not write {what} {str(path)!r}: {reason}; nothing partial was left and "
        f"{'its previous content is unchanged' if path.is_file() else 'no file was created'}"
    )
    error.errno = err.errno
    return error


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any], *, what: str = "file") -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file (binary) in the target directory, which is
    ``fsync``-ed and renamed over ``path``.

    If the process dies at any point, ``path`` still holds its previous content (or does not exist). If writing
    fails in-process (e.g. ``ENOSPC``, ``EROFS``, ``EACCES``), the temporary file is removed and an
    :class:`OutputError` names the file and the reason: never a partial or empty file at ``path``.

    :param path: the destination file; its directory is created if needed.
    :param write: called with the open binary file object.
    :param str what: what the file is, for the error message (e.g. ``"checkpoint"``).
    :raises OutputError: the file could not be written.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
        >>> atomic_write(path, lambda f: f.write(b"hello"))
        >>> open(path).read()
        'hello'
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _default_mode(fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _output_error(what, path, e) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_directory(path.parent)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically (:func:`atomic_write`): temp file in the target directory, ``fsync``,
    ``os.replace``.

    If the process dies at any point, ``path`` still holds its previous content (or does not exist); a
    leftover temporary file (``.<name>.*.tmp``) is harmless and removed when the save fails in-process.

    :param obj: anything ``torch.save`` accepts.
    :param path: the destination file; its directory is created if needed.
    :raises OutputError: the file could not be written (the previous checkpoint at ``path`` is intact).

    Example::

        >>> import tempfile, os, torch
        >>> d = tempfile.mkdtemp()
        >>> atomic_torch_save({"a": torch.ones(2)}, os.path.join(d, "c.pt"))
        >>> torch.load(os.path.join(d, "c.pt"))["a"]
        tensor([1., 1.])
    """

    def write(f) -> None:
        buffer = io.BytesIO()  # serialised in memory first: torch's zip writer reports a failed write (ENOSPC)
        torch.save(obj, buffer)  # as a bare RuntimeError, a plain file write as the OSError it is
        f.write(buffer.getbuffer())

    atomic_write(path, write, what="checkpoint")


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` names: ``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a directory
    (the ``out`` of a run), so that a run's directory may be given wherever its checkpoint is read.

    :param path: a checkpoint file or a run directory.
    :returns: ``pathlib.Path`` of the file (which need not exist).

    Example::

        >>> import tempfile
        >>> run = tempfile.mkdtemp()
        >>> checkpoint_file(run).name, checkpoint_file(run + "/other.pt").name
        ('checkpoint.pt', 'other.pt')
    """
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu", marker: str = FORMAT
) -> dict:
    """Read a checkpoint: a dict carrying the ``"format"`` entry ``marker``.

    :func:`pyroflows.train.fit` writes model, recipe (``"spec"``), optimiser, schedule and EMA states, the
    ``"step"``, the loss history, the settings (``"config"``) and the RNG states; :func:`pyroflows.infer.fit`
    writes its own (marker ``"pyroflows-svi-1"``), and :func:`pyroflows.infer.save_guide` a guide
    (``"pyroflows-guide-1"``). Loaded with ``torch.load(weights_only=True)``: no code in the file is executed.

    :param path: the checkpoint file (``out/checkpoint.pt``), or the run directory ``out`` holding it.
    :param map_location: where to load the tensors, as for ``torch.load``.
    :param str marker: the ``"format"`` entry the file must carry (default: a density checkpoint's).
    :raises CheckpointError: when the file is missing, truncated/corrupted, not a pyroflows checkpoint of that
        kind, or of a newer format version.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
        >>> atomic_torch_save({"format": "my-run", "step": 3}, path)
        >>> load_checkpoint(path, marker="my-run")["step"]
        3
        >>> load_checkpoint(os.path.dirname(path), marker="my-run")["step"]  # the run directory
        3
        >>> load_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        pyroflows.run.CheckpointError: '...checkpoint.pt' is not a pyroflows checkpoint (no 'pyroflows-checkpoint' ...
    """
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read (corrupted or truncated file?): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != marker:
        raise CheckpointError(f"{str(path)!r} is not a pyroflows checkpoint (no {marker!r} marker)")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {ckpt['version']}, newer than {VERSION}")
    return ckpt


# ------------------------------------------------------------------------------------------------ resume policy
def resume_source(target, resume, *, caller: str, hint: str = "resume=True") -> Path | None:
    """The one resume policy: which checkpoint a run continues from, or ``None`` for a fresh start.

    - ``resume=False``: a fresh start; an existing ``target`` is a :class:`CheckpointExistsError` naming it and how
      to resume (never overwritten silently);
    - ``resume=True``: ``target``, which must exist (else :class:`CheckpointError`);
    - ``resume="auto"``: ``target`` when it exists, else a fresh start;
    - a path: that checkpoint, or the run directory holding it (which must exist); the run then writes to
      ``target``.

    :param target: the checkpoint file the run writes (``out/checkpoint.pt``), or ``None`` when it writes none.
    :param resume: ``True``, ``False``, ``"auto"`` or a checkpoint path.
    :param str caller: the function to name in messages.
    :param str hint: how the user asks for a resume, for the message (e.g. ``"resume=True (pyroflows fit
        --resume)"``).
    :returns: the checkpoint to load, or ``None``.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
        >>> resume_source(path, "auto", caller="fit") is None  # nothing there yet: a fresh start
        True
        >>> resume_source(path, True, caller="fit")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        pyroflows.run.CheckpointError: fit: no checkpoint at '...checkpoint.pt' to resume from
    """
    target = Path(target) if target is not None else None
    if resume is False:
        if target is not None and target.is_file():
            raise CheckpointExistsError(
                f"{caller}: {str(target)!r} already exists; pass {hint} to continue that run, or choose another "
                "output directory"
            )
        return None
    if resume == "auto":
        return target if target is not None and target.is_file() else None
    source = target if resume is True else checkpoint_file(resume)
    if source is None or not source.is_file():
        raise CheckpointError(f"{caller}: no checkpoint at {str(source)!r} to resume from")
    return source


def check_settings(saved: dict, now: dict, *, source, caller: str) -> None:
    """Refuse to resume a run with settings that change its trajectory: a :class:`CheckpointError` naming each
    changed setting as ``name: saved X, now Y``.

    :param dict saved: the settings stored in the checkpoint.
    :param dict now: the settings of the resuming call; only these names are compared.
    :param source: the checkpoint, for the message.
    :param str caller: the function to name in the message.

    Example::

        >>> check_settings({"lr": 0.01, "seed": 0}, {"lr": 0.02, "seed": 0}, source="run/checkpoint.pt",
        ...                caller="fit")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        pyroflows.run.CheckpointError: fit: checkpoint ... with other settings (lr: saved 0.01, now 0.02); ...
    """
    changed = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise CheckpointError(
            f"{caller}: checkpoint {str(source)!r} was written with other settings ({', '.join(changed)}); resume "
            "with the same settings, or start a new run elsewhere"
        )


def require_keys(ckpt: dict, keys: Iterable[str], *, source, caller: str) -> None:
    """Raise :class:`CheckpointError` naming the first of ``keys`` that ``ckpt`` lacks (a checkpoint written by
    something else, or damaged), instead of a bare ``KeyError`` deep in a resume.

    Example::

        >>> require_keys({"step": 3}, ["step", "optimizer"], source="run/checkpoint.pt", caller="fit")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        pyroflows.run.CheckpointError: fit: checkpoint 'run/checkpoint.pt' lacks 'optimizer': it was not written ...
    """
    for key in keys:
        if key not in ckpt:
            raise CheckpointError(
                f"{caller}: checkpoint {str(source)!r} lacks {key!r}: it was not written by this trainer, or is damaged"
            )


def fingerprint(*objects) -> str:
    """A short hash of data (tensors, arrays, numbers, strings, and lists, tuples and dicts of them): a resumed run
    stores it and compares, so that continuing with other data is an error instead of a silent mix.

    Tensors and arrays count by dtype, shape and bytes; numbers and strings by value; other objects only by type.

    Example::

        >>> import torch
        >>> fingerprint(torch.arange(4)) == fingerprint(torch.arange(4)), fingerprint(torch.arange(4)) == fingerprint(
        ...     torch.arange(1, 5))
        (True, False)
    """
    import hashlib

    digest = hashlib.sha1()

    def feed(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu").contiguous()
            digest.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, np.ndarray):
            a = np.ascontiguousarray(obj)
            digest.update(f"array{a.dtype}{a.shape}".encode())
            digest.update(a.tobytes())
        elif isinstance(obj, (list, tuple)):
            digest.update(f"{type(obj).__name__}{len(obj)}".encode())
            for item in obj:
                feed(item)
        elif isinstance(obj, dict):
            digest.update(f"dict{len(obj)}".encode())
            for key in sorted(obj, key=repr):
                feed(key)
                feed(obj[key])
        elif obj is None or isinstance(obj, (numbers.Number, str, bytes)):
            digest.update(repr(obj).encode())
        else:  # functions, modules, other objects: their repr holds a memory address, so only the type counts
            digest.update(type(obj).__qualname__.encode())

    feed(objects)
    return digest.hexdigest()[:16]


def check_data(saved: dict, now: str, *, source, caller: str, what: str = "training data") -> None:
    """Refuse to resume on other data: ``saved["data"]`` (a :func:`fingerprint`, absent in checkpoints written
    before it was recorded, then not checked) must equal ``now``.

    Example::

        >>> check_data({"data": "0123"}, "4567", source="run/checkpoint.pt", caller="fit")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        pyroflows.run.CheckpointError: fit: checkpoint 'run/checkpoint.pt' was written for other training data ...
    """
    if saved.get("data") is not None and saved["data"] != now:
        raise CheckpointError(
            f"{caller}: checkpoint {str(source)!r} was written for other {what} (fingerprint {saved['data']}, now "
            f"{now}); resume with the data it was trained on, or start a new run elsewhere"
        )


# ------------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    """Python, NumPy, torch CPU and (if present) CUDA generator states, as tensors and plain types only,
    so the checkpoint loads with ``torch.load(weights_only=True)``.

    Example::

        >>> import torch
        >>> state = rng_state()
        >>> a = torch.rand(2)
        >>> set_rng_state(state)
        >>> torch.equal(torch.rand(2), a)
        True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved, wherever its tensors were loaded (a checkpoint read with
    ``map_location="cuda"`` holds them on the GPU; generator states are CPU tensors).

    :param dict state: a :func:`rng_state` result (e.g. from a checkpoint).

    Example::

        >>> import random
        >>> state = rng_state()
        >>> a = random.random()
        >>> set_rng_state(state)
        >>> random.random() == a
        True
    """
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in states])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------------ schedule
def lr_factor(
    schedule: str, num_steps: int, warmup_steps: int = 0, final_factor: float = 1.0
) -> Callable[[int], float]:
    r"""The learning-rate factor of step index ``s`` (0 for the first update), for ``LambdaLR``.

    A linear warm-up, :math:`\min(1, (s + 1)/w)` over ``warmup_steps`` :math:`w`, times a decay over the run:
    ``"constant"`` 1, ``"cosine"`` from 1 to ``final_factor`` along half a cosine, ``"exponential"``
    :math:`f^{s/(n-1)}`, ``"stable_cosine"`` 1 for the first four fifths of the run and then half a cosine to
    ``final_factor`` over the last fifth (:data:`STABLE_DECAY_FRACTION`; the warm-up–stable–decay schedule). The
    decaying ones reach ``final_factor`` at the last step. The factor is a plain function, so
    ``LambdaLR.state_dict`` holds only the step count: the schedule is rebuilt from the settings on resume.

    :param str schedule: one of :data:`SCHEDULES`: ``"constant"``, ``"cosine"``, ``"exponential"`` or
        ``"stable_cosine"``.
    :param int num_steps: the number of steps of the run.
    :param int warmup_steps: linear warm-up steps (0: none).
    :param float final_factor: the factor at the last step of a decaying schedule.

    Example::

        >>> f = lr_factor("cosine", 5, warmup_steps=2, final_factor=0.1)
        >>> [round(f(s), 4) for s in range(5)]
        [0.5, 0.8682, 0.55, 0.2318, 0.1]
        >>> [lr_factor("constant", 5, warmup_steps=4)(s) for s in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]
        >>> f = lr_factor("stable_cosine", 11, final_factor=0.05)
        >>> [round(f(s), 3) for s in range(11)]
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.525, 0.05]
    """

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        t = min(step / max(num_steps - 1, 1), 1.0)
        if schedule in ("cosine", "stable_cosine"):
            if schedule == "stable_cosine":  # the same half cosine, over the last fifth of the run only
                t = max(0.0, (t - (1 - STABLE_DECAY_FRACTION)) / STABLE_DECAY_FRACTION)
            decay = final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))
        elif schedule == "exponential":
            decay = final_factor**t
        else:
            decay = 1.0
        return warm * decay

    return factor


#: optimisers whose single fused kernel :func:`make_optimizer` takes where torch has it for the parameters
_FUSED = (torch.optim.Adam, torch.optim.AdamW)
#: optimisers with a multi-tensor (``foreach``) update but no fused one
_FOREACH = (torch.optim.Adamax,)


def make_optimizer(optimizer: type[torch.optim.Optimizer], params: Iterable, **kwargs) -> torch.optim.Optimizer:
    """``optimizer(params, **kwargs)``, the optimiser of both trainers, with torch's fastest update for it.

    Without ``fused`` or ``foreach`` among ``kwargs``, Adam and AdamW get ``fused=True`` (one kernel updates every
    tensor) where torch supports it for these parameters (floating point, on a device with the kernel: CPU and CUDA
    among them), else ``foreach=True``; Adamax gets ``foreach=True``. torch's own default on the CPU is a Python loop
    over the tensors, and a flow has many small ones: an Adam step over a 28x28 glow's 182 tensors took 6.6 ms in
    that loop, 4.9 ms with ``foreach`` and 1.2 ms fused (``benchmarks/optimizer_step.py``, one thread). The three
    compute the same update up to rounding. Other optimisers, and any choice made in ``kwargs``, are left as given;
    an optimiser state saved with another update loads, and keeps the update it was saved with.

    :param optimizer: a ``torch.optim.Optimizer`` class.
    :param params: its parameters (or parameter groups).
    :param kwargs: its other arguments (``lr``, ``betas``, ...).

    Example::

        >>> import torch
        >>> w = torch.zeros(3, requires_grad=True)
        >>> make_optimizer(torch.optim.Adam, [w], lr=0.1).defaults["fused"]
        True
        >>> make_optimizer(torch.optim.Adam, [w], lr=0.1, foreach=False).defaults["fused"] is None
        True
    """
    if "fused" in kwargs or "foreach" in kwargs or not (optimizer in _FUSED or optimizer in _FOREACH):
        return optimizer(params, **kwargs)
    params = list(params)
    if optimizer in _FUSED:
        try:
            return optimizer(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # not for these parameters (device, dtype, differentiable=True)
            pass
    return optimizer(params, foreach=True, **kwargs)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, num_steps: int, warmup_steps: int = 0, final_factor: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR(optimizer, lr_factor(...))``: the schedule of both trainers, stepped once per update.

    :param optimizer: the optimiser whose learning rate (the peak, ``lr``) is scaled.
    :param str schedule: as for :func:`lr_factor`.
    :param int num_steps: as for :func:`lr_factor`.
    :param int warmup_steps: as for :func:`lr_factor`.
    :param float final_factor: as for :func:`lr_factor`.

    Example::

        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> sched = make_scheduler(opt, "constant", 10, warmup_steps=2)
        >>> opt.param_groups[0]["lr"]
        0.05
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, num_steps, warmup_steps, final_factor))


# ------------------------------------------------------------------------------------------------ finite check
def check_finite(
    caller: str,
    step: int,
    loss: float,
    grad_norm: float | None = None,
    *,
    cause: BaseException | None = None,
    checkpoint: tuple | None = None,
    params: Iterable[torch.Tensor] = (),
) -> None:
    """The check before every update: a :class:`TrainingError` when the loss or the gradient norm is not finite.

    The message reads ``"<caller>: the loss is nan at step N; stopped before the update, ..."`` (or ``"the
    gradient norm is inf at step N (loss L)"``), with ``N`` counted from 1 (the N-th update), and names the last
    good checkpoint when there is one.

    :param str caller: the function to name (``"fit"``).
    :param int step: the step being taken, counted from 1.
    :param float loss: the loss of this step.
    :param grad_norm: the global gradient norm (``None``: not computed yet, only the loss is checked).
    :param cause: the exception that made the loss non-finite (validation naming a layer), chained and quoted.
    :param checkpoint: ``(path, step)`` of the last good checkpoint, or ``None``.
    :param params: parameters whose gradients are cleared before raising, so no later update applies them.

    Example::

        >>> check_finite("fit", 3, 1.25, 0.5)  # finite: nothing happens
        >>> check_finite("fit", 3, float("nan"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        pyroflows.run.TrainingError: fit: the loss is nan at step 3; stopped before the update, the parameters ...
    """
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    if not math.isfinite(loss):
        bad = f"the loss is {loss} at step {step}" + (f" ({cause})" if cause is not None else "")
    else:
        bad = f"the gradient norm is {grad_norm} at step {step} (loss {loss:.4g})"
    where = f"; the last good checkpoint is {str(checkpoint[0])!r} (step {checkpoint[1]})" if checkpoint else ""
    for p in params:
        p.grad = None
    raise TrainingError(
        f"{caller}: {bad}; stopped before the update, the parameters keep their values after step {step - 1}"
        f"{where}. Lower lr, set clip_norm, or check the model and data for invalid values (e.g. a scale that can "
        "reach zero)."
    ) from cause


# ------------------------------------------------------------------------------------------------ progress
def progress_bar(total: int, progress: bool | None, *, desc: str, initial: int = 0, enabled: bool = True):
    """The tqdm bar of a run: ``progress=None`` shows it only when stderr is a terminal, ``True`` always,
    ``False`` never; ``enabled=False`` (e.g. a rank other than 0) never. A disabled bar accepts every call.

    :param int total: the number of steps of the run.
    :param progress: ``None``, ``True`` or ``False``.
    :param str desc: the bar's label (``"fit"``, ``"svi"``).
    :param int initial: steps already done (a resumed run).
    :param bool enabled: ``False`` silences the bar whatever ``progress`` says.

    Example::

        >>> bar = progress_bar(10, False, desc="fit")
        >>> bar.update(1); bar.close()
    """
    from tqdm.auto import tqdm

    disable = True if not enabled else (None if progress is None else not progress)  # None: tty only
    return tqdm(total=total, initial=initial, disable=disable, desc=desc, unit="step", dynamic_ncols=True)


__all__ = [
    "CHECKPOINT",
    "FORMAT",
    "SCHEDULES",
    "VERSION",
    "CheckpointError",
    "CheckpointExistsError",
    "OutputError",
    "RunInterrupted",
    "RunLockedError",
    "StopRequest",
    "TrainingError",
    "atomic_torch_save",
    "atomic_write",
    "check_choice",
    "check_data",
    "check_device",
    "check_finite",
    "check_int",
    "check_number",
    "check_resume",
    "check_seed",
    "check_settings",
    "fingerprint",
    "checkpoint_file",
    "load_checkpoint",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "progress_bar",
    "require_keys",
    "rng_state",
    "run_lock",
    "resume_source",
    "set_rng_state",
    "stop_on_signals",
]
