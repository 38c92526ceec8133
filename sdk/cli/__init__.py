"""The ``autoglm`` command line (Typer + Rich). Each command group lives in its own module."""

from __future__ import annotations

try:
    import rich  # noqa: F401 - every command prints with it
    import typer
except ModuleNotFoundError as exc:  # the core install has no CLI: say which extra brings it
    from sdk.errors import require_extra

    raise require_extra(exc, "cli", feature="the autoglm command line") from exc

from sdk.cli import coord_cmds, identity_cmds, inference_cmds, mesh_cmds

app = typer.Typer(
    name="autoglm",
    help="Open-AutoGLM: DID identity, secure MQTT coordination and shared inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

for _module in (identity_cmds, coord_cmds, inference_cmds, mesh_cmds):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
