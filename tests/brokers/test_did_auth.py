"""DID proofs as CONNECT passwords: the format checks, and the embedded broker enforcing them
(replay guard bounded per DID, topic ACL, retained messages filtered through the ACL)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from brokers.did_auth import own_topics_acl
from brokers.embedded import EmbeddedBroker
from sdk.identity import Key
from sdk.messaging.broker_auth import (
    ProofReplayGuard,
    did_credentials,
    make_connect_password,
    verify_connect_password,
)
from sdk.messaging.errors import BrokerAuthError, ConnectFailed, SubscribeFailed
from sdk.messaging.topics import ROOT
from sdk.messaging.transport import Message, MqttTransport

ALICE = Key.from_seed(b"\x01" * 32)
MALLORY = Key.from_seed(b"\x02" * 32)
COORD = Key.from_seed(b"\x03" * 32)
CAROL = Key.from_seed(b"\x04" * 32)
NOW = 1_800_000_000.0


def _tok(key: Key) -> str:
    return key.did.rsplit(":", 1)[-1]


def wide_subscribe_acl(did: str | None, topic: str, action: str, admins: tuple[str, ...] = ()) -> bool:
    """A deployment ACL that grants broad subscriptions and relies on ``receive`` per message."""
    if action == "subscribe" and did is not None and topic.startswith(ROOT + "/"):
        return True
    return own_topics_acl(did, topic, action, admins)


def _reason(fn) -> str:
    with pytest.raises(BrokerAuthError) as info:
        fn()
    return info.value.reason


def _tamper_payload(password: str, **changes: object) -> str:
    h, p, s = password.split(".")
    payload = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    payload.update(changes)
    p2 = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"{h}.{p2}.{s}"


# --------------------------------------------------------------------------- format (no broker)


def test_proof_round_trip() -> None:
    pw = make_connect_password(ALICE, "cid-1", now=NOW)
    assert verify_connect_password(ALICE.did, pw, "cid-1", now=NOW + 5) == ALICE.did
    assert verify_connect_password(ALICE.did, pw.encode(), "cid-1", now=NOW - 5) == ALICE.did


def test_each_bad_proof_has_its_own_reason() -> None:
    good = make_connect_password(ALICE, "cid-1", now=NOW)
    v = verify_connect_password
    assert _reason(lambda: v(ALICE.did, "garbage", "cid-1", now=NOW)) == "malformed_proof"
    assert _reason(lambda: v(ALICE.did, None, "cid-1", now=NOW)) == "malformed_proof"
    assert _reason(lambda: v(ALICE.did, "a.b.c", "cid-1", now=NOW)) == "malformed_proof"
    # a proof signed by Mallory presented under Alice's DID
    forged = make_connect_password(MALLORY, "cid-1", now=NOW)
    assert _reason(lambda: v(ALICE.did, forged, "cid-1", now=NOW)) == "bad_proof"
    # Alice's proof with its payload edited (client id swapped): signature no longer covers it
    assert _reason(lambda: v(ALICE.did, _tamper_payload(good, cid="cid-2"), "cid-2", now=NOW)) == "bad_proof"
    assert _reason(lambda: v(ALICE.did, good, "cid-other", now=NOW)) == "wrong_client"
    assert _reason(lambda: v(ALICE.did, good, "cid-1", now=NOW + 61)) == "stale_proof"
    assert _reason(lambda: v(ALICE.did, good, "cid-1", now=NOW - 61)) == "stale_proof"
    assert _reason(lambda: v(ALICE.did, good, "cid-1", now=NOW, audience="other")) == "wrong_client"


def test_replayed_proof_is_refused() -> None:
    guard = ProofReplayGuard(window=60)
    pw = make_connect_password(ALICE, "cid-1", now=NOW)
    verify_connect_password(ALICE.did, pw, "cid-1", now=NOW, replay=guard)
    assert _reason(lambda: verify_connect_password(ALICE.did, pw, "cid-1", now=NOW + 1, replay=guard)) == (
        "replayed_proof")
    # a fresh proof from the same key is fine
    verify_connect_password(ALICE.did, make_connect_password(ALICE, "cid-1", now=NOW + 2), "cid-1",
                            now=NOW + 2, replay=guard)


def test_own_topics_acl() -> None:
    a = ALICE.did.rsplit(":", 1)[-1]
    m = MALLORY.did.rsplit(":", 1)[-1]
    acl = own_topics_acl
    assert acl(ALICE.did, f"autoglm/v1/dev/{a}/presence", "publish")
    assert not acl(ALICE.did, f"autoglm/v1/dev/{m}/presence", "publish")
    assert acl(ALICE.did, f"autoglm/v1/dev/{m}/cmd", "publish")  # writing to another's inbox
    assert acl(ALICE.did, f"autoglm/v1/reply/{a}", "subscribe")
    assert not acl(ALICE.did, f"autoglm/v1/reply/{m}", "subscribe")
    assert not acl(ALICE.did, "autoglm/v1/reply/+", "subscribe")
    assert acl(ALICE.did, "autoglm/v1/dev/+/presence", "subscribe")
    assert not acl(ALICE.did, "#", "subscribe")
    assert not acl(ALICE.did, "other/topic", "publish")
    assert not acl(None, f"autoglm/v1/dev/{a}/presence", "publish")
    assert acl(MALLORY.did, "other/topic", "publish", (MALLORY.did,))  # admins may do anything
    # status lists: only the issuer publishes its own; everyone may read them
    assert acl(ALICE.did, f"autoglm/v1/status/{a}", "publish")
    assert not acl(MALLORY.did, f"autoglm/v1/status/{a}", "publish")
    assert acl(MALLORY.did, f"autoglm/v1/status/{a}", "subscribe")
    assert acl(MALLORY.did, "autoglm/v1/status/+", "subscribe")
    assert acl(ALICE.did, f"autoglm/v1/dev/{a}/#", "subscribe")
    assert not acl(ALICE.did, f"autoglm/v1/dev/{m}/#", "subscribe")
    # the broadcast tree: everyone reads it with one filter; a presence under it only admins write
    assert acl(MALLORY.did, "autoglm/v1/status/#", "subscribe")
    assert acl(MALLORY.did, f"autoglm/v1/status/{a}/presence", "receive")
    assert not acl(ALICE.did, f"autoglm/v1/status/{a}/presence", "publish")
    assert acl(COORD.did, f"autoglm/v1/status/{_tok(COORD)}/presence", "publish", (COORD.did,))
    assert not acl(ALICE.did, f"autoglm/v1/status/{a}/other", "receive")


def test_only_admins_write_device_configs() -> None:
    """With no admins configured nobody may overwrite a device's (retained) config."""
    a = _tok(ALICE)
    config = f"autoglm/v1/dev/{a}/config"
    assert not own_topics_acl(MALLORY.did, config, "publish", ())
    assert not own_topics_acl(ALICE.did, config, "publish", ())
    assert not own_topics_acl(MALLORY.did, config, "publish", (COORD.did,))
    assert own_topics_acl(COORD.did, config, "publish", (COORD.did,))
    assert own_topics_acl(MALLORY.did, config, "subscribe", ())  # configs stay publicly readable


def test_receive_follows_what_a_subscription_to_the_topic_would_get() -> None:
    a, m = _tok(ALICE), _tok(MALLORY)
    acl = own_topics_acl
    assert acl(ALICE.did, f"autoglm/v1/dev/{a}/cmd", "receive")
    assert acl(ALICE.did, f"autoglm/v1/reply/{a}", "receive")
    assert acl(MALLORY.did, f"autoglm/v1/dev/{a}/presence", "receive")
    assert not acl(MALLORY.did, f"autoglm/v1/dev/{a}/cmd", "receive")
    assert not acl(MALLORY.did, f"autoglm/v1/reply/{a}", "receive")
    assert not acl(MALLORY.did, f"autoglm/v1/inf/req/{a}", "receive")
    assert not acl(MALLORY.did, "other/topic", "receive")
    assert acl(COORD.did, f"autoglm/v1/reply/{m}", "receive", (COORD.did,))


# --------------------------------------------------------------------------- replay guard bounds


def test_replay_guard_is_bounded_per_identity() -> None:
    """One DID flooding fresh proofs fills only its own share; other DIDs are still admitted."""
    guard = ProofReplayGuard(window=60, max_entries=50, max_per_identity=10)
    for i in range(100):  # a flood from one self-made DID
        try:
            guard.check_and_add(f"m-{i}", iat=NOW, now=NOW, identity=MALLORY.did)
        except BrokerAuthError as exc:
            assert exc.reason == "too_many_proofs" and i >= 10
    assert guard.count(MALLORY.did) == 10
    guard.check_and_add("a-1", iat=NOW, now=NOW, identity=ALICE.did)
    with pytest.raises(BrokerAuthError) as info:
        guard.check_and_add("a-1", iat=NOW, now=NOW + 1, identity=ALICE.did)
    assert info.value.reason == "replayed_proof"
    # the same jti from another DID is another proof
    guard.check_and_add("m-0", iat=NOW, now=NOW, identity=ALICE.did)
    # once its proofs are past the window, the flooding DID may connect again
    guard.check_and_add("m-late", iat=NOW + 62, now=NOW + 62, identity=MALLORY.did)


def test_full_replay_guard_evicts_from_the_heaviest_identity_and_never_allows_a_replay() -> None:
    guard = ProofReplayGuard(window=60, max_entries=30, max_per_identity=20)
    sybils = [f"did:key:sybil{i}" for i in range(3)]
    for i in range(20):
        guard.check_and_add(f"s0-{i}", iat=NOW, now=NOW, identity=sybils[0])
    for i in range(10):
        guard.check_and_add(f"s1-{i}", iat=NOW + 1, now=NOW + 1, identity=sybils[1])
    assert len(guard) == 30
    # full: a newcomer is admitted, the heaviest identity loses its oldest proof
    guard.check_and_add("a-1", iat=NOW + 2, now=NOW + 2, identity=ALICE.did)
    assert len(guard) == 30 and guard.count(sybils[0]) == 19 and guard.count(ALICE.did) == 1
    # the forgotten proof cannot be replayed, nor any other proof of that DID issued as early
    for jti in ("s0-0", "never-seen"):
        with pytest.raises(BrokerAuthError) as info:
            guard.check_and_add(jti, iat=NOW, now=NOW + 3, identity=sybils[0])
        assert info.value.reason == "too_many_proofs"
    # fresher proofs of that DID still work
    guard.check_and_add("s0-new", iat=NOW + 3, now=NOW + 3, identity=sybils[0])
    for i in range(40):  # many newcomers: each is admitted
        guard.check_and_add(f"n-{i}", iat=NOW + 4, now=NOW + 4, identity=f"did:key:new{i}")
    assert len(guard) == 30
    guard.check_and_add("a-2", iat=NOW + 4, now=NOW + 4, identity=ALICE.did)


# --------------------------------------------------------------------------- the embedded broker


@pytest.mark.broker
async def test_embedded_broker_admits_only_did_holders() -> None:
    async with EmbeddedBroker() as b:
        stale = lambda cid: make_connect_password(ALICE, cid, now=time.time() - 3600)  # noqa: E731
        forged = lambda cid: make_connect_password(MALLORY, cid)  # noqa: E731
        cases = [
            ({}, "malformed_proof"),  # anonymous
            ({"username": ALICE.did, "password": "not-a-proof"}, "malformed_proof"),
            ({"username": ALICE.did, "password": forged}, "bad_proof"),
            ({"username": ALICE.did, "password": stale}, "stale_proof"),
        ]
        for i, (creds, reason) in enumerate(cases):
            with pytest.raises(ConnectFailed) as info:
                await MqttTransport(b.url, client_id=f"bad-{i}", **creds).connect()
            assert info.value.reason == "not_authorized"
            assert b.rejections[-1] == (f"bad-{i}", reason)
        # a proof captured from one CONNECT cannot be replayed
        captured = make_connect_password(ALICE, "victim")
        async with MqttTransport(b.url, client_id="victim", username=ALICE.did, password=captured):
            pass
        with pytest.raises(ConnectFailed):
            await MqttTransport(b.url, client_id="victim", username=ALICE.did, password=captured).connect()
        assert b.rejections[-1] == ("victim", "replayed_proof")
        # the broker keeps serving DID holders
        async with MqttTransport(b.url, **did_credentials(ALICE)) as t:
            assert t.connected and t.protocol == "3.1.1"


@pytest.mark.broker
async def test_embedded_broker_keeps_clients_to_their_topics() -> None:
    a = ALICE.did.rsplit(":", 1)[-1]
    m = MALLORY.did.rsplit(":", 1)[-1]
    got: asyncio.Queue[Message] = asyncio.Queue()

    def inbox(topic: str, payload: bytes, *, retain: bool, qos: int) -> None:
        got.put_nowait(Message(topic, payload, qos, retain))

    async with EmbeddedBroker() as b, MqttTransport(b.url, **did_credentials(ALICE)) as alice, \
                MqttTransport(b.url, **did_credentials(MALLORY)) as mallory:
        await alice.subscribe(f"autoglm/v1/reply/{a}", qos=1, handler=inbox)
        await alice.subscribe("autoglm/v1/dev/+/presence", qos=1, handler=inbox)
        with pytest.raises(SubscribeFailed) as info:
            await mallory.subscribe(f"autoglm/v1/reply/{a}", qos=1)
        assert info.value.reason == "subscribe_denied"
        # Mallory cannot speak for Alice: amqtt drops it silently (PUBACK still comes back)
        await mallory.publish(f"autoglm/v1/dev/{a}/presence", b"spoofed", qos=1)
        await mallory.publish(f"autoglm/v1/dev/{m}/presence", b"mallory online", qos=1)
        await mallory.publish(f"autoglm/v1/reply/{a}", b"reply to alice", qos=1)
        first = await asyncio.wait_for(got.get(), 5)
        second = await asyncio.wait_for(got.get(), 5)
        assert {first.payload, second.payload} == {b"mallory online", b"reply to alice"}
        assert got.empty()


async def _connect_and_close(url: str, key: Key, client_id: str) -> bool:
    try:
        async with MqttTransport(url, client_id=client_id, connect_timeout=5, **did_credentials(key)):
            return True
    except ConnectFailed:
        return False


@pytest.mark.broker
async def test_connect_flood_from_one_did_does_not_lock_out_other_dids() -> None:
    """A DID flooding CONNECT proofs (a new self-made DID costs nothing) fills only its own share
    of the replay guard: a different DID still connects."""
    async with EmbeddedBroker(max_recent_proofs=30, max_proofs_per_identity=20) as b:
        flood = [await _connect_and_close(b.url, MALLORY, f"flood-{i}") for i in range(30)]
        assert flood.count(True) == 20  # then its own further CONNECTs are refused
        assert b.rejections[-1] == ("flood-29", "too_many_proofs")
        sybil = [await _connect_and_close(b.url, CAROL, f"sybil-{i}") for i in range(15)]
        assert all(sybil)  # the guard is full: the heaviest DID's oldest proofs make room
        assert await _connect_and_close(b.url, ALICE, "alice")
        async with MqttTransport(b.url, **did_credentials(ALICE)) as t:
            assert t.connected


class _Collect:
    """Every message a transport receives (handlers and unsolicited), in arrival order."""

    def __init__(self) -> None:
        self.items: list[Message] = []
        self.arrived = asyncio.Event()

    def __call__(self, topic: str, payload: bytes, *, retain: bool, qos: int) -> None:
        self.items.append(Message(topic, payload, qos, retain))
        self.arrived.set()

    async def wait_for(self, topic: str, timeout: float = 5.0) -> Message:
        async def scan() -> Message:
            while True:
                for m in self.items:
                    if m.topic == topic:
                        return m
                self.arrived.clear()
                await self.arrived.wait()
        return await asyncio.wait_for(scan(), timeout)


async def _retained_state(url: str) -> tuple[str, str]:
    """Alice's private inbox holds a retained message, both devices hold a retained config,
    Mallory a retained presence (the sentinel)."""
    a, bob = _tok(ALICE), _tok(MALLORY)
    async with MqttTransport(url, **did_credentials(COORD)) as coord, \
            MqttTransport(url, **did_credentials(CAROL)) as carol, \
            MqttTransport(url, **did_credentials(MALLORY)) as mallory:
        await carol.publish(f"{ROOT}/dev/{a}/cmd", b"private to alice", qos=1, retain=True)
        await coord.publish(f"{ROOT}/dev/{a}/config", b"alice config", qos=1, retain=True)
        await coord.publish(f"{ROOT}/dev/{bob}/config", b"mallory config", qos=1, retain=True)
        await mallory.publish(f"{ROOT}/dev/{bob}/presence", b"sentinel", qos=1, retain=True)
    return a, bob


async def _sentinel(t: MqttTransport, got: _Collect, key: Key) -> None:
    """Positive signal: amqtt handles one client's packets in order and delivers (and awaits the
    acks of) a subscription's retained messages before the next packet, so once the retained
    presence of a later SUBSCRIBE arrives, everything before it has been delivered."""
    topic = f"{ROOT}/dev/{_tok(key)}/presence"
    await t.subscribe(topic, qos=1, handler=got)
    assert (await got.wait_for(topic)).payload == b"sentinel"


@pytest.mark.broker
async def test_retained_messages_do_not_leak_at_connect() -> None:
    """amqtt sends every retained message matching *any* client's subscription to each new
    client; the embedded broker sends a client only retained messages of its own filters that
    the ACL lets it receive."""
    async with EmbeddedBroker(coordinator=COORD.did) as b:
        a, bob = await _retained_state(b.url)
        alice_got = _Collect()
        async with MqttTransport(b.url, **did_credentials(ALICE), on_message=alice_got) as alice:
            await alice.subscribe(f"{ROOT}/dev/{a}/#", qos=1)
            assert (await alice_got.wait_for(f"{ROOT}/dev/{a}/cmd")).payload == b"private to alice"
            got = _Collect()
            async with MqttTransport(b.url, **did_credentials(MALLORY), on_message=got) as mallory:
                await mallory.subscribe(f"{ROOT}/dev/{bob}/config", qos=1)
                await _sentinel(mallory, got, MALLORY)
                assert (await got.wait_for(f"{ROOT}/dev/{bob}/config")).payload == b"mallory config"
                assert [m.topic for m in got.items if a in m.topic] == []


@pytest.mark.broker
async def test_retained_messages_on_subscribe_pass_the_receive_check() -> None:
    """A broad subscription the ACL grants still delivers only retained messages the subscriber
    may receive (amqtt skips the receive check for retained messages)."""
    acl = "tests.brokers.test_did_auth.wide_subscribe_acl"
    async with EmbeddedBroker(acl=acl, coordinator=COORD.did) as b:
        a, _ = await _retained_state(b.url)
        got = _Collect()
        async with MqttTransport(b.url, **did_credentials(MALLORY), on_message=got) as mallory:
            await mallory.subscribe(f"{ROOT}/dev/#", qos=1)  # covers Alice's private inbox
            await _sentinel(mallory, got, MALLORY)
            assert (await got.wait_for(f"{ROOT}/dev/{a}/config")).payload == b"alice config"  # public
            assert [m.topic for m in got.items if m.topic.endswith("/cmd")] == []


@pytest.mark.broker
async def test_only_the_coordinator_overwrites_a_device_config() -> None:
    a, m = _tok(ALICE), _tok(MALLORY)
    config = f"{ROOT}/dev/{a}/config"
    async with EmbeddedBroker() as b, \
            MqttTransport(b.url, **did_credentials(ALICE)) as alice, \
            MqttTransport(b.url, **did_credentials(MALLORY)) as mallory, \
            MqttTransport(b.url, **did_credentials(COORD)) as coord:
        await alice.publish(f"{ROOT}/dev/{a}/presence", b"sentinel", qos=1, retain=True)
        seen: asyncio.Queue[bytes] = asyncio.Queue()
        await alice.subscribe(f"{ROOT}/dev/{m}/events", qos=1,
                              handler=lambda t, p, *, retain, qos: seen.put_nowait(p))

        async def mallory_publishes_config(n: int) -> None:
            await mallory.publish(config, b"mallory's config", qos=1, retain=True)  # PUBACK even if dropped
            # amqtt handles one client's publishes in order: once the next one is through,
            # the config publish has been decided
            await mallory.publish(f"{ROOT}/dev/{m}/events", b"%d" % n, qos=1)
            assert await asyncio.wait_for(seen.get(), 5) == b"%d" % n

        # no coordinator/admins: nobody writes configs
        await coord.publish(config, b"no admin yet", qos=1, retain=True)
        await mallory_publishes_config(1)
        got = _Collect()
        await alice.subscribe(config, qos=1, handler=got)
        await _sentinel(alice, got, ALICE)
        assert [x.payload for x in got.items if x.topic == config] == []
        await alice.unsubscribe(config)
        # the coordinator, started after the broker, becomes an admin
        b.add_admin(COORD.did)
        await coord.publish(config, b"signed by the coordinator", qos=1, retain=True)
        await mallory_publishes_config(2)
        got = _Collect()
        await alice.subscribe(config, qos=1, handler=got)
        assert (await got.wait_for(config)).payload == b"signed by the coordinator"


@pytest.mark.broker
async def test_a_client_id_cannot_be_taken_over_by_another_did() -> None:
    """amqtt resumes (or takes over) the session of a CONNECT's client id before checking who
    connects: another DID reusing a device's client id would get its queued messages."""
    a = _tok(ALICE)
    inbox = f"{ROOT}/dev/{a}/cmd"
    got: asyncio.Queue[Message] = asyncio.Queue()

    def on_cmd(topic: str, payload: bytes, *, retain: bool, qos: int) -> None:
        got.put_nowait(Message(topic, payload, qos, retain))

    async with EmbeddedBroker() as b:
        alice = MqttTransport(b.url, client_id="alice-dev", persistent=True, **did_credentials(ALICE))
        await alice.connect()
        await alice.subscribe(inbox, qos=1, handler=on_cmd)
        # while Alice is online: Mallory cannot kick her off with her client id
        with pytest.raises(ConnectFailed):
            await MqttTransport(b.url, client_id="alice-dev", connect_timeout=5,
                                **did_credentials(MALLORY)).connect()
        assert b.rejections[-1] == ("alice-dev", "client_id_taken")
        async with MqttTransport(b.url, **did_credentials(CAROL)) as carol:
            await carol.publish(inbox, b"while online", qos=1)
            assert (await asyncio.wait_for(got.get(), 5)).payload == b"while online"
            assert alice.connected and alice.reconnects == 0
            await alice.aclose()
            await carol.publish(inbox, b"queued for alice", qos=1)
        # Alice offline, her persistent session holds a queued message: Mallory cannot resume it
        for persistent in (True, False):
            mallory = MqttTransport(b.url, client_id="alice-dev", persistent=persistent, connect_timeout=5,
                                    on_message=on_cmd, **did_credentials(MALLORY))
            with pytest.raises(ConnectFailed):
                await mallory.connect()
            await mallory.aclose()
            assert b.rejections[-1] == ("alice-dev", "client_id_taken")
        # Alice comes back and gets it
        async with MqttTransport(b.url, client_id="alice-dev", persistent=True, on_message=on_cmd,
                                 **did_credentials(ALICE)):
            assert (await asyncio.wait_for(got.get(), 5)).payload == b"queued for alice"
        assert got.empty()
