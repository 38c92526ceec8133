"""`autoglm` commands for the coord layer."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this module's commands and groups to the root app."""
