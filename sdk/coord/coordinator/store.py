"""SQLite (WAL) persistence of devices, versioned desired state, reported state, events and
the issuer's status-list state, in one file with a schema version.

Every change is committed before it is published, so a restart or a ``kill -9`` loses no
committed config: on start the coordinator reloads desired versions and re-sends whatever a
device has not reported applied. ``durability="full"`` also survives power loss (fsync per commit).

Opening refuses a file that is not a healthy store (0 bytes, not SQLite, failing
``quick_check``) with :class:`StoreCorrupt`; ``fresh=True`` moves such a file aside and starts empty.
Values are written as strict JSON (no NaN/Infinity): what the store holds can always be signed.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk.coord.coordinator.errors import InvalidValue, StoreCorrupt, StoreError, StoreVersionError
from sdk.coord.coordinator.shared_state import SharedStates, thaw
from sdk.coord.coordinator.store_lease import Connection, LeaseMixin, LeaseState
from sdk.coord.coordinator.values import strict_dumps
from sdk.coord.protocol import ConfigVersion

log = logging.getLogger(__name__)

#: 1: devices, desired, reported, reports, events, processed (unversioned stores read as 1)
#: 2: + meta, issued and revoked (the issuer's status-list state)
#: 3: + audit (operator operations), tags (operator-assigned), properties (device-reported),
#:    pins (operator-set desired keys), enroll_tokens and enroll_requests (enrollment)
#: 4: + rollouts and rollout_members (staged roll-outs)
#: 5: + lease (the coordinator lease and its fencing token), desired.origin (how a version was made)
SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    did TEXT PRIMARY KEY, record TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS desired (
    did TEXT NOT NULL, version INTEGER NOT NULL, changes TEXT NOT NULL, state TEXT NOT NULL,
    event_id TEXT, rules TEXT NOT NULL, created REAL NOT NULL, origin TEXT, PRIMARY KEY (did, version));
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
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS issued (
    idx INTEGER PRIMARY KEY, did TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS issued_by_did ON issued(did);
CREATE TABLE IF NOT EXISTS revoked (
    idx INTEGER PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, operator TEXT NOT NULL, op TEXT NOT NULL,
    params TEXT NOT NULL, outcome TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_by_operator ON audit(operator, id);
CREATE TABLE IF NOT EXISTS tags (
    did TEXT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (did, tag));
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags(tag);
CREATE TABLE IF NOT EXISTS properties (
    did TEXT PRIMARY KEY, props TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pins (
    did TEXT NOT NULL, key TEXT NOT NULL, operator TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (did, key));
CREATE TABLE IF NOT EXISTS enroll_tokens (
    token_hash TEXT PRIMARY KEY, kind TEXT NOT NULL, groups TEXT NOT NULL, uses INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0, expires REAL NOT NULL, approve TEXT NOT NULL,
    valid_for REAL NOT NULL, operator TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS enroll_requests (
    id TEXT PRIMARY KEY, did TEXT NOT NULL, kind TEXT NOT NULL, groups TEXT NOT NULL, via TEXT NOT NULL,
    state TEXT NOT NULL, at REAL NOT NULL, credential TEXT);
CREATE INDEX IF NOT EXISTS enroll_requests_by_did ON enroll_requests(did);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, doc TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_members (
    rollout TEXT NOT NULL, did TEXT NOT NULL, rank INTEGER NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (rollout, did));
CREATE TABLE IF NOT EXISTS lease (
    name TEXT PRIMARY KEY, holder TEXT, token INTEGER NOT NULL, expires REAL);
"""

#: columns added to existing tables after their first schema: (table, column, declaration)
_ADDED_COLUMNS = (("desired", "origin", "TEXT"),)



def _dumps(value: Any, *, sort_keys: bool = True) -> str:
    return strict_dumps(value, sort_keys=sort_keys)


def _origin(origins: Mapping[str, Mapping[str, Any]] | None, did: str) -> str | None:
    """The strict-JSON text of ``did``'s origin document (None when not given)."""
    if origins is None or origins.get(did) is None:
        return None
    origin = origins[did]
    if not isinstance(origin, Mapping):
        raise InvalidValue(f"origin for {did} must be a JSON object, not {type(origin).__name__}")
    return _dumps(dict(origin))


def _move_aside(path: Path) -> Path:
    """Rename a bad store (and its WAL/SHM files) out of the way; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{target}{suffix}"))
    return target


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


#: a device's report, one row per (device, version)
_RECORD_REPORT = ("INSERT INTO reports(did, version, status, reason, apply_ms, at) VALUES (?,?,?,?,?,?) "
                  "ON CONFLICT(did, version) DO UPDATE SET status = excluded.status, "
                  "reason = excluded.reason, apply_ms = excluded.apply_ms, at = excluded.at")
#: an applied version is the device's reported state: the desired state of that version
_REPORTED_APPLIED = (
    "INSERT INTO reported(did, version, state, status, reason, at) "
    "VALUES (?, ?, COALESCE((SELECT state FROM desired WHERE did = ? AND version = ?), '{}'), ?, ?, ?) "
    "ON CONFLICT(did) DO UPDATE SET version=excluded.version, state=excluded.state, "
    "status=excluded.status, reason=excluded.reason, at=excluded.at WHERE excluded.version >= reported.version")
#: any other report changes only the reported status
_REPORTED_OTHER = ("INSERT INTO reported(did, version, state, status, reason, at) VALUES (?, 0, '{}', ?, ?, ?) "
                   "ON CONFLICT(did) DO UPDATE SET status=excluded.status, reason=excluded.reason, at=excluded.at")


class Store(LeaseMixin):
    """The coordinator's state store. One writer (the daemon); safe to read from other threads.

    ``created`` is True when this open found no store (a new, empty file): the daemon uses it to
    tell a first start from a store that went missing. Several coordinators sharing one store
    take its lease (:meth:`acquire_lease`) and fence their writes on its token (:meth:`fence`).
    """

    _db: Any
    _BEGIN = "BEGIN IMMEDIATE"       # SQLite: take the write lock at the start (across processes)

    def __init__(self, path: str | Path, *, durability: str = "normal", fresh: bool = False) -> None:
        if durability not in ("normal", "full"):
            raise ValueError("durability must be 'normal' or 'full'")
        self.path = Path(path)
        self.location = str(self.path)      # what log lines and errors name the store by
        self._lock = threading.RLock()
        self.moved_aside: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the state store's directory {self.path.parent}: {exc}") from exc
        try:
            self._db, self.created = self._open(durability)
        except StoreCorrupt as exc:
            if not fresh:
                err = StoreCorrupt(f"{exc}; start fresh (autoglm coordinator --fresh) to move it aside "
                                   "and begin with an empty store")
                log.error("%s", err)
                raise err from exc
            self.moved_aside = _move_aside(self.path)
            log.warning("%s; moved to %s, starting with an empty store", exc, self.moved_aside)
            self._db, self.created = self._open(durability)
        self._touched: set[str] = set()      # DIDs whose desired or reported state changed
        try:
            self.reload()
        except (sqlite3.Error, ValueError) as exc:
            self._db.close()
            raise StoreCorrupt(f"state store {self.path} holds unreadable desired state: {exc}") from exc

    def reload(self) -> None:
        """Reload the in-memory caches (latest versions, pins) from the store: another process
        sharing it may have written since this one opened it (the daemon calls it on taking the lease)."""
        latest: dict[str, tuple[int, dict[str, Any]]] = {}
        # -- identical desired states are one shared, read-only object (shared_state.py)
        self._states = shared = SharedStates()
        # -- end shared states
        with self._lock:
            rows = self._db.execute(
                "SELECT d.did, d.version, d.state FROM desired d JOIN "
                "(SELECT did, MAX(version) v FROM desired GROUP BY did) m "
                "ON d.did = m.did AND d.version = m.v").fetchall()
            for did, version, state in rows:
                latest[did] = (int(version), shared.intern(state))
            self._latest = latest
            self._pins = None

    def _open(self, durability: str) -> tuple[sqlite3.Connection, bool]:
        existed = self.path.exists()
        if existed and self.path.stat().st_size == 0 and not Path(f"{self.path}-wal").exists():
            raise StoreCorrupt(f"state store {self.path} is a 0-byte file (truncated or lost)")
        try:
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state store {self.path}: {exc}") from exc
        try:
            if existed:
                check = db.execute("PRAGMA quick_check").fetchone()
                if check is None or check[0] != "ok":
                    raise StoreCorrupt(f"state store {self.path} failed its integrity check: {check}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            db.execute("PRAGMA busy_timeout=5000")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            created = not tables
            if version > SCHEMA_VERSION:
                raise StoreVersionError(f"state store {self.path} has schema {version}; this coordinator "
                                        f"knows up to {SCHEMA_VERSION}")
            if version < SCHEMA_VERSION:
                self._migrate(db, 1 if version == 0 and not created else version, created)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreCorrupt(f"state store {self.path} is not a readable SQLite store: {exc}") from exc
        except StoreError:
            db.close()
            raise
        return db, created

    def _migrate(self, db: sqlite3.Connection, version: int, created: bool) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            for table, column, decl in _ADDED_COLUMNS:
                if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            if version == 1 and db.execute("SELECT 1 FROM processed LIMIT 1").fetchone() is None:
                # a store written before event dedup: its recorded events count as processed
                db.execute("INSERT OR IGNORE INTO processed(sender, event_id, at) "
                           "SELECT sender, event_id, received FROM events")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if not created:
            log.info("state store %s migrated from schema %d to %d", self.path, version, SCHEMA_VERSION)

    @property
    def schema_version(self) -> int:
        """The schema version of the open store."""
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def is_empty(self) -> bool:
        """True when the store holds no device, version or issuer state."""
        with self._lock:
            return all(self._db.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() is None
                       for t in ("devices", "desired", "issued", "meta"))

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:  # pragma: no cover - close on a broken db
                log.warning("closing state store: %s", exc)

    def _rollback(self) -> None:
        self._db.execute("ROLLBACK")

    def _read_one(self, sql: str, params: tuple[Any, ...]) -> Any:
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def _tx(self, fn: Callable[[Any], Any], *, fenced: bool = True) -> Any:
        """Run ``fn(db)`` in one write transaction (first checking the fence, when set)."""
        with self._lock:
            try:
                self._db.execute(self._BEGIN)
                try:
                    if fenced:
                        self._check_fence(self._db)
                    out = fn(self._db)
                except BaseException:
                    self._rollback()
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
        data = [(r["did"], _dumps(r), now) for r in rows]
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
               now: float | None = None, max_bytes: int | None = None,
               also: Callable[[Connection], Any] | None = None,
               origins: Mapping[str, Mapping[str, Any]] | None = None) -> list[ConfigVersion]:
        """Commit one new desired version per device, atomically; returns the new versions.

        ``event`` = ``(sender, type, fields)`` records the triggering event in the same transaction
        and marks ``(sender, event_id)`` processed; an event already processed commits nothing and
        returns ``[]`` (each event is applied exactly once, across restarts). A version that is not
        strict JSON, or whose config document exceeds ``max_bytes``, raises :class:`InvalidValue`
        before anything is written. ``also(db)`` runs inside the same transaction (operator pins).
        ``origins`` gives, per DID, a JSON object saying how its version was made (a policy, a
        model and its version, a prompt hash); :meth:`history` returns it.
        """
        now = time.time() if now is None else now
        out: list[ConfigVersion] = []
        for did, (changes, rules) in changes_by_device.items():
            version, state = self._latest.get(did, (0, {}))
            out.append(ConfigVersion(did, version + 1, dict(changes), merge(state, changes),
                                     event_id, tuple(rules), now))
        # strict JSON before the transaction: a value that cannot be signed commits nothing
        rows = [(c.did, c.version, _dumps(c.changes), _dumps(c.state), c.event_id, _dumps(list(c.rules)),
                 c.created, _origin(origins, c.did)) for c in out]
        if max_bytes is not None:
            for c, row in zip(out, rows, strict=True):
                size = len(row[2].encode()) + len(row[3].encode()) + len(row[5].encode()) + 256
                if size > max_bytes:
                    raise InvalidValue(f"config v{c.version} for {c.did} is {size} bytes (limit {max_bytes})")
        event_row = None if event is None else (event_id, event[0], event[1], _dumps(dict(event[2])), now,
                                                _dumps(sorted(changes_by_device)))
        def write(db: Connection) -> bool:
            if event is not None:
                if event_id is not None and db.execute(
                        "INSERT INTO processed(sender, event_id, at) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                        (event[0], event_id, now)).rowcount == 0:
                    return False
                assert event_row is not None
                db.execute("INSERT INTO events(event_id, sender, type, fields, received, targets) "
                           "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING", event_row)
            db.executemany("INSERT INTO desired(did, version, changes, state, event_id, rules, created, origin) "
                           "VALUES (?,?,?,?,?,?,?,?)", rows)
            if also is not None:
                also(db)
            return True

        if rows or event is not None or also is not None:
            if not self._tx(write):
                log.info("event %s from %s already processed; nothing committed", event_id,
                         event[0] if event else "?")
                return []
            for c, row in zip(out, rows, strict=True):
                self._latest[c.did] = (c.version, self._states.intern(row[3]))
                self._touched.add(c.did)
        return out

    def drain_touched(self) -> set[str]:
        """DIDs whose desired or reported state changed since the last call (status snapshots)."""
        out, self._touched = self._touched, set()
        return out

    def latest_version(self, did: str) -> int:
        """The newest desired version for ``did`` (0 when none)."""
        return self._latest.get(did, (0, {}))[0]

    def desired(self, did: str) -> dict[str, Any]:
        """The current desired state of ``did`` (the caller's own copy)."""
        return thaw(self._latest.get(did, (0, {}))[1])

    def versions_since(self, did: str, version: int) -> list[ConfigVersion]:
        """Every committed version of ``did`` newer than ``version``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT version, changes, state, event_id, rules, created FROM desired "
                "WHERE did = ? AND version > ? ORDER BY version", (did, version)).fetchall()
        return [ConfigVersion(did, v, json.loads(ch), json.loads(st), ev, tuple(json.loads(ru)), cr)
                for v, ch, st, ev, ru, cr in rows]

    def advance(self, did: str, version: int, *, reason: str = "store_behind",
                now: float | None = None) -> ConfigVersion | None:
        """Raise ``did``'s version floor to ``version`` (a device is ahead of the store): records an
        empty placeholder version so the next commit is ``version + 1``; None when not behind."""
        current, state = self._latest.get(did, (0, {}))
        if version <= current:
            return None
        now = time.time() if now is None else now
        cv = ConfigVersion(did, version, {}, dict(state), None, (reason,), now)
        self._tx(lambda db: db.execute(
            "INSERT INTO desired(did, version, changes, state, event_id, rules, created) "
            "VALUES (?,?,?,?,?,?,?)",
            (did, version, "{}", _dumps(cv.state), None, _dumps([reason]), now)))
        self._latest[did] = (version, state)
        self._touched.add(did)
        return cv

    # ------------------------------------------------------------------ issuer state
    def allocate_status_index(self, did: str, *, now: float | None = None) -> int:
        """Hand out the next status-list index to ``did`` (one transaction; never handed out twice)."""
        now = time.time() if now is None else now

        def write(db: Connection) -> int:
            row = db.execute("SELECT value FROM meta WHERE key = 'next_status_index'").fetchone()
            top = db.execute("SELECT MAX(idx) FROM issued").fetchone()[0]
            index = max(int(row[0]) if row else 0, -1 if top is None else int(top) + 1)
            db.execute("INSERT INTO issued(idx, did, at) VALUES (?,?,?)", (index, did, now))
            db.execute("INSERT INTO meta(key, value) VALUES ('next_status_index', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(index + 1),))
            return index

        return int(self._tx(write))

    def issued_indexes(self, did: str) -> list[int]:
        """Status-list indexes handed out to ``did``."""
        with self._lock:
            return [int(i) for (i,) in self._db.execute("SELECT idx FROM issued WHERE did = ? ORDER BY idx",
                                                        (did,))]

    def revoke_indexes(self, indexes: Iterable[int], *, now: float | None = None) -> None:
        """Mark status-list indexes revoked (one transaction; revocation is never undone)."""
        now = time.time() if now is None else now
        rows = [(int(i), now) for i in indexes]
        if rows:
            self._tx(lambda db: db.executemany("INSERT INTO revoked(idx, at) VALUES (?,?) ON CONFLICT DO NOTHING",
                                               rows))

    def revoked_indexes(self) -> list[int]:
        """Every revoked status-list index."""
        with self._lock:
            return [int(i) for (i,) in self._db.execute("SELECT idx FROM revoked ORDER BY idx")]

    def get_meta(self, key: str) -> str | None:
        """A value from the store's ``meta`` table."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a ``meta`` value (one transaction)."""
        self._tx(lambda db: db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value)))

    def import_issuer_state(self, state: Mapping[str, Any], *, marker: str, now: float | None = None) -> None:
        """Import a legacy issuer-state document (``next_index``, ``by_did``, ``revoked``) in one
        transaction, recording ``marker`` so it is imported once; a malformed document raises
        :class:`InvalidValue` and writes nothing."""
        now = time.time() if now is None else now
        try:
            next_index = int(state.get("next_index", 0))
            issued = [(int(i), str(did), now) for did, idx in dict(state.get("by_did", {})).items()
                      for i in idx]
            revoked = [(int(i), now) for i in state.get("revoked", [])]
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidValue(f"malformed issuer state: {exc}") from exc
        if next_index < 0 or any(i < 0 for i, *_ in issued) or any(i < 0 for i, _ in revoked):
            raise InvalidValue("malformed issuer state: negative status index")

        def write(db: Connection) -> None:
            db.executemany("INSERT INTO issued(idx, did, at) VALUES (?,?,?) ON CONFLICT DO NOTHING", issued)
            db.executemany("INSERT INTO revoked(idx, at) VALUES (?,?) ON CONFLICT DO NOTHING", revoked)
            row = db.execute("SELECT value FROM meta WHERE key = 'next_status_index'").fetchone()
            top = max([next_index, int(row[0]) if row else 0, *(i + 1 for i, *_ in issued)])
            db.execute("INSERT INTO meta(key, value) VALUES ('next_status_index', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(top),))
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (marker, str(now)))

        self._tx(write)

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

        def write(db: Connection) -> None:
            db.executemany(_RECORD_REPORT, [(did, version, status, reason, apply_ms, now)
                                            for did, version, status, reason, apply_ms in batch])
            # runs of applied / other reports, in order (two reports of one device in one batch
            # leave its reported row as the last one says)
            for applied, run in itertools.groupby(batch, key=lambda r: r[2] == "applied"):
                if applied:
                    db.executemany(_REPORTED_APPLIED, [(did, version, did, version, status, reason, now)
                                                       for did, version, status, reason, _ in run])
                else:
                    db.executemany(_REPORTED_OTHER, [(did, status, reason, now) for did, _, status, reason, _ in run])

        if batch:
            self._tx(write)
            self._touched.update(r[0] for r in batch)

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
        """``(did, desired_version, reported_version)`` for every device behind its desired state
        (the reported version is the one ``reported`` holds: the newest applied)."""
        with self._lock:
            applied = dict(self._db.execute("SELECT did, version FROM reported").fetchall())
        return [(did, version, int(applied.get(did, 0))) for did, (version, _) in self._latest.items()
                if version > int(applied.get(did, 0))]

    # ------------------------------------------------------------------ events
    def record_event(self, event_id: str, sender: str, event_type: str, fields: Mapping[str, Any],
                     targets: Iterable[str], *, now: float | None = None) -> None:
        """Record a received event and who it targeted."""
        now = time.time() if now is None else now
        self._tx(lambda db: db.execute(
            "INSERT INTO events(event_id, sender, type, fields, received, targets) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (event_id, sender, event_type, _dumps(dict(fields)), now, _dumps(sorted(targets)))))

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

    # -- operator state: audit of operator requests, operator-assigned tags, device-reported properties
    def add_audit(self, rows: Iterable[tuple[float, str, str, str, str]]) -> None:
        """Append ``(at, operator, op, params summary, outcome)`` audit rows (one transaction)."""
        data = [tuple(r) for r in rows]
        if data:
            self._tx(lambda db: db.executemany(
                "INSERT INTO audit(at, operator, op, params, outcome) VALUES (?,?,?,?,?)", data))

    def audit(self, *, limit: int = 50, operator: str | None = None, op: str | None = None,
              before: int | None = None) -> list[dict[str, Any]]:
        """Audit rows, newest first (optionally one operator's, one op's, or older than id ``before``)."""
        where, args = [], []
        for clause, value in (("operator = ?", operator), ("op = ?", op), ("id < ?", before)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = "SELECT id, at, operator, op, params, outcome FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, int(limit))).fetchall()
        return [{"id": i, "at": at, "operator": who, "op": name, "params": params, "outcome": outcome}
                for i, at, who, name, params, outcome in rows]

    def load_tags(self) -> dict[str, set[str]]:
        """Every device's operator-assigned tags."""
        out: dict[str, set[str]] = {}
        with self._lock:
            for did, tag in self._db.execute("SELECT did, tag FROM tags"):
                out.setdefault(did, set()).add(tag)
        return out

    def update_tags(self, changes: Mapping[str, tuple[Iterable[str], Iterable[str]]]) -> None:
        """Apply ``{did: (added, removed)}`` tag changes in one transaction."""
        add = [(did, t) for did, (added, _) in changes.items() for t in added]
        remove = [(did, t) for did, (_, removed) in changes.items() for t in removed]

        def write(db: Connection) -> None:
            db.executemany("DELETE FROM tags WHERE did = ? AND tag = ?", remove)
            db.executemany("INSERT INTO tags(did, tag) VALUES (?,?) ON CONFLICT DO NOTHING", add)

        if add or remove:
            self._tx(write)

    def load_properties(self) -> dict[str, tuple[dict[str, Any], float]]:
        """Every device's reported properties and when they last changed."""
        with self._lock:
            rows = self._db.execute("SELECT did, props, at FROM properties").fetchall()
        return {did: (json.loads(props), at) for did, props, at in rows}

    def save_properties(self, did: str, properties: Mapping[str, Any], *, now: float | None = None) -> None:
        """Replace ``did``'s reported properties (strict JSON; :class:`InvalidValue` otherwise)."""
        now = time.time() if now is None else now
        text = _dumps(dict(properties))
        self._tx(lambda db: db.execute(
            "INSERT INTO properties(did, props, at) VALUES (?,?,?) ON CONFLICT(did) DO UPDATE SET "
            "props = excluded.props, at = excluded.at", (did, text, now)))

    def reported_versions(self) -> dict[str, int]:
        """Every device's reported (applied) version, in one query."""
        with self._lock:
            return {did: int(v) for did, v in self._db.execute("SELECT did, version FROM reported")}

    def history(self, did: str, *, limit: int = 20) -> list[dict[str, Any]]:
        """``did``'s newest desired versions, newest first: version, changes, rules, source, created."""
        with self._lock:
            rows = self._db.execute(
                "SELECT version, changes, event_id, rules, created, origin FROM desired WHERE did = ? "
                "ORDER BY version DESC LIMIT ?", (did, int(limit))).fetchall()
        return [{"version": v, "changes": json.loads(ch), "rules": json.loads(ru), "source": ev,
                 "created": cr, "origin": None if og is None else json.loads(og)}
                for v, ch, ev, ru, cr, og in rows]
    # -- end operator state

    # -- enrollment (tokens, requests, the coordinator's status indexes, revocation reasons)
    def allocate_coordinator_index(self, did: str, *, reserved: range, now: float | None = None) -> int:
        """Like :meth:`allocate_status_index`, skipping ``reserved`` (the offline-issuance range)."""
        now = time.time() if now is None else now

        def write(db: Connection) -> int:
            row = db.execute("SELECT value FROM meta WHERE key = 'next_status_index'").fetchone()
            top = db.execute("SELECT MAX(idx) FROM issued").fetchone()[0]
            index = max(int(row[0]) if row else 0, -1 if top is None else int(top) + 1)
            if index in reserved:
                index = reserved.stop
            db.execute("INSERT INTO issued(idx, did, at) VALUES (?,?,?)", (index, did, now))
            db.execute("INSERT INTO meta(key, value) VALUES ('next_status_index', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(index + 1),))
            return index

        return int(self._tx(write))

    def add_enroll_token(self, token_hash: str, *, kind: str, groups: Iterable[str], uses: int, expires: float,
                         approve: str, valid_for: float, operator: str | None,
                         now: float | None = None) -> None:
        """Record an enrollment token by its SHA-256 (the token itself is never stored)."""
        now = time.time() if now is None else now
        self._tx(lambda db: db.execute(
            "INSERT INTO enroll_tokens(token_hash, kind, groups, uses, used, expires, approve, valid_for, "
            "operator, created) VALUES (?,?,?,?,0,?,?,?,?,?)",
            (token_hash, kind, _dumps(sorted(groups)), uses, expires, approve, valid_for, operator, now)))

    def use_enroll_token(self, token_hash: str, *, now: float | None = None) -> tuple[str, dict[str, Any] | None]:
        """Spend one use of a token in one transaction: ``("ok", row)``, or ``("unknown"|"used"|"expired", row)``."""
        now = time.time() if now is None else now

        def write(db: Connection) -> tuple[str, dict[str, Any] | None]:
            row = db.execute("SELECT kind, groups, uses, used, expires, approve, valid_for, operator "
                             "FROM enroll_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
            if row is None:
                return "unknown", None
            kind, groups, uses, used, expires, approve, valid_for, operator = row
            info = {"kind": kind, "groups": json.loads(groups), "uses": uses, "used": used, "expires": expires,
                    "approve": approve, "valid_for": valid_for, "operator": operator}
            if used >= uses:
                return "used", info
            if expires <= now:
                return "expired", info
            db.execute("UPDATE enroll_tokens SET used = used + 1 WHERE token_hash = ?", (token_hash,))
            info["used"] = used + 1
            return "ok", info

        out: tuple[str, dict[str, Any] | None] = self._tx(write)
        return out

    def add_enroll_request(self, request_id: str, *, did: str, kind: str, groups: Iterable[str], via: str,
                           state: str, credential: Mapping[str, Any] | None = None,
                           now: float | None = None) -> None:
        """Record an enrollment request (``state``: pending, issued or denied)."""
        now = time.time() if now is None else now
        self._tx(lambda db: db.execute(
            "INSERT INTO enroll_requests(id, did, kind, groups, via, state, at, credential) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (request_id, did, kind, _dumps(sorted(groups)), via, state, now,
             None if credential is None else _dumps(dict(credential)))))

    def set_enroll_request(self, request_id: str, *, state: str,
                           credential: Mapping[str, Any] | None = None) -> None:
        """Move a request to ``state`` (with the issued credential)."""
        self._tx(lambda db: db.execute(
            "UPDATE enroll_requests SET state = ?, credential = ? WHERE id = ?",
            (state, None if credential is None else _dumps(dict(credential)), request_id)))

    def enroll_requests(self, *, request_id: str | None = None, did: str | None = None,
                        state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Enrollment requests, newest first, filtered by id, DID and/or state."""
        where, args = [], []
        for column, value in (("id", request_id), ("did", did), ("state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = ("SELECT id, did, kind, groups, via, state, at, credential FROM enroll_requests"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY at DESC LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [{"id": i, "did": d, "kind": k, "groups": json.loads(g), "via": v, "state": s, "at": a,
                 "credential": None if c is None else json.loads(c)} for i, d, k, g, v, s, a, c in rows]

    def record_revocation(self, did: str, *, reason: str, operator: str | None, indexes: Iterable[int],
                          now: float | None = None) -> None:
        """Remember why and by whom ``did`` was revoked (``meta`` key ``revocation:<did>``)."""
        now = time.time() if now is None else now
        self.set_meta(f"revocation:{did}", _dumps({"reason": reason, "operator": operator, "at": now,
                                                    "indexes": sorted(indexes)}))

    def revocation(self, did: str) -> dict[str, Any] | None:
        """The recorded revocation of ``did`` (reason, operator, at, indexes), if any."""
        value = self.get_meta(f"revocation:{did}")
        return None if value is None else dict(json.loads(value))
    # -- end enrollment

    # -- pins: desired-state keys an operator set on a device; rule outputs leave them alone
    _pins: dict[str, dict[str, str]] | None = None       # did -> {key: operator}, loaded on first use

    def _pin_index(self) -> dict[str, dict[str, str]]:
        if self._pins is None:
            pins: dict[str, dict[str, str]] = {}
            with self._lock:
                for did, key, operator in self._db.execute("SELECT did, key, operator FROM pins"):
                    pins.setdefault(did, {})[key] = operator
            self._pins = pins
        return self._pins

    def pins(self, did: str) -> dict[str, str]:
        """``{key: operator DID}`` of the keys operators pinned on ``did``."""
        return dict(self._pin_index().get(did, {}))

    def pinned(self, did: str) -> frozenset[str]:
        """The keys of ``did`` that rule outputs must not change."""
        return frozenset(self._pin_index().get(did, ()))

    def commit_operator(self, changes_by_device: Mapping[str, Mapping[str, Any]], *, operator: str,
                        event_id: str, op: str, unpin: Mapping[str, Iterable[str]] | None = None,
                        now: float | None = None, max_bytes: int | None = None) -> list[ConfigVersion]:
        """Commit an operator's changes as one transaction with its pins; returns the new versions.

        A key set to a value is pinned to ``operator`` on that device; a key set to ``None`` is
        removed from the state and unpinned; ``unpin`` names further ``{did: keys}`` to unpin
        (devices without a new version). The versions record ``operator:<did>`` as their rule and
        the request as an event of type ``op`` (the source in the device's history)."""
        now = time.time() if now is None else now
        pin_rows = [(did, k, operator, now) for did, ch in changes_by_device.items()
                    for k, v in ch.items() if v is not None]
        unpin_rows = [(did, k) for did, ch in changes_by_device.items() for k, v in ch.items() if v is None]
        unpin_rows += [(did, k) for did, keys in (unpin or {}).items() for k in keys]

        def write_pins(db: Connection) -> None:
            db.executemany("DELETE FROM pins WHERE did = ? AND key = ?", unpin_rows)
            db.executemany("INSERT INTO pins(did, key, operator, at) VALUES (?,?,?,?) ON CONFLICT(did, key) "
                           "DO UPDATE SET operator = excluded.operator, at = excluded.at", pin_rows)

        source = (f"operator:{operator}",)
        fields = {"targets": len(changes_by_device)}
        versions = self.commit({did: (dict(ch), source) for did, ch in changes_by_device.items()},
                               event_id=event_id, event=(operator, op, fields), now=now,
                               max_bytes=max_bytes, also=write_pins)
        self._update_pin_index(unpin_rows, pin_rows)
        return versions

    def _update_pin_index(self, unpin_rows: Iterable[tuple[str, str]],
                          pin_rows: Iterable[tuple[str, str, str, float]]) -> None:
        """Apply committed pin and unpin rows to the in-memory pin index."""
        index = self._pin_index()
        for did, key in unpin_rows:
            keys = index.get(did)
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del index[did]
        for did, key, who, _ in pin_rows:
            index.setdefault(did, {})[key] = who
    # -- end pins

    # -- roll-outs: one row per roll-out (its state document) and per target device (its membership)
    def save_rollout(self, rollout_id: str, state: str, doc: Mapping[str, Any], *, created: float,
                     members: Iterable[tuple[str, int, Mapping[str, Any]]] = ()) -> None:
        """Upsert a roll-out's state document and ``(did, rank, doc)`` member rows (one transaction)."""
        now = time.time()
        text = _dumps(dict(doc))
        rows = [(rollout_id, did, rank, _dumps(dict(m))) for did, rank, m in members]

        def write(db: Connection) -> None:
            db.execute("INSERT INTO rollouts(id, state, doc, created, updated) VALUES (?,?,?,?,?) "
                       "ON CONFLICT(id) DO UPDATE SET state = excluded.state, doc = excluded.doc, "
                       "updated = excluded.updated", (rollout_id, state, text, created, now))
            self._write_members(db, rows)

        self._tx(write)

    @staticmethod
    def _write_members(db: Connection, rows: list[tuple[str, str, int, str]]) -> None:
        db.executemany("INSERT INTO rollout_members(rollout, did, rank, doc) VALUES (?,?,?,?) "
                       "ON CONFLICT(rollout, did) DO UPDATE SET rank = excluded.rank, doc = excluded.doc", rows)

    def save_rollout_members(self, rollout_id: str, members: Iterable[tuple[str, int, Mapping[str, Any]]]) -> None:
        """Upsert ``(did, rank, doc)`` member rows of a roll-out (one transaction)."""
        rows = [(rollout_id, did, rank, _dumps(dict(m))) for did, rank, m in members]
        if rows:
            self._tx(lambda db: self._write_members(db, rows))

    def load_rollouts(self, *, rollout_id: str | None = None) -> list[dict[str, Any]]:
        """Roll-outs, oldest first: ``{id, state, doc, created, updated}``."""
        sql, args = "SELECT id, state, doc, created, updated FROM rollouts", []
        if rollout_id is not None:
            sql, args = sql + " WHERE id = ?", [rollout_id]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created, id", args).fetchall()
        return [{"id": i, "state": st, "doc": json.loads(d), "created": c, "updated": u} for i, st, d, c, u in rows]

    def load_rollout_members(self, rollout_id: str) -> list[tuple[str, int, dict[str, Any]]]:
        """A roll-out's ``(did, rank, doc)`` member rows, by rank."""
        with self._lock:
            rows = self._db.execute("SELECT did, rank, doc FROM rollout_members WHERE rollout = ? ORDER BY rank",
                                    (rollout_id,)).fetchall()
        return [(did, int(rank), json.loads(doc)) for did, rank, doc in rows]

    def report_status(self, did: str, version: int) -> str | None:
        """What ``did`` reported for ``version`` (applied/failed), or None."""
        with self._lock:
            row = self._db.execute("SELECT status FROM reports WHERE did = ? AND version = ?",
                                   (did, version)).fetchone()
        return None if row is None else str(row[0])

    def commit_rollout(self, changes_by_device: Mapping[str, Mapping[str, Any]], *, operator: str, event_id: str,
                       op: str, pin: Mapping[str, Iterable[str]], unpin: Mapping[str, Iterable[str]],
                       rollout_id: str, state: str, doc: Mapping[str, Any], created: float,
                       members: Iterable[tuple[str, int, Mapping[str, Any]]],
                       now: float | None = None, max_bytes: int | None = None) -> list[ConfigVersion]:
        """Commit a roll-out step: one version per device (recorded as ``operator:<did>``, event
        ``event_id`` processed once: a repeat commits nothing and returns ``[]``), the ``pin`` and
        ``unpin`` keys, the roll-out's state document and member rows, in one transaction."""
        now = time.time() if now is None else now
        pin_rows = [(did, k, operator, now) for did, keys in pin.items() for k in keys]
        unpin_rows = [(did, k) for did, keys in unpin.items() for k in keys]
        rows = [(rollout_id, did, rank, _dumps(dict(m))) for did, rank, m in members]
        text = _dumps(dict(doc))

        def write(db: Connection) -> None:
            db.execute("INSERT INTO rollouts(id, state, doc, created, updated) VALUES (?,?,?,?,?) "
                       "ON CONFLICT(id) DO UPDATE SET state = excluded.state, doc = excluded.doc, "
                       "updated = excluded.updated", (rollout_id, state, text, created, now))
            db.executemany("DELETE FROM pins WHERE did = ? AND key = ?", unpin_rows)
            db.executemany("INSERT INTO pins(did, key, operator, at) VALUES (?,?,?,?) ON CONFLICT(did, key) "
                           "DO UPDATE SET operator = excluded.operator, at = excluded.at", pin_rows)
            self._write_members(db, rows)

        versions = self.commit({did: (dict(ch), (f"operator:{operator}",)) for did, ch in changes_by_device.items()},
                               event_id=event_id, event=(operator, op, {"targets": len(changes_by_device)}),
                               now=now, max_bytes=max_bytes, also=write)
        if versions:
            self._update_pin_index(unpin_rows, pin_rows)
        return versions
    # -- end roll-outs


_PG_SCHEMES = ("postgresql://", "postgres://")


def open_store(url_or_path: str | Path, *, durability: str = "normal", fresh: bool = False) -> Store:
    """Open the state store a ``[store] url`` names: a path or ``sqlite:///abs/path`` opens the
    SQLite store; ``postgresql://user@host:port/db`` the PostgreSQL one (the ``postgres`` extra).
    Both have the same methods and guarantees."""
    text = str(url_or_path)
    if text.startswith(_PG_SCHEMES):
        try:
            from sdk.coord.coordinator.store_postgres import PostgresStore
        except ImportError as exc:
            raise StoreError(f"a PostgreSQL store needs psycopg (pip install 'open-autoglm-sdk[postgres]'): "
                             f"{exc}") from exc
        return PostgresStore(text, durability=durability, fresh=fresh)
    if text.startswith("sqlite:"):
        path = text.removeprefix("sqlite:").removeprefix("//")
        if not path:
            raise StoreError(f"store URL {text!r} names no file (sqlite:///path/to/coordinator.db)")
        return Store(path, durability=durability, fresh=fresh)
    if "://" in text:
        raise StoreError(f"unknown store URL scheme in {text!r} (a path, sqlite:///path or postgresql://...)")
    return Store(url_or_path, durability=durability, fresh=fresh)


__all__ = ["ConfigVersion", "LeaseState", "Reported", "Store", "SCHEMA_VERSION", "delta", "merge", "open_store"]
