"""Smoke tests of the VI examples: each script runs end to end in ``--quick`` mode and writes its table and plots.

(The figures the full runs produce are in the README / closing notes; these only check that the scripts work.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import vi_common  # noqa: E402

ALL = ",".join(vi_common.GUIDES)


def _check_outputs(out: Path, tag: str, guides: list[str]) -> dict:
    payload = json.loads((out / f"{tag}.json").read_text())
    assert set(payload["summary"]) == set(guides)
    for row in payload["summary"].values():
        assert row["khat"] == row["khat"] and row["elbo"] < 0  # numbers, not NaN
    assert (out / f"{tag}_khat.png").stat().st_size > 1000
    assert len(list(out.glob(f"{tag}_pair_*.png"))) == len(guides)
    return payload


def test_eight_schools_quick_every_guide(tmp_path):
    import eight_schools

    results = eight_schools.main(["--quick", "--param", "noncentered", "--out", str(tmp_path)])
    summary, details = results["noncentered"]
    assert list(summary.index) == list(vi_common.GUIDES)
    assert {"NUTS", "exact"} <= set(details["pyroflows.realnvp"])
    assert "theta[Choate]" in details["pyroflows.realnvp"]["NUTS"].index
    _check_outputs(tmp_path, "eight_schools_noncentered", list(vi_common.GUIDES))


def test_eight_schools_centered_runs_as_a_script(tmp_path):
    guides = "AutoNormal,pyroflows.planar"
    cmd = [
        sys.executable,
        "eight_schools.py",
        "--quick",
        "--param",
        "centered",
        "--guides",
        guides,
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=EXAMPLES, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eight_schools_centered" in proc.stdout
    _check_outputs(tmp_path, "eight_schools_centered", guides.split(","))


def test_funnel_quick(tmp_path):
    import funnel

    guides = "AutoNormal,pyroflows.realnvp,pyroflows.residual"
    summary, details = funnel.main(["--quick", "--guides", guides, "--out", str(tmp_path)])
    assert list(details["AutoNormal"]["exact"].index) == ["v"] + [f"x[{i}]" for i in range(1, 10)]
    _check_outputs(tmp_path, "funnel", guides.split(","))


def test_logistic_regression_quick(tmp_path):
    import logistic_regression

    guides = "AutoMultivariateNormal,pyroflows.realnvp"
    summary, details = logistic_regression.main(["--quick", "--guides", guides, "--out", str(tmp_path)])
    assert details["pyroflows.realnvp"]["NUTS"].shape[0] == 31  # 30 weights and the intercept
    assert (summary["elpd_loo"] < 0).all()
    _check_outputs(tmp_path, "logistic_regression", guides.split(","))


def test_unknown_guide_is_an_error():
    import funnel

    with pytest.raises(SystemExit, match="unknown guide"):
        funnel.main(["--quick", "--guides", "AutoNormal,nonsense"])
