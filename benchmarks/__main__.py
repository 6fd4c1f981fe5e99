"""``python -m benchmarks {all,vi,guides,svi,image,residual,scaling,sampling,applications} [--quick] [--out DIR]``
(``guides`` is ``vi`` without the energies: the guide comparisons)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from . import PARTS, _common
from .report import write_report

#: part -> its scripts, each (module, results name)
SCRIPTS = {
    "vi": [("vi_energies", "vi_energies"), ("vi_guides", "vi_guides"), ("vi_heldout", "vi_heldout")],
    "guides": [("vi_guides", "vi_guides"), ("vi_heldout", "vi_heldout")],  # the guide comparisons (part of "vi")
    "svi": [
        ("svi_step", "svi_step"),
        ("stl_cost", "stl_cost"),
        ("optimizer_step", "optimizer_step"),
        ("mixture_step", "mixture_step"),
    ],
    "image": [("image_flows", "image_flows")],
    "residual": [("residual", "residual"), ("residual_eval", "residual_eval")],
    "scaling": [("scaling", "scaling")],
    "sampling": [("sampling", "sampling")],
    "applications": [("hybrid", "hybrid"), ("ood", "ood")],
}


def _argv(part: str, name: str, quick: bool, out: Path) -> list[str] | None:
    """The standalone script's arguments for this part's script writing ``name`` (``None``: skip it)."""
    quick_flag = ["--quick"] if quick else []
    if part in ("scaling", "sampling"):
        return [*quick_flag, "--out", str(out)]
    argv = [*quick_flag, "--out", str(_common.result_path(out, name, quick))]
    if name in ("vi_guides", "vi_heldout"):
        argv += ["--workers", str(max(1, (os.cpu_count() or 2)))]
    if not _common.have_normflows():
        if name == "residual":
            return None  # every row of it is a comparison with normflows
        if part == "image":
            argv += ["--models", "glow/pyroflows,realnvp/pyroflows"]
    return argv


def _stamp(path: Path, module: str, argv: list[str], suite_command: str) -> None:
    """Add the machine, quick/full and the reproducing command to a results file written by an earlier script."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    command = "python " + shlex.join([f"benchmarks/{module}.py", *argv])
    data.update(machine=_common.machine(), quick="--quick" in argv, command=command, suite_command=suite_command)
    for key in ("a", "b", "c"):  # residual.py keeps one record per part
        if isinstance(data.get(key), dict) and "command" in data[key]:
            data[key]["command"] = command
    path.write_text(json.dumps(data, indent=1, default=str))


def run_part(part: str, quick: bool, out: Path, suite_command: str) -> tuple[str, float]:
    """Run one part through its scripts' ``main``; returns ``(status, seconds)`` (the first status that is not
    ``ok``, if any)."""
    t0 = time.perf_counter()
    statuses = []
    for module_name, name in SCRIPTS[part]:
        argv = _argv(part, name, quick, out)
        if argv is None:
            print(f"== {part}: skipped (normflows is not installed: pip install normflows)", flush=True)
            statuses.append("skipped: normflows missing")
            continue
        module = importlib.import_module(f"benchmarks.{module_name}")
        print(f"== {part}: python benchmarks/{module_name}.py {shlex.join(argv)}", flush=True)
        try:
            code = module.main(argv) or 0
            statuses.append("ok" if code == 0 else f"exit {code}")
        except Exception:  # noqa: BLE001  (one failing part must not stop the others)
            traceback.print_exc()
            statuses.append("failed")
        if part not in ("scaling", "sampling"):
            _stamp(_common.result_path(out, name, quick), module_name, argv, suite_command)
            write_report(out)
    return next((s for s in statuses if s != "ok"), "ok"), time.perf_counter() - t0


def main(argv=None) -> int:
    """Run the requested parts in sequence and print a summary of their status and wall time."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("part", choices=("all", *SCRIPTS), help="which part to run; all runs each in sequence")
    p.add_argument("--quick", action="store_true", help="smoke-test settings for every part (minutes on a CPU)")
    p.add_argument("--out", default=str(_common.RESULTS), help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    suite_command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out)
    parts = PARTS if args.part == "all" else (args.part,)
    t0 = time.perf_counter()
    summary = {part: run_part(part, args.quick, out, suite_command) for part in parts}
    total = time.perf_counter() - t0
    print("\n== summary")
    for part, (status, seconds) in summary.items():
        print(f"  {part:<9} {status:<28} {seconds:6.0f} s")
    print(f"  total {total:.0f} s wall; results in {out}, report in {out.parent / 'RESULTS.md'}")
    return 0 if all(s in ("ok",) or s.startswith("skipped") for s, _ in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
