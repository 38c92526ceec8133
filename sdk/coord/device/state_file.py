"""The device's state file: the last config version it handled, as ``{"last_version": N}``.

Replaced atomically (temporary file, fsync, rename) once per handled config, so a crash leaves
the old or the new version, never a torn file. A state file written by an earlier release also
held the unacknowledged events (``"outbox": [...]``): :meth:`StateFile.load` hands them back so
they move into the outbox journal, and the next save leaves them out.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from sdk.identity.hazmat import json as strict_json

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 64 * 1024 * 1024


class StateFile:
    """``last_version`` persisted in ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self, default: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """``(last_version, legacy outbox events)``; ``default`` when missing or unreadable (logged)."""
        try:
            data = strict_json.loads(self.path.read_bytes(), max_bytes=MAX_STATE_BYTES)
        except FileNotFoundError:
            return default, []
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable device state %s: %s", self.path, exc)
            return default, []
        version = data.get("last_version") if isinstance(data, dict) else None
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            log.warning("ignoring device state %s: last_version is not a non-negative integer", self.path)
            return default, []
        legacy = data.get("outbox")
        events = [b for b in legacy if isinstance(b, dict) and isinstance(b.get("event_id"), str)] \
            if isinstance(legacy, list) else []
        return max(default, version), events

    def save(self, last_version: int) -> None:
        """Write ``last_version`` (atomically and durably)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"last_version": int(last_version)}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


__all__ = ["StateFile"]
