"""pyroflows demo: a Glow density model on the embedded digits, then flow guides for a 2-D posterior in Pyro.

Run with ``make demo`` (or ``python examples/demo.py``); under 2 minutes on a laptop CPU, nothing downloaded.

1. Density model: ``pyroflows.train.fit`` trains a small Glow on scikit-learn's 8x8 digits (17 intensity levels)
   by maximum likelihood, prints the test bits/dim and writes a sample grid to ``examples/out/digits/``
   (with a checkpoint that ``pyroflows sample`` / ``pyroflows eval`` accept).
2. Variational inference: RealNVP and planar-flow guides (``AutoNormalizingFlow``) on a banana-shaped posterior
   next to ``AutoNormal``, fitted by ``pyroflows.infer.fit`` and checked by PSIS k̂ (``pyroflows.diagnostics``).
   The model is normalised (log Z = 0), so KL(q || p) = -ELBO exactly; a picture of the
   fits goes to ``examples/out/demo_guide.png``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from functools import partial
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow

import pyroflows


def log_target(z: torch.Tensor) -> torch.Tensor:
    """Unnormalised log-density of a banana: z1 ~ N(0, 1.5²), z2 | z1 ~ N(z1²/2 - 1, 0.5²)."""
    z1, z2 = z[..., 0], z[..., 1]
    return -0.5 * (z1 / 1.5) ** 2 - 0.5 * ((z2 - 0.5 * z1**2 + 1.0) / 0.5) ** 2


def model():
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.5))
    pyro.sample("z2", dist.Normal(0.5 * z1**2 - 1.0, 0.5))


LOG_Z = -math.log(2 * math.pi * 1.5 * 0.5)  # normaliser of exp(log_target): the model itself is normalised


def fit(guide, steps: int, lr: float):
    """SVI with ``pyroflows.infer.fit``, then the ELBO and PSIS k̂ from 20,000 fresh draws."""
    pyro.clear_param_store()
    pyroflows.infer.fit(
        model, guide, steps, lr=lr, num_particles=32, lr_schedule="exponential", final_lr_factor=0.05, progress=False
    )
    return pyroflows.diagnostics.psis_khat(model, guide, num_samples=20000)


def density_demo(steps: int, out: Path) -> None:
    from pyroflows.data import load_digits
    from pyroflows.train import build_density
    from pyroflows.train import fit as fit_density

    train, test = load_digits("train"), load_digits("test")
    if (out / "checkpoint.pt").is_file():  # the demo's own scratch directory: start afresh on every run
        shutil.rmtree(out)
    print(f"1. Glow on digits: {len(train)} train / {len(test)} test images, 8x8, {train.n_bins} levels")
    torch.manual_seed(0)
    model = build_density("glow", train.shape, levels=2, num_layers=4, hidden=64)
    start = time.perf_counter()
    result = fit_density(
        model,
        train,
        test,
        num_steps=steps,
        batch_size=64,
        lr=2e-3,
        warmup_steps=50,
        device="cpu",
        out=out,
        n_samples=64,
        temperature=0.7,
        progress=False,
    )
    seconds = time.perf_counter() - start
    print(
        f"   {result.step} steps in {seconds:.0f} s: test bits/dim {result.evals[-1]['test_bpd']:.3f} "
        f"(uniform over 17 levels: {math.log2(17):.3f})"
    )
    print(f"   samples at temperature 0.7: {out / 'samples.png'}; checkpoint: {result.checkpoint}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--density-steps", type=int, default=600, help="Glow training steps")
    parser.add_argument("--steps", type=int, default=600, help="SVI steps per guide")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    density_demo(args.density_steps, args.out / "digits")
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    print()
    print("2. Flow guides in Pyro.")
    print("banana posterior: z1 ~ N(0, 1.5²), z2 | z1 ~ N(z1²/2 - 1, 0.5²); log Z = 0, so KL = -ELBO")
    guides = {
        "pyroflows.realnvp": lambda: AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=6)),
        "pyroflows.planar_flow": lambda: AutoNormalizingFlow(model, partial(pyroflows.planar_flow, num_layers=16)),
        "AutoNormal": lambda: AutoNormal(model),
    }
    fitted = {}
    print(f"{'guide':24s} {'ELBO':>9s} {'KL(q||p)':>9s} {'PSIS k':>7s} {'seconds':>8s}")
    for name, make in guides.items():
        pyro.set_rng_seed(0)
        guide = make()
        start = time.perf_counter()
        psis = fit(guide, args.steps, lr=1e-2)
        seconds = time.perf_counter() - start
        print(f"{name:24s} {psis.elbo:9.4f} {-psis.elbo:9.4f} {psis.khat:7.2f} {seconds:8.1f}")
        fitted[name] = guide
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no picture (pip install pyroflows[plots])")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(fitted) + 1, figsize=(4 * (len(fitted) + 1), 4), sharex=True, sharey=True)
    grid = torch.linspace(-5, 5, 200)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1)
    axes[0].contourf(grid, grid, (log_target(zz) + LOG_Z).exp(), levels=30)
    axes[0].set_title("target")
    for ax, (name, guide) in zip(axes[1:], fitted.items()):
        with torch.no_grad():
            z = _draw(guide, 5000)
        ax.hist2d(z[:, 0].numpy(), z[:, 1].numpy(), bins=80, range=[[-5, 5], [-5, 5]])
        ax.set_title(name)
    path = args.out / "demo_guide.png"
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"saved {path}")


def _draw(guide, n: int) -> torch.Tensor:
    with pyro.plate("draws", n, dim=-1):
        draw = guide()
    return torch.stack([draw["z1"], draw["z2"]], dim=-1)


if __name__ == "__main__":
    main()
