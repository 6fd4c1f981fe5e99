"""Sphinx configuration. Build with ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``).

Nothing here reaches the network: no intersphinx mappings, MathJax is loaded by the reader's browser.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import pyroflows  # noqa: E402

project = "pyroflows"
author = "the pyroflows developers"
copyright = "the pyroflows developers"  # noqa: A001 - Sphinx's name
version = release = pyroflows.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "examples", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
root_doc = "index"

# ----------------------------------------------------------------------------------------------- autodoc
# The API pages are generated from docs/api.rst's autosummary list (one line per module) into docs/api/.
autosummary_generate = True
autosummary_imported_members = True  # packages re-export from their submodules; __all__ decides what is public
autosummary_ignore_module_all = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # show defaults as written (``torch.optim.Adam``, not ``<class ...>``)
autoclass_content = "class"
autodoc_inherit_docstrings = False  # torch/Pyro base-class docstrings are not reST-clean and not ours
add_module_names = False
python_display_short_literal_types = True

# Cross-references to pyroflows names must resolve: an unresolved ``:class:`pyroflows.X``` is an error under -W.
# References into other libraries (torch, Pyro, ...) have no intersphinx inventory offline and are not checked.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!pyroflows\b).*"),  # anything outside this package: torch.*, pyro.*, int, Sequence, ...
]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# ----------------------------------------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"pyroflows {version}"
html_static_path: list[str] = []


# ----------------------------------------------------------------------------------------------- re-exports
# ``pyroflows.realnvp`` is documented where it is defined (``pyroflows.builders.realnvp``), ``pyroflows.Compose``
# under ``pyroflows.transforms``. A reference to a public alias is resolved to the documented object.
def _lookup(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_alias(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target, context = node.get("reftarget", ""), node.get("py:module") or ""
    if not target.startswith("pyroflows.") and context.startswith("pyroflows"):
        target = f"{context}.{target}"  # a relative reference in a summary shown outside its module
    if not target.startswith("pyroflows."):
        return None
    obj = _lookup(target)
    if isinstance(obj, property):
        obj = obj.fget
    qualname = getattr(obj, "__qualname__", None)
    if obj is None or qualname is None:
        return None
    domain = env.get_domain("py")
    for module in [getattr(obj, "__module__", None), *_api_modules()]:
        candidate = f"{module}.{qualname}"
        if module and candidate in domain.objects:
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode)
    return None


def _api_modules() -> list[str]:
    lines = (DOCS / "api.rst").read_text().splitlines()
    return [s.strip() for s in lines if s.strip().startswith("pyroflows")]


def _reexports() -> dict[str, list[str]]:
    """Per API module, the public names it re-exports from another part of the package: each is listed in the
    module's summary table but documented only on its home module's page (no duplicate descriptions)."""
    out = {}
    for name in _api_modules():
        module = importlib.import_module(name)
        foreign = []
        for member in getattr(module, "__all__", []):
            home = getattr(getattr(module, member), "__module__", None)
            if isinstance(home, str) and home != name and not home.startswith(name + "."):
                foreign.append(member)
        out[name] = foreign
    return out


autosummary_context = {"reexports": _reexports()}


# ----------------------------------------------------------------------------------------------- benchmarks page
# benchmarks.md includes benchmarks/RESULTS.md when the benchmark suite has written it; until then it shows the
# tables stored with the earlier benchmark runs in benchmarks/results/*.json.
def _stored_tables() -> str:
    out = []
    for name, key, title in (
        ("vi_energies", "table_markdown", "Flow guides on the four 2-D energies of Rezende & Mohamed (2015)"),
        ("image_flows", "table", "Density models on the embedded digits (CPU)"),
        ("gpu_density_h100", "table", "Glow training on an H100 (CPU vs CUDA)"),
    ):
        path = ROOT / "benchmarks" / "results" / f"{name}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        table = record.get(key)
        if not table:
            continue
        out.append(f"## {title}\n\nFrom `benchmarks/results/{name}.json`, written by `{record.get('command', '?')}`.\n")
        out.append(table.strip() + "\n")
    if not out:
        return "No benchmark results are stored in this checkout.\n"
    return "\n".join(out)


def _benchmarks_source(app, docname, source):
    if docname != "benchmarks":
        return
    results = ROOT / "benchmarks" / "RESULTS.md"
    if results.is_file():
        options = ":heading-offset: 1\n:relative-images:\n:relative-docs: ..\n"
        block = f"```{{include}} ../benchmarks/RESULTS.md\n{options}```\n"
    else:
        block = _stored_tables()
    source[0] = source[0].replace("<!-- results -->", block)


def _public_bases(app, name, obj, options, bases):
    """``Bases: _PowerIteration`` means nothing to a reader: show a private base's own public bases instead."""
    public = []
    for base in bases:
        while base.__name__.startswith("_") and base.__bases__:
            base = base.__bases__[0]
        public.append(base)
    bases[:] = public


def setup(app):
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("missing-reference", _resolve_alias)
    app.connect("source-read", _benchmarks_source)
    return {"parallel_read_safe": True}
