"""Sphinx configuration for the lens_laai documentation (Sphinx + furo + MyST-NB, as TransformerLens).

Build: ``bash scripts/docs.sh`` (strict: ``-W --keep-going -n``). The notebooks in ``notebooks/`` are
copied into ``docs/tutorials/`` (git-ignored) and executed by MyST-NB on the embedded SmolLM2 model.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

import lens_laai  # noqa: E402

project = "lens_laai"
author = "the lens_laai authors"
copyright = "2026, the lens_laai authors"
release = lens_laai.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "method_figure",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "results/**", "jupyter_execute"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# MyST: ::: fences, definition lists, heading anchors so page#section links are checked. No $…$ maths:
# MathJax would come from a CDN, and the site is meant to work offline (formulas are written in Unicode).
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Notebooks run at build time, on the embedded model; any error fails the build (with -W).
nb_execution_mode = os.environ.get("LENS_LAAI_DOCS_EXECUTE", "force")
nb_execution_timeout = int(os.environ.get("LENS_LAAI_DOCS_CELL_TIMEOUT", "900"))
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# circuitsvis views and pandas tables are HTML; keep HTML first so the views render on the page.
nb_mime_priority_overrides = [("html", "text/html", 0)]

# API reference from docstrings.
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": False, "ignore-module-all": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Strict references (-n): every lens_laai name must resolve. Third-party libraries have no
# inventory offline (intersphinx needs the network), so their names are exempt.
nitpicky = True
nitpick_ignore_regex = [
    # third-party names: no inventory offline
    (
        r"py:.*",
        r"~?(torch|pd|pandas|np|numpy|nn|transformer_lens|transformers|jaxtyping|matplotlib|scipy|os|typing|collections|pathlib|argparse|tqdm|safetensors|circuitsvis|enum|json|ast|datetime|contextlib|abc|dataclasses)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Tensor|TransformerBridge|DataFrame|Series|Figure|Axes|Path|PathLike|Float|Int|Bool|Generator|Iterator|Iterable|Sequence|Mapping|Callable|Any|Literal|TypeVar|Protocol|ndarray|dtype|device|Module|T|Namespace|ArgumentParser|AbstractContextManager|HookPoint|ActivationCache|PreTrainedTokenizerBase|TextIO|Self)",
    ),
    # jaxtyping shape strings ('batch pos') and napoleon's reading of "Summary: ..." property docstrings
    (r"py:class", r".*[ '].*"),
    # type aliases (Literal[...] names) and private helpers are not documented objects
    (
        r"py:.*",
        r"(.*\.)?(Pair|Hook|Where|Positions|Init|Select|Objective|TaskLike|Divergence|Method|Kind|DeltaAt|Key|Batchable|Path_)",
    ),
    (r"py:.*", r"(.*\.)?(_\w+|T)"),
    (r"py:meth", r"replay"),  # BlockCall.replay has no docstring, so no entry
    (r"py:data", r"(.*\.)?[A-Z][A-Z0-9_]+"),
    # pydantic's field metadata in the manifest schema's signatures, and pydantic / stdlib names
    (r"py:class", r"(FieldInfo|Ge|Le|Lt|Gt|MaxLen|MinLen|\w+=.*|0-9a-f.*)"),
    (r"py:.*", r"~?(pydantic|pydantic_core|random)(\..*)?"),
]

html_theme = "furo"
html_title = f"lens_laai {release}"
html_static_path = ["_static"]

html_theme_options = {"source_repository": "", "navigation_with_keys": True}

# The tutorials are the notebooks of notebooks/, copied here so the repository keeps one copy.
# Their links into docs/ ("../docs/x") are rewritten for the new place.
TUTORIALS = DOCS / "tutorials"
NOTEBOOKS = ["quickstart", "heads_vs_ablation", "task_calculus", "opinion_dynamics"]


def copy_notebooks() -> None:
    TUTORIALS.mkdir(exist_ok=True)
    for name in NOTEBOOKS:
        text = (ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8")
        text = re.sub(r"\.\./docs/", "../", text)
        target = TUTORIALS / f"{name}.ipynb"
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
    for stale in TUTORIALS.glob("*.ipynb"):
        if stale.stem not in NOTEBOOKS:
            stale.unlink()


copy_notebooks()


def _fix_docstring(app, what, name, obj, options, lines) -> None:
    """``:class:`X`s`` (a plural right after a role) is invalid reST; make it ``:class:`X`\\ s``."""
    for i, line in enumerate(lines):
        lines[i] = re.sub(r"(:\w+:`[^`]+`)(s\b)", r"\1\\ \2", line)


def _canonical(dotted: str) -> str:
    """``lens_laai.fit`` → ``lens_laai.fitting.fit.fit``: where a re-exported object is defined."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return dotted
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        return f"{module}.{qualname}" if module and qualname and cut < len(parts) else dotted
    return dotted


def _resolve_short_names(app, env, node, contnode):
    """Resolve a lens_laai name written short in a docstring (``Task``, ``lens_laai.fit``) when it is unique.

    Docstrings say ``:class:`Task``` or ``:func:`lens_laai.fit``` (the public alias); Sphinx looks
    those up only relative to the current module. This finds the one documented object they mean
    and fails (the build stays strict) when there is none or more than one.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    domain = env.get_domain("py")
    if target.startswith("lens_laai."):
        target = _canonical(target)
    matches = [name for name in domain.objects if name == target or name.endswith("." + target)]
    if len(matches) != 1:
        return None
    from sphinx.util.nodes import make_refnode

    obj = domain.objects[matches[0]]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, matches[0])


def setup(app):
    app.connect("autodoc-process-docstring", _fix_docstring)
    app.connect("missing-reference", _resolve_short_names)
