"""SQLite WAL state store: versions, catch-up queries, reports, delta, reopen after close."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sdk.coord.coordinator.store import Store, delta, merge


def test_versions_state_and_catch_up(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    (v1,) = store.commit({"did:a": ({"ui.layout": "companion", "w": 800}, ("r1",))}, event_id="e1")
    (v2,) = store.commit({"did:a": ({"w": None, "h": 600}, ("r2",))}, event_id="e2")
    assert (v1.version, v2.version) == (1, 2)
    assert v2.state == {"ui.layout": "companion", "h": 600}
    assert [c.version for c in store.versions_since("did:a", 0)] == [1, 2]
    assert [c.version for c in store.versions_since("did:a", 1)] == [2]
    assert store.versions_since("did:a", 2) == []
    assert store.pending() == [("did:a", 2, 0)]
    store.record_report("did:a", 1, "applied", apply_ms=0.5)
    assert store.delta("did:a") == {"h": 600, "w": None}
    store.record_report("did:a", 2, "applied")
    assert store.delta("did:a") == {} and store.pending() == []
    assert store.reported("did:a").version == 2
    store.record_report("did:a", 1, "applied")          # a late duplicate never moves back
    assert store.reported("did:a").version == 2
    store.close()


def test_reopen_keeps_committed_versions(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.commit({f"did:{i}": ({"k": i}, ("r",)) for i in range(50)}, event_id="e")
    store.save_devices([{"did": "did:0", "kind": "phone"}])
    # no close(): simulate a crash; a second connection sees everything committed
    again = Store(tmp_path / "state.db")
    assert again.latest_version("did:7") == 1 and again.desired("did:7") == {"k": 7}
    assert again.load_devices() == [{"did": "did:0", "kind": "phone"}]
    (nxt,) = again.commit({"did:7": ({"k": 8}, ("r",))})
    assert nxt.version == 2
    mode = sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()
    again.close()


def test_failed_report_and_counts(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.commit({"did:b": ({"x": 1}, ("r",))})
    store.record_report("did:b", 1, "failed", reason="unsupported")
    rep = store.reported("did:b")
    assert rep.status == "failed" and rep.reason == "unsupported" and rep.version == 0
    assert store.report_counts() == {"failed": 1}
    store.close()


def test_merge_and_delta_helpers() -> None:
    assert merge({"a": 1, "b": 2}, {"a": None, "c": 3}) == {"b": 2, "c": 3}
    assert delta({"a": 1, "b": 2}, {"a": 1, "z": 0}) == {"b": 2, "z": None}


def test_event_dedup_is_per_sender_and_survives_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    ev = ("did:display", "screen_available", {"width": 800, "height": 600})
    (v1,) = store.commit({"did:phone": ({"w": 800}, ("r",))}, event_id="e-0001", event=ev)
    assert v1.version == 1 and store.event_processed("did:display", "e-0001")
    assert not store.event_processed("did:other", "e-0001")           # scoped to the sender
    assert store.commit({"did:phone": ({"w": 800}, ("r",))}, event_id="e-0001", event=ev) == []
    assert store.latest_version("did:phone") == 1
    store.close()

    store = Store(tmp_path / "state.db")                              # a restarted coordinator
    assert store.event_processed("did:display", "e-0001")
    assert store.commit({"did:phone": ({"w": 800}, ("r",))}, event_id="e-0001", event=ev) == []
    assert [c.version for c in store.versions_since("did:phone", 0)] == [1]
    other = ("did:other", "screen_available", {"width": 640, "height": 480})
    (v2,) = store.commit({"did:phone": ({"w": 640}, ("r",))}, event_id="e-0001", event=other)
    assert v2.version == 2                                            # another sender's event applies
    store.close()
