"""The PostgreSQL runner and what only the PostgreSQL store does: a fresh database per test,
connection loss as a typed error with reconnect, and state loaded at open by a second process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from brokers.postgres import PostgresServer
from sdk.coord.coordinator.errors import LeaseLost, StoreError, StoreUnavailable
from sdk.coord.coordinator.store import open_store

pytestmark = pytest.mark.postgres


def test_fresh_databases_are_separate(postgres: PostgresServer) -> None:
    import psycopg

    first, second = postgres.fresh_url(), postgres.fresh_url()
    assert first != second and first.startswith(f"postgresql://postgres@127.0.0.1:{postgres.port}/")
    with psycopg.connect(first, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        listen = conn.execute("SHOW listen_addresses").fetchone()
    assert listen == ("127.0.0.1",)
    with psycopg.connect(second, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll (10 ms) until ``condition()`` holds (in a thread that an event loop does not run)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _admin(postgres: PostgresServer) -> Any:
    import psycopg

    return psycopg.connect(postgres.url(), autocommit=True)


def test_connection_loss_is_a_typed_error_and_the_next_call_reconnects(postgres: PostgresServer,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(postgres.fresh_url())
    store.commit({"did:a": ({"k": 1}, ("r",))})
    with _admin(postgres) as admin:                                  # the server drops our session
        admin.execute("SELECT pg_terminate_backend(%s)", (store._db._conn.info.backend_pid,))
    with pytest.raises(StoreUnavailable) as err:
        store.commit({"did:a": ({"k": 2}, ("r",))}, event_id="e2", event=("did:s", "t", {}))
    assert err.value.reason == "store_unavailable" and isinstance(err.value, StoreError)
    assert "connection lost" in caplog.text
    assert store.latest_version("did:a") == 1                        # nothing half-applied
    (v2,) = store.commit({"did:a": ({"k": 2}, ("r",))}, event_id="e2", event=("did:s", "t", {}))
    assert v2.version == 2 and store.event_processed("did:s", "e2")   # reconnected
    store.close()


def test_server_down_then_back(tmp_path: Path) -> None:
    server = PostgresServer().start()
    try:
        url = server.url(server.create_database())
        store = open_store(url)
        store.commit({"did:a": ({"k": 1}, ("r",))})
        server.stop()
        with pytest.raises(StoreUnavailable):
            store.reported("did:a")
        with pytest.raises(StoreUnavailable):
            store.commit({"did:a": ({"k": 2}, ("r",))})
        with pytest.raises(StoreUnavailable):
            open_store(url)
        server.start()
        assert store.commit({"did:a": ({"k": 2}, ("r",))})[0].version == 2
        store.close()
    finally:
        server.cleanup()


def test_a_fenced_write_in_progress_holds_off_a_takeover(postgres: PostgresServer) -> None:
    """The writer locks the lease row FOR SHARE: the acquirer's FOR UPDATE waits for its commit."""
    url = postgres.fresh_url()
    writer, standby = open_store(url), open_store(url)
    assert writer.acquire_lease("A", 1, now=100.0) == 1
    writer.fence(1, holder="A")
    inside, taken = threading.Event(), []

    def take_over() -> None:
        inside.wait(10)
        taken.append(standby.acquire_lease("B", 5, now=200.0))

    thread = threading.Thread(target=take_over)
    thread.start()
    pid = standby._db._connection().info.backend_pid

    def in_transaction(db: Any) -> None:
        inside.set()
        with _admin(postgres) as admin:                              # wait until B waits on our row lock
            _wait_for(lambda: admin.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                            (pid,)).fetchone() == ("Lock",))
        assert not taken

    (v1,) = writer.commit({"did:a": ({"k": 1}, ("r",))}, also=in_transaction)
    thread.join(10)
    assert v1.version == 1 and taken == [2] and standby.latest_version("did:a") == 1
    with pytest.raises(LeaseLost):
        writer.commit({"did:a": ({"k": 2}, ("r",))})
    writer.close()
    standby.close()


_SECOND = textwrap.dedent("""
    import sys
    from sdk.coord.coordinator.store import open_store
    store = open_store(sys.argv[1])
    token = store.acquire_lease("P2", 30)
    store.fence(token, holder="P2")
    store.commit({"did:a": ({"k": 2}, ("p2",))}, origins={"did:a": {"policy": "model", "model": "m"}})
    store.commit_operator({"did:b": {"x": 1}}, operator="did:op", event_id="o1", op="desired.set")
    store.release_lease("P2", token)
""")


def test_a_store_that_takes_the_lease_loads_what_another_process_wrote(postgres: PostgresServer) -> None:
    url = postgres.fresh_url()
    standby = open_store(url)                                        # open early, as a hot standby
    standby.commit({"did:a": ({"k": 1}, ("r",))})
    assert standby.pins("did:b") == {}
    out = subprocess.run([sys.executable, "-c", _SECOND, url], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2], check=False)
    assert out.returncode == 0, out.stderr
    assert standby.acquire_lease("S", 5) == 2                        # taking the lease reloads the caches
    assert standby.latest_version("did:a") == 2 and standby.desired("did:a") == {"k": 2}
    assert standby.pins("did:b") == {"x": "did:op"} and standby.latest_version("did:b") == 1
    standby.fence(2, holder="S")
    assert standby.commit({"did:a": ({"k": 3}, ("r",))})[0].version == 3
    assert standby.history("did:a")[1]["origin"] == {"policy": "model", "model": "m"}
    standby.close()


def test_session_timeouts_and_url_parameters_win(postgres: PostgresServer) -> None:
    url = postgres.fresh_url()
    store = open_store(url)
    assert store._db.execute("SHOW lock_timeout").fetchone() == ("10s",)
    assert store._db.execute("SHOW statement_timeout").fetchone() == ("1min",)
    store.close()
    store = open_store(url + "?options=-c%20lock_timeout%3D1500&application_name=mine", durability="full")
    assert store._db.execute("SHOW lock_timeout").fetchone() == ("1500ms",)
    assert store._db.execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert store._db.execute("SELECT current_setting('application_name')").fetchone() == ("mine",)
    store.close()
