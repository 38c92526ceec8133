"""Hot-standby coordinators: one active instance, the others waiting on a lease in the shared store.

Every instance runs :class:`HACoordinator` over the same ``[store] url`` (PostgreSQL; a SQLite
file works for instances on one host) with the same coordinator identity (key, DID, credential:
the fleet trusts one coordinator DID) and a data directory of its own. The lease row in the store
(``Store.acquire_lease``) names the active instance and carries a fencing token that grows by one
at every takeover:

* **standby**: try ``acquire_lease`` every ``poll_interval`` (at most ``lease_ttl / 5``). A standby
  holds no broker connection and no coordinator state, so it cannot answer a hello, an event or an
  operator request, and it has no will that could announce "offline" over a serving active. Its
  readiness is the store: it polls the lease, and ``ha.json`` / the metrics say so.
* **promotion**: with the lease held, open a fresh store, ``fence`` it with the token (every write
  transaction checks the lease row first: a writer whose lease was taken writes nothing and gets
  :class:`~sdk.coord.coordinator.errors.LeaseLost`), load the state from it as a restart does, connect
  and announce a new ``boot``: devices re-authenticate stating their last version and the pump
  sends every committed version they miss. Events not acknowledged by the old active are re-sent by
  the devices and deduplicated by the store's ``processed`` table.
* **active**: renew every ``lease_ttl / 3``. A renewal refused, none succeeding for ``0.8 x
  lease_ttl``, or any ``LeaseLost`` from the store demotes at once: the broker connection is closed
  first (no more publishes, subscriptions gone; a clean disconnect, so no will), then the
  coordinator is stopped without announcing anything, and the instance goes back to standby.

kill -9 of the active: its lease expires at most ``lease_ttl`` after its last renewal and a standby
polls within ``poll_interval``: with the defaults (3 s, 0.6 s) a takeover starts within about
3.6 s. A paused active (SIGSTOP) that wakes up after its lease was taken is refused by the fence at
its first write and by its next renewal (split brain prevented in the store; it may publish a few
already committed configs before it notices, which devices take in version order anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sdk.coord.coordinator.errors import LeaseLost, StoreError
from sdk.coord.coordinator.lock import DataDirLock
from sdk.errors import AutoGLMError

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator
    from sdk.coord.coordinator.store import Store

log = logging.getLogger(__name__)

ACTIVE, STANDBY, STOPPED = "active", "standby", "stopped"
DEFAULT_LEASE_TTL = 3.0
LEASE_NAME = "coordinator"
STATUS_FILE = "ha.json"
#: without a successful renewal for this share of the TTL, the active steps down (before others
#: may take the lease: the margin absorbs clock skew between hosts and a slow store)
_RENEW_DEADLINE = 0.8


def default_instance() -> str:
    """``HOST-PID``: an instance name unique on the host."""
    return f"{socket.gethostname()}-{os.getpid()}"


class _FencedStore:
    """A store whose every call reports :class:`LeaseLost` to the HA runner before re-raising it."""

    def __init__(self, store: Any, on_lost: Callable[[], None]) -> None:
        self._store = store
        self._on_lost = on_lost

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except LeaseLost:
                self._on_lost()
                raise

        return call


class HACoordinator:
    """Run ``build()`` (a new, unstarted :class:`Coordinator`) only while this instance holds the lease.

    ``await ha.start()`` opens the store and starts the lease loop (standby or active within one
    poll); ``await ha.stop()`` steps down (a graceful stop: the lease is released, so a standby
    takes over at its next poll). ``role``, ``token``, ``lease_holder`` and ``coordinator`` (the
    serving instance, else None) describe the state; ``ha.json`` in ``data_dir`` holds the same.
    """

    def __init__(self, build: Callable[[], Coordinator], *, store_url: str, data_dir: str | Path,
                 instance: str | None = None, lease_ttl: float = DEFAULT_LEASE_TTL,
                 poll_interval: float | None = None, metrics_port: int = 0,
                 durability: str = "normal", lease_name: str = LEASE_NAME) -> None:
        if not 0.5 <= lease_ttl <= 600:
            raise ValueError("lease_ttl must be between 0.5 and 600 seconds")
        self.build = build
        self.store_url = store_url
        self.data_dir = Path(data_dir)
        self.instance = instance or default_instance()
        #: the lease holder: the instance name and a per-run suffix, so a restarted instance waits
        #: for its predecessor's lease to expire instead of inheriting its token
        self.holder = f"{self.instance}/{secrets.token_hex(4)}"
        self.lease_ttl = float(lease_ttl)
        self.poll_interval = min(poll_interval or self.lease_ttl / 5, self.lease_ttl / 5)
        self.renew_interval = self.lease_ttl / 3
        self.metrics_port = metrics_port
        self.durability = durability
        self.lease_name = lease_name
        self.role = STOPPED
        self.token: int | None = None
        self.lease_holder: str | None = None
        self.lease_token: int | None = None
        self.coordinator: Coordinator | None = None
        self.promotions = 0
        #: promotions that took the lease over from another holder
        self.failovers = 0
        self.since = time.time()
        self._listeners: list[Callable[[str, dict[str, Any]], Any]] = []
        self._lease_store: Store | None = None
        self._lock = DataDirLock(self.data_dir)
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._stopping = asyncio.Event()
        self._http: Any = None
        self._metrics: Any = None
        self._status_written = 0.0
        self._took_over = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Lock the data directory, open the shared store and start the lease loop."""
        from sdk.coord.coordinator.store import open_store

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._lease_store = open_store(self.store_url, durability=self.durability)
        except BaseException:
            self._lock.release()
            raise
        self._set_role(STANDBY)
        self._start_metrics()
        self._task = asyncio.ensure_future(self._run())
        log.info("HA coordinator %s on %s (lease ttl %.1fs, poll %.2fs)", self.holder, self.store_url,
                 self.lease_ttl, self.poll_interval,
                 extra={"event": "ha_started", "holder": self.holder})

    async def stop(self) -> None:
        """Step down (releasing the lease) and stop the loop."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            with contextlib.suppress(Exception):
                self._http[0].shutdown()
                self._http[0].server_close()
            self._http = None
        if self._lease_store is not None:
            self._lease_store.close()
            self._lease_store = None
        self._set_role(STOPPED)
        self._lock.release()

    async def __aenter__(self) -> HACoordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def add_listener(self, listener: Callable[[str, dict[str, Any]], Any]) -> None:
        """``listener(what, info)``: ``promoted`` (token, failover), ``demoted`` (reason)."""
        self._listeners.append(listener)

    async def wait_role(self, role: str, timeout: float = 30.0) -> None:
        """Wait until this instance is ``role`` (tests, scripts)."""
        deadline = time.monotonic() + timeout
        while self.role != role:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.instance} is {self.role}, not {role}, after {timeout}s")
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ the lease loop
    async def _run(self) -> None:
        while not self._stopping.is_set():
            token = self._try_acquire()
            if token is None:
                self._write_status()
                await self._sleep(self.poll_interval)
                continue
            try:
                reason = await self._serve(token)
            except Exception:                      # the loop outlives any one promotion
                log.exception("serving with lease token %d failed", token)
                reason = "start_failed"
            if reason == "start_failed":           # give another instance the chance, then retry
                await self._sleep(self.lease_ttl)
        self._write_status(force=True)

    def _try_acquire(self) -> int | None:
        store = self._lease_store
        assert store is not None
        try:
            before = store.lease(name=self.lease_name)
            token = store.acquire_lease(self.holder, self.lease_ttl, name=self.lease_name)
            if token is None:
                now = store.lease(name=self.lease_name)
                self.lease_holder = now.holder if now is not None else None
                self.lease_token = now.token if now is not None else None
                return None
        except AutoGLMError as exc:
            log.warning("lease %s not polled: %s: %s", self.lease_name, exc.reason, exc)
            return None
        self._took_over = before is not None and before.holder not in (None, self.holder) \
            and before.token < token
        if self._took_over:
            self.failovers += 1
            self._gauge("failovers")
        self.lease_holder, self.lease_token = self.holder, token
        return int(token)

    async def _serve(self, token: int) -> str:
        """Serve as the active instance with ``token`` until the lease is lost or stop; the reason."""
        self._lost.clear()
        self.token = token
        try:
            coord = self.build()
            self._prepare(coord, token)
        except Exception:
            log.exception("cannot build the coordinator; lease token %d released", token,
                          extra={"event": "ha_start_failed", "token": token})
            self._release(token)
            self.token = None
            return "start_failed"
        renewer = asyncio.ensure_future(self._renew_loop(token))
        reason = "stopped"
        try:
            starting = asyncio.ensure_future(coord.start())
            lost = asyncio.ensure_future(self._lost.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({starting, lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                stopping.cancel()
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(BaseException):
                    await starting
                reason = "lease_lost" if self._lost.is_set() else "stopped"
                await self._step_down(coord, reason, started=False, token=token)
                return reason
            exc = starting.exception()
            if exc is not None:
                reason = "lease_lost" if isinstance(exc, LeaseLost) else "start_failed"
                log.error("promotion with lease token %d failed: %s", token, exc,
                          extra={"event": "ha_start_failed", "token": token})
                await self._step_down(coord, reason, started=False, token=token)
                return reason
            self.coordinator = coord
            self.promotions += 1
            self._set_role(ACTIVE)
            log.warning("coordinator %s active with lease token %d (%s)", self.holder, token,
                        "took it over" if self._took_over else "it was free",
                        extra={"event": "ha_promoted", "token": token, "holder": self.holder})
            self._emit("promoted", token=token, failovers=self.failovers, boot=coord.boot)
            lost = asyncio.ensure_future(self._lost.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                stopping.cancel()
            reason = "lease_lost" if self._lost.is_set() else "stopped"
            await self._step_down(coord, reason, started=True, token=token)
            return reason
        finally:
            renewer.cancel()
            with contextlib.suppress(BaseException):
                await renewer
            self.coordinator = None
            self.token = None
            if not self._stopping.is_set() or self.role != STOPPED:
                self._set_role(STANDBY)

    def _prepare(self, coord: Coordinator, token: int) -> None:
        """Fence the coordinator's store with ``token`` before anything is read or written."""
        def hook(store: Store) -> Store:
            store.fence(token, holder=self.holder, name=self.lease_name)
            return cast("Store", _FencedStore(store, lambda: self._on_lease_lost(token)))

        coord.store_url = self.store_url
        coord.store_hook = hook
        coord._lock = self._lock  # noqa: SLF001 - the instance's data-dir lock, held across roles
        if self.metrics_port:
            coord.metrics_port = 0                 # served by this runner, whatever the role

    def _on_lease_lost(self, token: int) -> None:
        if token != self.token:                    # a leftover of an earlier term: not this one's news
            return
        if not self._lost.is_set():
            log.error("the store refused a write: lease token %s is no longer ours", self.token,
                      extra={"event": "ha_lease_lost", "token": self.token})
            self._lost.set()
        coord = self.coordinator
        if coord is not None:                      # stop publishing now, not at the next loop turn
            with contextlib.suppress(RuntimeError):   # no loop here: the renewal notices it too
                asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(_close_client(coord)))

    async def _renew_loop(self, token: int) -> None:
        last_ok = time.monotonic()
        while True:
            deadline = last_ok + _RENEW_DEADLINE * self.lease_ttl
            await asyncio.sleep(max(0.0, min(self.renew_interval - (time.monotonic() - last_ok),
                                             deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                log.error("lease token %d not renewed for %.1fs; stepping down", token,
                          time.monotonic() - last_ok, extra={"event": "ha_renew_timeout", "token": token})
                self._lost.set()
                return
            t0 = time.monotonic()
            assert self._lease_store is not None
            try:
                ok = self._lease_store.renew_lease(self.holder, token, self.lease_ttl, name=self.lease_name)
            except StoreError as exc:
                log.warning("lease renewal failed (%s: %s); retrying", exc.reason, exc)
                await asyncio.sleep(min(0.2, self.renew_interval / 4))
                continue
            if not ok:
                log.error("lease token %d was taken over; stepping down", token,
                          extra={"event": "ha_lease_lost", "token": token})
                self._lost.set()
                return
            last_ok = t0
            self._write_status()

    async def _step_down(self, coord: Coordinator, reason: str, *, started: bool, token: int) -> None:
        """Stop serving. Lease lost: close the broker connection first (nothing more goes out, not
        even "offline": the new active is online), then the coordinator. Stopping on our own: stop
        the coordinator normally (offline presence), then release the lease for a standby."""
        if reason == "lease_lost" or not started:
            await _close_client(coord)
        if started or coord.store is not None:
            try:
                await coord.stop()
            except AutoGLMError as exc:            # e.g. a refused final write: close what is left
                log.warning("coordinator stop after %s: %s", reason, exc)
                if coord.store is not None:
                    with contextlib.suppress(Exception):
                        coord.store.close()
        if reason != "lease_lost":
            self._release(token)
        self._lock.acquire()                         # coord.stop() released the shared lock object
        if started:
            log.warning("coordinator %s stepped down (%s, token %d)", self.holder, reason, token,
                        extra={"event": "ha_demoted", "reason": reason, "token": token})
            self._emit("demoted", reason=reason, token=token)

    def _release(self, token: int) -> None:
        if self._lease_store is not None:
            try:
                self._lease_store.release_lease(self.holder, token, name=self.lease_name)
            except StoreError as exc:              # it expires on its own
                log.warning("lease token %d not released: %s", token, exc)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # ------------------------------------------------------------------ state, status, metrics
    def _set_role(self, role: str) -> None:
        if role != self.role:
            self.role = role
            self.since = time.time()
            self._gauge("role")
        self._write_status(force=True)

    def _emit(self, what: str, /, **info: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(what, info)
            except Exception:
                log.exception("HA listener failed on %s", what)

    def status(self) -> dict[str, Any]:
        """Role, lease and counters (what ``ha.json`` holds)."""
        coord = self.coordinator
        return {"instance": self.instance, "holder": self.holder, "role": self.role, "token": self.token,
                "lease": {"holder": self.lease_holder, "token": self.lease_token},
                "lease_ttl": self.lease_ttl, "since": self.since, "promotions": self.promotions,
                "failovers": self.failovers, "boot": coord.boot if coord is not None else None,
                "pid": os.getpid(), "updated": time.time()}

    def _write_status(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._status_written < 1.0:
            return
        self._status_written = now
        path = self.data_dir / STATUS_FILE
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.status()), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write %s: %s", path, exc)

    def _start_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        registry = CollectorRegistry()
        role = Gauge("autoglm_coordinator_role", "1 for this instance's role (active or standby)", ["role"],
                     registry=registry)
        token = Gauge("autoglm_coordinator_lease_token", "Fencing token of the lease held (0: none)",
                      registry=registry)
        failovers = Counter("autoglm_coordinator_failovers", "Takeovers of the lease from another holder",
                            registry=registry)
        self._metrics = (role, token, failovers)
        registry.register(_CurrentCoordinator(self))
        self.metrics_registry = registry
        self._gauge("role")
        if self.metrics_port:
            from prometheus_client import start_http_server

            self._http = start_http_server(self.metrics_port, addr="127.0.0.1", registry=registry)

    def _gauge(self, what: str) -> None:
        if self._metrics is None:
            return
        role, token, failovers = self._metrics
        if what == "role":
            for r in (ACTIVE, STANDBY):
                role.labels(r).set(1 if self.role == r else 0)
            token.set(self.token or 0)
        elif what == "failovers":
            failovers.inc()


class _CurrentCoordinator:
    """A collector yielding the serving coordinator's metrics (none while standby)."""

    def __init__(self, ha: HACoordinator) -> None:
        self.ha = ha

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        coord = self.ha.coordinator
        if coord is not None:
            yield from coord.metrics.registry.collect()


async def _close_client(coord: Any) -> None:
    with contextlib.suppress(Exception):
        await coord.client.aclose()


def read_status(data_dir: str | Path) -> dict[str, Any] | None:
    """The ``ha.json`` an HA instance keeps in its data directory (None if it has none)."""
    from sdk.identity.hazmat.json import loads

    try:
        data = loads((Path(data_dir) / STATUS_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


__all__ = ["HACoordinator", "ACTIVE", "STANDBY", "STOPPED", "DEFAULT_LEASE_TTL", "default_instance",
           "read_status"]
