"""The PostgreSQL runner and what only the PostgreSQL store does: a fresh database per test,
connection loss as a typed error with reconnect, and state loaded at open by a second process."""

from __future__ import annotations

import pytest

from brokers.postgres import PostgresServer

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
