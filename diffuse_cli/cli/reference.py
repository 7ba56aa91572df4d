"""docs/commands.md, written from the commands' own help, so that the page and `--help` cannot disagree.

    python -m diffuse_cli.cli.reference > docs/commands.md

tests/test_docs.py fails when the page in the repository is not what this writes.
"""

from __future__ import annotations

import click
import typer.main

from .app import app

HEAD = """# Commands

Every command and option, as `diffuse COMMAND --help` gives them. This page is generated (`python -m
diffuse_cli.cli.reference > docs/commands.md`) and a test fails when it is stale: edit the help, not the
page. What the commands do, and why, is told in [training.md](training.md), [sampling.md](sampling.md),
[editing.md](editing.md), [explorer.md](explorer.md) and [diffusers.md](diffusers.md).
"""


def plain(text: str) -> str:
    """Help text as the terminal shows it: rich's escaped brackets unescaped, one line."""
    return " ".join(text.replace("\\[", "[").split())


def command_section(name: str, command: click.Command) -> str:
    ctx = click.Context(command, info_name=f"diffuse {name}")
    lines = [f"## `diffuse {name}`", "", plain(command.help or ""), "", "```", command.get_usage(ctx), "```", ""]
    rows = [param.get_help_record(ctx) for param in command.params]
    lines += ["| argument or option | what |", "|---|---|"]
    for names, text in (row for row in rows if row is not None):
        lines.append(f"| `{names}` | {plain(text).replace('|', '/')} |")
    if command.epilog:
        examples = [line.strip() for line in command.epilog.splitlines() if line.strip().startswith("diffuse ")]
        lines += ["", "```bash", *examples, "```"]
    return "\n".join(lines) + "\n"


def reference() -> str:
    """The whole page: the head, then a section a command, in the order `diffuse --help` lists them."""
    group = typer.main.get_command(app)
    return HEAD + "".join("\n" + command_section(name, group.commands[name]) for name in group.commands)


if __name__ == "__main__":
    print(reference(), end="")
