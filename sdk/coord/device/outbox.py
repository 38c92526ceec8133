"""The device's event outbox: events wait here, in order, until the coordinator acknowledges them.

Persisted as an append-only journal, one JSON object per line::

    {"event": {..., "event_id": "…"}}    queued
    {"ack": "…"}                          acknowledged by the coordinator
    {"drop": "…"}                         given up (outbox full, device revoked)

Each change appends one line, so a change costs one small write however long the outbox is.
When the lines of acknowledged or dropped events outnumber the live events (and number at least
``compact_min``), the journal is rewritten with only the live events: a temporary file,
fsynced, then renamed over the journal, so a crash leaves either the old or the new one. The
file therefore stays under about twice the live size plus ``compact_min`` lines.

Durability: ``"normal"`` hands every line to the operating system at once (it survives the
process crashing or being killed, not a power cut); ``"full"`` also fsyncs every line (it
survives a power cut; one fsync per event, so callers on an event loop should write from a
worker thread: :class:`~sdk.coord.device.Device` does). Loading tolerates a last line cut short
by a crash (logged, then cut off) and skips any other unreadable line with an error log.
Methods are thread-safe. With ``auto_compact=False`` the owner calls :meth:`compact` when
:attr:`compact_due` (the device does so from a worker thread, so its event loop only appends).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sdk.identity.hazmat import json as strict_json

log = logging.getLogger(__name__)

MAX_OUTBOX = 1000          # unacknowledged events kept (the oldest are dropped beyond, logged)
COMPACT_MIN = 64           # dead lines tolerated before a compaction is considered
MAX_LINE_BYTES = 512 * 1024
DURABILITY = ("normal", "full")

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


@dataclass(eq=False)
class Entry:
    """One queued event, with when it was last sent (not persisted)."""

    body: dict[str, Any]
    sent_gen: int = -1          # admission generation it was last sent in (-1: not yet)
    sent_at: float = 0.0

    @property
    def event_id(self) -> str:
        return str(self.body["event_id"])


class Outbox:
    """Unacknowledged events in order, optionally journalled to ``path`` (see the module doc)."""

    def __init__(self, path: str | Path | None = None, *, max_entries: int = MAX_OUTBOX,
                 durability: str = "normal", compact_min: int = COMPACT_MIN,
                 auto_compact: bool = True) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {DURABILITY}")
        self.path = Path(path) if path is not None else None
        self.max_entries = max_entries
        self.durability = durability
        self.compact_min = max(1, compact_min)
        self.auto_compact = auto_compact
        self.compactions = 0
        self._entries: dict[str, Entry] = {}
        self._lines = 0            # lines in the journal file
        self._file: IO[bytes] | None = None
        self._lock = threading.RLock()
        if self.path is not None:
            self._load()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, event_id: object) -> bool:
        with self._lock:
            return event_id in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def ids(self) -> list[str]:
        """Event ids, oldest first."""
        with self._lock:
            return list(self._entries)

    def entries(self) -> list[Entry]:
        """The queued entries, oldest first (a snapshot)."""
        with self._lock:
            return list(self._entries.values())

    def get(self, event_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(event_id)

    @property
    def compact_due(self) -> bool:
        """True when dead lines dominate the journal (:meth:`compact` would shrink it)."""
        with self._lock:
            dead = self._lines - len(self._entries)
            return self.path is not None and dead >= self.compact_min and dead > len(self._entries)

    @property
    def dead_lines(self) -> int:
        """Journal lines that no longer stand for a queued event."""
        with self._lock:
            return self._lines - len(self._entries)

    # ------------------------------------------------------------------ changes
    def add(self, body: dict[str, Any]) -> list[str]:
        """Queue an event body (it must carry a string ``event_id``); returns the ids dropped for room.

        An id already queued keeps its place and its first body.
        """
        event_id = body.get("event_id") if isinstance(body, dict) else None
        if not isinstance(event_id, str) or not event_id:
            raise ValueError("an outbox event needs a string event_id")
        line = _dumps({"event": body}).encode()          # fails before anything changes (NaN...)
        dropped: list[str] = []
        with self._lock:
            if event_id in self._entries:
                return []
            self._entries[event_id] = Entry(dict(body))
            self._append(line)
            while len(self._entries) > self.max_entries:
                oldest = next(iter(self._entries))
                self._remove(oldest, "drop")
                dropped.append(oldest)
                log.warning("outbox full (%d): dropped unacknowledged event %s", self.max_entries, oldest)
            self._maybe_compact()
        return dropped

    def ack(self, event_id: str) -> bool:
        """The coordinator acknowledged ``event_id``: forget it. False when it was not queued."""
        return self._forget(event_id, "ack")

    def drop(self, event_id: str) -> bool:
        """Give up on ``event_id`` without an acknowledgement. False when it was not queued."""
        return self._forget(event_id, "drop")

    def compact(self) -> None:
        """Rewrite the journal with only the queued events (atomically)."""
        with self._lock:
            if self.path is None:
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                for entry in self._entries.values():
                    f.write(_dumps({"event": entry.body}).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            if self._file is not None:
                self._file.close()
                self._file = None
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            self._lines = len(self._entries)
            self.compactions += 1

    def close(self) -> None:
        """Close the journal file (the outbox stays usable; the next change reopens it)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    # ------------------------------------------------------------------ internals
    def _forget(self, event_id: str, op: str) -> bool:
        with self._lock:
            if event_id not in self._entries:
                return False
            self._remove(event_id, op)
            self._maybe_compact()
            return True

    def _remove(self, event_id: str, op: str) -> None:
        del self._entries[event_id]
        self._append(_dumps({op: event_id}).encode())

    def _append(self, line: bytes) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "ab")      # noqa: SIM115 - kept open between appends
        self._file.write(line + b"\n")
        self._file.flush()
        if self.durability == "full":
            os.fsync(self._file.fileno())
        self._lines += 1

    def _maybe_compact(self) -> None:
        if self.auto_compact and self.compact_due:
            self.compact()

    def _load(self) -> None:
        assert self.path is not None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        replay = _replay(data, str(self.path))
        self._entries = {body["event_id"]: Entry(body) for body in replay.events}
        self._lines = replay.good
        if replay.bad:
            self.compact()                   # the journal again holds only readable lines
        else:
            if replay.unterminated:
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open between appends
                self._file.write(b"\n")
                self._file.flush()
            if self.compact_due:             # opening is the one compaction the owner does not schedule
                self.compact()
        if self._entries:
            log.info("outbox %s: %d unacknowledged event(s) restored", self.path, len(self._entries))


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """The queued event bodies in the journal at ``path``, oldest first, without changing the file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return _replay(data, str(path)).events


@dataclass
class _Replay:
    events: list[dict[str, Any]]
    good: int              # readable lines
    bad: int               # unreadable lines (a cut-short last line included)
    unterminated: bool     # the last readable line lacks its newline


def _replay(data: bytes, where: str) -> _Replay:
    """Replay a journal: the live events, and how many lines were readable."""
    entries: dict[str, dict[str, Any]] = {}
    lines = data.split(b"\n")
    tail = lines.pop()                       # b"" unless the last write was cut short
    good = bad = 0
    for number, raw in enumerate(lines, 1):
        if _apply(entries, raw):
            good += 1
            continue
        bad += 1
        if number == len(lines) and not tail:
            log.warning("outbox %s: last line unreadable (a write cut short?); dropped", where)
        else:
            log.error("outbox %s: line %d unreadable; skipped", where, number)
    unterminated = False
    if tail:
        if _apply(entries, tail):
            good += 1
            unterminated = True
        else:
            bad += 1
            log.warning("outbox %s: last line cut short (%d bytes); dropped", where, len(tail))
    return _Replay(list(entries.values()), good, bad, unterminated)


def _apply(entries: dict[str, dict[str, Any]], raw: bytes) -> bool:
    """Replay one journal line into ``entries``; False when it is unreadable."""
    if not raw.strip() or len(raw) > MAX_LINE_BYTES:
        return False
    try:
        record = strict_json.loads(raw)
    except ValueError:
        return False
    if not isinstance(record, dict) or len(record) != 1:
        return False
    ((op, value),) = record.items()
    if op == "event" and isinstance(value, dict) and isinstance(value.get("event_id"), str) \
            and value["event_id"]:
        entries.setdefault(value["event_id"], value)
        return True
    if op in ("ack", "drop") and isinstance(value, str):
        entries.pop(value, None)
        return True
    return False


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["Outbox", "Entry", "read_journal", "MAX_OUTBOX", "COMPACT_MIN"]
