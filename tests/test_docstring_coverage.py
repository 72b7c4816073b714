"""Every public function and class comes with a docstring example (tests/test_docstrings.py runs them).

The names below still lack one. The list may only shrink: a new public name without an example fails,
and so does a listed name that has gained one (delete it from the list). Print the current list with
``python tests/test_docstring_coverage.py``; ``--write`` puts it in this file (after a merge).
"""

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import lens_laai

LISTED = """
"""
WITHOUT_EXAMPLE = set(LISTED.split())


def names_without_example() -> set[str]:
    """Public module-level functions and classes of lens_laai, defined where found, with no ``>>>`` in their docstring."""
    missing = set()
    for info in pkgutil.walk_packages(lens_laai.__path__, "lens_laai."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and ">>>" not in (inspect.getdoc(obj) or ""):
                missing.add(f"{info.name}.{name}")
    return missing


def test_new_public_names_come_with_an_example():
    new = sorted(names_without_example() - WITHOUT_EXAMPLE)
    assert not new, f"public names without a docstring example (add an 'Example:' section with >>> lines): {new}"


def test_the_allow_list_only_shrinks():
    stale = sorted(WITHOUT_EXAMPLE - names_without_example())
    assert not stale, f"these names have an example now or are gone; delete them from LISTED: {stale}"


if __name__ == "__main__":
    missing = sorted(names_without_example())
    print(len(missing), "public module-level functions and classes without an example:")
    print("\n".join(missing))
    if "--write" in sys.argv[1:]:
        here = Path(__file__)
        listed = "".join(f"{name}\n" for name in missing)
        text = re.sub(
            r'(LISTED = """\n).*?(""")', lambda m: m[1] + listed + m[2], here.read_text(), count=1, flags=re.S
        )
        here.write_text(text)
