"""One coordinator per data directory: an exclusive ``flock`` on ``DATA_DIR/coordinator.lock``.

Two daemons on one store would both answer handshakes and hand out challenges the other cannot
check (``wrong_challenge`` for every device). The lock file holds the holder's PID so the refusal
can name it; the lock itself is the kernel's ``flock``, which dies with the process, so a file
left behind by a killed daemon never blocks the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from sdk.errors import CoordinationError

log = logging.getLogger(__name__)

LOCK_FILE = "coordinator.lock"


class DataDirLock:
    """``acquire()`` or raise ``CoordinationError(reason="locked")``; ``release()`` when done."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> int | None:
        """The PID written by the current (or last) holder, if readable."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def acquire(self) -> None:
        """Take the lock and write our PID into the file; a second holder is refused."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = self.holder()
            who = f"process {pid}" if pid is not None else "another process"
            msg = f"data directory {self.path.parent} is in use by {who} (lock {self.path})"
            log.error("refusing to start: %s", msg)
            raise CoordinationError(msg, reason="locked") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        log.debug("data directory lock %s taken by %d", self.path, os.getpid())

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race a waiting starter)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["DataDirLock", "LOCK_FILE"]
