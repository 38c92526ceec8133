"""docs/OPERATIONS.md: every `autoglm ...` command in its shell blocks is one the CLI accepts.

Each line is parsed by the real command tree (options, arguments, required values) without
running it; the flow it describes runs for real in tests/coord/test_fleet_cli.py."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main

from sdk.cli import app

DOC = Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md"
_click: Any = importlib.import_module(typer.BadParameter.__module__)


def runbook_commands() -> list[str]:
    blocks = re.findall(r"```(?:sh|console|bash)\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    lines = [line.strip().removeprefix("$ ") for block in blocks for line in block.splitlines()]
    return [line.split("  #")[0].strip() for line in lines if line.startswith("autoglm ")]


def parse(argv: list[str]) -> Any:
    """Walk the command tree as Click would and parse the leaf's parameters (UsageError if wrong)."""
    cmd: Any = typer.main.get_command(app)
    args, parent, name = list(argv), None, "autoglm"
    while True:
        ctx = cmd.make_context(name, list(args), parent=parent)
        if not hasattr(cmd, "get_command"):
            return ctx
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return ctx
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            raise _click.UsageError(f"no command {rest[0]!r} under {name}")
        cmd, args, parent, name = sub, rest[1:], ctx, rest[0]


COMMANDS = runbook_commands()


def test_the_runbook_covers_the_whole_path() -> None:
    used = {" ".join(shlex.split(c)[1:3]) for c in COMMANDS}
    for needed in ("coordinator init", "fleet ls", "fleet token", "fleet show", "fleet set", "fleet tag",
                   "fleet call", "fleet revoke", "fleet audit", "fleet approve", "fleet pending"):
        assert needed in used, needed
    assert any(c.startswith("autoglm coordinator -c") for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_runbook_command_parses(line: str) -> None:
    ctx = parse(shlex.split(line)[1:])
    assert ctx.command.callback is not None, line


def test_a_wrong_command_would_be_caught() -> None:
    with pytest.raises(_click.UsageError):
        parse(["fleet", "ls", "--kindd", "phone"])
    with pytest.raises(_click.UsageError):
        parse(["fleet", "revoke", "did:key:z6Mk"])                     # --reason is required
    with pytest.raises(_click.UsageError):
        parse(["fleet", "rm", "x"])


def test_the_device_snippet_names_real_api() -> None:
    """The Python block compiles (as a coroutine body) and the names it uses exist."""
    import inspect

    from sdk.coord.device import Device

    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    body = "\n".join("    " + line for line in block.splitlines())
    compile(f"async def _snippet():\n{body}\n", "OPERATIONS.md", "exec")
    assert "from sdk.coord.device import Device" in block
    params = inspect.signature(Device.enroll).parameters
    assert {"broker", "coordinator", "token", "credential_file"} <= set(params)
    assert callable(Device.register_command) and hasattr(Device, "__aenter__")
