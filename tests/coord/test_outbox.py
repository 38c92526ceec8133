"""The device outbox journal and state file, on a real file system (no broker)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.device import Device, DeviceState, Outbox
from sdk.coord.device.outbox import read_journal
from sdk.coord.device.state import TRANSITIONS, allowed
from sdk.identity import Key

Logs = pytest.LogCaptureFixture


def _event(n: int) -> dict[str, Any]:
    return {"type": "battery", "fields": {"battery_class": "low"}, "event_id": f"event-{n:06d}"}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_events_survive_a_restart_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    for n in range(5):
        box.add(_event(n))
    box.close()
    again = Outbox(path)
    assert again.ids() == [f"event-{n:06d}" for n in range(5)]
    assert again.get("event-000003") is not None and again.get("event-000003").body == _event(3)  # type: ignore[union-attr]


def test_each_change_appends_one_line(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    box.add(_event(0))
    box.add(_event(1))
    first = path.read_bytes()
    box.ack("event-000000")
    assert path.read_bytes().startswith(first)              # nothing rewritten
    assert [json.loads(line) for line in _lines(path)][-1] == {"ack": "event-000000"}
    assert box.add(_event(1)) == [] and len(_lines(path)) == 3   # an id already queued: no change


def test_acks_remove_events_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    for n in range(4):
        box.add(_event(n))
    assert box.ack("event-000001") and box.ack("event-000003")
    assert not box.ack("event-000001")                       # already gone
    assert Outbox(path).ids() == ["event-000000", "event-000002"]


def test_truncated_last_line_is_tolerated_and_cut_off(tmp_path: Path, caplog: Logs) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    for n in range(3):
        box.add(_event(n))
    box.close()
    with open(path, "ab") as f:                              # a write cut short by a crash
        f.write(b'{"event":{"type":"battery","fields":{"battery_cl')
    with caplog.at_level(logging.WARNING, logger="sdk.coord.device.outbox"):
        again = Outbox(path)
    assert again.ids() == ["event-000000", "event-000001", "event-000002"]
    assert any("cut short" in r.getMessage() for r in caplog.records)
    again.add(_event(3))                                     # appends land on a clean line
    assert Outbox(path).ids() == [f"event-{n:06d}" for n in range(4)]
    assert all(json.loads(line) for line in _lines(path))


def test_last_line_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    first, second = (json.dumps({"event": _event(n)}).encode() for n in (0, 1))
    path.write_bytes(first + b"\n" + second)
    box = Outbox(path)
    assert box.ids() == ["event-000000", "event-000001"]
    box.add(_event(2))
    assert Outbox(path).ids() == ["event-000000", "event-000001", "event-000002"]


def test_unreadable_middle_line_is_skipped_with_an_error(tmp_path: Path, caplog: Logs) -> None:
    path = tmp_path / "outbox.jsonl"
    good = [json.dumps({"event": _event(n)}).encode() for n in range(3)]
    path.write_bytes(b"\n".join([good[0], b'{"event": NaN}', good[1], b"\xff\xfe", good[2]]) + b"\n")
    with caplog.at_level(logging.ERROR, logger="sdk.coord.device.outbox"):
        box = Outbox(path)
    assert box.ids() == ["event-000000", "event-000001", "event-000002"]
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2
    assert len(_lines(path)) == 3                           # rewritten without them


def test_compaction_keeps_unacked_events_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path, compact_min=16)
    for n in range(100):
        box.add(_event(n))
    for n in range(0, 100, 4):                               # ack 3 of every 4
        for k in (n, n + 1, n + 2):
            box.ack(f"event-{k:06d}")
    live = [f"event-{n:06d}" for n in range(3, 100, 4)]
    assert box.ids() == live
    assert box.compactions >= 1
    assert len(_lines(path)) <= 2 * len(live) + 16           # bounded by the live size
    assert Outbox(path).ids() == live
    assert read_journal(path) == [_event(int(i.split("-")[1])) for i in live]


def test_the_outbox_is_bounded(tmp_path: Path, caplog: Logs) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path, max_entries=5)
    with caplog.at_level(logging.WARNING, logger="sdk.coord.device.outbox"):
        dropped = [d for n in range(8) for d in box.add(_event(n))]
    assert dropped == ["event-000000", "event-000001", "event-000002"]
    assert sum("outbox full" in r.getMessage() for r in caplog.records) == 3
    assert Outbox(path, max_entries=5).ids() == [f"event-{n:06d}" for n in range(3, 8)]


def test_full_durability_and_memory_only(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.jsonl", durability="full")
    box.add(_event(1))
    box.drop("event-000001")
    assert Outbox(tmp_path / "o.jsonl").ids() == []
    mem = Outbox()
    mem.add(_event(2))
    assert mem.ids() == ["event-000002"] and mem.path is None
    with pytest.raises(ValueError):
        mem.add({"type": "battery"})                        # no event_id
    with pytest.raises(ValueError):
        mem.add({**_event(3), "fields": {"level": float("nan")}})
    assert mem.ids() == ["event-000002"]
    with pytest.raises(ValueError):
        Outbox(durability="sometimes")


def test_read_journal_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    path.write_bytes(json.dumps({"event": _event(0)}).encode() + b"\n{\"ev")
    before = path.read_bytes()
    assert read_journal(path) == [_event(0)]
    assert path.read_bytes() == before
    assert read_journal(tmp_path / "missing.jsonl") == []


def test_device_moves_a_legacy_state_file_outbox_into_the_journal(tmp_path: Path) -> None:
    """A state file from before the journal held the outbox; the device takes the events over."""
    state = tmp_path / "phone-state.json"
    state.write_text(json.dumps({"last_version": 3, "outbox": [_event(1), _event(2), {"junk": 1}]}))
    key = Key.generate()
    dev = Device(key, {"issuer": Key.generate().did}, broker="mqtt://127.0.0.1:1",
                 coordinator=Key.generate().did, state_file=state)
    assert dev.last_version == 3 and dev.outbox == ["event-000001", "event-000002"]
    assert json.loads(state.read_text()) == {"last_version": 3}
    assert read_journal(tmp_path / "phone-state.outbox.jsonl") == [_event(1), _event(2)]


def test_unreadable_state_file_falls_back(tmp_path: Path, caplog: Logs) -> None:
    state = tmp_path / "s.json"
    state.write_text('{"last_version": NaN}')
    with caplog.at_level(logging.WARNING):
        dev = Device(Key.generate(), {"issuer": "did:key:z6Mkx"}, broker="mqtt://127.0.0.1:1",
                     coordinator="did:key:z6Mky", state_file=state, last_version=2)
    assert dev.last_version == 2
    assert any("unreadable device state" in r.getMessage() for r in caplog.records)


def test_state_machine_transitions(caplog: Logs) -> None:
    assert allowed(DeviceState.ADMITTED, DeviceState.REVOKED)
    assert TRANSITIONS[DeviceState.REVOKED] == {DeviceState.AUTHENTICATING, DeviceState.CLOSED}
    assert all(DeviceState.CLOSED in to for s, to in TRANSITIONS.items() if s is not DeviceState.CLOSED)
    dev = Device(Key.generate(), {"issuer": "did:key:z6Mkx"}, broker="mqtt://127.0.0.1:1",
                 coordinator="did:key:z6Mky")
    assert dev.state is DeviceState.CLOSED and dev.state == "closed"
    with caplog.at_level(logging.INFO, logger="sdk.coord.device.client"):
        assert not dev._set_state(DeviceState.ADMITTED)
        assert dev.state is DeviceState.CLOSED
        assert dev._set_state(DeviceState.CONNECTING, "test")
    messages = [r.getMessage() for r in caplog.records]
    assert any("no transition closed -> admitted" in m for m in messages)
    assert any("closed -> connecting (test)" in m for m in messages)


def test_without_auto_compaction_the_owner_decides(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.jsonl", compact_min=4, auto_compact=False)
    for n in range(6):
        box.add(_event(n))
        box.ack(f"event-{n:06d}")
    assert box.compactions == 0 and box.compact_due and box.dead_lines == 12
    box.compact()
    assert not box.compact_due and _lines(tmp_path / "o.jsonl") == []
