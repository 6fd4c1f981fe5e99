"""Continuously indexed flows against their base flow: the same steps, matched parameter counts.

2-D densities whose support a bijection of a Gaussian cannot match (concentric rings, eight separated Gaussians, a
checkerboard): a CIF built on RealNVP couplings (:func:`pyroflows.cif`) and a plain RealNVP with twice the couplings,
its width chosen so the two parameter counts agree within a few per cent, each trained by :func:`pyroflows.train.fit`
for the same number of steps. Reported: test NLL (nats; CIF by importance weighting with K = 256, RealNVP exact)
against the toy's true entropy (the best possible NLL), the mass each model puts where the data have almost none
(the fraction of 20,000 model samples in the region holding 0.1 % of the true mass), and a figure with the densities
side by side. Then the 8x8 digits: ``cif-realnvp`` against ``realnvp``, one scale each, test bits/dim.

::

    python benchmarks/cif.py --out benchmarks/results/cif.json --figure docs/images/cif_toys.png
    python benchmarks/cif.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402
from pyroflows import CIFDensity, FlowDensity, cif, realnvp  # noqa: E402
from pyroflows.data import get_toy, load_digits  # noqa: E402
from pyroflows.train import evaluate, fit  # noqa: E402

TOYS = ("rings", "eight_gaussians", "checkerboard")


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _matched_base(target: int, build, widths) -> tuple[object, int]:
    """The width among ``widths`` whose model's parameter count is nearest ``target``."""
    best = min(widths, key=lambda w: abs(_count(build(w)) - target))
    return best, _count(build(best))


def _low_density_mass(toy, samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of ``samples`` where the true density is below the level that leaves 0.1 % of the mass under it."""
    threshold = torch.quantile(toy.log_prob(reference.double()), 0.001)
    return float((toy.log_prob(samples.double()) < threshold).float().mean())


def _train(model, data, test, steps, seed):
    torch.manual_seed(seed)
    start = time.perf_counter()
    fit(model, data, test, num_steps=steps, batch_size=256, lr=3e-3, device="cpu", progress=False, report=False)
    return time.perf_counter() - start


def toys(steps: int, seed: int, figure: Path | None) -> list[dict]:
    rows, panels = [], []
    for name in TOYS:
        toy = get_toy(name)
        data = toy.sample(20000, torch.Generator().manual_seed(seed))
        test = toy.sample(5000, torch.Generator().manual_seed(seed + 1))
        reference = toy.sample(200000, torch.Generator().manual_seed(seed + 2))
        entropy, _ = toy.entropy(n=200000, generator=torch.Generator().manual_seed(seed + 3))
        torch.manual_seed(seed)
        c = CIFDensity(cif(2, num_layers=5, hidden=(64,), cif_hidden=(24,)), (2,), num_samples=32)
        width, n_base = _matched_base(_count(c), lambda w: realnvp(2, num_layers=10, hidden=(w,)), range(16, 257, 2))
        torch.manual_seed(seed)
        b = FlowDensity(realnvp(2, num_layers=10, hidden=(width,)), (2,))
        seconds = {"cif": _train(c, data, test, steps, seed), "realnvp": _train(b, data, test, steps, seed)}
        c.eval()
        b.eval()
        with torch.no_grad():
            torch.manual_seed(seed)
            nll = {"cif": -float(c.log_prob(test, num_samples=256).mean()), "realnvp": evaluate(b, test)}
            samples = {"cif": c.sample(20000), "realnvp": b.sample(20000)}
        row = {
            "toy": name,
            "steps": steps,
            "entropy": entropy,
            "params": {"cif": _count(c), "realnvp": n_base},
            "realnvp_width": width,
            "test_nll": nll,
            "low_density_mass": {k: _low_density_mass(toy, s, reference) for k, s in samples.items()},
            "seconds": seconds,
        }
        rows.append(row)
        off = row["low_density_mass"]
        print(
            f"{name:16s} entropy {entropy:.3f} | NLL cif {nll['cif']:.3f} realnvp {nll['realnvp']:.3f} | "
            f"mass off-support cif {off['cif']:.4f} realnvp {off['realnvp']:.4f}"
            f" | params {row['params']['cif']} / {n_base} | {seconds['cif']:.0f}s / {seconds['realnvp']:.0f}s",
            flush=True,
        )
        panels.append((name, toy, c, b))
    if figure is not None:
        _figure(panels, figure)
    return rows


@torch.no_grad()
def _figure(panels, path: Path, grid: int = 150) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 3, figsize=(9, 3 * len(panels)))
    for row, (name, toy, c, b) in enumerate(panels):
        (x0, x1), (y0, y1) = toy.bounds
        xs, ys = torch.linspace(x0, x1, grid), torch.linspace(y0, y1, grid)
        pts = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
        torch.manual_seed(0)
        maps = {
            "truth": toy.log_prob(pts.double()).float(),
            "RealNVP": b.log_prob(pts),
            "CIF-RealNVP (K=64)": torch.cat([c.log_prob(p, num_samples=64) for p in pts.split(2500)]),
        }
        for col, (title, lp) in enumerate(maps.items()):
            ax = axes[row, col]
            ax.imshow(lp.exp().reshape(grid, grid), origin="lower", extent=(x0, x1, y0, y1), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {title}" if col == 0 else title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def digits(steps: int, seed: int) -> dict:
    train, test = load_digits("train"), load_digits("test")
    torch.manual_seed(seed)
    c = CIFDensity(cif((1, 8, 8), num_layers=3, hidden=32, cif_hidden=16), (1, 8, 8), num_samples=32)
    width, n_base = _matched_base(
        _count(c), lambda w: realnvp((1, 8, 8), num_layers=5, hidden=w, levels=1), range(8, 129, 2)
    )
    torch.manual_seed(seed)
    b = FlowDensity(realnvp((1, 8, 8), num_layers=5, hidden=width, levels=1), (1, 8, 8))
    seconds = {"cif": _train(c, train, test, steps, seed), "realnvp": _train(b, train, test, steps, seed)}
    c.eval()
    c.num_samples = 128
    torch.manual_seed(seed)
    bpd = {"cif": evaluate(c, test, seed=seed), "realnvp": evaluate(b, test, seed=seed)}
    row = {
        "steps": steps,
        "params": {"cif": _count(c), "realnvp": n_base},
        "realnvp_width": width,
        "test_bpd": bpd,
        "seconds": seconds,
    }
    print(
        f"digits 8x8: test bits/dim cif {bpd['cif']:.3f} (K=128) realnvp {bpd['realnvp']:.3f} | params "
        f"{row['params']['cif']} / {n_base} | {seconds['cif']:.0f}s / {seconds['realnvp']:.0f}s",
        flush=True,
    )
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: checks that it runs")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per 2-D model")
    parser.add_argument("--digit-steps", type=int, default=1500, help="training steps per digits model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figure", type=Path, help="PNG of the 2-D densities side by side")
    args = parser.parse_args(argv)
    steps, digit_steps = (20, 10) if args.quick else (args.steps, args.digit_steps)
    result = {
        "toys": toys(steps, args.seed, args.figure),
        "digits": digits(digit_steps, args.seed),
        "machine": _common.machine(),
        "quick": args.quick,
        "command": _common.command_line("benchmarks/cif.py", argv),
    }
    if args.out:
        _common.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
