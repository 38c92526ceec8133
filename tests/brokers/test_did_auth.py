"""DID proofs as CONNECT passwords: the format checks, and the embedded broker enforcing them."""

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
from sdk.messaging.transport import Message, MqttTransport

ALICE = Key.from_seed(b"\x01" * 32)
MALLORY = Key.from_seed(b"\x02" * 32)
NOW = 1_800_000_000.0


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

    async with EmbeddedBroker() as b:
        async with MqttTransport(b.url, **did_credentials(ALICE)) as alice, \
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
