"""Print the import circles of a package: the strongly connected components of its module graph.

Usage: python scripts/import_cycles.py [package]   (default lens_laai; run from the repository root)

Every import counts, lazy ones inside functions too, as import-linter (grimp) sees them. A
component of two or more modules is a circle: each of its modules imports, directly or through the
others, every other one.
"""

from __future__ import annotations

import sys

import grimp


def components(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's strongly connected components of the module graph, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(graph.find_modules_directly_imported_by(module)):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == module:
                    break
            found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return sorted((c for c in found if len(c) > 1), key=len, reverse=True)


def main() -> None:
    package = sys.argv[1] if len(sys.argv) > 1 else "lens_laai"
    graph = grimp.build_graph(package)
    circles = components(graph)
    print(f"{package}: {len(graph.modules)} modules, {len(circles)} import circle(s)")
    for circle in circles:
        print(f"  {len(circle)} modules: {', '.join(circle)}")


if __name__ == "__main__":
    main()
