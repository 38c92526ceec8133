"""A first admission in one round trip: the device presents over the id of the request that
carries its presentation (fresh and single use by the envelope checks), with no hello.

Both sides still prove themselves: the coordinator verifies the device's presentation in full,
the device verifies the coordinator's presentation over its nonce before it counts itself
admitted. A coordinator that takes no direct presentation answers ``wrong_challenge`` and the
device says hello instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sdk.coord import protocol
from sdk.coord.coordinator import Coordinator
from sdk.coord.coordinator.auth import COORDINATOR_CREDENTIAL, device_credential, present
from sdk.coord.coordinator.errors import AdmissionError
from sdk.identity import Key, TrustPolicy
from sdk.messaging import SecureClient
from sdk.messaging.envelope import Message, Signer, new_id
from tests.coord.test_coordinator import Mesh, mesh, until  # noqa: F401 - the fixture

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


def _count_hellos(coord: Coordinator) -> list[str]:
    """The senders of every hello the coordinator handles from now on."""
    seen: list[str] = []
    hello = coord._hello

    def counting(msg: Message) -> dict[str, Any]:
        seen.append(msg.sender)
        return hello(msg)

    coord._hello = counting                                             # type: ignore[method-assign]
    return seen


def _direct_message(coord: Coordinator, key: Key, credential: Any, *, sender: str | None = None,
                    vp_challenge: str | None = None, body_challenge: str | None = None,
                    vp: Any = None) -> Message:
    """A present as the secure client hands it over, its presentation over the envelope's own id
    unless told otherwise."""
    msg_id = new_id()
    challenge = body_challenge or msg_id
    if vp is None:
        vp = present(credential, key, challenge=vp_challenge or msg_id, domain=coord.did)
    sender = sender or key.did
    body = {"challenge": challenge, "vp": vp, "last_version": 0, "nonce": "device-nonce-1"}
    return Message(topic=protocol.device_commands(protocol.token(coord.did)), sender=sender,
                   kid=f"{sender}#{sender.removeprefix('did:key:')}", type=protocol.PRESENT, id=msg_id,
                   body=body, issued_at=time.time())


async def test_a_first_admission_is_one_request_and_both_sides_prove_themselves(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    hellos = _count_hellos(coord)
    dev = await mesh.device("phone")
    assert dev.admitted and hellos == []
    assert coord.admission.direct == 1 and coord.admission.signed == 1     # it proved itself in the reply
    assert coord.admission.inflight == 0 and coord.challenges.refused == 0
    assert coord.metrics.auth.labels("direct")._value.get() == 1
    # the device checked that presentation: one that trusts another issuer for coordinators refuses
    # the same coordinator, still without a hello
    other = Key.generate()
    doubter = await mesh.device("phone", connect=False,
                                trust=TrustPolicy({other.did: {COORDINATOR_CREDENTIAL}}))
    try:
        await doubter.connect(authenticate=False)
        with pytest.raises(AdmissionError) as err:
            await doubter.authenticate()
        assert err.value.reason == "untrusted_coordinator" and not doubter.admitted
    finally:
        await doubter.aclose()
    assert hellos == []
    # a later admission (a reconnect) resumes by ticket: no hello, no direct presentation either
    await dev.authenticate()
    assert coord.admission.resumed == 1 and coord.admission.direct == 2 and hellos == []


async def test_a_coordinator_that_takes_no_direct_presentation_gets_a_hello(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator(direct_admission=False)
    hellos = _count_hellos(coord)
    dev = await mesh.device("phone")
    assert dev.admitted and len(hellos) == 1 and coord.admission.direct == 0
    assert coord.metrics.auth.labels("wrong_challenge")._value.get() == 1
    # it remembers: the next full handshake says hello first, with no direct attempt refused
    await dev.authenticate(resume=False)
    assert len(hellos) == 2 and coord.metrics.auth.labels("wrong_challenge")._value.get() == 1
    # a device told not to present directly says hello to any coordinator
    coord.direct_admission = True
    polite = await mesh.device("phone", direct_admission=False)
    assert polite.admitted and len(hellos) == 3 and coord.admission.direct == 0
    # an admission reply that says direct presentations are taken turns them on again
    await dev.authenticate(resume=False)
    assert len(hellos) == 4
    await dev.authenticate(resume=False)
    assert len(hellos) == 4 and coord.admission.direct == 1


async def test_a_replayed_direct_presentation_admits_nobody(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    key = Key.generate()
    cred = coord.issue_device_credential(key.did, kind="phone")
    topic = protocol.device_commands(protocol.token(coord.did))
    async with SecureClient(mesh.url, key) as client:
        msg_id = new_id()
        body = {"challenge": msg_id, "vp": present(cred, key, challenge=msg_id, domain=coord.did),
                "last_version": 0, "nonce": "device-nonce-1"}
        _, wire = Signer(key).seal(topic, body, type=protocol.PRESENT, msg_id=msg_id, ttl=30,
                                   reply_to=client.reply_topic, correlation_id=msg_id)
        before = coord.client.stats.rejected["replayed"]
        await client.transport.publish(topic, wire, qos=1)
        await until(lambda: coord.admission.direct == 1, timeout=10, what="admitted")
        await client.transport.publish(topic, wire, qos=1)            # the same bytes again
        await until(lambda: coord.client.stats.rejected["replayed"] == before + 1, timeout=10,
                    what="replay refused")
    assert coord.admission.direct == 1 and coord.metrics.auth.labels("admitted")._value.get() == 1


async def test_a_direct_presentation_must_be_over_its_own_envelope(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    key, thief = Key.generate(), Key.generate()
    cred = coord.issue_device_credential(key.did, kind="phone")
    cases = [
        # over some other id than the envelope's
        ("wrong_challenge", _direct_message(coord, key, cred, vp_challenge=new_id())),
        # over an id the coordinator never issued, carried in another envelope
        ("wrong_challenge", _direct_message(coord, key, cred, body_challenge=new_id())),
        # another sender carrying the device's presentation
        ("holder_mismatch", _direct_message(coord, key, cred, sender=thief.did)),
    ]
    for reason, msg in cases:
        with pytest.raises(AdmissionError) as err:
            await coord._present(msg)
        assert err.value.reason == reason, msg.body["challenge"]
    assert coord.registry.get(key.did) is None and coord.admission.inflight == 0
    # the cheap checks come before any signature: a forged presentation over another id is refused
    # for its challenge, not for its signature (which the full check would find first)
    bogus = present(cred, key, challenge=new_id(), domain=coord.did)["proof"]["proofValue"]  # another's
    forged = present(cred, key, challenge=new_id(), domain=coord.did)
    forged["proof"] = {**forged["proof"], "proofValue": bogus}
    with pytest.raises(AdmissionError) as err:
        await coord._present(_direct_message(coord, key, cred, vp=forged))
    assert err.value.reason == "wrong_challenge"
    forged_over_id = _direct_message(coord, key, cred)              # over its own id, but forged
    forged_over_id.body["vp"]["proof"]["proofValue"] = bogus
    with pytest.raises(AdmissionError) as err:
        await coord._present(forged_over_id)
    assert err.value.reason == "bad_signature"
    assert coord.admission.direct == 0 and coord.admission.inflight == 0
    reply = await coord._present(_direct_message(coord, key, cred))
    assert reply["session"] and reply["direct"] is True and coord.registry.get(key.did) is not None


async def test_direct_presentations_take_a_handshake_slot(tmp_path: Path) -> None:
    """Bounded like hellos: a full coordinator answers busy before it looks at the presentation."""
    issuer = Key.generate()
    coord = Coordinator(Key.generate(), broker="mqtt://127.0.0.1:1", data_dir=tmp_path, trust=TrustPolicy({}),
                        issuer=issuer, heartbeat_ttl=600, max_admissions=1)
    coord.store = coord._open_store()
    try:
        key = Key.generate()
        cred = device_credential(issuer, key.did, kind="phone")         # no status list: no broker here
        assert coord.admission.begin("did:key:zOther", known=False)      # the one slot is taken
        with pytest.raises(AdmissionError) as err:
            await coord._present(_direct_message(coord, key, cred, vp="not a presentation"))
        assert err.value.reason == "busy" and "retry" in str(err.value).lower()
        assert coord.admission.busy == 1 and coord.registry.get(key.did) is None
        coord.admission.finish("did:key:zOther")
        await coord._present(_direct_message(coord, key, cred))
        assert coord.admission.direct == 1 and coord.admission.inflight == 0
        assert coord.registry.get(key.did) is not None
    finally:
        coord.store.close()

