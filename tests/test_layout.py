"""The package's shape: what the top level exports, documented subpackages, and no reaching into private names."""

import ast
import importlib
import pkgutil
from pathlib import Path

import lens_laai

PACKAGE = Path(lens_laai.__file__).parent
SUBPACKAGES = sorted(m.name for m in pkgutil.iter_modules(lens_laai.__path__, "lens_laai.") if m.ispkg)


def test_top_level_exports_what_a_notebook_calls_and_no_policy_helpers():
    notebook = {
        "load_model", "load_task", "fit", "fit_path", "evaluate", "evaluate_many", "generate",
        "HeadIntervention", "HeadAblation", "ResidualIntervention", "Intervention", "load_intervention",
        "Task", "TaskSplits", "PromptTemplate", "compose_tasks", "bundled_tasks", "head_table", "HeadAnalysis",
        "load_survey", "bundled_surveys", "fit_opinion", "evaluate_opinion", "compare_methods", "Survey",
        "LensLaaiError", "FitError", "TaskError", "InterventionError", "ModelError", "SaveError",
    }  # fmt: skip
    assert notebook <= set(lens_laai.__all__)
    for name in ("FitConfig", "auto_layer", "default_layers"):
        assert name not in lens_laai.__all__ and not hasattr(lens_laai, name), name
        assert hasattr(importlib.import_module("lens_laai.fitting"), name), name
    assert all(hasattr(lens_laai, name) for name in lens_laai.__all__)


def test_every_subpackage_says_what_it_is_and_exports_real_names():
    assert len(SUBPACKAGES) >= 10
    for name in SUBPACKAGES:
        module = importlib.import_module(name)
        assert module.__doc__ and module.__doc__.strip(), name
        assert all(hasattr(module, export) for export in getattr(module, "__all__", [])), name


def test_no_module_imports_another_modules_private_names():
    """One implementation of each thing, reached through its public name (``_x`` stays inside its module)."""
    reaching = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lens_laai"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    reaching.append(f"{path.relative_to(PACKAGE)}: from {node.module} import {', '.join(private)}")
    assert not reaching, reaching


def test_no_module_is_past_450_lines():
    root = Path(lens_laai.__file__).parent
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines (split them by idea): {long}"
