"""The coordinator lease and write fencing, kept in the state store itself.

One row per lease name in ``lease (name, holder, token, expires)``. Taking a free or expired lease
bumps ``token`` (strictly increasing forever: releasing or expiring keeps the counter); the holder
renews with the same token. A fenced :class:`~sdk.coord.coordinator.store.Store` checks, inside
every write transaction, that the row still carries its holder and token, so a coordinator that
lost the lease to a standby writes nothing (:class:`LeaseLost`). Expiry is the next acquirer's
business: a writer whose token is still in the row may write; a new holder bumps the token first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sdk.coord.coordinator.errors import InvalidValue, LeaseLost

log = logging.getLogger(__name__)

DEFAULT_LEASE = "coordinator"

@dataclass(frozen=True)
class LeaseState:
    """A lease row: who holds it (None once released), its fencing token, when it expires."""

    holder: str | None
    token: int
    expires: float | None


class Connection(Protocol):
    """The statements the shared store logic runs: ``?`` placeholders on either backend."""

    def execute(self, sql: str, params: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, rows: Any, /) -> Any: ...


def _check_ttl(ttl: float) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise InvalidValue(f"lease ttl must be a positive number of seconds, not {ttl!r}")
    return float(ttl)


class LeaseMixin:
    """Lease and fencing methods of the state store (both backends)."""

    #: row-lock clauses the backend supports (SQLite holds the whole database under BEGIN IMMEDIATE)
    _FOR_UPDATE = ""
    _FOR_SHARE = ""
    _fence_state: tuple[str, str, int] | None = None        # (name, holder, token) when fenced

    def _tx(self, fn: Callable[[Any], Any], *, fenced: bool = True) -> Any:  # pragma: no cover - Store's
        raise NotImplementedError

    def reload(self) -> None:  # pragma: no cover - Store's
        raise NotImplementedError

    def _read_one(self, sql: str, params: tuple[Any, ...]) -> Any:  # pragma: no cover - Store's
        raise NotImplementedError

    def acquire_lease(self, holder: str, ttl: float, *, name: str = DEFAULT_LEASE,
                      now: float | None = None) -> int | None:
        """Take the lease if free or expired (a new token) or renew it if ``holder`` has it (same
        token); None while another holder's lease is unexpired. One transaction, atomic across
        processes. Taking it anew reloads this store's caches (another process may have written)."""
        ttl = _check_ttl(ttl)
        if not holder:
            raise InvalidValue("lease holder must be a non-empty string")

        def write(db: Connection) -> tuple[int | None, bool]:
            db.execute("INSERT INTO lease(name, holder, token, expires) VALUES (?, NULL, 0, NULL) "
                       "ON CONFLICT(name) DO NOTHING", (name,))
            row = db.execute(f"SELECT holder, token, expires FROM lease WHERE name = ?{self._FOR_UPDATE}",
                             (name,)).fetchone()
            current, token, expires = row[0], int(row[1]), row[2]
            at = time.time() if now is None else now
            if current == holder:
                db.execute("UPDATE lease SET expires = ? WHERE name = ?", (at + ttl, name))
                return token, False
            if current is not None and expires is not None and expires > at:
                return None, False
            db.execute("UPDATE lease SET holder = ?, token = ?, expires = ? WHERE name = ?",
                       (holder, token + 1, at + ttl, name))
            return token + 1, True

        token, taken = self._tx(write, fenced=False)
        if taken:
            log.info("lease %s taken by %s with token %d", name, holder, token)
            self.reload()
        return token

    def renew_lease(self, holder: str, token: int, ttl: float, *, name: str = DEFAULT_LEASE,
                    now: float | None = None) -> bool:
        """Extend ``holder``'s lease by ``ttl`` from now; False when the row no longer carries
        ``holder`` and ``token`` (the lease was lost)."""
        ttl = _check_ttl(ttl)
        at = time.time() if now is None else now
        ok = bool(self._tx(lambda db: db.execute(
            "UPDATE lease SET expires = ? WHERE name = ? AND holder = ? AND token = ?",
            (at + ttl, name, holder, int(token))).rowcount == 1, fenced=False))
        if not ok:
            log.warning("lease %s: renewal by %s with token %d refused (lost)", name, holder, token)
        return ok

    def release_lease(self, holder: str, token: int, *, name: str = DEFAULT_LEASE) -> None:
        """Give the lease up now (when ``holder`` and ``token`` still hold it); the token counter stays."""
        self._tx(lambda db: db.execute(
            "UPDATE lease SET holder = NULL, expires = ? WHERE name = ? AND holder = ? AND token = ?",
            (time.time(), name, holder, int(token))), fenced=False)

    def lease(self, name: str = DEFAULT_LEASE) -> LeaseState | None:
        """The lease row ``name``, or None when it was never taken."""
        row = self._read_one("SELECT holder, token, expires FROM lease WHERE name = ?", (name,))
        return None if row is None else LeaseState(row[0], int(row[1]), row[2])

    def fence(self, token: int | None, *, holder: str = "", name: str = DEFAULT_LEASE) -> None:
        """From now on every write first checks, in its own transaction, that lease ``name`` still
        carries ``holder`` and ``token``, else raises :class:`LeaseLost` and writes nothing.
        ``fence(None)`` turns the check off (the default: one coordinator on its own store)."""
        if token is None:
            self._fence_state = None
            return
        if not holder:
            raise InvalidValue("fence needs the lease holder")
        self._fence_state = (name, holder, int(token))

    @property
    def fenced(self) -> tuple[str, str, int] | None:
        """``(name, holder, token)`` this store's writes are fenced on, or None."""
        return self._fence_state

    def _check_fence(self, db: Connection) -> None:
        """Inside a write transaction: refuse it unless the lease row carries the fenced token."""
        if self._fence_state is None:
            return
        name, holder, token = self._fence_state
        row = db.execute(f"SELECT holder, token FROM lease WHERE name = ?{self._FOR_SHARE}", (name,)).fetchone()
        if row is None or row[0] != holder or int(row[1]) != token:
            now_holder, now_token = (None, None) if row is None else (row[0], row[1])
            err = LeaseLost(f"lease {name} lost: held by {now_holder} with token {now_token}, this store "
                            f"writes for {holder} with token {token}; nothing written")
            log.error("%s", err)
            raise err


__all__ = ["DEFAULT_LEASE", "LeaseMixin", "LeaseState"]
