"""Glow through ``pyroflows.train.fit`` on CPU and on a GPU, in one command: training images/s and test bits/dim.

Two data sets: scikit-learn's 8x8 digits (17 levels, the embedded default) and synthetic 3x32x32 images with
256 levels (smooth random colour blobs, generated from a fixed seed: no download). For each (data set, device,
setting) the script runs ``fit`` for ``--steps`` steps and reads the per-step timings from ``metrics.jsonl``
(``float(loss)`` synchronises every step, so the wall-clock figures are real); images/s is
``batch_size * steps / seconds`` over the steps after the first ``--skip`` (warm-up: cuDNN autotuning,
allocator growth). Every figure is a ratio against CPU fp32 measured in the same command on the same machine.

Settings: ``fp32`` (the default: validation on), ``fp32-noval`` (``pyroflows.enable_validation(False)``:
no per-layer finiteness checks, so no device synchronisation per layer), ``compiled`` (``compile=True``,
validation off; opt-in with ``--extra compiled``), ``bf16`` (``amp=True``: conditioner
networks in bfloat16, log-dets in float32).

Usage::

    python benchmarks/gpu_density.py                       # CPU and CUDA (if present), both data sets
    python benchmarks/gpu_density.py --quick               # a few steps, for a smoke test
    python benchmarks/gpu_density.py --long-steps 3000     # also train Glow on digits for 3000 GPU steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyroflows  # noqa: E402
from pyroflows.data import ImageDataset, load_digits  # noqa: E402
from pyroflows.train import build_density, evaluate, fit  # noqa: E402


def synthetic_images(n: int, size: int = 32, seed: int = 0) -> ImageDataset:
    """``n`` RGB images of a few Gaussian colour blobs on a dark background, quantised to 0..255."""
    g = torch.Generator().manual_seed(seed)
    k = 4
    grid = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centres = torch.rand(n, k, 2, generator=g)
    widths = 0.05 + 0.15 * torch.rand(n, k, 1, 1, generator=g)
    colours = torch.rand(n, k, 3, generator=g)
    d2 = (xx - centres[..., 0, None, None]) ** 2 + (yy - centres[..., 1, None, None]) ** 2  # (n, k, H, W)
    blobs = torch.exp(-d2 / (2 * widths**2))
    img = torch.einsum("nkhw,nkc->nchw", blobs, colours).clamp(0, 1)
    img = img + 0.02 * torch.randn(img.shape, generator=g)
    return ImageDataset((img.clamp(0, 1) * 255).round().to(torch.uint8), n_bins=256)


DATASETS = {
    "digits": dict(
        data=lambda: (load_digits("train"), load_digits("test")),
        model=dict(levels=2, num_layers=4, hidden=64),
        batch=64,
    ),
    "synthetic32": dict(
        data=lambda: (synthetic_images(5000, seed=0), synthetic_images(500, seed=1)),
        model=dict(levels=3, num_layers=8, hidden=128),
        batch=64,
    ),
}


def timed_fit(name: str, device: str, setting: str, steps: int, skip: int, lr: float) -> dict:
    spec = DATASETS[name]
    train, test = spec["data"]()
    torch.manual_seed(0)
    model = build_density("glow", train.shape, **spec["model"])
    pyroflows.enable_validation(setting not in ("fp32-noval", "compiled"))
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            fit(
                model,
                train,
                None,
                num_steps=steps,
                batch_size=spec["batch"],
                lr=lr,
                warmup_steps=min(100, steps),
                device=device,
                amp=setting == "bf16",
                compile=setting == "compiled",
                out=out,
                log_every=1,
                progress=False,
                checkpoint_every=None,
                sample_every=None,
            )
            total = time.perf_counter() - start
            rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    finally:
        pyroflows.enable_validation(None)
    t = {r["step"]: r["seconds"] for r in rows if "seconds" in r}
    seconds = t[steps] - t[skip]
    bpd = evaluate(model, test, device=device)
    return {
        "data": name,
        "device": device,
        "setting": setting,
        "steps": steps,
        "batch": spec["batch"],
        "images_per_s": spec["batch"] * (steps - skip) / seconds,
        "ms_per_step": 1000 * seconds / (steps - skip),
        "test_bpd": bpd,
        "wall_s": total,
        "final_train_loss": rows[-1].get("loss"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="steps per timed GPU run")
    p.add_argument("--cpu-steps", type=int, default=40, help="steps per timed CPU run")
    p.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the timing")
    p.add_argument("--cpu-skip", type=int, default=10)
    p.add_argument("--long-steps", type=int, default=0, help="also: digits Glow for this many GPU steps, bpd")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        choices=["compiled"],
        help="more GPU settings: compiled "
        "(torch.compile, validation off; compile time is inside the skipped warm-up steps)",
    )
    p.add_argument("--out", default="benchmarks/results/gpu_density.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.cpu_steps, args.skip, args.cpu_skip = 30, 12, 10, 4
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    records = []
    for name in DATASETS:
        for device in devices:
            settings = ["fp32"] if device == "cpu" else ["fp32", "fp32-noval", "bf16"] + args.extra
            for setting in settings:
                steps, skip = (args.cpu_steps, args.cpu_skip) if device == "cpu" else (args.steps, args.skip)
                r = timed_fit(name, device, setting, steps, skip, lr=1e-3)
                records.append(r)
                print(json.dumps(r), flush=True)
    long_run = None
    if args.long_steps and torch.cuda.is_available():
        long_run = timed_fit("digits", "cuda", "fp32-noval", args.long_steps, args.skip, lr=2e-3)
        print(json.dumps(long_run), flush=True)

    lines = [
        "| data | device | setting | batch | ms/step | images/s | × CPU fp32 | test bpd after steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        base = next(b for b in records if b["data"] == r["data"] and b["device"] == "cpu")
        lines.append(
            f"| {r['data']} | {r['device']} | {r['setting']} | {r['batch']} | {r['ms_per_step']:.1f} | "
            f"{r['images_per_s']:.0f} | {r['images_per_s'] / base['images_per_s']:.1f} | "
            f"{r['test_bpd']:.3f} ({r['steps']}) |"
        )
    table = "\n".join(lines)
    print(table)
    if long_run:
        print(
            f"digits Glow, {long_run['steps']} steps on CUDA: test bpd {long_run['test_bpd']:.4f} "
            f"in {long_run['wall_s']:.0f} s ({long_run['images_per_s']:.0f} images/s)"
        )
    payload = {
        "command": "python benchmarks/gpu_density.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "records": records,
        "long_run": long_run,
        "table": table,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    return 0 if all(math.isfinite(r["test_bpd"]) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
