"""SQLite (WAL) persistence of devices, versioned desired state, reported state and events.

Every change is committed before it is published, so a restart or a ``kill -9`` loses no
committed config: on start the coordinator reloads desired versions and re-sends whatever a
device has not reported applied. ``durability="full"`` also survives power loss (fsync per commit).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk.coord.coordinator.errors import StoreError
from sdk.coord.protocol import ConfigVersion

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    did TEXT PRIMARY KEY, record TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS desired (
    did TEXT NOT NULL, version INTEGER NOT NULL, changes TEXT NOT NULL, state TEXT NOT NULL,
    event_id TEXT, rules TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (did, version));
CREATE TABLE IF NOT EXISTS reported (
    did TEXT PRIMARY KEY, version INTEGER NOT NULL, state TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reports (
    did TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT,
    apply_ms REAL, at REAL NOT NULL, PRIMARY KEY (did, version));
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, sender TEXT NOT NULL, type TEXT NOT NULL, fields TEXT NOT NULL,
    received REAL NOT NULL, targets TEXT NOT NULL, converged REAL, failures INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS processed (
    sender TEXT NOT NULL, event_id TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (sender, event_id));
"""


@dataclass
class Reported:
    """What a device last reported: its applied version and state."""

    did: str
    version: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    status: str = "none"
    reason: str | None = None
    at: float = 0.0


def merge(state: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``changes`` to a flat state (``None`` removes a key)."""
    out = dict(state)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def delta(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, Any]:
    """Keys whose desired value differs from the reported one (``None`` = should be removed)."""
    out = {k: v for k, v in desired.items() if reported.get(k, object()) != v}
    out.update({k: None for k in reported if k not in desired})
    return out


class Store:
    """The coordinator's state store. One writer (the daemon); safe to read from other threads."""

    def __init__(self, path: str | Path, *, durability: str = "normal") -> None:
        if durability not in ("normal", "full"):
            raise ValueError("durability must be 'normal' or 'full'")
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            if self._db.execute("SELECT 1 FROM processed LIMIT 1").fetchone() is None:
                # a store written before event dedup: its recorded events count as processed
                self._db.execute("INSERT OR IGNORE INTO processed(sender, event_id, at) "
                                 "SELECT sender, event_id, received FROM events")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state store {self.path}: {exc}") from exc
        self._latest: dict[str, tuple[int, dict[str, Any]]] = {}
        for did, version, state in self._db.execute(
                "SELECT d.did, d.version, d.state FROM desired d JOIN "
                "(SELECT did, MAX(version) v FROM desired GROUP BY did) m "
                "ON d.did = m.did AND d.version = m.v"):
            self._latest[did] = (version, json.loads(state))

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:  # pragma: no cover - close on a broken db
                log.warning("closing state store: %s", exc)

    def _tx(self, fn: Any) -> Any:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return out
            except sqlite3.Error as exc:
                log.error("state store write failed: %s", exc)
                raise StoreError(f"state store write failed: {exc}") from exc

    # ------------------------------------------------------------------ devices
    def save_devices(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Upsert device records (``to_row()`` dicts)."""
        now = time.time()
        data = [(r["did"], json.dumps(r, sort_keys=True), now) for r in rows]
        if data:
            self._tx(lambda db: db.executemany(
                "INSERT INTO devices(did, record, updated) VALUES (?,?,?) "
                "ON CONFLICT(did) DO UPDATE SET record=excluded.record, updated=excluded.updated", data))

    def load_devices(self) -> list[dict[str, Any]]:
        """All persisted device records."""
        with self._lock:
            return [json.loads(r) for (r,) in self._db.execute("SELECT record FROM devices")]

    # ------------------------------------------------------------------ desired state
    def commit(self, changes_by_device: Mapping[str, tuple[dict[str, Any], tuple[str, ...]]], *,
               event_id: str | None = None, event: tuple[str, str, Mapping[str, Any]] | None = None,
               now: float | None = None) -> list[ConfigVersion]:
        """Commit one new desired version per device, atomically; returns the new versions.

        ``event`` = ``(sender, type, fields)`` records the triggering event in the same transaction
        and marks ``(sender, event_id)`` processed; an event already processed commits nothing and
        returns ``[]`` (each event is applied exactly once, across restarts).
        """
        now = time.time() if now is None else now
        out: list[ConfigVersion] = []
        for did, (changes, rules) in changes_by_device.items():
            version, state = self._latest.get(did, (0, {}))
            out.append(ConfigVersion(did, version + 1, dict(changes), merge(state, changes),
                                     event_id, tuple(rules), now))
        rows = [(c.did, c.version, json.dumps(c.changes, sort_keys=True),
                 json.dumps(c.state, sort_keys=True), c.event_id, json.dumps(list(c.rules)), c.created)
                for c in out]
        def write(db: sqlite3.Connection) -> bool:
            if event is not None:
                if event_id is not None and db.execute(
                        "INSERT OR IGNORE INTO processed(sender, event_id, at) VALUES (?,?,?)",
                        (event[0], event_id, now)).rowcount == 0:
                    return False
                db.execute("INSERT OR IGNORE INTO events(event_id, sender, type, fields, received, targets) "
                           "VALUES (?,?,?,?,?,?)", (event_id, event[0], event[1],
                                                    json.dumps(dict(event[2]), sort_keys=True), now,
                                                    json.dumps(sorted(changes_by_device))))
            db.executemany("INSERT INTO desired(did, version, changes, state, event_id, rules, created) "
                           "VALUES (?,?,?,?,?,?,?)", rows)
            return True

        if rows or event is not None:
            if not self._tx(write):
                log.info("event %s from %s already processed; nothing committed", event_id,
                         event[0] if event else "?")
                return []
            for c in out:
                self._latest[c.did] = (c.version, c.state)
        return out

    def latest_version(self, did: str) -> int:
        """The newest desired version for ``did`` (0 when none)."""
        return self._latest.get(did, (0, {}))[0]

    def desired(self, did: str) -> dict[str, Any]:
        """The current desired state of ``did``."""
        return dict(self._latest.get(did, (0, {}))[1])

    def versions_since(self, did: str, version: int) -> list[ConfigVersion]:
        """Every committed version of ``did`` newer than ``version``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT version, changes, state, event_id, rules, created FROM desired "
                "WHERE did = ? AND version > ? ORDER BY version", (did, version)).fetchall()
        return [ConfigVersion(did, v, json.loads(ch), json.loads(st), ev, tuple(json.loads(ru)), cr)
                for v, ch, st, ev, ru, cr in rows]

    # ------------------------------------------------------------------ reported state
    def record_report(self, did: str, version: int, status: str, *, reason: str | None = None,
                      apply_ms: float | None = None, now: float | None = None) -> None:
        """Record a device's applied/failed report (idempotent per version)."""
        self.record_reports([(did, version, status, reason, apply_ms)], now=now)

    def record_reports(self, reports: Iterable[tuple[str, int, str, str | None, float | None]], *,
                       now: float | None = None) -> None:
        """Record many ``(did, version, status, reason, apply_ms)`` reports in one transaction."""
        now = time.time() if now is None else now
        batch = list(reports)

        def write(db: sqlite3.Connection) -> None:
            for did, version, status, reason, apply_ms in batch:
                db.execute("INSERT OR REPLACE INTO reports(did, version, status, reason, apply_ms, at) "
                           "VALUES (?,?,?,?,?,?)", (did, version, status, reason, apply_ms, now))
                if status == "applied":
                    row = db.execute("SELECT state FROM desired WHERE did = ? AND version = ?",
                                     (did, version)).fetchone()
                    state = row[0] if row else "{}"
                    db.execute("INSERT INTO reported(did, version, state, status, reason, at) "
                               "VALUES (?,?,?,?,?,?) ON CONFLICT(did) DO UPDATE SET "
                               "version=excluded.version, state=excluded.state, status=excluded.status, "
                               "reason=excluded.reason, at=excluded.at WHERE excluded.version >= version",
                               (did, version, state, status, reason, now))
                else:
                    db.execute("INSERT INTO reported(did, version, state, status, reason, at) "
                               "VALUES (?, 0, '{}', ?, ?, ?) ON CONFLICT(did) DO UPDATE SET "
                               "status=excluded.status, reason=excluded.reason, at=excluded.at",
                               (did, status, reason, now))

        if batch:
            self._tx(write)

    def reported(self, did: str) -> Reported:
        """The last reported state of ``did``."""
        with self._lock:
            row = self._db.execute("SELECT version, state, status, reason, at FROM reported "
                                   "WHERE did = ?", (did,)).fetchone()
        if row is None:
            return Reported(did)
        return Reported(did, row[0], json.loads(row[1]), row[2], row[3], row[4])

    def delta(self, did: str) -> dict[str, Any]:
        """Desired minus reported for ``did``."""
        return delta(self.desired(did), self.reported(did).state)

    def report_counts(self) -> dict[str, int]:
        """Number of reports by status (applied/failed)."""
        with self._lock:
            return dict(self._db.execute("SELECT status, COUNT(*) FROM reports GROUP BY status").fetchall())

    def pending(self) -> list[tuple[str, int, int]]:
        """``(did, desired_version, reported_version)`` for every device behind its desired state."""
        out = []
        for did, (version, _) in self._latest.items():
            rv = self._reported_version(did)
            if version > rv:
                out.append((did, version, rv))
        return out

    def _reported_version(self, did: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(version) FROM reports WHERE did = ?", (did,)).fetchone()
        return int(row[0] or 0)

    # ------------------------------------------------------------------ events
    def record_event(self, event_id: str, sender: str, event_type: str, fields: Mapping[str, Any],
                     targets: Iterable[str], *, now: float | None = None) -> None:
        """Record a received event and who it targeted."""
        now = time.time() if now is None else now
        self._tx(lambda db: db.execute(
            "INSERT OR IGNORE INTO events(event_id, sender, type, fields, received, targets) "
            "VALUES (?,?,?,?,?,?)",
            (event_id, sender, event_type, json.dumps(dict(fields), sort_keys=True), now,
             json.dumps(sorted(targets)))))

    def event_processed(self, sender: str, event_id: str) -> bool:
        """True when ``sender``'s event ``event_id`` was already processed (persisted dedup)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM processed WHERE sender = ? AND event_id = ?",
                                    (sender, event_id)).fetchone() is not None

    def mark_converged(self, event_id: str, *, failures: int = 0, now: float | None = None) -> None:
        """Record when every target of an event had reported."""
        now = time.time() if now is None else now
        self._tx(lambda db: db.execute("UPDATE events SET converged = ?, failures = ? WHERE event_id = ?",
                                       (now, failures, event_id)))

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent events, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT event_id, sender, type, fields, received, targets, converged, failures "
                "FROM events ORDER BY received DESC LIMIT ?", (limit,)).fetchall()
        return [{"event_id": e, "sender": s, "type": t, "fields": json.loads(f), "received": r,
                 "targets": json.loads(tg), "converged": c, "failures": fl}
                for e, s, t, f, r, tg, c, fl in rows]


__all__ = ["ConfigVersion", "Reported", "Store", "merge", "delta"]
