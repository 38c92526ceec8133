"""The state store on both backends (SQLite WAL, PostgreSQL): versions, catch-up queries, reports,
delta, reopen after close, typed errors; the SQLite file's own checks and migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sdk.coord.coordinator.store import Store, delta, merge
from tests.fixtures.postgres import StoreOpener


def test_versions_state_and_catch_up(store_opener: StoreOpener) -> None:
    store = store_opener()
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


def test_reopen_keeps_committed_versions(store_opener: StoreOpener) -> None:
    store = store_opener()
    store.commit({f"did:{i}": ({"k": i}, ("r",)) for i in range(50)}, event_id="e")
    store.save_devices([{"did": "did:0", "kind": "phone"}])
    # no close(): simulate a crash; a second connection sees everything committed
    again = store_opener()
    assert again.latest_version("did:7") == 1 and again.desired("did:7") == {"k": 7}
    assert again.load_devices() == [{"did": "did:0", "kind": "phone"}]
    (nxt,) = again.commit({"did:7": ({"k": 8}, ("r",))})
    assert nxt.version == 2
    if store_opener.backend == "sqlite":
        mode = sqlite3.connect(store_opener.url()).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_failed_report_and_counts(store_opener: StoreOpener) -> None:
    store = store_opener()
    store.commit({"did:b": ({"x": 1}, ("r",))})
    store.record_report("did:b", 1, "failed", reason="unsupported")
    rep = store.reported("did:b")
    assert rep.status == "failed" and rep.reason == "unsupported" and rep.version == 0
    assert store.report_counts() == {"failed": 1}
    store.close()


def test_a_batch_of_reports_keeps_each_devices_last_word(store_opener: StoreOpener) -> None:
    store = store_opener()
    store.commit({"did:a": ({"w": 1}, ("r",)), "did:b": ({"w": 1}, ("r",))})
    store.commit({"did:a": ({"w": 2}, ("r",))})
    store.record_reports([
        ("did:a", 2, "applied", None, 1.0),          # the reported state is version 2's desired state
        ("did:a", 1, "applied", None, 1.0),          # an older version does not take it back
        ("did:b", 1, "applied", None, 1.0),
        ("did:b", 1, "failed", "disk full", None),   # a later failure keeps the state, not the status
        ("did:c", 9, "applied", None, 1.0),          # no desired row: an empty state
    ], now=50.0)
    a, b, c = store.reported("did:a"), store.reported("did:b"), store.reported("did:c")
    assert (a.version, a.state, a.status) == (2, {"w": 2}, "applied")
    assert (b.version, b.state, b.status, b.reason) == (1, {"w": 1}, "failed", "disk full")
    assert (c.version, c.state, c.status) == (9, {}, "applied")
    assert store.report_status("did:a", 1) == "applied" and store.report_status("did:b", 1) == "failed"
    assert store.report_counts() == {"applied": 3, "failed": 1}
    store.close()


def test_merge_and_delta_helpers() -> None:
    assert merge({"a": 1, "b": 2}, {"a": None, "c": 3}) == {"b": 2, "c": 3}
    assert delta({"a": 1, "b": 2}, {"a": 1, "z": 0}) == {"b": 2, "z": None}


def test_event_dedup_is_per_sender_and_survives_reopen(store_opener: StoreOpener) -> None:
    store = store_opener()
    ev = ("did:display", "screen_available", {"width": 800, "height": 600})
    (v1,) = store.commit({"did:phone": ({"w": 800}, ("r",))}, event_id="e-0001", event=ev)
    assert v1.version == 1 and store.event_processed("did:display", "e-0001")
    assert not store.event_processed("did:other", "e-0001")           # scoped to the sender
    assert store.commit({"did:phone": ({"w": 800}, ("r",))}, event_id="e-0001", event=ev) == []
    assert store.latest_version("did:phone") == 1
    store.close()

    store = store_opener()                                            # a restarted coordinator
    assert store.event_processed("did:display", "e-0001")
    assert store.commit({"did:phone": ({"w": 800}, ("r",))}, event_id="e-0001", event=ev) == []
    assert [c.version for c in store.versions_since("did:phone", 0)] == [1]
    other = ("did:other", "screen_available", {"width": 640, "height": 480})
    (v2,) = store.commit({"did:phone": ({"w": 640}, ("r",))}, event_id="e-0001", event=other)
    assert v2.version == 2                                            # another sender's event applies
    store.close()


def test_schema_version_and_legacy_store_migrates(tmp_path: Path) -> None:
    from sdk.coord.coordinator.store import SCHEMA_VERSION

    store = Store(tmp_path / "new.db")
    assert store.created and store.schema_version == SCHEMA_VERSION
    store.close()
    legacy = sqlite3.connect(tmp_path / "old.db")            # a store written before schema versions
    legacy.executescript(
        "CREATE TABLE devices (did TEXT PRIMARY KEY, record TEXT NOT NULL, updated REAL NOT NULL);"
        "CREATE TABLE desired (did TEXT NOT NULL, version INTEGER NOT NULL, changes TEXT NOT NULL,"
        " state TEXT NOT NULL, event_id TEXT, rules TEXT NOT NULL, created REAL NOT NULL,"
        " PRIMARY KEY (did, version));"
        "INSERT INTO desired VALUES ('did:a', 4, '{}', '{\"k\": 1}', NULL, '[]', 0);")
    legacy.commit()
    legacy.close()
    store = Store(tmp_path / "old.db")
    assert not store.created and store.schema_version == SCHEMA_VERSION
    assert store.latest_version("did:a") == 4 and store.desired("did:a") == {"k": 1}
    assert store.allocate_status_index("did:a") == 0
    store.close()


def test_store_from_a_newer_schema_is_refused(store_opener: StoreOpener) -> None:
    from sdk.coord.coordinator.errors import StoreVersionError

    store = store_opener()
    assert store.created and store_opener().created is False
    if store_opener.backend == "sqlite":
        db = sqlite3.connect(store_opener.url())
        db.execute("PRAGMA user_version = 99")
        db.close()
    else:
        store._db.execute("UPDATE schema_info SET version = 99")
    with pytest.raises(StoreVersionError) as err:
        store_opener()
    assert err.value.reason == "store_too_new"


@pytest.mark.parametrize("content", [b"", b"SQLite format 3\x00" + b"\xff" * 4000, b"garbage" * 500])
def test_corrupt_or_empty_file_is_refused_unless_fresh(tmp_path: Path, content: bytes) -> None:
    from sdk.coord.coordinator.errors import StoreCorrupt

    path = tmp_path / "coordinator.db"
    path.write_bytes(content)
    with pytest.raises(StoreCorrupt) as err:
        Store(path)
    assert err.value.reason == "store_corrupt" and path.read_bytes() == content
    store = Store(path, fresh=True)
    assert store.created and store.moved_aside is not None and store.moved_aside.read_bytes() == content
    store.commit({"did:a": ({"k": 1}, ("r",))})
    store.close()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {"x": [float("-inf")]}])
def test_unsignable_values_commit_nothing(store_opener: StoreOpener, bad: object) -> None:
    from sdk.coord.coordinator.errors import InvalidValue

    store = store_opener()
    ev = ("did:display", "custom", {"x": 1})
    with pytest.raises(InvalidValue):
        store.commit({"did:phone": ({"k": bad}, ("r",))}, event_id="e-0001", event=ev)
    assert store.latest_version("did:phone") == 0 and not store.event_processed("did:display", "e-0001")
    with pytest.raises(InvalidValue):
        store.commit({"did:phone": ({"k": "x" * 5000}, ("r",))}, event_id="e-0002", event=ev, max_bytes=4096)
    with pytest.raises(InvalidValue):
        store.save_devices([{"did": "did:phone", "heartbeat_ttl": float("nan")}])
    (v1,) = store.commit({"did:phone": ({"k": 1}, ("r",))}, event_id="e-0001", event=ev)
    assert v1.version == 1                                   # nothing was blocked
    assert store_opener().versions_since("did:phone", 0)[0].state == {"k": 1}


def test_issuer_state_is_transactional_and_survives_reopen(store_opener: StoreOpener) -> None:
    store = store_opener()
    assert [store.allocate_status_index(d) for d in ("did:a", "did:b", "did:a")] == [0, 1, 2]
    store.revoke_indexes(store.issued_indexes("did:a"))
    store.close()
    store = store_opener()
    assert store.revoked_indexes() == [0, 2] and store.issued_indexes("did:b") == [1]
    assert store.allocate_status_index("did:c") == 3          # never handed out twice
    store.import_issuer_state({"next_index": 10, "by_did": {"did:z": [7]}, "revoked": [7]}, marker="m")
    assert store.allocate_status_index("did:d") == 10 and store.get_meta("m") is not None
    assert store.revoked_indexes() == [0, 2, 7]
    store.close()


def test_advance_raises_the_version_floor(store_opener: StoreOpener) -> None:
    store = store_opener()
    store.commit({"did:a": ({"k": 1}, ("r",))})
    assert store.advance("did:a", 1) is None                   # not behind
    floor = store.advance("did:a", 5)
    assert floor is not None and floor.version == 5 and floor.state == {"k": 1}
    (nxt,) = store.commit({"did:a": ({"j": 2}, ("r",))})
    assert nxt.version == 6 and nxt.state == {"k": 1, "j": 2}
    store.close()


def test_origin_is_recorded_per_device_and_in_history(store_opener: StoreOpener) -> None:
    from sdk.coord.coordinator.errors import InvalidValue

    store = store_opener()
    origin = {"policy": "model", "model": "smollm2", "model_version": "1", "prompt_hash": "sha256:ab"}
    store.commit({"did:a": ({"k": 1}, ("r",)), "did:b": ({"k": 2}, ("r",))}, origins={"did:a": origin})
    store.commit({"did:a": ({"k": 3}, ("r",))})
    assert [h["origin"] for h in store.history("did:a")] == [None, origin]
    assert store.history("did:b")[0]["origin"] is None
    with pytest.raises(InvalidValue):
        store.commit({"did:a": ({"k": 4}, ("r",))}, origins={"did:a": "model"})  # type: ignore[dict-item]
    with pytest.raises(InvalidValue):
        store.commit({"did:a": ({"k": 4}, ("r",))}, origins={"did:a": {"score": float("nan")}})
    assert store.latest_version("did:a") == 2
    assert store_opener().history("did:a", limit=2)[1]["origin"] == origin


def test_schema_4_store_migrates_to_5_keeping_its_data(tmp_path: Path) -> None:
    from sdk.coord.coordinator.store import SCHEMA_VERSION

    store = Store(tmp_path / "s.db")
    store.commit({"did:a": ({"k": 1}, ("r",))}, event_id="e1", event=("did:s", "t", {}))
    store.close()
    db = sqlite3.connect(tmp_path / "s.db")                  # what a schema-4 coordinator left
    db.execute("DROP TABLE lease")
    db.execute("ALTER TABLE desired DROP COLUMN origin")
    db.execute("PRAGMA user_version = 4")
    db.commit()
    db.close()
    store = Store(tmp_path / "s.db")
    assert store.schema_version == SCHEMA_VERSION == 5 and not store.created
    assert store.latest_version("did:a") == 1 and store.event_processed("did:s", "e1")
    assert store.history("did:a")[0]["origin"] is None and store.lease() is None
    store.commit({"did:a": ({"k": 2}, ("r",))}, origins={"did:a": {"policy": "rules"}})
    assert store.history("did:a")[0]["origin"] == {"policy": "rules"}
    assert store.acquire_lease("c1", 5) == 1
    store.close()


def test_open_store_and_the_store_section(tmp_path: Path) -> None:
    from sdk.coord.coordinator.config import parse_config
    from sdk.coord.coordinator.errors import ConfigFileError, StoreError
    from sdk.coord.coordinator.store import open_store

    store = open_store(f"sqlite://{tmp_path}/a.db")
    assert isinstance(store, Store) and store.path == tmp_path / "a.db"
    store.close()
    store = open_store(tmp_path / "b.db", durability="full")
    assert store.path == tmp_path / "b.db" and store.created
    store.close()
    for bad in ("mysql://h/db", "sqlite:"):
        with pytest.raises(StoreError):
            open_store(bad)
    assert parse_config({}).store_url is None
    assert parse_config({"store": {"url": "postgresql://c@h:5/db"}}).store_url == "postgresql://c@h:5/db"
    assert parse_config({"store": {"url": "s.db"}}, base_dir=tmp_path).store_url == str(tmp_path / "s.db")
    for table in ({"url": "mysql://h/db"}, {"url": ""}, {"url": 5}, {"dsn": "x"}, "postgresql://h"):
        with pytest.raises(ConfigFileError):
            parse_config({"store": table})


def test_operator_rollout_and_enrollment_state(store_opener: StoreOpener) -> None:
    from sdk.coord.coordinator.errors import InvalidValue, StoreError

    store = store_opener()
    assert store.is_empty()
    store.save_devices([{"did": "did:a", "kind": "phone"}, {"did": "did:b", "kind": "tv"}])
    store.save_devices([{"did": "did:a", "kind": "tablet"}])
    assert sorted(d["kind"] for d in store.load_devices()) == ["tablet", "tv"] and not store.is_empty()
    store.add_audit([(1.0, "did:op", "desired.set", "{}", "ok"), (2.0, "did:op2", "tags", "{}", "denied")])
    assert [a["op"] for a in store.audit()] == ["tags", "desired.set"]
    assert [a["operator"] for a in store.audit(operator="did:op")] == ["did:op"]
    assert store.audit(before=store.audit()[0]["id"])[0]["op"] == "desired.set"
    store.update_tags({"did:a": (["blue", "x"], []), "did:b": (["blue"], [])})
    store.update_tags({"did:a": (["blue"], ["x"])})
    assert store.load_tags() == {"did:a": {"blue"}, "did:b": {"blue"}}
    store.save_properties("did:a", {"screen": [800, 600]}, now=5.0)
    assert store.load_properties() == {"did:a": ({"screen": [800, 600]}, 5.0)}
    versions = store.commit_operator({"did:a": {"k": 1, "j": None}}, operator="did:op", event_id="o1",
                                     op="desired.set", now=10.0)
    assert [v.version for v in versions] == [1] and store.pins("did:a") == {"k": "did:op"}
    assert store.commit_operator({"did:a": {"k": 1}}, operator="did:op", event_id="o1", op="desired.set") == []
    store.record_event("ev1", "did:s", "changed", {"x": 1}, ["did:a"], now=11.0)
    store.record_event("ev1", "did:s", "changed", {"x": 2}, ["did:a"], now=12.0)   # recorded once
    store.mark_converged("ev1", failures=1, now=13.0)
    (event,) = [e for e in store.events() if e["event_id"] == "ev1"]
    assert (event["fields"], event["converged"], event["failures"]) == ({"x": 1}, 13.0, 1)
    store.record_reports([("did:a", 1, "applied", None, 2.5), ("did:a", 1, "applied", None, 3.0)])
    assert store.reported_versions() == {"did:a": 1} and store.report_status("did:a", 1) == "applied"
    assert store.report_counts() == {"applied": 1}

    doc = {"stage": 0}
    store.save_rollout("r1", "running", doc, created=1.0, members=[("did:a", 0, {"s": 0}), ("did:b", 1, {"s": 0})])
    store.save_rollout_members("r1", [("did:b", 1, {"s": 1})])
    out = store.commit_rollout({"did:b": {"m": 2}}, operator="did:op", event_id="r1-0", op="rollout.step",
                               pin={"did:b": ["m"]}, unpin={"did:a": ["k"]}, rollout_id="r1", state="done",
                               doc={"stage": 1}, created=1.0, members=[("did:b", 1, {"s": 2})])
    assert [(v.did, v.version) for v in out] == [("did:b", 1)]
    assert store.load_rollouts()[0]["state"] == "done" and store.load_rollout_members("r1")[1][2] == {"s": 2}
    assert store.pins("did:a") == {} and store.pinned("did:b") == frozenset({"m"})

    assert store.allocate_coordinator_index("did:a", reserved=range(0, 8)) == 8
    assert store.allocate_status_index("did:b") == 9
    store.record_revocation("did:a", reason="lost", operator="did:op", indexes=[8], now=20.0)
    assert store.revocation("did:a") == {"reason": "lost", "operator": "did:op", "at": 20.0, "indexes": [8]}
    store.add_enroll_token("h1", kind="device", groups=["g"], uses=1, expires=100.0, approve="auto",
                           valid_for=60.0, operator=None, now=1.0)
    assert store.use_enroll_token("h1", now=2.0)[0] == "ok" and store.use_enroll_token("h1", now=3.0)[0] == "used"
    assert store.use_enroll_token("nope")[0] == "unknown"
    with pytest.raises(StoreError):                          # the same token twice: a typed error
        store.add_enroll_token("h1", kind="device", groups=[], uses=1, expires=1.0, approve="auto",
                               valid_for=1.0, operator=None)
    store.add_enroll_request("q1", did="did:c", kind="device", groups=["g"], via="token", state="pending")
    store.set_enroll_request("q1", state="issued", credential={"vc": 1})
    assert store.enroll_requests(did="did:c")[0]["credential"] == {"vc": 1}
    with pytest.raises(InvalidValue):
        store.import_issuer_state({"next_index": -1}, marker="m")

    again = store_opener()                                   # a second process opening it later
    assert again.pins("did:b") == {"m": "did:op"} and again.latest_version("did:b") == 1
    assert again.desired("did:a") == {"k": 1} and again.pending() == [("did:b", 1, 0)]


def test_identical_desired_states_are_shared_and_one_change_moves_only_its_device(
        store_opener: StoreOpener) -> None:
    store = store_opener()
    fleet = [f"did:s{i}" for i in range(20)]
    store.commit({d: ({"ui.layout": "companion", "list": [1, 2]}, ("r",)) for d in fleet}, event_id="e1")
    shared = {id(store._latest[d][1]) for d in fleet}
    assert len(shared) == 1                                  # one object for the 20 equal states
    with pytest.raises(TypeError):
        store._latest[fleet[0]][1]["ui.layout"] = "x"        # the shared state is read-only
    mine = store.desired(fleet[0])                           # a caller's own copy, nested lists too
    mine["ui.layout"] = "mine"
    mine["list"].append(3)
    assert store.desired(fleet[1]) == {"ui.layout": "companion", "list": [1, 2]}
    (one,) = store.commit({fleet[0]: ({"ui.layout": "kiosk"}, ("r",))}, event_id="e2")
    one.state["list"] = "changed by the pump"                # a version's state is the caller's too
    assert store.desired(fleet[0]) == {"ui.layout": "kiosk", "list": [1, 2]}
    assert all(store.desired(d) == {"ui.layout": "companion", "list": [1, 2]} for d in fleet[1:])
    assert store._latest[fleet[1]][1] is store._latest[fleet[19]][1]
    store.commit({fleet[1]: ({"ui.layout": "kiosk"}, ("r",))}, event_id="e3")
    assert store._latest[fleet[0]][1] is store._latest[fleet[1]][1]   # equal again: shared again
    floor = store.advance(fleet[2], 9)
    assert floor is not None and floor.state == {"ui.layout": "companion", "list": [1, 2]}
    assert store._latest[fleet[2]][1] is store._latest[fleet[3]][1]
    again = store_opener()                                   # loaded from the store: shared as well
    assert again._latest[fleet[5]][1] is again._latest[fleet[6]][1]
    assert again.desired(fleet[0]) == {"ui.layout": "kiosk", "list": [1, 2]}
    assert again.latest_version(fleet[2]) == 9
    store.close()
    again.close()
