"""The docs say what the code does: the commands page is the help, and the README's and docs' command lines
and Python snippets run (parsed, for the command lines that would train for minutes)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer.main

from diffuse_cli.cli.app import app
from diffuse_cli.cli.reference import reference

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_commands_page_is_the_help_as_it_is_now():
    page = (ROOT / "docs" / "commands.md").read_text()
    assert page == reference(), "docs/commands.md is stale: python -m diffuse_cli.cli.reference > docs/commands.md"


def test_no_help_text_loses_a_bracket_to_rich_markup():
    """rich reads an unescaped [word] in help as a style tag and drops it ("needs the  extra"): every help text and
    epilog must show, rendered as the terminal renders it, what it says with its escapes undone."""
    from rich.text import Text

    def texts(command: click.Command, path: str):
        yield path, command.help or ""
        yield path + " (examples)", command.epilog or ""
        for param in command.params:
            yield f"{path} {param.name}", getattr(param, "help", None) or ""
        for name, sub in getattr(command, "commands", {}).items():
            yield from texts(sub, f"{path} {name}")

    swallowed = [where for where, text in texts(typer.main.get_command(app), "diffuse")
                 if Text.from_markup(text).plain != text.replace("\\[", "[")]
    assert swallowed == []


def command_lines(page: Path) -> list[str]:
    """Every `diffuse ...` line of the page's bash blocks, comments and prompts removed."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(), re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.split(" # ")[0].strip().removeprefix("$ ")
                if part.startswith("diffuse "):
                    lines.append(part)
    return lines


DOCUMENTED = [(page.name, line) for page in PAGES for line in command_lines(page)]


def test_the_docs_show_command_lines():
    assert len(DOCUMENTED) > 40 and {page for page, _ in DOCUMENTED} >= {"README.md", "commands.md", "training.md"}


@pytest.mark.parametrize("page, line", DOCUMENTED, ids=[f"{p}:{line[:60]}" for p, line in DOCUMENTED])
def test_every_documented_command_line_parses(page, line):
    """Each command line in the README and docs names a command and options that exist, with values they take
    (click parses it as `diffuse` would, without running it)."""
    args = shlex.split(line.replace("<run>", "run").replace("<", "").replace(">", ""))[1:]
    group = typer.main.get_command(app)
    name, *rest = args
    assert name in group.commands, f"{page}: no command {name!r}: {line}"
    try:
        group.commands[name].make_context(f"diffuse {name}", rest)
    except click.exceptions.Exit:  # --help
        pass


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """README's API example, on 8 tiny images and 2 steps instead of 2,000 (the one change), then loaded back
    from the run folder a CLI run made (CPU, fp32)."""
    import torch

    from diffuse_cli.cli import app as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["diffuse", "train", "--model", "tiny", "--image-size", "8", "--steps", "1",
                                     "--batch-size", "4", "--out", "checkpoints/run", "--precision", "fp32"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    (block,) = python_blocks(ROOT / "README.md")
    code = block.replace("steps=2000", "steps=2, preset='tiny', batch_size=4, precision='fp32'")
    code = code.replace("steps=50)", "steps=5)").replace("<run>", "run")
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    namespace = {"images": images}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["images"].shape == (16, 3, 8, 8) and (tmp_path / "samples" / "mine" / "grid.png").exists()
    assert namespace["model"].path == Path("checkpoints/run/model.safetensors")


def test_the_api_page_sampling_your_own_network_runs(capsys):
    """docs/api.md's 'Lower down' example, with a stand-in for the reader's network; it prints the 25 calls."""
    import torch

    block = next(b for b in python_blocks(ROOT / "docs" / "api.md") if "my_unet" in b)
    exec(compile(block, "docs/api.md", "exec"), {"my_unet": lambda x, t: torch.zeros_like(x)})
    assert capsys.readouterr().out.strip() == "25"
