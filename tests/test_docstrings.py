"""Every public function and class documents its arguments and shows an example that runs under doctest."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = (
    "pyroflows",
    "pyroflows.transforms",
    "pyroflows.nn",
    "pyroflows.logdet",
    "pyroflows.builders",
    "pyroflows.density",
    "pyroflows.cif",
    "pyroflows.hybrid",
    "pyroflows.latent",
    "pyroflows.ood",
    "pyroflows.data",
    "pyroflows.train",
    "pyroflows.plots",
    "pyroflows.infer",
    "pyroflows.start",
    "pyroflows.elbo",
    "pyroflows.autoguide",
    "pyroflows.diagnostics",
    "pyroflows.cli",
)


def _public():
    seen = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", [a for a in dir(module) if not a.startswith("_")]):
            obj = getattr(module, attr)
            if inspect.ismodule(obj) or not callable(obj) or id(obj) in seen:
                continue  # constants are documented by their module; each object once
            seen[id(obj)] = (f"{name}.{attr}", obj)
    return sorted(seen.values(), key=lambda item: item[0])


PUBLIC = _public()


def test_the_audit_sees_the_api():
    names = {n for n, _ in PUBLIC}
    assert {"pyroflows.glow", "pyroflows.transforms.ResidualBlock", "pyroflows.infer.fit"} <= names
    assert len(PUBLIC) > 60


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_name_has_arguments_and_an_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"{name}: the docstring has no doctest example"
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    missing = [p for p in params if p not in ("self", "args", "kwargs") and p not in doc]
    assert not missing, f"{name}: arguments not documented: {missing}"
