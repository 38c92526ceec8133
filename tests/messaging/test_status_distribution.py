"""Status lists over MQTT (sdk.messaging.status) on real brokers: verified, ordered, never rolled back."""

from __future__ import annotations

import pytest

from sdk.identity import Key, StatusList, TrustPolicy, create_status_list_credential
from sdk.messaging import SecureClient
from sdk.messaging.status import MqttStatusListSource, publish_status_list, status_list_url
from tests.fixtures.waiting import until

pytestmark = pytest.mark.broker




def _list(issuer: Key, *, revoked: tuple[int, ...] = (), sequence: int) -> dict:
    bits = StatusList()
    for i in revoked:
        bits.set(i)
    cred = create_status_list_credential(issuer, status_list_url(issuer.did), status_list=bits, sequence=sequence)
    assert isinstance(cred, dict)
    return cred


async def test_a_replayed_pre_revocation_list_never_rolls_back(broker) -> None:
    issuer, revoked_device, verifier = Key.generate(), Key.generate(), Key.generate()
    before = _list(issuer, sequence=1)
    after = _list(issuer, revoked=(7,), sequence=2)
    source = MqttStatusListSource(TrustPolicy({issuer.did: ["DeviceCredential"]}))
    taken: list[int] = []
    source.add_listener(lambda url, cred: taken.append(cred["credentialSubject"]["sequence"]))
    url = status_list_url(issuer.did)
    async with SecureClient(broker.url, issuer) as pub, SecureClient(broker.url, verifier) as client, \
            SecureClient(broker.url, revoked_device) as attacker:
        try:
            await publish_status_list(pub, after)
            assert await source.attach(client)
            await until(lambda: taken == [2])
            # the revoked device relays the list from before its revocation, retained and live
            await publish_status_list(attacker, before)
            await until(lambda: client.stats.handled >= 2)
            assert source(url) == after and source.verified(url).bits.get(7)
            # a forged "newer" list (not signed by the issuer) is refused too
            forged = dict(_list(revoked_device, sequence=99), id=url, issuer=issuer.did)
            await attacker.publish(f"autoglm/v1/status/{url.rsplit(':', 1)[-1]}", forged,
                                   type="coord.status_list", retain=True)
            await until(lambda: client.stats.handled >= 3)
            assert source(url) == after
            newer = _list(issuer, revoked=(7, 8), sequence=3)
            await publish_status_list(pub, newer)
            await until(lambda: taken == [2, 3])
        finally:
            await pub.transport.publish(f"autoglm/v1/status/{url.rsplit(':', 1)[-1]}", b"", qos=1, retain=True)


def test_a_local_issuer_puts_lists_through_the_same_rules() -> None:
    issuer = Key.generate()
    source = MqttStatusListSource(TrustPolicy({issuer.did: ["DeviceCredential"]}))
    url = status_list_url(issuer.did)
    old = _list(issuer, sequence=4)  # issued first: older validFrom
    new = _list(issuer, revoked=(1,), sequence=5)
    assert source.put(url, new) is True
    assert source.put(url, old) is False and source(url) == new
    assert source.put(url, new) is False  # the identical list again: no change
    stranger = Key.generate()
    assert MqttStatusListSource(TrustPolicy({issuer.did: ["X"]})).put(
        status_list_url(stranger.did), _list(stranger, sequence=1)) is False


def test_only_a_verifying_source_claims_to_hand_out_verified_lists() -> None:
    from sdk.identity.status_list import VerifiedListSource

    issuer = Key.generate()
    assert isinstance(MqttStatusListSource(TrustPolicy({issuer.did: ["X"]})), VerifiedListSource)
    raw = MqttStatusListSource()
    assert not isinstance(raw, VerifiedListSource)  # a StatusChecker verifies what it returns
    url = status_list_url(issuer.did)
    assert raw.put(url, _list(issuer, sequence=1)) and raw(url) is not None
