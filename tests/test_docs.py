"""The README documents every command and every option (as sqlite-utils' test_docs does),
and the command-line help points only at what ships with the package."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from cli.main import main

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _commands(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[
        tuple[str, click.Command]]:
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            if not sub.hidden:
                yield from _commands(sub, (*path, name))
    else:
        yield " ".join(("tracer", *path)), cmd


COMMANDS = list(_commands(main))


def test_there_are_commands_to_check() -> None:
    names = {name for name, _ in COMMANDS}
    assert {"tracer capture", "tracer report", "tracer connections", "tracer logs add"} <= names


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_readme_shows_every_command_and_option(name: str, command: click.Command) -> None:
    *group, last = name.split()
    # `tracer logs add|list|show|remove` names four commands in one heading
    spelled = re.escape(" ".join(group)) + r" (?:[\w-]+\|)*" + re.escape(last) + r"(?![\w-])"
    assert re.search(spelled, README), f"README does not show `{name}`"
    missing = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        longs = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
        if not any(re.search(re.escape(o) + r"(?![\w-])", README) for o in longs):
            missing.append("/".join(longs))
    assert not missing, f"README does not mention {name} {', '.join(missing)}"


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_help_points_only_at_what_ships(name: str, command: click.Command) -> None:
    text = " ".join([command.help or ""] + [
        p.help or "" for p in command.params if isinstance(p, click.Option)])
    assert "DESIGN.md" not in text, f"{name} --help points at a file that is not shipped"
