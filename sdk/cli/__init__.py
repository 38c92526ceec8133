"""The ``autoglm`` command line (Typer + Rich). Each command group lives in its own module.

Every command's failures go through :mod:`sdk.cli.errors`: one ``error:`` line and a ``hint:``,
exit 2 for usage and 1 for runtime failures, ``--json`` errors as JSON, ``--debug`` for the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

try:
    import rich  # noqa: F401 - every command prints with it
    import typer
except ModuleNotFoundError as exc:  # the core install has no CLI: say which extra brings it
    from sdk.errors import require_extra

    raise require_extra(exc, "cli", feature="the autoglm command line") from exc

from sdk.cli import coord_cmds, examples_cmd, identity_cmds, inference_cmds, mesh_cmds
from sdk.cli.errors import DEBUG_ENV, GuardedGroup, hoist_debug, set_debug

app = typer.Typer(
    name="autoglm",
    help="Open-AutoGLM: DID identity, secure MQTT coordination and shared inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=GuardedGroup,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", envvar=DEBUG_ENV, show_envvar=True,
                               help="On failure, also print the traceback."),
) -> None:
    set_debug(debug)


for _module in (identity_cmds, coord_cmds, inference_cmds, mesh_cmds, examples_cmd):
    _module.register(app)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``--debug`` may come anywhere before ``--``)."""
    args = hoist_debug(sys.argv[1:] if argv is None else argv)
    app(args=args, prog_name="autoglm")


__all__ = ["app", "main"]
