"""The phone side of the app: its UI follows the layout the coordinator pushes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PhoneUI:
    """Shows ``standalone`` until a display in the room offers its screen, then ``companion``."""

    layout: str = "standalone"
    resolution: str | None = None
    versions: list[int] = field(default_factory=list)

    def on_config(self, config: Any) -> None:
        """The device's ``on_config`` callback: apply the desired state (returning means applied)."""
        state = config.state
        layout = state.get("ui.layout", "standalone")
        if layout not in ("standalone", "companion"):
            raise ValueError(f"unknown layout {layout!r}")       # reported to the coordinator as failed
        self.layout = layout
        self.resolution = state.get("ui.companion.resolution")
        self.versions.append(config.version)
