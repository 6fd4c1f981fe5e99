"""Out-of-distribution detection on the digits with a Glow trained on the classes 0-4 only.

Scores (higher = more out of distribution, :mod:`pyroflows.ood`): the negative log-likelihood in bits/dim and the
typicality statistic |NLL - H| per input, H the mean NLL of half of the test images of classes 0-4 (held out from
the scoring). In-distribution: the other half. Out-of-distribution sets: (a) the test images of the held-out
classes 5-9, (b) uniform noise images, (c) inverted digits (16 - x) and digits rotated by 90 degrees, (d) constant
images (every pixel at one level, a low-variance set whose likelihood is known to fool flows on natural images).
Reported: AUROC of each score on each set, and a ROC figure.

The hybrid rule: a Glow of the same size trained as a :class:`pyroflows.HybridDensity` (lam = 1/D) on the digits
0-4 with their labels; tau is the 5 % quantile of the log-likelihoods of the held-out half
(:func:`pyroflows.ood.likelihood_threshold`), and :func:`pyroflows.ood.open_set_predict` answers a class or
"unknown". Reported per set: the share called unknown, the AUROC of the hybrid's own NLL and of the classifier's
maximum-softmax score (the usual non-generative baseline); for the in-distribution half, the open-set accuracy
(right class and not refused) against the closed-set accuracy.

::

    python benchmarks/ood.py --out benchmarks/results/ood.json --figure docs/images/ood_roc.png
    python benchmarks/ood.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402
from pyroflows.data import ImageDataset, load_digits  # noqa: E402
from pyroflows.ood import (  # noqa: E402
    hybrid_scores,
    likelihood_threshold,
    nll_scores,
    open_set_predict,
    roc_auc,
    typicality_scores,
)
from pyroflows.train import build_density, fit  # noqa: E402


def _subset(data: ImageDataset, keep: torch.Tensor) -> ImageDataset:
    return ImageDataset(data.images[keep], data.n_bins, data.labels[keep])


def outlier_sets(test: ImageDataset, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The out-of-distribution image sets (integer pixels in [0, n_bins))."""
    n_bins = test.n_bins
    low = test.labels < 5
    inliers, held_out = test.images[low], test.images[~low]
    n = len(inliers)
    return {
        "held-out classes 5-9": held_out,
        "uniform noise": torch.randint(0, n_bins, inliers.shape, generator=generator, dtype=inliers.dtype),
        "inverted digits": (n_bins - 1) - inliers,
        "rotated digits": torch.rot90(inliers, 1, dims=(-2, -1)),
        "constant images": torch.randint(0, n_bins, (n, 1, 1, 1), generator=generator).expand(inliers.shape).clone(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: checks that it runs")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figure", type=Path, help="ROC curves of both scores on every set (PNG)")
    args = parser.parse_args(argv)
    steps = 10 if args.quick else args.steps
    train, test = load_digits("train"), load_digits("test")
    train = _subset(train, train.labels < 5)
    inliers = test.images[test.labels < 5]
    torch.manual_seed(args.seed)
    model = build_density("glow", train.shape, levels=2, num_layers=4, hidden=64)
    fit(model, train, num_steps=steps, batch_size=64, lr=2e-3, device="cpu", progress=False, report=False)
    # H from held-out in-distribution images (half of the test digits 0-4): the training images' mean NLL is
    # biased low once the model fits them better than new ones; the other half is the in-distribution set
    half = len(inliers) // 2
    entropy = float(nll_scores(model, inliers[:half], n_bins=test.n_bins, seed=args.seed).mean())
    train_nll = float(nll_scores(model, train, seed=args.seed).mean())
    nll_in = nll_scores(model, inliers[half:], n_bins=test.n_bins, seed=args.seed + 1)
    # the hybrid: the same Glow with a linear head on its latent, lam = 1/D, trained on the labels 0-4
    torch.manual_seed(args.seed)
    hybrid = build_density(
        "glow", train.shape, levels=2, num_layers=4, hidden=64, hybrid={"num_classes": 5, "lam": 1 / 64}
    )
    fit(hybrid, train, num_steps=steps, batch_size=64, lr=2e-3, device="cpu", progress=False, report=False)
    tau = likelihood_threshold(hybrid, inliers[:half], quantile=0.05, n_bins=test.n_bins, seed=args.seed)
    labels_in = test.labels[test.labels < 5][half:]
    hyb_nll_in, log_py_in = hybrid_scores(hybrid, inliers[half:], test.n_bins, seed=args.seed + 1)
    pred_in = open_set_predict(hybrid, inliers[half:], tau, n_bins=test.n_bins, seed=args.seed + 1)
    msp_in = -log_py_in.max(-1).values  # maximum-softmax score: higher = less confident = more suspicious
    hybrid_in = {
        "closed_set_accuracy": float((log_py_in.argmax(-1) == labels_in).double().mean()),
        "open_set_accuracy": float((pred_in == labels_in).double().mean()),
        "rejected": float((pred_in == 5).double().mean()),
        "tau_bpd": tau,
    }
    rows, curves = [], {}
    for name, images in outlier_sets(test, torch.Generator().manual_seed(args.seed)).items():
        nll_out = nll_scores(model, images, n_bins=test.n_bins, seed=args.seed + 2)
        typ_in, typ_out = typicality_scores(nll_in, entropy), typicality_scores(nll_out, entropy)
        hyb_nll_out, log_py_out = hybrid_scores(hybrid, images, test.n_bins, seed=args.seed + 2)
        pred_out = open_set_predict(hybrid, images, tau, n_bins=test.n_bins, seed=args.seed + 2)
        row = {
            "set": name,
            "n": len(images),
            "mean_bpd": float(nll_out.mean()),
            "auroc_nll": roc_auc(nll_in, nll_out),
            "auroc_typicality": roc_auc(typ_in, typ_out),
            "auroc_hybrid_nll": roc_auc(hyb_nll_in, hyb_nll_out),
            "auroc_max_softmax": roc_auc(msp_in, -log_py_out.max(-1).values),
            "rejected_hybrid": float((pred_out == 5).double().mean()),
        }
        rows.append(row)
        curves[f"{name}: NLL"] = (nll_in, nll_out)
        curves[f"{name}: typicality"] = (typ_in, typ_out)
        if name.startswith("held-out"):  # the hard set: the hybrid's likelihood and the classifier-only baseline
            curves[f"{name}: hybrid NLL"] = (hyb_nll_in, hyb_nll_out)
            curves[f"{name}: max-softmax"] = (msp_in, -log_py_out.max(-1).values)
        print(
            f"{name:22s} mean {row['mean_bpd']:.2f} bits/dim | AUROC NLL {row['auroc_nll']:.3f}, "
            f"typicality {row['auroc_typicality']:.3f}, hybrid NLL {row['auroc_hybrid_nll']:.3f}, max-softmax "
            f"{row['auroc_max_softmax']:.3f} | hybrid rule refuses {row['rejected_hybrid']:.3f}",
            flush=True,
        )
    print(
        f"hybrid on the in-distribution half: closed-set accuracy {hybrid_in['closed_set_accuracy']:.4f}, open-set "
        f"{hybrid_in['open_set_accuracy']:.4f}, refused {hybrid_in['rejected']:.3f} (tau {tau:.2f} bits/dim)"
    )
    print(
        f"in-distribution mean {float(nll_in.mean()):.2f} bits/dim; entropy estimate (held out) {entropy:.2f}; "
        f"training images {train_nll:.2f}"
    )
    if args.figure is not None:
        from pyroflows.plots import plot_roc

        args.figure.parent.mkdir(parents=True, exist_ok=True)
        plot_roc(curves, args.figure, title="digits 0-4 (Glow) against each set")
    result = {
        "rows": rows,
        "steps": steps,
        "in_mean_bpd": float(nll_in.mean()),
        "entropy_bpd": entropy,
        "train_bpd": train_nll,
        "hybrid_in": hybrid_in,
        "machine": _common.machine(),
        "quick": args.quick,
        "command": _common.command_line("benchmarks/ood.py", argv),
    }
    if args.out:
        _common.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
