"""Fleet-scale bookkeeping: every index the coordinator keeps instead of scanning the fleet must
equal the scan it replaces, after random sequences of transitions."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.coord import protocol
from sdk.coord.backpressure import retry_after
from sdk.coord.coordinator import Coordinator, auth, daemon
from sdk.coord.coordinator.auth import Challenges
from sdk.coord.coordinator.errors import AdmissionError
from sdk.coord.coordinator.registry import (
    EXPIRED,
    OFFLINE,
    ONLINE,
    REVOKED,
    DeviceRecord,
    Registry,
    Session,
    compact_credential,
    shared_names,
)
from sdk.identity import Key, StatusList, TrustPolicy, status_entry
from tests.fixtures.waiting import until

STATES = (ONLINE, OFFLINE, EXPIRED, REVOKED)
URLS = [f"https://issuer.example/status/{i}" for i in range(4)]


def _did(i: int) -> str:
    return f"did:example:dev{i:04d}"


def _admit(reg: Registry, rng: random.Random, i: int, now: float) -> None:
    urls = rng.sample(URLS, rng.randint(0, 2))
    session = Session(f"s{rng.random()}", {}, f"fp{i}-{rng.randint(0, 3)}")
    reg.put(reg.admission(_did(i), {"kind": rng.choice(["phone", "display"]), "groups": [f"room:{i % 3}"],
                                    "capabilities": ["display"]},
                          session=session, heartbeat_ttl=rng.choice([1.0, 5.0, 30.0]), now=now,
                          status=[status_entry(u, i) for u in urls], issuer="did:example:issuer"))


def _random_step(reg: Registry, rng: random.Random, n: int, now: float) -> None:
    i = rng.randrange(n)
    did = _did(i)
    op = rng.random()
    if op < 0.35 or did not in reg:
        _admit(reg, rng, i, now)
    elif op < 0.55:
        reg.touch(did, now)
    elif op < 0.75:
        reg.set_state(did, rng.choice((OFFLINE, EXPIRED)))
    elif op < 0.8:
        reg.revoke(did, [f"fp{i}-0"])
    elif op < 0.9:
        reg.set_tags(did, rng.sample(["a", "b", "room:9"], rng.randint(0, 2)))
    else:
        reg.announce(did, capabilities=rng.sample(["cam", "mic"], rng.randint(0, 2)),
                     attributes={"x": rng.randint(0, 5)})


def test_state_counters_equal_a_recount() -> None:
    rng, reg = random.Random(1), Registry()
    for step in range(3000):
        _random_step(reg, rng, 200, now=1000.0 + step)
        if step % 50 == 0:
            recount = {s: sum(1 for r in reg if r.state == s) for s in STATES}
            assert reg.counts() == recount
    assert sum(reg.counts().values()) == len(reg)


def test_deadline_heap_expires_exactly_the_lapsed_devices() -> None:
    rng, reg = random.Random(2), Registry()
    now = 1000.0
    for _ in range(200):
        for _ in range(30):
            now += rng.random() * 0.2
            _random_step(reg, rng, 150, now)
        probe = now + rng.choice([0.0, 0.5, 2.0, 10.0, 40.0])
        expected = {r.did for r in reg if r.state == ONLINE and probe - r.last_seen > r.heartbeat_ttl}
        got = reg.expired(probe)
        assert {r.did for r in got} == expected
        assert len(got) == len(expected)             # each lapsed device once
        assert {r.did for r in reg.expired(probe)} == expected     # a query: asking again answers the same
        for rec in got[: len(got) // 2]:             # the sweep marks some of them, not all
            reg.set_state(rec.did, EXPIRED)
    # the heap holds at most one live entry per online device, plus stale ones dropped lazily
    live = sum(1 for r in reg if r.state == ONLINE)
    assert live <= len(reg._due) <= len(reg)


def test_a_device_seen_again_is_not_expired_and_a_clock_step_back_is_honoured() -> None:
    reg = Registry()
    reg.put(reg.admission(_did(1), {}, session=Session("s", {}, "fp"), heartbeat_ttl=10, now=100.0))
    reg.touch(_did(1), 105.0)
    assert reg.expired(112.0) == []                  # due at 110 by the first entry, seen at 105
    assert [r.did for r in reg.expired(115.5)] == [_did(1)]
    reg.touch(_did(1), 50.0)                         # the clock stepped back: earlier deadline
    assert [r.did for r in reg.expired(60.5)] == [_did(1)]


def test_status_list_index_finds_exactly_the_records_on_a_list() -> None:
    rng, reg = random.Random(3), Registry()
    for step in range(2000):
        _random_step(reg, rng, 120, now=float(step))
        if step % 100 == 0:
            for url in [*URLS, "https://issuer.example/status/none"]:
                scan = {r.did for r in reg if any(e.get("statusListCredential") == url for e in r.status)}
                assert {r.did for r in reg.with_status_list(url)} == scan


@pytest.fixture
def coord(tmp_path: Path) -> Iterator[Coordinator]:
    c = Coordinator(Key.generate(), broker="mqtt://127.0.0.1:1", data_dir=tmp_path, trust=TrustPolicy({}),
                    issuer=Key.generate(), heartbeat_ttl=600)
    c.store = c._open_store()  # not connected: no broker needed
    yield c
    c.store.close()


async def test_a_status_list_update_revokes_exactly_the_listed_devices(coord: Coordinator) -> None:
    assert coord.issuer is not None
    own = protocol.status_list_url(coord.issuer.did)
    reg = coord.registry
    for i in range(40):
        url = own if i % 2 == 0 else URLS[0]         # the odd ones sit on another list, same indexes
        reg.put(reg.admission(_did(i), {"kind": "phone"}, session=Session(f"s{i}", {}, f"fp{i}"),
                              status=[status_entry(url, i)], issuer=coord.issuer.did))
    revoked = {4, 5, 10, 11, 30}
    coord._status_list = StatusList(coord.status_list_size)
    for index in revoked:
        coord._status_list.set(index)
    coord._resign_status_list()  # accepted by the status source: listeners run now
    got = {r.did for r in reg if r.state == REVOKED}
    assert got == {_did(i) for i in revoked if i % 2 == 0}
    assert all(r.state == ONLINE for r in reg if r.did not in got)
    ended = coord.metrics.registry.get_sample_value("autoglm_coord_sessions_ended_total", {"reason": "revoked"})
    assert ended == len(got)


def _without_clock(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "updated"}


async def test_incremental_status_matches_a_full_recomputation(coord: Coordinator) -> None:
    assert coord.store is not None
    rng, reg = random.Random(4), coord.registry
    versions: dict[str, int] = {}
    for step in range(600):
        now = 1000.0 + step
        op = rng.random()
        if op < 0.6 or not len(reg):
            _random_step(reg, rng, 60, now)
        elif op < 0.75:          # a rule (or an operator) commits new desired versions
            dids = rng.sample(reg.dids(), min(len(reg), rng.randint(1, 5)))
            for cv in coord.store.commit({d: ({"k": rng.randint(0, 9)}, ("r",)) for d in dids}):
                versions[cv.did] = cv.version
        elif op < 0.9 and versions:                  # devices report
            did = rng.choice(sorted(versions))
            coord.store.record_reports([(did, versions[did], rng.choice(["applied", "failed"]), None, 1.0)])
        elif op < 0.95:                              # a device ahead of the store
            did = rng.choice(reg.dids())
            versions[did] = coord.store.latest_version(did) + rng.randint(1, 3)
            coord.store.advance(did, versions[did])
        else:
            reg.changed(rng.choice(reg.dids()))
        if step % 7 == 0:
            assert _without_clock(json.loads(coord.status_json())) == _without_clock(coord.status())
    assert len(json.loads(coord.status_json())["devices"]) == len(reg)


async def test_devices_cli_reads_the_written_snapshot(coord: Coordinator, tmp_path: Path) -> None:
    assert coord.store is not None
    reg = coord.registry
    for i in range(5):
        reg.put(reg.admission(_did(i), {"kind": "display" if i else "phone"}, session=Session(f"s{i}", {}, "f")))
    coord.store.commit({_did(0): ({"ui.layout": "companion"}, ("r",))})
    coord.store.record_reports([(_did(0), 1, "applied", None, 2.0)])
    coord._write_status()  # the sweeper does this on change
    reg.set_state(_did(3), OFFLINE)
    coord._write_status()  # only the changed row re-rendered
    runner = CliRunner()
    result = runner.invoke(app, ["devices", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {d["did"]: d for d in json.loads(result.stdout)["devices"]}
    assert rows[_did(0)]["desired_version"] == 1 and rows[_did(0)]["reported_version"] == 1
    assert rows[_did(0)]["delta"] == {} and rows[_did(3)]["state"] == OFFLINE
    assert [d["did"] for d in json.loads(result.stdout)["devices"]][:2] == [_did(1), _did(2)]  # by kind
    table = runner.invoke(app, ["devices", "--data-dir", str(tmp_path)])
    assert table.exit_code == 0 and "phone" in table.output and "display" in table.output


def test_sweep_expires_persists_and_sets_the_gauges(coord: Coordinator) -> None:
    assert coord.store is not None
    reg = coord.registry
    for i in range(30):
        reg.put(reg.admission(_did(i), {}, session=Session(f"s{i}", {}, "f"), heartbeat_ttl=5.0 + i, now=100.0))
    reg.set_state(_did(0), OFFLINE)
    expired = coord.sweep(now=120.5)                 # ttl < 20.5 lapsed: devices 1..15
    assert sorted(expired) == [_did(i) for i in range(1, 16)]
    saved = {r["did"]: r["state"] for r in coord.store.load_devices()}
    assert all(saved[d] == EXPIRED for d in expired)
    gauge = {s: coord.metrics.registry.get_sample_value("autoglm_coord_devices", {"state": s}) for s in STATES}
    assert gauge == {ONLINE: 14, EXPIRED: 15, OFFLINE: 1, REVOKED: 0}
    assert coord.sweep(now=120.5) == []


async def test_credential_deadlines_stay_bounded_and_exact_under_re_admissions(coord: Coordinator) -> None:
    reg, rng = coord.registry, random.Random(5)
    live: dict[str, float] = {}
    for _ in range(40):                          # forty reconnect storms of 50 devices
        for i in range(50):
            valid_until = 10_000.0 + rng.random() * 100
            session = Session(f"s{rng.random()}", {}, f"fp{i}", valid_until)
            reg.put(reg.admission(_did(i), {}, session=session, now=1.0))
            coord._schedule_expiry(_did(i), session)
            live[_did(i)] = valid_until
        queued = {(did, sid) for _, did, sid in coord._deadlines}
        assert all((r.did, r.session.id) in queued for r in reg if r.session is not None)
    assert len(coord._deadlines) <= 2 * len(reg) + 64 + 1
    ended = coord._expire_due(now=10_050.0)
    assert sorted(ended) == sorted(d for d, t in live.items() if t <= 10_050.0)
    assert all(reg.get(d).state == EXPIRED for d in ended)          # type: ignore[union-attr]
    assert sum(1 for r in reg if r.state == ONLINE) == len(live) - len(ended)


# ---------------------------------------------------------------------------- compact records


def test_compact_records_round_trip_through_the_store_row() -> None:
    rng, reg = random.Random(7), Registry()
    for step in range(400):
        _random_step(reg, rng, 50, now=1000.0 + step)
    for rec in reg:
        back = DeviceRecord.from_row(json.loads(json.dumps(rec.to_row())))
        assert back.to_row() == {**rec.to_row(), "state": back.state}     # live state is not restored
        assert back.groups == rec.groups and back.tags == rec.tags and back.kind == rec.kind
    with pytest.raises(AttributeError):
        next(iter(reg)).scratch = 1            # type: ignore[attr-defined]  # slotted: no stray fields


def test_equal_name_sets_are_one_object_and_records_share_them() -> None:
    reg = Registry()
    for i in range(100):
        reg.put(reg.admission(_did(i), json.loads(json.dumps(
            {"kind": "phone", "groups": ["room:a", "floor:1"], "capabilities": ["display"]}))))
    recs = list(reg)
    assert len({id(r.groups) for r in recs}) == 1 and len({id(r.capabilities) for r in recs}) == 1
    assert len({id(r.kind) for r in recs}) == 1
    assert shared_names(["floor:1", "room:a"]) is recs[0].groups
    assert shared_names([]) == frozenset() and reg.members("room:a") == {_did(i) for i in range(100)}


def test_a_session_keeps_only_what_decisions_need() -> None:
    credential = {"@context": ["https://www.w3.org/ns/credentials/v2"], "id": "urn:uuid:1",
                  "type": ["VerifiableCredential", "DeviceCredential"], "issuer": "did:example:i",
                  "validFrom": "2026-01-01T00:00:00Z", "validUntil": "2027-01-01T00:00:00Z",
                  "credentialSubject": {"id": "did:example:d", "kind": "phone", "name": "hall",
                                        "groups": ["room:a"] * 50},
                  "credentialStatus": {"statusListIndex": "3"}, "proof": {"proofValue": "z" * 200}}
    kept = Session("s", credential, "fp").credential
    assert kept == {"id": "urn:uuid:1", "type": ["VerifiableCredential", "DeviceCredential"],
                    "issuer": "did:example:i", "validFrom": "2026-01-01T00:00:00Z",
                    "validUntil": "2027-01-01T00:00:00Z", "credentialSubject": {"name": "hall"}}
    assert compact_credential({"validUntil": "x"}) == {"validUntil": "x"}
    # parsed from two messages, equal issuer and dates are one object each (a fleet issued together)
    one, two = (compact_credential(json.loads(json.dumps(credential))) for _ in range(2))
    for key in ("issuer", "validFrom", "validUntil"):
        assert one[key] is two[key]
    assert one["id"] == two["id"]
    reg = Registry()
    recs = [reg.admission(_did(i), {"kind": "phone"}, session=Session(f"s{i}", {}, "f"),
                          issuer="".join(["did:example:", "issuer"])) for i in range(2)]
    assert recs[0].issuer is recs[1].issuer


def test_the_pump_lock_is_made_on_first_use_and_kept_across_re_admission() -> None:
    reg = Registry()
    rec = reg.register(_did(1), {"kind": "phone"})
    assert rec.pump_lock is None
    lock = rec.lock
    assert rec.lock is lock
    again = reg.register(_did(1), {"kind": "phone"})
    assert again.lock is lock                  # a pump of the old session still holds it


# ---------------------------------------------------------------------------- bounded challenges


def test_challenges_are_single_use_bound_to_their_did_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    ch = Challenges(ttl=30.0)
    a, ticket = ch.issue("did:a"), ch.issue("did:a", ttl=600.0)
    with pytest.raises(AdmissionError) as err:
        ch.consume(a, "did:b")
    assert err.value.reason == "wrong_challenge"
    b = ch.issue("did:b")
    ch.consume(b, "did:b")
    with pytest.raises(AdmissionError):
        ch.consume(b, "did:b")                 # used once
    c = ch.issue("did:c")
    clock[0] += 31
    with pytest.raises(AdmissionError):
        ch.consume(c, "did:c")                 # past its 30 s
    ch.consume(ticket, "did:a")                # a ticket lives 600 s
    d = ch.issue("did:d")
    clock[0] += 31
    assert ch.sweep() == 1 and len(ch) == 0
    with pytest.raises(AdmissionError):
        ch.consume(d, "did:d")


def test_challenges_at_their_limit_evict_tickets_first_then_refuse_busy() -> None:
    ch = Challenges(ttl=30.0, limit=10)
    tickets = [ch.issue(f"did:t{i}", ttl=600.0) for i in range(6)]
    hellos = [ch.issue(f"did:h{i}") for i in range(4)]
    assert len(ch) == 10
    more = [ch.issue(f"did:n{i}") for i in range(6)]     # each takes the oldest ticket's place
    assert len(ch) == 10 and ch.evicted == 6 and ch.refused == 0
    with pytest.raises(AdmissionError) as err:
        ch.issue("did:flood")                  # only live handshakes left: refused, none dropped
    assert err.value.reason == "busy" and retry_after(str(err.value)) is not None
    assert ch.refused == 1 and len(ch) == 10
    for i, value in enumerate(hellos):
        ch.consume(value, f"did:h{i}")         # the challenges handed out stay valid
    for i, value in enumerate(more):
        ch.consume(value, f"did:n{i}")
    with pytest.raises(AdmissionError):
        ch.consume(tickets[0], "did:t0")       # an evicted ticket: a full handshake next time
    assert len(ch) == 0


def test_challenge_sweep_drops_exactly_the_expired_of_every_lifetime(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    ch = Challenges(ttl=30.0)
    tickets = {ch.issue(f"did:{i}", ttl=600.0): f"did:{i}" for i in range(200)}
    clock[0] = 10.0
    hellos = [ch.issue(f"did:h{i}") for i in range(10)]
    clock[0] = 45.0
    assert ch.sweep() == 10 and len(ch) == 200
    assert ch.sweep() == 0
    for value in hellos:
        with pytest.raises(AdmissionError):
            ch.consume(value, "did:h0")
    for value, did in tickets.items():
        ch.consume(value, did)
    clock[0] = 700.0
    assert ch.sweep() == 0 and len(ch) == 0


async def test_a_fan_out_runs_a_bounded_number_of_pumps_and_reaches_every_target(
        coord: Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    assert coord.store is not None
    monkeypatch.setattr(daemon, "PUMP_CONCURRENCY", 8)
    reg = coord.registry
    for i in range(100):
        reg.put(reg.admission(_did(i), {"kind": "phone"}, session=Session(f"s{i}", {}, "f")))
        reg.get(_did(i)).session.sent = 0                   # type: ignore[union-attr]
    live, peak, sent = [0], [0], []

    async def broker_write(topic: str, payload: bytes, **kw: Any) -> None:   # the broker's ack, later
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        await asyncio.sleep(0.001)
        live[0] -= 1
        if topic.endswith(protocol.token(_did(7)) + "/config"):
            raise RuntimeError("a bug in one pump")
        sent.append(topic)

    coord.client.transport.publish = broker_write          # type: ignore[method-assign,assignment]
    versions = coord.store.commit({_did(i): ({"k": 1}, ("r",)) for i in range(100)})
    with pytest.raises(RuntimeError):
        await coord.push_desired("ev-1", versions)
    assert peak[0] == 8                                    # never more pumps at once
    assert len(sent) == 99                                 # the failing one does not stop the others
    assert all(reg.get(_did(i)).session.sent == 1 for i in range(100) if i != 7)   # type: ignore[union-attr]
    assert all(reg.get(_did(i)).pump_lock is None for i in range(100))             # type: ignore[union-attr]


async def test_pumps_of_one_device_stay_in_order_and_leave_no_lock(coord: Coordinator) -> None:
    assert coord.store is not None
    reg = coord.registry
    reg.put(reg.admission(_did(0), {"kind": "phone"}, session=Session("s0", {}, "f")))
    reg.get(_did(0)).session.sent = 0                       # type: ignore[union-attr]
    sent: list[int] = []
    gate = asyncio.Event()

    async def broker_write(topic: str, payload: bytes, **kw: Any) -> None:
        await gate.wait()
        sent.append(len(sent) + 1)

    coord.client.transport.publish = broker_write          # type: ignore[method-assign,assignment]
    for n in range(3):
        coord.store.commit({_did(0): ({"k": n}, ("r",))})
    pumps = [asyncio.ensure_future(coord._pump(_did(0))) for _ in range(3)]
    await asyncio.sleep(0)
    rec = reg.get(_did(0))
    assert rec is not None and rec.pump_lock is not None and rec.pumps == 3
    gate.set()
    await asyncio.gather(*pumps)
    assert sent == [1, 2, 3] and rec.session is not None and rec.session.sent == 3   # each version once
    assert rec.pump_lock is None and rec.pumps == 0


async def test_status_rows_share_equal_store_fields_and_still_match_a_recomputation(coord: Coordinator) -> None:
    assert coord.store is not None
    reg = coord.registry
    for i in range(30):
        reg.put(reg.admission(_did(i), {"kind": "display"}, session=Session(f"s{i}", {}, f"fp{i}")))
    versions = coord.store.commit({_did(i): ({"ui.layout": "companion"}, ("r",)) for i in range(30)})
    coord.store.record_reports([(cv.did, cv.version, "applied", None, 1.0) for cv in versions[:20]])
    assert _without_clock(json.loads(coord.status_json())) == _without_clock(coord.status())
    fields = coord._status_store
    assert fields[_did(0)] is fields[_did(19)]                  # applied alike: one string
    assert fields[_did(20)] is fields[_did(29)] and fields[_did(20)] != fields[_did(0)]
    coord.store.commit({_did(0): ({"ui.layout": "kiosk"}, ("r",))})   # one device moves on
    rows = {d["did"]: d for d in json.loads(coord.status_json())["devices"]}
    assert rows[_did(0)]["desired_version"] == 2 and rows[_did(0)]["delta"] == {"ui.layout": "kiosk"}
    assert rows[_did(1)]["desired_version"] == 1 and rows[_did(1)]["delta"] == {}
    assert fields[_did(0)] is not fields[_did(1)]
    assert _without_clock(json.loads(coord.status_json())) == _without_clock(coord.status())


async def test_status_rows_share_their_fleet_wide_fields(coord: Coordinator) -> None:
    reg = coord.registry
    for i in range(6):
        groups = ["lobby"] if i < 4 else ["hall"]
        reg.put(reg.admission(_did(i), {"kind": "display", "groups": groups, "name": f"d{i}"},
                              session=Session(f"s{i}", {}, f"fp{i}")))
    assert _without_clock(json.loads(coord.status_json())) == _without_clock(coord.status())
    rows = coord._status_rows
    assert rows[_did(0)][1] is rows[_did(3)][1]                 # same kind, groups, state...: one string
    assert rows[_did(0)][1] != rows[_did(4)][1]                 # other groups: another
    assert all(_did(0) not in part for part in rows[_did(0)])   # its own fields are rendered per write
    reg.set_state(_did(1), "offline")
    reg.touch(_did(2))
    doc = json.loads(coord.status_json())
    assert _without_clock(doc) == _without_clock(coord.status())
    states = {d["did"]: d["state"] for d in doc["devices"]}
    assert states[_did(1)] == "offline" and states[_did(0)] == "online"
    assert rows[_did(1)][1] is not rows[_did(0)][1]
    seen = {d["did"]: d["last_seen"] for d in doc["devices"]}
    assert seen[_did(2)] == reg.get(_did(2)).last_seen              # type: ignore[union-attr]
    del reg._devices[_did(5)]                                    # gone between a drain and a write
    doc = json.loads("".join(coord._status_chunks()))
    assert _did(5) not in {d["did"] for d in doc["devices"]} and len(doc["devices"]) == 5


def test_status_own_fields_render_as_json_dumps_would() -> None:
    from sdk.coord.coordinator.daemon import _status_own_json

    reg = Registry()
    rec = reg.admission(_did(1), {"kind": "display", "name": 'l\u00f6bby "1"\n', "attributes": {"a": [1, 2.5]}},
                        session=Session("s", {}, "fp"), credential_id="urn:uuid:1")
    rec.status = ({"id": "u#1", "type": "BitstringStatusListEntry", "statusListIndex": "1"},)
    for r in (rec, reg.admission(_did(2), {}, session=Session("t", {}, "fp2"))):
        row = r.to_row()
        want = json.dumps({k: row[k] for k in ("did", "name", "attributes", "credential_id", "last_seen",
                                                 "first_seen", "status", "fingerprint")},
                          default=str, separators=(",", ":"))
        assert _status_own_json(r) == want


def test_did_key_cache_grows_with_the_fleet_and_never_shrinks(coord: Coordinator) -> None:
    from sdk.coord.coordinator.fleet_caches import fit_caches, fleet_cache_size
    from sdk.identity import resolver

    before = resolver.did_key_cache_size()
    try:
        resolver.resize_did_key_cache(resolver.DID_KEY_CACHE_SIZE)
        assert fit_caches(100) == resolver.DID_KEY_CACHE_SIZE      # a small fleet keeps the default
        assert fleet_cache_size(20_000, resolver.DID_KEY_CACHE_SIZE) == 22_000
        assert fit_caches(20_000) == 22_000
        assert resolver.did_key_cache_size() == 22_000
        assert fit_caches(10) == 22_000                            # a fleet that shrank keeps its bound
        resolver.resize_did_key_cache(4)
        header_bound = coord.client.verifier.header_cache_size
        for i in range(10):
            coord.registry.put(coord.registry.admission(_did(i), {"kind": "phone"}, session=Session(f"s{i}", {}, "f")))
        coord.sweep()                                              # the per-second sweep sizes it
        assert resolver.did_key_cache_size() == resolver.DID_KEY_CACHE_SIZE
        resolver.resize_did_key_cache(4)
        for i in range(10, 5000):
            coord.registry.put(coord.registry.admission(_did(i), {"kind": "phone"}, session=Session(f"s{i}", {}, "f")))
        coord.sweep()
        assert resolver.did_key_cache_size() == fleet_cache_size(len(coord.registry), 1)
        # the envelope header cache keeps its configured bound: hot senders only
        assert coord.client.verifier.header_cache_size == header_bound
    finally:
        resolver.resize_did_key_cache(before)


def test_status_list_republication_is_off_by_default_and_configurable(tmp_path: Path) -> None:
    from sdk.coord.coordinator.config import parse_config
    from sdk.coord.coordinator.errors import ConfigFileError

    ident = {"key": Key.generate().private_key_multibase}
    assert parse_config({"identity": ident}).status_republish == 0.0
    cfg = parse_config({"identity": ident, "issuer": {"key": Key.generate().private_key_multibase},
                        "coordinator": {"status_republish": 30, "data_dir": str(tmp_path / "d")}})
    assert cfg.status_republish == 30.0
    coord = Coordinator.from_config(cfg, broker="mqtt://127.0.0.1:1")
    assert coord.status_republish == 30.0
    plain = Coordinator(Key.generate(), broker="mqtt://127.0.0.1:1", data_dir=tmp_path / "p",
                        trust=TrustPolicy({}), issuer=Key.generate())
    assert plain.status_republish == 0.0      # each re-publication reaches the whole fleet: opt in
    for bad in (-1, float("nan"), True, "30"):
        with pytest.raises(ConfigFileError, match="status_republish"):
            parse_config({"identity": ident, "coordinator": {"status_republish": bad}})


def _watch_status_writes(coord: Coordinator, monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], list[float]]:
    """Sweep every 10 ms; record when status.json would be written and when each sweep ran."""
    writes: list[float] = []
    sweeps: list[float] = []
    monkeypatch.setattr(coord, "sweep_interval", 0.01)

    def write() -> None:
        coord._dirty = False
        writes.append(time.monotonic())

    real_sweep = coord.sweep

    def sweep(now: float | None = None) -> list[str]:
        sweeps.append(time.monotonic())
        return real_sweep(now)

    monkeypatch.setattr(coord, "_write_status", write)
    monkeypatch.setattr(coord, "sweep", sweep)
    return writes, sweeps


@asynccontextmanager
async def _sweeping(coord: Coordinator, monkeypatch: pytest.MonkeyPatch, *, busy: float,
                    cost: float) -> AsyncIterator[tuple[list[float], list[float]]]:
    """The sweep loop running with ``STATUS_BUSY_INTERVAL = busy`` and snapshots costing ``cost``
    seconds, entered once the first (dirty) status write happened: yields (writes, sweeps)."""
    monkeypatch.setattr(daemon, "STATUS_BUSY_INTERVAL", busy)
    writes, sweeps = _watch_status_writes(coord, monkeypatch)
    coord._status_cost = cost
    coord._dirty = True
    task = asyncio.ensure_future(coord._sweep_loop())
    try:
        await until(lambda: len(writes) == 1)
        yield writes, sweeps
    finally:
        task.cancel()


async def test_a_costly_push_holds_the_status_write_from_its_start(coord: Coordinator,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # 50 ms snapshots: at most one a second
    async with _sweeping(coord, monkeypatch, busy=1.0, cost=0.05) as (writes, sweeps):
        await until(lambda: sweeps[-1] - writes[0] > 1.2)     # a write would be allowed again
        versions = [protocol.ConfigVersion(_did(i), 1, {"x": 1}, {"x": 1}) for i in (1, 2)]
        await coord.push_desired("ev", versions)    # devices unknown here: nothing is sent
        pushed = time.monotonic()
        await until(lambda: sweeps[-1] - pushed > 0.5)
        assert len(writes) == 1                     # not at the push's start, while its reports come
        await until(lambda: len(writes) == 2)       # but once the busy interval from its start is over
        assert writes[1] - pushed >= 1.0 - 0.05


async def test_status_writes_wait_while_a_large_fleet_is_admitted(coord: Coordinator,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # 50 ms snapshots: at most one a second
    async with _sweeping(coord, monkeypatch, busy=3600.0, cost=0.05) as (writes, sweeps):
        coord._dirty, coord._admitted_at = True, float("inf")     # admissions keep coming
        seen = len(sweeps)
        await until(lambda: len(sweeps) >= seen + 150)   # 1.5 s of sweeps: a write would be due by now
        assert len(writes) == 1
        coord._status_cost = 0.001                  # a small fleet's snapshot: admissions do not hold it
        await until(lambda: len(writes) == 2)
        coord._dirty, coord._status_cost = True, 0.05
        coord._admitted_at = time.monotonic() - 2.5      # the storm is over: written again
        await until(lambda: len(writes) == 3)


async def test_status_writes_wait_while_a_costly_push_converges(coord: Coordinator,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # a cheap snapshot: written on change
    async with _sweeping(coord, monkeypatch, busy=3600.0, cost=0.001) as (writes, sweeps):
        coord.metrics.start("ev", {_did(1): 1, _did(2): 1})   # a push converging, 50 ms snapshots
        coord._status_cost = 0.05
        coord._dirty = True
        coord._reports_at = float("inf")            # reports keep coming
        seen = len(sweeps)
        await until(lambda: len(sweeps) >= seen + 150)   # 1.5 s of sweeps: a write would be due by now
        assert len(writes) == 1
        coord._reports_at = float("-inf")           # only a device that is away is left: written again
        await until(lambda: len(writes) == 2)
        coord._dirty, coord._reports_at = True, float("inf")
        seen = len(sweeps)
        await until(lambda: len(sweeps) >= seen + 150)
        assert len(writes) == 2
        coord.metrics.report(_did(1), 1, "applied")
        assert coord.metrics.report(_did(2), 1, "applied") is not None   # converged: the write follows
        await until(lambda: len(writes) == 3)
