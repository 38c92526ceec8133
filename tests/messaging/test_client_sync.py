"""The blocking facade against a real Mosquitto (sync test: the embedded broker needs the loop)."""

from __future__ import annotations

import threading

import pytest

from sdk.coord import protocol
from sdk.identity import Key
from sdk.mesh import topics as mesh_topics
from sdk.messaging import RemoteError, SecureClient, SyncSecureClient

pytestmark = [pytest.mark.broker, pytest.mark.mosquitto]


def test_sync_facade(mosquitto_broker) -> None:
    node_key, user_key = Key.generate(), Key.generate()
    topic = mesh_topics.inference_requests("sync-node")
    with SyncSecureClient(mosquitto_broker.url, node_key) as node, \
            SyncSecureClient(mosquitto_broker.url, user_key) as user:
        node.serve(topic, lambda m: {"twice": m.body * 2})

        async def count(m):  # streaming handler
            for i in range(m.body):
                yield i

        node.serve(mesh_topics.inference_requests("sync-streamer"), count)

        def fail(m):
            raise ValueError("bad")

        node.serve(protocol.device_commands("sync-node"), fail)
        assert user.request(topic, 21, timeout=10).body == {"twice": 42}
        assert user.request(topic, 1, encrypt_to=node_key.did, timeout=10).encrypted
        assert [m.body for m in user.stream(mesh_topics.inference_requests("sync-streamer"), 4, timeout=10)] == [0, 1, 2, 3]
        with pytest.raises(RemoteError):
            user.request(protocol.device_commands("sync-node"), None, timeout=10)
        seen = threading.Event()
        user.subscribe(protocol.ALL_EVENTS, lambda m: seen.set())
        node.publish(protocol.device_events("sync-node"), {"e": 1})
        assert seen.wait(10)
        assert isinstance(user.client, SecureClient) and user.stats.rejected_total == 0
