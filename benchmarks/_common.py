"""Helpers shared by the benchmark scripts: machine facts, interleaved timing, peak memory in a forked child,
scaling fits and the results files."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MEMORY_METHOD = (
    "peak RSS increase in a forked child over building the model and running 2 steps: VmHWM (after "
    "/proc/self/clear_refs <- 5) minus VmRSS at the reset, after one unmeasured run of the same work and "
    "glibc malloc_trim (ru_maxrss difference where clear_refs is not writable)"
)


def cpu_model() -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except ImportError:
        return None


def machine() -> dict:
    """CPU model, core count, load and the versions of the libraries under test and their peers."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": _version("pyro"),
        "pyroflows": _version("pyroflows"),
        "normflows": _version("normflows"),
        "torch_threads": torch.get_num_threads(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
    }


def git_commit() -> str | None:
    """The short commit of the checkout the benchmarks run from (``+dirty`` with uncommitted changes), if any."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(  # the results a run writes do not make the code it measures dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results", ":!*.md"],
            cwd=root,
            capture_output=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def have_normflows() -> bool:
    """Whether the optional peer ``normflows`` (the ``bench`` extra) is importable."""
    try:
        import normflows  # noqa: F401
    except ImportError:
        return False
    return True


def peers_available(benchmark: str) -> bool:
    """:func:`have_normflows`, saying on stderr when it is missing: the rows compared with it are then left out of
    the results (written all the same), and a results file without them should not pass for a full run."""
    if have_normflows():
        return True
    print(
        f"{benchmark}: normflows is not installed (pip install -e '.[bench]'): its peer rows are left out",
        file=sys.stderr,
        flush=True,
    )
    return False


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run."""
    args = sys.argv[1:] if argv is None else list(argv)
    return "python " + shlex.join([script, *args])


def row_timing_args(argv, doc: str, name: str, quick: str, rounds: int, quick_rounds: int) -> argparse.Namespace:
    """The options of a benchmark that times rows of interleaved rounds: ``--quick`` (``quick`` says what it keeps),
    ``--out`` (the JSON; default ``results/<name>.json``) and ``--rounds`` (default ``rounds``, quick
    ``quick_rounds``; left ``None`` when not given, for the benchmark to resolve)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--out", default=None, help=f"the JSON to write (default results/{name}.json)")
    p.add_argument(
        "--rounds", type=int, default=None, help=f"timed rounds per row (default {rounds}; quick {quick_rounds})"
    )
    return p.parse_args(argv)


def save_rows(name: str, args: argparse.Namespace, argv, config: dict, rows: list[dict], t0: float, markdown) -> int:
    """Write a row-timing benchmark's result (see :func:`row_timing_args`): ``{benchmark, command, machine, quick,
    config (with one thread), rows, total_seconds}`` to ``--out`` or ``results/<name>[_quick].json``, regenerate
    ``RESULTS.md``, print the rows' table; returns the exit status 0."""
    out = Path(args.out) if args.out else result_path(RESULTS, name, args.quick)
    payload = {
        "benchmark": name,
        "command": command_line(f"benchmarks/{name}.py", argv),
        "machine": machine(),
        "quick": args.quick,
        "config": {**config, "threads": 1},
        "rows": rows,
        "total_seconds": time.perf_counter() - t0,
    }
    write_result(out, payload)
    print("\n" + markdown(rows))
    return 0


def parse_options(spec: str) -> dict:
    """Keyword options written ``KEY=VALUE,...`` (``"anneal=0.5,num_particles=4,estimator=iw"``): ints and floats
    where the value parses as one, strings otherwise; an empty spec gives ``{}``."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def result_path(out_dir: str | os.PathLike, name: str, quick: bool) -> Path:
    """``out_dir/<name>.json``, or ``<name>_quick.json`` for a ``--quick`` run (so a smoke test never overwrites a
    full run's results)."""
    return Path(out_dir) / f"{name}{'_quick' if quick else ''}.json"


def write_result(path: Path, payload: dict) -> Path:
    """Write ``payload`` as JSON and regenerate ``RESULTS.md`` beside the results folder."""
    from .report import write_report

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float))
    write_report(path.parent)
    return path


# --------------------------------------------------------------------------------------------- timing
def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int, rounds: int) -> dict[str, dict]:
    """Time every ``steps[name]()`` interleaved: ``warmup`` untimed calls each, then ``rounds`` rounds of one
    timed call each in rotating order, so load from other processes falls on all of them alike.

    :returns: per name ``{"ms_median", "ms_q1", "ms_q3", "rounds_ms"}`` (wall milliseconds, ``time.perf_counter``).
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    ms: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            ms[name].append(1e3 * (time.perf_counter() - t0))
    out = {}
    for name, values in ms.items():
        q1, q3 = _quartiles(values)
        out[name] = {"ms_median": statistics.median(values), "ms_q1": q1, "ms_q3": q3, "rounds_ms": values}
    return out


def paired_ratio(peer: dict, this: dict) -> float:
    """Median over rounds of ``peer_ms / this_ms`` (> 1: ``this`` is faster than the peer)."""
    return statistics.median(a / b for a, b in zip(peer["rounds_ms"], this["rounds_ms"]))


# --------------------------------------------------------------------------------------------- memory
def proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    """Make glibc hand freed memory back to the kernel, so RSS tracks live allocations: a fixed mmap threshold
    (no dynamic growth), a small trim threshold, then ``malloc_trim(0)``. A no-op without glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _child_peak_mib(work: Callable[[], object]) -> float:
    # A first, unmeasured run faults in the code and data pages the work touches (a forked child does not inherit
    # the parent's page-table entries of file-backed mappings, so they would count as new memory).
    work()
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base_kib = proc_status_kib("VmRSS")
    except OSError:
        base_kib = None
    if base_kib is None:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        work()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024.0
    work()
    return (proc_status_kib("VmHWM") - base_kib) / 1024.0


def peak_rss_mib(work: Callable[[], object], timeout: float = 300.0) -> float | None:
    """Peak resident memory (MiB) that ``work()`` adds, measured in a forked child (see :data:`MEMORY_METHOD`);
    ``None`` where ``os.fork`` is missing or the child fails."""
    if not hasattr(os, "fork"):
        return None
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, leave without running the parent's cleanup
        code = 0
        try:
            os.close(read_fd)
            os.write(write_fd, json.dumps(_child_peak_mib(work)).encode())
        except BaseException:  # noqa: BLE001  (any failure: report nothing)
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return None
        time.sleep(0.01)
    with os.fdopen(read_fd) as f:
        text = f.read()
    return json.loads(text) if text and os.waitstatus_to_exitcode(status) == 0 else None


# --------------------------------------------------------------------------------------------- scaling
def normflows_glow(shape: tuple[int, int, int], levels: int, depth: int, hidden: int, glow_base: bool = False):
    """normflows' multi-scale Glow: per level ``depth`` ``GlowBlock``s (LU 1x1 conv, affine coupling) and a
    squeeze, levels merged coarsest first; fixed standard-normal bases, or normflows' learned ``GlowBase``."""
    import normflows as nf

    c, h, w = shape
    bases, flows, merges = [], [], []
    with warnings.catch_warnings():  # normflows' LU init calls the deprecated torch.lu
        warnings.simplefilter("ignore")
        for i in range(levels):
            channels = c * 2 ** (levels + 1 - i)
            blocks = [
                nf.flows.GlowBlock(channels, hidden, scale=True, split_mode="channel", use_lu=True)
                for _ in range(depth)
            ]
            flows.append([*blocks, nf.flows.Squeeze()])
            if i > 0:
                merges.append(nf.flows.Merge())
                latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
            else:
                latent = (c * 2 ** (levels + 1), h // 2**levels, w // 2**levels)
            base = nf.distributions.GlowBase(latent) if glow_base else None
            bases.append(base or nf.distributions.DiagGaussian(latent, trainable=False))
    return nf.MultiscaleFlow(bases, flows, merges, class_cond=False)


def fit_exponent(sizes: list[float], ms: list[float]) -> float | None:
    """Least-squares slope of ``log ms`` against ``log size`` (``None`` with fewer than two sizes)."""
    pts = [(math.log(s), math.log(t)) for s, t in zip(sizes, ms) if t and t > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None
