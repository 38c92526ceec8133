"""``autoglm examples [DIR]``: write the commented example configuration shipped with the package.

The files are package data (``sdk/cli/examples/``), the same as the repository's ``examples/``,
so an installed wheel can start a coordinator without a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import typer

#: The example files, in the order they are listed.
EXAMPLE_FILES = ("coordinator.toml", "rules.toml")


def example_text(name: str) -> str:
    """The text of one bundled example file."""
    return (resources.files("sdk.cli") / "examples" / name).read_text(encoding="utf-8")


def examples(
    dest: Path = typer.Argument(Path("autoglm-examples"), help="Directory to write the files into"),
    force: bool = typer.Option(False, "--force", help="Overwrite files that already exist"),
) -> None:
    """Write the example coordinator.toml and rules.toml (start with: autoglm coordinator -c DIR/coordinator.toml)."""
    from sdk.cli.errors import fail

    targets = [dest / name for name in EXAMPLE_FILES]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        fail("file_exists", f"{', '.join(existing)} already exist", "pass --force to overwrite, or another DIR")
    dest.mkdir(parents=True, exist_ok=True)
    for name, path in zip(EXAMPLE_FILES, targets, strict=True):
        path.write_text(example_text(name), encoding="utf-8")
        typer.echo(f"wrote {path}")
    typer.echo(f"next: edit {dest / 'coordinator.toml'}, then autoglm coordinator --config {dest / 'coordinator.toml'}")


def register(app: typer.Typer) -> None:
    """Attach ``examples`` to the root app."""
    app.command("examples")(examples)


__all__ = ["EXAMPLE_FILES", "example_text", "examples", "register"]
