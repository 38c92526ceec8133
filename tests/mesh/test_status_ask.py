"""Mesh status lists asked for at once: a :class:`LiveStatus` whose issuer's list never reached it
(a retained list not delivered across broker nodes, modelled here by a publisher that does not
publish it retained) asks the publisher (``coord.status_get``) on its first lookup instead of
waiting for the next re-publication; the lookup fails closed, the next one finds the list.

Real brokers (the ``broker`` fixture: embedded and Mosquitto), real signed lists."""

from __future__ import annotations

from typing import Any

import pytest

from sdk.identity import (
    Key,
    StatusList,
    StatusUnavailable,
    TrustPolicy,
    create_status_list_credential,
    status_entry,
)
from sdk.identity.errors import Revoked
from sdk.mesh.revocation import LiveStatus, issuer_inbox
from sdk.messaging import SecureClient
from sdk.messaging.status import StatusListPublisher, status_list_url
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


def _signed(issuer: Key, bits: StatusList) -> dict[str, Any]:
    cred = create_status_list_credential(issuer, status_list_url(issuer.did), status_list=bits)
    assert isinstance(cred, dict)
    return cred


@pytest.mark.parametrize("where", ["default", "mapping"])
async def test_a_missing_list_is_asked_for_on_the_first_lookup(broker: Any, where: str) -> None:
    issuer, verifier = Key.generate(), Key.generate()
    url = status_list_url(issuer.did)
    bits = StatusList()
    bits.set(7)
    inbox = issuer_inbox(url) if where == "default" else "autoglm/v1/dev/status-service/cmd"
    assert inbox is not None
    async with SecureClient(broker.url, issuer) as pub, SecureClient(broker.url, verifier) as client:
        publisher = StatusListPublisher(pub, interval=0)      # never re-published: only asking helps
        await publisher.put(_signed(issuer, bits), publish=False)
        await publisher.serve(inbox)
        live = LiveStatus(trust=TrustPolicy({issuer.did: ["DeviceCredential"]}),
                          ask=True if where == "default" else {issuer.did: inbox})
        assert await live.attach(client)
        with pytest.raises(StatusUnavailable):                # fails closed, and asks
            live.checker.check(status_entry(url, 3), issuer=issuer.did)
        await until(lambda: live.updates == 1, 10, what="the list, asked for")
        assert publisher.answered == 1
        live.checker.check(status_entry(url, 3), issuer=issuer.did)          # clear
        with pytest.raises(Revoked):
            live.checker.check(status_entry(url, 7), issuer=issuer.did)


async def test_asking_can_be_turned_off(broker: Any) -> None:
    issuer, verifier = Key.generate(), Key.generate()
    url = status_list_url(issuer.did)
    async with SecureClient(broker.url, verifier) as client:
        live = LiveStatus(trust=TrustPolicy({issuer.did: ["DeviceCredential"]}), ask=False)
        assert await live.attach(client)
        with pytest.raises(StatusUnavailable):
            live.checker.check(status_entry(url, 3), issuer=issuer.did)
        assert live.source._ask is None and not live.source._ask_tasks     # nothing asked


def test_the_default_inbox_is_the_issuers_command_topic() -> None:
    issuer = Key.generate()
    from sdk.messaging.topics import client_token

    assert issuer_inbox(status_list_url(issuer.did)) == f"autoglm/v1/dev/{client_token(issuer.did)}/cmd"
    assert issuer_inbox("https://example.com/status/1") is None


@pytest.mark.cluster
async def test_a_mesh_verifier_on_node_2_has_the_list_published_retained_on_node_1_at_once(
        ejabberd_cluster: Any) -> None:
    """ejabberd does not deliver node 1's retained list to a subscription made on node 2: the
    LiveStatus there asks the issuer's inbox on its first lookup and has it one round trip later,
    long before the publisher's next re-publication (none within this test: interval 0)."""
    c = ejabberd_cluster
    issuer, verifier = Key.generate(), Key.generate()
    url = status_list_url(issuer.did)
    bits = StatusList()
    bits.set(2)
    async with SecureClient(c.urls[0], issuer, **c.credentials(issuer)) as pub, \
            SecureClient(c.urls[1], verifier, **c.credentials(verifier)) as client:
        publisher = StatusListPublisher(pub, interval=0)
        await publisher.put(_signed(issuer, bits))            # retained, on node 1
        inbox = issuer_inbox(url)
        assert inbox is not None
        await publisher.serve(inbox)
        try:
            live = LiveStatus(trust=TrustPolicy({issuer.did: ["DeviceCredential"]}))
            assert await live.attach(client)
            with pytest.raises(StatusUnavailable):
                live.checker.check(status_entry(url, 2), issuer=issuer.did)
            await until(lambda: live.updates >= 1, 10, what="the list, asked for across nodes")
            with pytest.raises(Revoked):
                live.checker.check(status_entry(url, 2), issuer=issuer.did)
            assert publisher.answered == 1
        finally:
            from sdk.messaging.status import status_list_topic

            await pub.transport.publish(status_list_topic(issuer.did), b"", qos=1, retain=True)
