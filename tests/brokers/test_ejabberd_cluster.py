"""The SDK on a real two-node ejabberd cluster: DID admission through extauth, the %u topic ACL,
coordination across nodes, and broker failover after kill -9 of a node."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from brokers.ejabberd import EjabberdCluster, ejabberd_username
from sdk.identity import Key, TrustPolicy
from sdk.messaging.broker_auth import make_connect_password
from sdk.messaging.errors import ConnectFailed, PublishFailed, SubscribeFailed
from sdk.messaging.topics import ROOT, client_token
from sdk.messaging.transport import MqttTransport
from tests.fixtures.brokers import CLUSTER_ADMIN
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.cluster, pytest.mark.broker]

RULES = Path(__file__).resolve().parents[2] / "examples" / "rules.toml"


def _transport(cluster: EjabberdCluster, url: str, key: Key, **kw: Any) -> MqttTransport:
    return MqttTransport(url, reconnect=False, **cluster.credentials(key), **kw)


async def test_did_connect_is_admitted_on_every_node_and_bad_or_replayed_proofs_are_refused(
        ejabberd_cluster: EjabberdCluster) -> None:
    c = ejabberd_cluster
    key = Key.generate()
    for url in c.urls:
        async with _transport(c, url, key) as t:
            assert t.connected
    # a proof signed by another key than the one the username names
    other = Key.generate()
    forged = MqttTransport(c.urls[0], reconnect=False, client_id="forged-1", username=ejabberd_username(key.did),
                           password=make_connect_password(other, "forged-1"))
    with pytest.raises(ConnectFailed) as exc:
        await forged.connect()
    assert exc.value.reason == "not_authorized"
    assert (ejabberd_username(key.did), "wrong_username") in c.verifier.rejections
    # garbage, then a stale proof
    for password, reason in (("not.a.proof", "malformed_proof"),
                             (make_connect_password(key, "stale-1", now=1_000_000.0), "stale_proof")):
        t = MqttTransport(c.urls[1], reconnect=False, client_id="stale-1", username=ejabberd_username(key.did),
                          password=password)
        with pytest.raises(ConnectFailed):
            await t.connect()
        assert (ejabberd_username(key.did), reason) in c.verifier.rejections
    # one proof, used on node 1, is refused on node 2 (one replay guard for the cluster)
    proof = make_connect_password(key, "replay-1")
    async with MqttTransport(c.urls[0], reconnect=False, client_id="replay-1",
                             username=ejabberd_username(key.did), password=proof):
        pass
    again = MqttTransport(c.urls[1], reconnect=False, client_id="replay-1",
                          username=ejabberd_username(key.did), password=proof)
    with pytest.raises(ConnectFailed) as exc:
        await again.connect()
    assert exc.value.reason == "not_authorized"
    assert c.verifier.rejections[-1] == (ejabberd_username(key.did), "replayed_proof")


async def test_a_device_cannot_publish_or_read_another_devices_topics(ejabberd_cluster: EjabberdCluster) -> None:
    c = ejabberd_cluster
    alice, bob = Key.generate(), Key.generate()
    a, b = client_token(alice.did), client_token(bob.did)
    seen: list[tuple[str, bytes]] = []
    async with _transport(c, c.urls[0], alice) as ta, _transport(c, c.urls[1], bob) as tb:
        await tb.subscribe(f"{ROOT}/dev/+/events", qos=1, handler=lambda t, p, **_: seen.append((t, p)))
        await ta.publish(f"{ROOT}/dev/{a}/events", b"alice event", qos=1)
        await until(lambda: (f"{ROOT}/dev/{a}/events", b"alice event") in seen, timeout=5)
        for topic in (f"{ROOT}/dev/{b}/events", f"{ROOT}/dev/{b}/presence", f"{ROOT}/dev/{b}/config",
                      f"{ROOT}/dev/{a}/config", f"{ROOT}/status/{b}"):
            with pytest.raises(PublishFailed):
                await ta.publish(topic, b"forged", qos=1)
        await ta.publish(f"{ROOT}/dev/{b}/cmd", b"to bob's inbox", qos=1)  # inboxes take anyone's writes
        for topic_filter in (f"{ROOT}/dev/{b}/cmd", f"{ROOT}/reply/{b}", f"{ROOT}/#", f"{ROOT}/dev/+/cmd"):
            with pytest.raises(SubscribeFailed):
                await ta.subscribe(topic_filter, qos=1)
        await ta.publish(f"{ROOT}/dev/{a}/events", b"marker", qos=1)
        await until(lambda: (f"{ROOT}/dev/{a}/events", b"marker") in seen, timeout=5)
    assert all(t == f"{ROOT}/dev/{a}/events" for t, _ in seen)


async def _coordination(c: EjabberdCluster, tmp_path: Path, *, coordinator_urls: str,
                        device_urls: list[str], on_config: dict[int, list[Any]]) -> tuple[Any, list[Any]]:
    from sdk.coord.coordinator import Coordinator, load_rules
    from sdk.coord.device import Device

    coord = Coordinator(CLUSTER_ADMIN, broker=coordinator_urls, data_dir=tmp_path, trust=TrustPolicy({}),
                        issuer=Key.generate(), rules=load_rules(RULES), **c.credentials(CLUSTER_ADMIN))
    await coord.start()
    devices: list[Any] = []
    try:
        for i, url in enumerate(device_urls):
            key = Key.generate()
            kind = "display" if i == 0 else "phone"
            cred = coord.issue_device_credential(key.did, kind=kind, groups=["room:living"])
            got = on_config.setdefault(i, [])
            dev = Device(key, cred, broker=url, coordinator=CLUSTER_ADMIN.did, on_config=got.append,
                         **c.credentials(key))
            await dev.connect()
            devices.append(dev)
    except BaseException:
        for dev in devices:
            await dev.aclose()
        await coord.stop()
        raise
    return coord, devices


async def test_event_from_a_device_reaches_another_through_the_coordinator_across_nodes(
        ejabberd_cluster: EjabberdCluster, tmp_path: Path) -> None:
    """A (display) and B (phone) on node 2, the coordinator on node 1: A's event becomes B's config."""
    c = ejabberd_cluster
    configs: dict[int, list[Any]] = {}
    coord, (display, phone) = await _coordination(c, tmp_path, coordinator_urls=c.urls[0],
                                                  device_urls=[c.urls[1], c.urls[1]], on_config=configs)
    try:
        assert phone.client.transport.broker_url == c.urls[1]
        await display.screen_available(800, 600)
        await until(lambda: any(x.state.get("ui.companion.resolution") == "800x600" for x in configs[1]),
                    timeout=10)
    finally:
        for dev in (display, phone):
            await dev.aclose()
        await coord.stop()


async def test_kill_9_of_a_node_while_configs_are_pushed_every_device_ends_on_the_latest(
        ejabberd_cluster: EjabberdCluster, tmp_path: Path) -> None:
    """Coordinator and half the phones start on node 1, the rest on node 2, all with both URLs;
    node 1 dies mid-way: every phone ends on the config of the last event, versions strictly
    increasing (none applied twice)."""
    c = ejabberd_cluster
    both, reverse = c.url, ",".join(reversed(c.urls))
    configs: dict[int, list[Any]] = {}
    coord, devices = await _coordination(c, tmp_path, coordinator_urls=both,
                                         device_urls=[both, both, both, reverse, reverse], on_config=configs)
    display = devices[0]
    try:
        last = ""
        for n in range(8):
            width = 640 + 10 * n
            last = f"{width}x480"
            if n == 3:
                c.kill(0)
            await display.screen_available(width, 480)
        for i in range(1, len(devices)):
            await until(lambda i=i: bool(configs[i]) and
                        configs[i][-1].state.get("ui.companion.resolution") == last, timeout=20)
            versions = [x.version for x in configs[i]]
            assert versions == sorted(set(versions)), versions
        for dev in devices:
            assert dev.client.transport.broker_url == c.urls[1]
        assert coord.client.transport.broker_url == c.urls[1]
    finally:
        for dev in devices:
            await dev.aclose()
        await coord.stop()
        await asyncio.to_thread(c.restart, 0)  # it rejoins the cluster from its spool


async def test_mesh_generation_across_nodes_survives_the_loss_of_the_serving_nodes_broker(
        ejabberd_cluster: EjabberdCluster) -> None:
    """A mesh node on broker node 1, the router (peer) on node 2; then node 1 dies mid-request: the
    mesh node fails over to node 2 and the request completes; a new one runs too."""
    from sdk.mesh import AccessPolicy, Mesh, MeshNode, NodeConfig, NodePolicy
    from sdk.messaging import SecureClient
    from sdk.testing import FakeEngine, TestIssuer

    c = ejabberd_cluster
    issuer = TestIssuer()
    node_key, peer_key = Key.generate(), Key.generate()
    node = MeshNode(FakeEngine(token_delay=0.01), c.url, key=node_key, access=AccessPolicy(issuer.trust),
                    credential=issuer.node(node_key, models=["fake-model"]),
                    config=NodeConfig(advert_interval=0.3), **c.credentials(node_key))
    mesh = Mesh(",".join(reversed(c.urls)), peer_key, credentials=[issuer.access(peer_key)],
                node_policy=NodePolicy(issuer.trust), **c.credentials(peer_key))
    publishers = [SecureClient(url, issuer.key, **c.credentials(issuer.key)) for url in c.urls]
    try:
        for client in publishers:  # retained state is per ejabberd node (see docs/BROKERS.md)
            await client.connect()
            await issuer.publish(client)
        await node.start()
        await mesh.start()
        await mesh.wait_for_nodes(1, model="fake-model")
        assert node.client.transport.broker_url == c.urls[0]
        assert mesh.client.transport.broker_url == c.urls[1]
        result = await mesh.generate(prompt="across", max_new_tokens=16, model="fake-model")
        assert result.text == "Echo: across"

        long_prompt = "x" * 20
        pending = asyncio.ensure_future(mesh.generate(prompt=long_prompt, max_new_tokens=60, model="fake-model"))
        await asyncio.sleep(0.1)
        c.kill(0)
        result = await asyncio.wait_for(pending, 30)
        assert result.text == f"Echo: {long_prompt}"[:60]
        await until(lambda: node.client.transport.connected and node.client.transport.broker_url == c.urls[1],
                    timeout=15)
        result = await mesh.generate(prompt="after", max_new_tokens=16, model="fake-model")
        assert result.text == "Echo: after"
    finally:
        await mesh.aclose()
        await node.aclose()
        for client in publishers:
            await client.aclose()
        await asyncio.to_thread(c.restart, 0)


async def test_a_fresh_subscriber_on_node_2_gets_the_status_list_by_request_and_later_revocations_live(
        ejabberd_cluster: EjabberdCluster) -> None:
    """The issuer publishes on node 1; its retained list does not reach a subscription made on node 2
    (docs/BROKERS.md). The verifier there asks for it (STATUS_GET on the issuer's inbox) on its first
    lookup and has it at once; a revocation published afterwards takes effect there live; a second
    fresh verifier that never asks gets the list from the publisher's periodic re-publication."""
    from sdk.identity import StatusList, create_status_list_credential
    from sdk.messaging import SecureClient
    from sdk.messaging.status import MqttStatusListSource, StatusListPublisher, status_list_url

    c = ejabberd_cluster
    issuer, verifier, other = Key.generate(), Key.generate(), Key.generate()
    url = status_list_url(issuer.did)
    inbox = f"{ROOT}/dev/{client_token(issuer.did)}/cmd"
    bits = StatusList()

    def signed() -> dict[str, Any]:
        cred = create_status_list_credential(issuer, url, status_list=bits)
        assert isinstance(cred, dict)
        return cred

    trust = TrustPolicy({issuer.did: ["DeviceCredential"]})
    async with SecureClient(c.urls[0], issuer, **c.credentials(issuer)) as pub, \
            SecureClient(c.urls[1], verifier, **c.credentials(verifier)) as client, \
            SecureClient(c.urls[1], other, **c.credentials(other)) as client2:
        publisher = StatusListPublisher(pub, interval=1.5)
        await publisher.put(signed())
        await publisher.serve(inbox)
        source = MqttStatusListSource(trust)
        assert await source.attach(client)
        source.ask_when_missing(client, lambda u: inbox if u == url else None)
        assert source.verified(url) is None            # the retained copy did not cross nodes: ask
        await until(lambda: source.verified(url) is not None, timeout=5)
        assert publisher.answered == 1 and not source.verified(url).bits.get(5)  # type: ignore[union-attr]
        bits.set(5)                                     # a revocation, published live on node 1
        await publisher.put(signed())
        await until(lambda: source.verified(url).bits.get(5), timeout=5)  # type: ignore[union-attr]
        # a verifier that does not ask gets the list within one re-publication interval
        quiet = MqttStatusListSource(trust)
        assert await quiet.attach(client2)
        publisher.start()
        try:
            await until(lambda: quiet.verified(url) is not None and quiet.verified(url).bits.get(5),  # type: ignore[union-attr]
                        timeout=10)
            assert publisher.republished >= 1
        finally:
            await publisher.aclose()
            await pub.transport.publish(f"{ROOT}/status/{client_token(issuer.did)}", b"", qos=1, retain=True)


async def test_the_coordinator_serves_and_re_publishes_its_issuers_status_list_across_nodes(
        ejabberd_cluster: EjabberdCluster, tmp_path: Path) -> None:
    """The coordinator (with an issuer key) on node 1: a verifier on node 2 asks it for the list on
    its command topic; an unknown list is refused with a reason; the list is re-published live."""
    from sdk.coord.coordinator import Coordinator
    from sdk.messaging import SecureClient
    from sdk.messaging.errors import MessagingError
    from sdk.messaging.status import STATUS_GET, MqttStatusListSource, status_list_url

    c = ejabberd_cluster
    issuer, verifier = Key.generate(), Key.generate()
    coord = Coordinator(CLUSTER_ADMIN, broker=c.urls[0], data_dir=tmp_path, trust=TrustPolicy({}), issuer=issuer,
                        status_republish=1.0, **c.credentials(CLUSTER_ADMIN))
    await coord.start()
    url = status_list_url(issuer.did)
    inbox = f"{ROOT}/dev/{client_token(CLUSTER_ADMIN.did)}/cmd"
    try:
        async with SecureClient(c.urls[1], verifier, **c.credentials(verifier)) as client:
            source = MqttStatusListSource(TrustPolicy({issuer.did: ["DeviceCredential"]}))
            taken: list[str] = []
            source.add_listener(lambda u, cred: taken.append(u))
            assert await source.attach(client)
            assert await source.request(client, url, topic=inbox)
            assert source.verified(url) is not None and taken == [url]
            with pytest.raises(MessagingError) as exc:
                await client.request(inbox, {"url": status_list_url(verifier.did)}, type=STATUS_GET, timeout=5)
            assert exc.value.reason == "unknown_status_list"
        live: list[bool] = []
        async with _transport(c, c.urls[1], Key.generate()) as raw:
            await raw.subscribe(f"{ROOT}/status/{client_token(issuer.did)}", qos=1,
                                handler=lambda t, p, *, retain, qos: live.append(retain))
            await until(lambda: live.count(False) >= 2, timeout=10)       # re-published, live, across nodes
    finally:
        await coord.stop()
