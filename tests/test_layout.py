"""The package's shape: no module imports another that imports it back, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "diffuse_cli"


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports anywhere in it (`from .x import`, `from . import x`)."""
    modules = {f.stem for f in PACKAGE.glob("*.py")}
    graph = {}
    for f in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                deps.update(name if name in modules else "__init__" for name in names)
        graph[f.stem] = deps - {f.stem}
    return graph


def test_no_import_cycles():
    graph = imports()
    del graph["__init__"]  # the package's root loads the API on first use, and modules read its __version__

    def cycle_from(start: str, node: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph.get(node, ())):
            if dep == start:
                return path + [start]
            if dep not in path and (found := cycle_from(start, dep, path + [dep])):
                return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, [m]))]
    assert not cycles, " -> ".join(cycles[0])


def test_the_graph_holds_lazy_imports_too():
    """The graph is read from the source, function bodies too: api_tools once imported Model back from api lazily."""
    graph = imports()
    assert "model" in graph["api_tools"] and "api_tools" in graph["api"] and "api" not in graph["api_tools"]
    assert "cli_convert" in graph["cli"] and "cli" not in graph["cli_convert"]


def test_the_commands_call_the_api_and_do_no_engine_work():
    """The command modules import the API, their options, the console and the errors: inspect, the sample folder's
    files and every summary come from the API, which a notebook user then has too."""
    interface = {"cli", "cli_convert", "cli_reference", "options", "console", "launch", "errors", "api", "__init__"}
    allowed = {"cli": interface, "cli_convert": interface}
    for module, deps in allowed.items():
        extra = imports()[module] - deps
        assert not extra, f"{module}.py imports {sorted(extra)}"
