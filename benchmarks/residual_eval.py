"""Test bits/dim of a residual image model on 1000 28x28 images: wall time, standard error and peak memory of the
evaluation settings, against the former default (20 exact terms) in the same command.

A residual flow's log-det in eval mode above 64 dimensions is the unbiased estimator (Hutchinson probe, Russian
roulette over the power series after ``eval_n_exact_terms`` exact terms); each term costs one vector-Jacobian
product through the block. The figure is therefore an estimate, and :func:`pyroflows.train.evaluate_with_error`
reports it with its standard error (``repeats`` independent evaluations of every image; the batches' totals are the
independent units, since a batch shares one roulette length).

The model is the command line's default residual flow for 28x28 on a CPU (``build_density("residual", (1, 28,
28))``: 2 levels, 2 blocks, 32 channels), trained here for ``--train-steps`` steps on scikit-learn's digits
upsampled to 28x28 (bilinear, 8-bit): an MNIST stand-in, since nothing is downloaded. A trained branch has a
Jacobian that an untrained one lacks, and with it the estimator's variance. The 1000 evaluated images are the
first 1000 of the upsampled digits' ``"all"`` split (training images included: the figure is for timing and error
bars, not a test result).

Usage::

    python benchmarks/residual_eval.py            # 150 training steps, 1000 images
    python benchmarks/residual_eval.py --quick    # 3 training steps, 50 images
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402

OLD_TERMS = 20  # eval_n_exact_terms before 0.2


def upsampled_digits(split: str, size: int = 28):
    """scikit-learn's digits as 8-bit ``size`` x ``size`` images (bilinear), an offline MNIST stand-in."""
    import torch.nn.functional as F

    from pyroflows.data import ImageDataset, load_digits

    d = load_digits(split)
    x = d.images.float() / (d.n_bins - 1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return ImageDataset((x * 255).round().to(torch.uint8), n_bins=256, labels=d.labels)


def _set_terms(model, terms: int) -> None:
    from pyroflows.transforms import ResidualBlock

    for m in model.modules():
        if isinstance(m, ResidualBlock):
            m.eval_n_exact_terms = terms


def _row(model, images, terms: int, repeats: int, batch_size: int, memory: bool) -> dict:
    from pyroflows.train import evaluate, evaluate_with_error

    _set_terms(model, terms)
    t0 = time.perf_counter()
    if repeats == 1:
        bpd, se = evaluate(model, images, batch_size=batch_size), None
    else:
        bpd, se = evaluate_with_error(model, images, batch_size=batch_size, repeats=repeats)
    seconds = time.perf_counter() - t0

    def work():  # one batch: what the batch size bounds; one thread (a forked child's thread pool can hang)
        torch.set_num_threads(1)
        _set_terms(model, terms)
        evaluate(model, images[:batch_size], batch_size=batch_size)

    peak = _common.peak_rss_mib(work, timeout=300.0) if memory else None
    return {"eval_n_exact_terms": terms, "repeats": repeats, "batch_size": batch_size, "bpd": bpd, "se": se,
            "seconds": seconds, "peak_mib": peak}  # fmt: skip


def run(args) -> dict:
    from pyroflows.train import build_density, evaluate, fit
    from pyroflows.transforms import ResidualBlock

    torch.manual_seed(0)
    model = build_density("residual", (1, args.size, args.size))
    default_terms = next(m for m in model.modules() if isinstance(m, ResidualBlock)).eval_n_exact_terms
    t0 = time.perf_counter()
    fit(model, upsampled_digits("train", args.size), num_steps=args.train_steps, batch_size=64, lr=1e-3,
        warmup_steps=min(50, args.train_steps // 4), device="cpu", progress=False, report=False, seed=0)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    images = upsampled_digits("all", args.size).images[: args.images]
    # the first evaluation after training converges every layer's eval-mode power iteration (once per weights):
    # timed apart, so the rows compare the estimator settings alone
    t0 = time.perf_counter()
    evaluate(model, images[:2])
    convergence_seconds = time.perf_counter() - t0
    old = args.compare_terms
    medium, small = max(1, args.batch_size // 5), max(1, args.batch_size // 20)
    settings = [(old, 1, args.batch_size)]
    # the default number of terms at three batch sizes, then twice and half as many terms at the smaller ones
    settings += [(default_terms, 2, batch) for batch in (args.batch_size, medium, small)]
    settings += [
        (terms, 2, batch) for terms in (2 * default_terms, max(1, default_terms // 2)) for batch in (medium, small)
    ]
    settings = list(dict.fromkeys(settings))  # (a default of 1 has no half)
    rows = []
    for terms, repeats, batch in settings:
        row = _row(model, images, terms, repeats, batch, memory=not args.quick and repeats > 1)
        rows.append(row)
        se = "" if row["se"] is None else f" ± {row['se']:.4f}"
        print(f"terms {terms:>2} repeats {repeats} batch {batch:>4}: {row['bpd']:.4f}{se} bits/dim in "
              f"{row['seconds']:.1f} s (peak {row['peak_mib']} MiB)", flush=True)  # fmt: skip
    base = rows[0]["seconds"]
    for r in rows:
        r["speed_ratio"] = base / r["seconds"]
    return {"benchmark": "residual_eval", "images": len(images), "size": args.size, "train_steps": args.train_steps,
            "train_seconds": train_seconds, "convergence_seconds": convergence_seconds,
            "default_terms": default_terms, "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip


def markdown(d: dict) -> str:
    cols = ["eval_n_exact_terms", "repeats", "batch", "bits/dim", "standard error", "seconds", "speed ratio",
            "peak MiB (one batch)"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in d["rows"]:
        se = "–" if r["se"] is None else f"{r['se']:.4f}"
        peak = "–" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        default = " (default)" if r["eval_n_exact_terms"] == d["default_terms"] else ""
        lines.append(
            f"| {r['eval_n_exact_terms']}{default} | {r['repeats']} | {r['batch_size']} | {r['bpd']:.4f} | {se} | "
            f"{r['seconds']:.1f} | {r['speed_ratio']:.2f} | {peak} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 training steps, 50 images")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default 150; quick 3)")
    p.add_argument("--images", type=int, default=None, help="images to evaluate (default 1000; quick 50)")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")
    p.add_argument("--size", type=int, default=28, help="image side (default 28)")
    help_terms = f"eval_n_exact_terms of the baseline rows (default {OLD_TERMS}, the former default)"
    p.add_argument("--compare-terms", type=int, default=OLD_TERMS, help=help_terms)
    p.add_argument("--out", default=None, help="the JSON to write (default results/residual_eval.json)")
    args = p.parse_args(argv)
    args.train_steps = args.train_steps or (3 if args.quick else 150)
    args.images = args.images or (50 if args.quick else 1000)
    return args


def main(argv=None) -> int:
    """Run the residual-evaluation benchmark from the command line."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    payload = run(args)
    payload.update(command=_common.command_line("benchmarks/residual_eval.py", argv), machine=_common.machine(),
                   quick=args.quick, total_seconds=time.perf_counter() - t0)  # fmt: skip
    out = Path(args.out) if args.out else _common.result_path(_common.RESULTS, "residual_eval", args.quick)
    _common.write_result(out, payload)
    print("\n" + markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
