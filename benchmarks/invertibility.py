"""Numerical invertibility of trained flows (Behrmann et al. 2021): the same 2-D density (two moons) learned by
an affine-coupling RealNVP with its default scale bound (3) and with the bound effectively removed (1e4), and by a
residual flow at ``coeff`` 0.9 and 0.99, each trained the same number of steps; then
:func:`pyroflows.diagnostics.invertibility` on test data, on the model's samples and on points 5x outside the data.

::

    python benchmarks/invertibility.py --out benchmarks/results/invertibility.json
    python benchmarks/invertibility.py --quick
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402
from pyroflows import FlowDensity, realnvp, residual_flow  # noqa: E402
from pyroflows.data import get_toy  # noqa: E402
from pyroflows.diagnostics import invertibility  # noqa: E402
from pyroflows.train import evaluate, fit  # noqa: E402

MODELS = {
    "realnvp, scale_bound 3": lambda: realnvp(2, num_layers=6, scale_bound=3.0),
    "realnvp, scale_bound 1e4": lambda: realnvp(2, num_layers=6, scale_bound=1e4),
    "residual, coeff 0.9": lambda: residual_flow(2, num_layers=6, hidden=(64,), coeff=0.9),
    "residual, coeff 0.99": lambda: residual_flow(2, num_layers=6, hidden=(64,), coeff=0.99),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: checks that it runs")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    steps = 20 if args.quick else args.steps
    toy = get_toy("two_moons")
    train = toy.sample(4000, torch.Generator().manual_seed(0))
    test = toy.sample(1000, torch.Generator().manual_seed(1))
    rows = []
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model = FlowDensity(build(), (2,))
        fit(model, train, num_steps=steps, batch_size=256, lr=1e-2, device="cpu", progress=False, report=False)
        model.eval()
        with torch.no_grad():
            samples = model.sample(500)
        row = {"model": name, "steps": steps, "test_nll": evaluate(model, test)}
        for where, x in (("test", test[:500]), ("samples", samples), ("5x outside", 5 * test[:500])):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = invertibility(model.flow, x)
            row[where] = {
                "error32_max": float(r.error32.max()),
                "error64_max": float(r.error64.max()),
                "lipschitz_max": float(r.lipschitz.max()),
                "inverse_lipschitz_max": float(r.inverse_lipschitz.max()),
                "condition_max": float(r.condition.max()),
                "invertible": r.invertible,
            }
        rows.append(row)
        t, o = row["test"], row["5x outside"]
        print(
            f"{name:26s} nll {row['test_nll']:.3f} | test: err32 {t['error32_max']:.1e} Lip {t['lipschitz_max']:.3g} "
            f"Lip-1 {t['inverse_lipschitz_max']:.3g} cond {t['condition_max']:.3g} | 5x out: err32 "
            f"{o['error32_max']:.1e} cond {o['condition_max']:.3g} ok={o['invertible']}",
            flush=True,
        )
    command = _common.command_line("benchmarks/invertibility.py", argv)
    result = {"rows": rows, "machine": _common.machine(), "quick": args.quick, "command": command}
    if args.out:
        _common.write_result(args.out, result)  # also regenerates RESULTS.md
    return 0


if __name__ == "__main__":
    sys.exit(main())
