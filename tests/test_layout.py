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
    assert "model" in graph["api_images"] and "api_images" in graph["api"] and "api" not in graph["api_images"]
    assert "cli.convert" in graph["cli.app"] and "cli.app" not in graph["cli.convert"]
    assert "network.threads" in graph["training.loop"] and "diffusion.denoiser" in graph["training.run_folder"]


# The layers, top to bottom (docs/development.md): an import points down this list, or within its own layer.
LAYERS = (
    ("cli", "__main__"),
    ("api", "api_convert", "api_ema", "api_eval", "api_images", "api_sample", "api_settings", "__init__"),
    ("training",),
    ("evaluation",),
    ("model",),
    ("images",),
    ("formats",),
    ("diffusion",),
    ("network",),
    ("config", "presets"),
    ("errors", "version"),
)
API = {name for name in LAYERS[1]}


def layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def against_the_layers(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up the layers, and any import of the CLI's other than of the API, the CLI and the
    errors."""
    found = []
    for module, deps in graph.items():
        for dep in deps:
            if layer(dep) < layer(module):
                found.append(f"{module} -> {dep}")
            elif module.split(".")[0] == "cli" and dep.split(".")[0] not in {"cli", "errors", *API}:
                found.append(f"{module} -> {dep} (the commands call the API)")
    return sorted(found)


def test_every_import_points_down_the_layers():
    """Read from every module's source, function bodies too, package to package: nothing imports a layer above it,
    and the commands import nothing of the engine but through the API."""
    graph = imports()
    assert {name.split(".")[0] for name in graph} <= {name for names in LAYERS for name in names}
    bad = against_the_layers(graph)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_layer_check_finds_an_import_against_the_grain():
    """Planted upward imports and a command reaching past the API are each found; downward ones are not."""
    graph = {"diffusion.denoiser": {"images.data"}, "images.data": {"training.distributed"},
             "cli.console": {"training.loop"}, "model": {"diffusion.samplers"}, "cli.app": {"api", "errors"}}
    assert against_the_layers(graph) == ["cli.console -> training.loop (the commands call the API)",
                                         "diffusion.denoiser -> images.data", "images.data -> training.distributed"]


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


def test_every_distribution_the_package_imports_is_declared():
    """What the package imports from outside the standard library is a dependency pyproject.toml names (typer brings
    click today, but not by promise); the import name is mapped to the distribution where the two differ."""
    import sys
    import tomllib

    distribution = {"PIL": "pillow"}
    imported = set()
    for f in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            imported |= {n.split(".")[0] for n in names}
    outside = {distribution.get(n, n).lower() for n in imported - set(sys.stdlib_module_names) - {"diffuse_cli"}}
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()
                for d in project["dependencies"]}
    assert outside and outside <= declared, f"imported but not declared: {sorted(outside - declared)}"
