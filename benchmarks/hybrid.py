"""Hybrid models on the 8x8 digits: Glow, RealNVP and Residual-Flow hybrids at lam = 0, 1/D and 1, next to a plain
(non-invertible) convolutional classifier of similar size, all at the same budget.

Each hybrid is ``build_density(flow, (1, 8, 8), hybrid={"num_classes": 10, "lam": lam})`` with the architecture
``pyroflows fit`` picks for 8x8 images on a CPU and a linear head on the flattened latent, trained by
:func:`pyroflows.train.fit` on lam * log p(x) + log p(y|x) (same steps, batch, learning rate and seed for all).
The classifier sees the same dequantised inputs. Reported: test accuracy, test bits/dim (exact for Glow and
RealNVP, the residual flow's evaluation estimator), test class NLL, parameters and training seconds.

::

    python benchmarks/hybrid.py --out benchmarks/results/hybrid.json
    python benchmarks/hybrid.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402
from pyroflows.data import dequantize, load_digits  # noqa: E402
from pyroflows.train import build_density, default_options, evaluate_hybrid, fit  # noqa: E402

FLOWS = ("glow", "realnvp", "residual")
LAMS = {"0": 0.0, "1/D": None, "1": 1.0}  # None: one over the data's dimension


def classifier(channels: int = 1, classes: int = 10) -> nn.Module:
    """A plain CNN for 8x8 images: 71k parameters, between the sizes of the hybrids (11k to 84k)."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, classes),
    )


def train_classifier(train, test, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """The plain classifier on the same dequantised inputs, the same batches per epoch and the same optimiser."""
    torch.manual_seed(seed)
    net = classifier()
    optim = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(train)
    t0 = time.perf_counter()
    order = torch.randperm(n, generator=g)
    at = 0
    for _ in range(steps):
        if at + batch_size > n:
            order, at = torch.randperm(n, generator=g), 0
        index = order[at : at + batch_size]
        at += batch_size
        x = dequantize(train.images[index].float(), train.n_bins, g)
        loss = nn.functional.cross_entropy(net(x), train.labels[index])
        optim.zero_grad()
        loss.backward()
        optim.step()
    seconds = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        x = dequantize(test.images.float(), test.n_bins, torch.Generator().manual_seed(seed))
        log_p = torch.log_softmax(net(x), -1)
    return {
        "model": "CNN classifier",
        "lam": "-",
        "accuracy": float((log_p.argmax(-1) == test.labels).double().mean()),
        "test_bpd": None,
        "class_nll": float(-log_p.gather(-1, test.labels[:, None]).mean()),
        "params": sum(p.numel() for p in net.parameters()),
        "seconds": seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: checks that it runs")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flows", default=",".join(FLOWS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    steps = 5 if args.quick else args.steps
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, test = load_digits("train"), load_digits("test")
    dim = train.shape[0] * train.shape[1] * train.shape[2]
    rows = []
    for flow in args.flows.split(","):
        options = default_options(flow, train.shape, "cpu")
        for name, lam in LAMS.items():
            lam = 1.0 / dim if lam is None else lam
            torch.manual_seed(args.seed)
            model = build_density(flow, train.shape, hybrid={"num_classes": 10, "lam": lam}, **options)
            result = fit(
                model,
                train,
                num_steps=steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                device="cpu",
                progress=False,
                report=False,
            )
            figures = evaluate_hybrid(model, test, seed=args.seed)
            row = {
                "model": flow,
                "lam": name,
                "accuracy": figures["accuracy"],
                "test_bpd": figures["bpd"],
                "class_nll": figures["class_nll"],
                "params": sum(p.numel() for p in model.parameters()),
                "seconds": result.seconds,
            }
            rows.append(row)
            print(
                f"{flow:9s} lam {name:4s}: accuracy {row['accuracy']:.4f}, {row['test_bpd']:.3f} bits/dim, "
                f"class NLL {row['class_nll']:.3f}, {row['params']:,} parameters, {row['seconds']:.0f} s",
                flush=True,
            )
    row = train_classifier(train, test, steps, args.batch_size, args.lr, args.seed)
    rows.append(row)
    print(f"CNN classifier: accuracy {row['accuracy']:.4f}, {row['params']:,} parameters, {row['seconds']:.0f} s")
    result = {
        "rows": rows,
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "machine": _common.machine(),
        "quick": args.quick,
        "command": _common.command_line("benchmarks/hybrid.py", argv),
    }
    if args.out:
        _common.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
