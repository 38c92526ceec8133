"""The coordinator lease in the state store: acquire/renew/release, contention, monotonic fencing
tokens, and fenced writers refused after a takeover (nothing written), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdk.coord.coordinator.errors import InvalidValue, LeaseLost, StoreError
from tests.fixtures.postgres import StoreOpener


def test_acquire_renew_release(store_opener: StoreOpener) -> None:
    a, b = store_opener(), store_opener()
    assert a.lease() is None
    assert a.acquire_lease("A", 10, now=100.0) == 1
    assert a.acquire_lease("A", 10, now=105.0) == 1                 # the holder renews: same token
    assert b.acquire_lease("B", 10, now=105.0) is None              # held and unexpired
    state = b.lease()
    assert state is not None and (state.holder, state.token, state.expires) == ("A", 1, 115.0)
    assert a.renew_lease("A", 1, 10, now=108.0) and b.lease().expires == 118.0  # type: ignore[union-attr]
    assert b.acquire_lease("B", 10, now=117.9) is None
    assert b.acquire_lease("B", 10, now=118.5) == 2                  # expired: taken with a new token
    assert not a.renew_lease("A", 1, 10, now=119.0)                  # A lost it
    a.release_lease("A", 1)                                          # a stale release changes nothing
    assert b.lease().holder == "B"  # type: ignore[union-attr]
    b.release_lease("B", 2)
    state = a.lease()
    assert state is not None and state.holder is None and state.token == 2
    assert a.acquire_lease("A", 10) == 3                             # free: taken, the counter goes on


def test_tokens_strictly_increase_across_expiry_and_reopen(store_opener: StoreOpener) -> None:
    a, b = store_opener(), store_opener()
    tokens, now = [], 1000.0
    for i in range(10):
        store, holder = (a, "A") if i % 2 == 0 else (b, "B")
        token = store.acquire_lease(holder, 5, now=now)
        assert token is not None
        tokens.append(token)
        now += 6                                                     # let it expire
    assert tokens == sorted(set(tokens)) and tokens == list(range(1, 11))
    a.close()
    again = store_opener()                                           # the counter is in the store
    assert again.acquire_lease("C", 5, now=now) == 11


def test_fenced_writer_refused_after_takeover_writes_nothing(store_opener: StoreOpener) -> None:
    a = store_opener()
    token = a.acquire_lease("A", 5, now=100.0)
    assert token == 1
    a.fence(token, holder="A")
    (v1,) = a.commit({"did:x": ({"k": 1}, ("r",))}, event_id="e1", now=101.0)
    assert v1.version == 1
    b = store_opener()                                               # a standby, opened while A writes
    (v2,) = a.commit({"did:x": ({"k": 2}, ("r",))}, event_id="e2", now=102.0)
    assert a.commit({"did:x": ({"k": 3}, ("r",))}, event_id="e3", now=104.9)[0].version == 3
    assert b.acquire_lease("B", 5, now=106.0) == 2                   # A's lease expired: takeover
    assert b.latest_version("did:x") == 3                            # caches reloaded on taking it
    b.fence(2, holder="B")

    ev = ("did:sensor", "changed", {"v": 1})
    with pytest.raises(LeaseLost) as err:
        a.commit({"did:x": ({"k": 4}, ("r",))}, event_id="e4", event=ev, now=107.0)
    assert err.value.reason == "lease_lost" and isinstance(err.value, StoreError)
    for write in (lambda: a.record_report("did:x", 3, "applied"), lambda: a.set_meta("k", "v"),
                  lambda: a.save_devices([{"did": "did:x"}]), lambda: a.allocate_status_index("did:x")):
        with pytest.raises(LeaseLost):
            write()
    assert a.latest_version("did:x") == 3                           # the refused commit left no trace
    fresh = store_opener()
    assert fresh.latest_version("did:x") == 3 and not fresh.event_processed("did:sensor", "e4")
    assert fresh.reported("did:x").version == 0 and fresh.get_meta("k") is None
    assert fresh.issued_indexes("did:x") == [] and fresh.load_devices() == []
    (v4,) = b.commit({"did:x": ({"k": 4}, ("r",))}, event_id="e4", event=ev, now=107.0)
    assert v4.version == 4 and v4.state == {"k": 4}                  # the new active writes on
    assert not a.renew_lease("A", 1, 5)
    a.fence(None)                                                    # fencing off: single-process use
    a.set_meta("k", "v")
    assert fresh.get_meta("k") == "v"
    del v2


def test_expired_lease_not_taken_still_lets_its_holder_write(store_opener: StoreOpener) -> None:
    a = store_opener()
    assert a.acquire_lease("A", 1, now=100.0) == 1
    a.fence(1, holder="A")
    (v1,) = a.commit({"did:x": ({"k": 1}, ("r",))}, now=500.0)      # long expired, nobody took over
    assert v1.version == 1
    assert a.acquire_lease("A", 1, now=501.0) == 1                   # and its holder keeps its token


def test_fence_before_any_lease_refuses_writes(store_opener: StoreOpener) -> None:
    a = store_opener()
    a.fence(7, holder="A")
    with pytest.raises(LeaseLost):
        a.commit({"did:x": ({"k": 1}, ("r",))})
    assert a.latest_version("did:x") == 0


@pytest.mark.parametrize("ttl", [0, -1.0, math.nan, math.inf, True, "5"])
def test_bad_ttl_or_holder_is_a_typed_error(store_opener: StoreOpener, ttl: object) -> None:
    a = store_opener()
    with pytest.raises(InvalidValue):
        a.acquire_lease("A", ttl)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue):
        a.acquire_lease("", 5)
    with pytest.raises(InvalidValue):
        a.fence(1, holder="")
    assert a.lease() is None


_CONTENDER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from sdk.coord.coordinator.store import open_store
    url, holder, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    store = open_store(url)
    while not go.exists():
        time.sleep(0.001)
    got = []
    for _ in range(60):
        token = store.acquire_lease(holder, 0.002)
        if token is not None:
            got.append(token)
            time.sleep(0.003)                  # past the ttl: another process may take it over
    print(json.dumps(got))
""")


def test_processes_contending_never_share_a_token(store_opener: StoreOpener, tmp_path: Path) -> None:
    """Four processes take a 2 ms lease in a loop on one store: each token has exactly one holder."""
    url = store_opener.url()
    store_opener().close()
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, url, f"P{i}", str(go)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[2]) for i in range(4)]
    go.touch()
    holders: dict[int, set[str]] = {}
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        for token in json.loads(out):
            holders.setdefault(token, set()).add(f"P{i}")
    assert holders and all(len(h) == 1 for h in holders.values()), holders
    assert len({next(iter(h)) for h in holders.values()}) >= 2       # the lease did change hands
    state = store_opener().lease()
    assert state is not None and state.token == max(holders)         # no token lost or reused
