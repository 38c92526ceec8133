"""SecureClient on real brokers (embedded amqtt and Mosquitto): request/response, streaming,
encryption, authorization, and every rejection case (distinct, logged, client keeps working)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from sdk.coord import protocol
from sdk.identity import V2_CONTEXT, Key, TrustPolicy, issue_credential
from sdk.mesh import topics as mesh_topics
from sdk.messaging import (
    ClientConfig,
    CredentialRequirement,
    Message,
    MqttTransport,
    RemoteError,
    RequestTimeout,
    SecureClient,
    VerifyPolicy,
    topics,
)
from sdk.messaging.envelope import Signer, b64d, b64e
from tests.fixtures.waiting import until

pytestmark = pytest.mark.broker




@pytest.fixture(scope="module")
def node_key() -> Key:
    return Key.generate()


@pytest.fixture(scope="module")
def user_key() -> Key:
    return Key.generate()


async def _echo(msg: Message) -> dict:
    return {"echo": msg.body, "sender": msg.sender, "encrypted": msg.encrypted}


async def test_signed_request_response(broker, node_key: Key, user_key: Key) -> None:
    topic = mesh_topics.inference_requests("node-a")
    async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
        await node.serve(topic, _echo)
        reply = await user.request(topic, {"q": 1}, timeout=10)
        assert reply.type == "response" and reply.sender == node_key.did
        assert reply.body == {"echo": {"q": 1}, "sender": user_key.did, "encrypted": False}
        # a handler error comes back as a typed RemoteError, and the server keeps serving
        async def boom(msg: Message) -> None:
            raise KeyError("nope")

        await node.serve(protocol.device_commands("node-a"), boom)
        with pytest.raises(RemoteError) as err:
            await user.request(protocol.device_commands("node-a"), None, timeout=10)
        assert err.value.reason == "handler_error"
        assert (await user.request(topic, 2, timeout=10)).body["echo"] == 2
        # nobody serving: timeout
        with pytest.raises(RequestTimeout):
            await user.request(mesh_topics.inference_requests("nobody"), 1, timeout=0.3)


async def test_a_request_can_name_its_own_id(broker, node_key: Key, user_key: Key) -> None:
    """``request_id`` is the request envelope's id (a body may bind itself to it); bad ones are
    refused before anything is sent, and a reused one is refused by the server as a replay."""
    topic = mesh_topics.inference_requests("node-ids")
    seen: list[str] = []

    async def ids(msg: Message) -> str:
        seen.append(msg.id)
        return msg.id

    async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
        await node.serve(topic, ids)
        reply = await user.request(topic, None, timeout=10, request_id="chosen-id-1")
        assert reply.body == "chosen-id-1" and reply.correlation_id == "chosen-id-1"
        for bad in ("", "x" * 65, 7):
            with pytest.raises(ValueError):
                await user.request(topic, None, timeout=10, request_id=bad)  # type: ignore[arg-type]
        with pytest.raises(RequestTimeout):           # the server drops it unanswered
            await user.request(topic, None, timeout=0.5, request_id="chosen-id-1")
        await until(lambda: node.stats.rejected["replayed"] == 1, timeout=10, what="replay refused")
        assert seen == ["chosen-id-1"]


async def test_pubsub_retained_and_sync_handler(broker, node_key: Key, user_key: Key) -> None:
    topic = protocol.device_presence(topics.client_token(node_key.did))
    async with SecureClient(broker.url, node_key) as dev:
        await dev.publish(topic, {"online": True}, type="presence", retain=True, ttl=60)
        got: list[Message] = []
        async with SecureClient(broker.url, user_key) as watcher:
            # the session-wide Mosquitto may hold other tests' retained presence: keep only ours
            await watcher.subscribe(protocol.ALL_PRESENCE,
                                    lambda m: got.append(m) if m.topic == topic else None)
            await until(lambda: len(got) == 1)
            assert got[0].retained and got[0].body == {"online": True} and got[0].sender == node_key.did
            await dev.publish(topic, {"online": False}, type="presence")
            await until(lambda: len(got) == 2)
            assert not got[1].retained and got[1].body == {"online": False}
        await dev.transport.publish(topic, b"", qos=1, retain=True)  # clear the retained message


async def test_streaming_and_cancellation(broker, node_key: Key, user_key: Key) -> None:
    topic = mesh_topics.inference_requests("streamer")
    cancelled = asyncio.Event()

    async def tokens(msg: Message) -> AsyncIterator[dict]:
        n = msg.body["n"]
        try:
            for i in range(n if n >= 0 else 10**9):
                yield {"i": i}
                if n < 0:
                    await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
        await node.serve(topic, tokens)
        chunks = [m async for m in user.stream(topic, {"n": 5}, timeout=10)]
        assert [m.body for m in chunks] == [{"i": i} for i in range(5)]
        assert [m.seq for m in chunks] == list(range(5)) and all(m.type == "stream.chunk" for m in chunks)
        # breaking out sends cancel; the server's generator sees CancelledError
        async with user.stream(topic, {"n": -1}, timeout=10) as responses:
            async for m in responses:
                if m.seq == 3:
                    break
        await asyncio.wait_for(cancelled.wait(), 10)
        await until(lambda: not node._serving)  # noqa: SLF001 - the handler task is gone
        # a plain `async for` + break also cancels (the async generator is finalized)
        cancelled.clear()
        async for m in user.stream(topic, {"n": -1}, timeout=10):
            if m.seq == 1:
                break
        await asyncio.wait_for(cancelled.wait(), 10)
        await until(lambda: not node._serving)  # noqa: SLF001
        # idle timeout: the server stalls after one chunk
        async def stall(msg: Message) -> AsyncIterator[int]:
            yield 1
            await asyncio.sleep(30)
            yield 2

        await node.serve(mesh_topics.inference_requests("staller"), stall)
        seen = []
        with pytest.raises(RequestTimeout):
            async for m in user.stream(mesh_topics.inference_requests("staller"), None, idle_timeout=0.5):
                seen.append(m.body)
        assert seen == [1]
        await until(lambda: not node._serving)  # noqa: SLF001 - cancel reached the server
        # overall timeout: chunks keep coming but the whole stream takes too long
        seen.clear()
        with pytest.raises(RequestTimeout, match="overall"):
            async for m in user.stream(topic, {"n": -1}, idle_timeout=5, timeout=0.5):
                seen.append(m.seq)
        assert len(seen) > 3
        await until(lambda: not node._serving)  # noqa: SLF001
        # a plain handler answered through stream() yields its single response
        await node.serve(mesh_topics.inference_requests("plain"), _echo)
        single = [m async for m in user.stream(mesh_topics.inference_requests("plain"), 7, timeout=10)]
        assert len(single) == 1 and single[0].body["echo"] == 7


async def test_one_cover_feeds_local_subscriptions_each_with_its_policy(broker, node_key: Key,
                                                                         user_key: Key) -> None:
    """``cover()`` is the only broker subscription; each ``local=True`` handler under it keeps its
    own policy, and what matches none of them is dropped unverified."""
    tree = f"{topics.ROOT}/status/#"
    lists, presence = f"{topics.ROOT}/status/+", f"{topics.ROOT}/status/{topics.client_token(node_key.did)}/presence"
    async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
        subscribed: list[str] = []
        real = user.transport.subscribe

        async def spy(topic_filter: str, **kw: object) -> int:
            subscribed.append(topic_filter)
            return await real(topic_filter, **kw)  # type: ignore[arg-type]

        user.transport.subscribe = spy  # type: ignore[method-assign]
        got_lists: list[Message] = []
        got_presence: list[Message] = []
        await user.subscribe(lists, got_lists.append, local=True)
        await user.subscribe(presence, got_presence.append, senders={node_key.did}, local=True)
        await node.publish(presence, {"state": "online"}, type="coord.presence", retain=True, qos=1)
        await user.cover(tree, qos=1)
        await user.cover(tree, qos=1)                               # idempotent
        assert subscribed == [tree]
        await until(lambda: got_presence)                           # the retained copy, via the cover
        assert got_presence[0].retained and got_presence[0].body == {"state": "online"}
        verified = user.stats.received - user.stats.unrouted
        other = f"{topics.ROOT}/status/{topics.client_token(user_key.did)}/else"
        await node.publish(other, {"x": 1}, qos=1)                  # under the cover, no handler
        await node.publish(topics.status_list(topics.client_token(node_key.did)), {"l": 1}, qos=1)
        await until(lambda: got_lists)
        assert user.stats.unrouted >= 1 and user.stats.received - user.stats.unrouted == verified + 1
        # a sender the presence handler does not take is refused by its own policy
        rejected = user.stats.rejected["wrong_sender"]
        await user.publish(presence, {"state": "offline"}, type="coord.presence", qos=1)
        await until(lambda: user.stats.rejected["wrong_sender"] > rejected)
        assert len(got_presence) == 1
        await user.uncover(tree)
        assert subscribed == [tree]
        await node.transport.publish(presence, b"", qos=1, retain=True)     # clear the retained copy


async def test_encryption_hides_plaintext_from_the_broker(broker, node_key: Key, user_key: Key) -> None:
    topic = mesh_topics.inference_requests("secret-node")
    spy_key = Key.generate()
    async with MqttTransport(broker.url, **broker.credentials(spy_key)) as spy:
        await spy.subscribe("#", qos=1)
        seen: list[bytes] = []

        async def collect() -> None:
            async for m in spy.messages():
                seen.append(m.payload)

        collector = asyncio.create_task(collect())
        async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
            async def answer(msg: Message) -> dict:
                assert msg.encrypted and msg.body == {"prompt": "PLAINTEXT-PROMPT-42"}
                return {"completion": "PLAINTEXT-COMPLETION-17"}

            async def stream(msg: Message) -> AsyncIterator[str]:
                yield "PLAINTEXT-TOKEN-99"

            await node.serve(topic, answer)
            await node.serve(mesh_topics.inference_requests("secret-streamer"), stream)
            reply = await user.request(topic, {"prompt": "PLAINTEXT-PROMPT-42"}, encrypt_to=node_key.did, timeout=10)
            assert reply.encrypted and reply.body == {"completion": "PLAINTEXT-COMPLETION-17"}
            chunks = [m async for m in user.stream(mesh_topics.inference_requests("secret-streamer"), "x",
                                                   encrypt_to=node_key.did, timeout=10)]
            assert [c.body for c in chunks] == ["PLAINTEXT-TOKEN-99"] and chunks[0].encrypted
            await until(lambda: len(seen) >= 5)  # request, response, request, chunk, end
        collector.cancel()
    blob = b"\n".join(seen)
    for secret in (b"PLAINTEXT-PROMPT-42", b"PLAINTEXT-COMPLETION-17", b"PLAINTEXT-TOKEN-99"):
        assert secret not in blob
        for part in blob.replace(b"\n", b".").split(b"."):  # nor inside any base64url part
            try:
                assert secret not in b64d(part)
            except Exception as exc:  # noqa: BLE001 - parts that are not base64url are irrelevant
                if isinstance(exc, AssertionError):
                    raise


async def test_every_bad_case_is_rejected_distinctly_and_client_keeps_working(
    broker, node_key: Key, user_key: Key, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sdk.messaging.client")
    topic = protocol.device_events("victim")
    other = protocol.device_events("elsewhere")
    config = ClientConfig(policy=VerifyPolicy(max_bytes=4096))
    attacker = Key.generate()
    signer = Signer(user_key, max_bytes=1 << 20)
    async with SecureClient(broker.url, node_key, config=config) as victim, \
            MqttTransport(broker.url, **broker.credentials(attacker)) as raw:
        got: list[Message] = []
        await victim.subscribe(topic, got.append)

        _, valid = signer.seal(topic, {"ok": 1}, type="event")
        h, p, s = valid.split(b".")
        forged_payload = b64e(b64d(p).replace(b'"ok":1', b'"ok":9'))
        unknown_header = b64e(b'{"alg":"EdDSA","kid":"did:web:unknown.example#k1","typ":"autoglm-msg+jws"}')
        _, expired = signer.seal(topic, {"old": 1}, type="event", now=time.time() - 100, ttl=10)
        _, future = signer.seal(topic, {"f": 1}, type="event", now=time.time() + 3600)
        _, oversized = signer.seal(topic, "x" * 8000, type="event")
        _, wrong_topic = signer.seal(other, {"w": 1}, type="event")
        _, other_recipient = signer.seal(topic, {"e": 1}, type="event", encrypt_to=attacker.did)

        cases = [
            ("bad_signature", h + b"." + forged_payload + b"." + s),
            ("unknown_sender", unknown_header + b"." + p + b"." + s),
            ("expired", expired),
            ("clock_skew", future),
            ("too_large", oversized),
            ("malformed", b"\x00\xffnot an envelope"),
            ("wrong_topic", wrong_topic),
            ("decrypt_failed", other_recipient),
        ]
        await raw.publish(topic, valid, qos=1)
        await until(lambda: len(got) == 1)
        cases.append(("replayed", valid))
        for reason, payload in cases:
            await raw.publish(topic, payload, qos=1)
            await until(lambda r=reason: victim.stats.rejected[r] == 1)
            # the client keeps working: a fresh valid message still arrives
            _, fresh = signer.seal(topic, {"after": reason}, type="event")
            await raw.publish(topic, fresh, qos=1)
            await until(lambda r=reason: got[-1].body == {"after": r})
        assert sum(victim.stats.rejected.values()) == len(cases)
        assert all(m.sender == user_key.did for m in got) and len(got) == len(cases) + 1
    logged = {r.getMessage().split(": ")[1] for r in caplog.records if "rejected message" in r.getMessage()}
    assert logged == {reason for reason, _ in cases}


def _access_vc(issuer: Key, subject: str) -> dict:
    return issue_credential(
        {"@context": [V2_CONTEXT], "type": ["VerifiableCredential", "InferenceAccessCredential"],
         "credentialSubject": {"id": subject}},
        issuer,
    )


async def test_authorization_hook(broker, node_key: Key) -> None:
    issuer, rogue_issuer = Key.generate(), Key.generate()
    alice, bob, carol, mallory = Key.generate(), Key.generate(), Key.generate(), Key.generate()
    requirement = CredentialRequirement(
        type="InferenceAccessCredential",
        trust=TrustPolicy({issuer.did: {"InferenceAccessCredential"}}),
        check=lambda result, msg: msg.body != "forbidden",
    )
    topic = mesh_topics.inference_requests("guarded")
    async with SecureClient(broker.url, node_key) as node:
        await node.serve(topic, _echo, require=requirement)
        clients = {
            "alice": SecureClient(broker.url, alice, credentials=[_access_vc(issuer, alice.did)]),
            "bob": SecureClient(broker.url, bob),  # no credential
            "carol": SecureClient(broker.url, carol, credentials=[_access_vc(rogue_issuer, carol.did)]),
            "mallory": SecureClient(broker.url, mallory, credentials=[_access_vc(issuer, alice.did)]),  # stolen
        }
        for c in clients.values():
            await c.connect()
        try:
            assert (await clients["alice"].request(topic, 1, timeout=10)).body["echo"] == 1
            assert (await clients["alice"].request(topic, 2, timeout=10)).body["echo"] == 2  # cached grant
            for name in ("bob", "carol", "mallory"):
                with pytest.raises(RemoteError) as err:
                    await clients[name].request(topic, 1, timeout=10)
                assert err.value.reason == "not_authorized", name
            with pytest.raises(RemoteError) as err:  # the app check runs on cached grants too
                await clients["alice"].request(topic, "forbidden", timeout=10)
            assert err.value.reason == "not_authorized"
            assert node.stats.rejected["not_authorized"] == 4
        finally:
            for c in clients.values():
                await c.aclose()


async def test_wrong_sender_reply_is_rejected(broker, node_key: Key, user_key: Key) -> None:
    topic = mesh_topics.inference_requests("impostor")
    async with SecureClient(broker.url, node_key) as impostor, SecureClient(broker.url, user_key) as user:
        await impostor.serve(topic, _echo)
        expected = Key.generate().did
        with pytest.raises(RequestTimeout):
            await user.request(topic, 1, expect_from=expected, timeout=1.0)
        assert user.stats.rejected["wrong_sender"] == 1


async def test_reply_to_outside_reply_prefix_is_refused(broker, node_key: Key, user_key: Key) -> None:
    topic = mesh_topics.inference_requests("reflector")
    victim_topic = protocol.device_config("someone")
    async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
        calls: list[Message] = []
        await node.serve(topic, calls.append)
        seen: list[Message] = []
        await user.subscribe(victim_topic, seen.append)
        await user.publish(topic, 1, type="request", reply_to=victim_topic, correlation_id="c1", ttl=10)
        await until(lambda: node.stats.rejected["bad_reply_to"] == 1)
        assert (await user.request(topic, 2, timeout=10)).type == "response"  # still serving
        assert [m.body for m in calls] == [2] and seen == []


@pytest.mark.slow
async def test_reconnect_after_broker_restart(restartable_broker, node_key: Key, user_key: Key) -> None:
    topic = mesh_topics.inference_requests("survivor")
    async with SecureClient(restartable_broker.url, node_key) as node, \
            SecureClient(restartable_broker.url, user_key) as user:
        await node.serve(topic, _echo)
        assert (await user.request(topic, "before", timeout=10)).body["echo"] == "before"
        await restartable_broker.restart()
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = await user.request(topic, "after", timeout=2)
                break
            except (RequestTimeout, Exception):  # noqa: BLE001 - reconnecting
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert reply.body["echo"] == "after"
        assert node.transport.reconnects >= 1 and user.transport.reconnects >= 1


@pytest.mark.slow
async def test_qos1_events_survive_restart_with_persistent_session(restartable_broker, user_key: Key) -> None:
    if restartable_broker.kind == "embedded":
        pytest.skip("amqtt keeps no sessions across a restart (documented gap)")
    topic = protocol.device_events("survivor")
    got: list[int] = []
    sub_key = Key.generate()
    async with SecureClient(restartable_broker.url, sub_key, persistent=True, client_id="b2-persistent-sub") as sub, \
            SecureClient(restartable_broker.url, user_key) as pub:
        await sub.subscribe(topic, lambda m: got.append(m.body))
        await pub.publish(topic, -1)
        await until(lambda: got == [-1])
        await restartable_broker.restart()
        # published while the connection is down or coming back: queued in the client session
        await asyncio.wait_for(asyncio.gather(*(pub.publish(topic, i) for i in range(20))), 30)
        await until(lambda: len(got) >= 21, timeout=30)
        await asyncio.sleep(0.3)
    assert sorted(got[1:]) == list(range(20))  # nothing lost, no duplicate reached the handler


async def test_a_stream_drops_a_redelivered_chunk_and_ends_on_a_lost_one(broker, node_key: Key, user_key: Key) -> None:
    """Chunks carry seq numbers: one delivered twice is yielded once; one lost in transit (a later
    seq first) ends the stream with ``stream_gap`` instead of silently missing from the reply."""
    from sdk.messaging import MessagingError

    topic = mesh_topics.inference_requests("gappy")
    async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
        async def answer(msg: Message) -> None:
            assert msg.reply_to is not None
            for seq, body in ((0, "a"), (0, "a"), (1, "b"), (3, "d")):  # seq 0 twice, seq 2 lost
                await node.publish(msg.reply_to, body, type="stream.chunk", seq=seq, correlation_id=msg.correlation_id)

        await node.subscribe(topic, answer)
        got: list[tuple[int | None, object]] = []
        with pytest.raises(MessagingError) as caught:
            async for m in user.stream(topic, None, idle_timeout=10):
                got.append((m.seq, m.body))
        assert caught.value.reason == "stream_gap"
        assert got == [(0, "a"), (1, "b")]
