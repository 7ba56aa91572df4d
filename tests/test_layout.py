"""The package's shape: no module imports another that imports it back, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "diffuse_cli"
SEAMS = ("diffusion", "network", "training", "formats", "images", "evaluation", "cli")


def module_name(f: Path) -> str:
    """A module's dotted name inside the package: 'api', 'diffusion.samplers', 'cli' for cli/__init__.py."""
    parts = f.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports anywhere in it (relative imports, function
    bodies too), by dotted name; a name imported from a package (`from ..network import threads`) is its module."""
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        here = name.split(".")[:-1] if f.name != "__init__.py" else name.split(".")
        if name == "__init__":
            here = []
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = here[:len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                for alias in node.names:
                    target = ".".join(base + [alias.name])
                    deps.add(target if target in files else ".".join(base) or "__init__")
        graph[name] = deps - {name}
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
    assert "cli.convert" in graph["cli.app"] and "cli.app" not in graph["cli.convert"]
    assert "network.threads" in graph["training.loop"] and "diffusion.denoiser" in graph["training.run_folder"]


def test_the_commands_call_the_api_and_do_no_engine_work():
    """The command modules import the API, their options, the console and the errors: inspect, the sample folder's
    files and every summary come from the API, which a notebook user then has too."""
    interface = {"cli.app", "cli.convert", "cli.options", "cli.console", "cli.launch", "errors", "api", "__init__"}
    allowed = {"cli.app": interface | {"cli.evaluate"}, "cli.convert": interface, "cli.evaluate": interface}
    for module, deps in allowed.items():
        extra = imports()[module] - deps
        assert not extra, f"{module}.py imports {sorted(extra)}"


def test_each_seam_is_a_folder_and_the_engine_never_imports_the_interface():
    """The forward process and samplers, the network, training, the file formats, images and the interface each
    have a folder; nothing below the API imports the CLI, typer or rich (the engine never prints)."""
    graph = imports()
    assert {name.split(".")[0] for name in graph if "." in name} == set(SEAMS)
    for name, deps in graph.items():
        if name.split(".")[0] not in ("cli", "__main__"):
            assert not {d for d in deps if d.split(".")[0] == "cli"}, f"{name} imports the CLI"
    for f in PACKAGE.rglob("*.py"):
        if f.parent.name != "cli":
            tree = ast.parse(f.read_text())
            named = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            named |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                      and n.level == 0}
            assert not named & {"typer", "rich"}, f"{f.relative_to(PACKAGE)} imports {named & {'typer', 'rich'}}"
