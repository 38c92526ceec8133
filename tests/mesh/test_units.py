"""Mesh building blocks without a model: scopes, credentials, rate limits, wire bodies, adverts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sdk.identity import Key, TrustPolicy, verify_credential
from sdk.inference import GenerationRequest
from sdk.mesh import (
    ACCESS_CREDENTIAL,
    NODE_CREDENTIAL,
    AccessScope,
    Mesh,
    NodeAdvert,
    NodeGrant,
    NodePolicy,
    NoNode,
    NoNodeTrust,
    PeerBuckets,
    PeerStreams,
    RateLimit,
    access_scope,
    issue_access_credential,
    issue_node_credential,
    node_grant,
)
from sdk.mesh import topics as mesh_topics
from sdk.mesh.protocol import ADVERT, Refusal, parse_request, request_body
from sdk.messaging import SecureClient


def test_scope_refusals() -> None:
    scope = AccessScope(("m1", "m2"), 100)
    assert scope.refusal("m1", 100) is None
    assert scope.refusal("m3", 10) == "scope_model"
    assert scope.refusal("m2", 101) == "scope_max_tokens"
    assert AccessScope().refusal("anything", 10**6) is None


def test_access_credential_round_trip_and_validation() -> None:
    issuer, holder = Key.generate(), Key.generate()
    vc = issue_access_credential(issuer, holder.did, models=["m"], max_tokens=32)
    result = verify_credential(vc, trust=TrustPolicy({issuer.did: {ACCESS_CREDENTIAL}}))
    assert result.verified and result.subject == holder.did and ACCESS_CREDENTIAL in result.types
    assert access_scope(result.credential) == AccessScope(("m",), 32)
    jwt = issue_access_credential(issuer, holder.did, proof_format="jwt")
    assert access_scope(verify_credential(jwt, trust=TrustPolicy.ANY).credential) == AccessScope(("*",), None)
    with pytest.raises(ValueError):
        issue_access_credential(issuer, holder.did, max_tokens=0)
    with pytest.raises(ValueError):
        issue_access_credential(issuer, holder.did, models=[])
    with pytest.raises(ValueError):
        access_scope({"credentialSubject": {"id": holder.did}})
    with pytest.raises(ValueError):
        access_scope({"credentialSubject": {"scope": {"models": "m"}}})


def test_token_bucket_per_peer() -> None:
    now = [0.0]
    buckets = PeerBuckets(RateLimit(rate=2.0, burst=2), clock=lambda: now[0])
    assert buckets.allow("a") and buckets.allow("a")
    assert not buckets.allow("a")
    assert buckets.allow("b")  # its own bucket
    now[0] += 0.5  # one token refilled
    assert buckets.allow("a") and not buckets.allow("a")
    with pytest.raises(ValueError):
        RateLimit(rate=0)


def test_stream_cap_per_peer() -> None:
    streams = PeerStreams(2)
    assert streams.acquire("a") and streams.acquire("a") and not streams.acquire("a")
    assert streams.full("a") and not streams.full("b") and streams.acquire("b")
    streams.release("a")
    assert streams.count("a") == 1 and streams.acquire("a")
    for _ in range(3):
        streams.release("b")  # over-release is harmless
    assert len(streams) == 1
    with pytest.raises(ValueError):
        PeerStreams(0)


def test_node_credential_round_trip_and_binding() -> None:
    issuer, node = Key.generate(), Key.generate()
    token = node.did.rsplit(":", 1)[1]
    vc = issue_node_credential(issuer, node.did, models=["m"], node_ids=["gpu-1"], valid_for=3600)
    result = verify_credential(vc, trust=TrustPolicy({issuer.did: {NODE_CREDENTIAL}}))
    assert result.verified and result.subject == node.did and NODE_CREDENTIAL in result.types
    assert result.expires_at is not None
    grant = node_grant(result.credential)
    assert grant == NodeGrant(("m",), ("gpu-1",))

    def advert_for(node_id: str, models: tuple[str, ...] = ("m",), did: str = node.did) -> NodeAdvert:
        return NodeAdvert(node_id=node_id, did=did, epoch=1.0, seq=1, models=models)

    assert grant.refusal(advert_for(token), node.did) is None  # its own token is always its id
    assert grant.refusal(advert_for("gpu-1"), node.did) is None
    assert grant.refusal(advert_for("gpu-2"), node.did) == "node_id_not_bound"
    assert grant.refusal(advert_for(token, ("m", "other")), node.did) == "model_not_covered"
    assert grant.refusal(advert_for(token), Key.generate().did) == "wrong_did"
    assert NodeGrant(("*",)).covers("anything")
    assert not verify_credential(vc, trust=TrustPolicy({issuer.did: {ACCESS_CREDENTIAL}})).verified
    for bad in ({"credentialSubject": {"id": node.did}}, {"credentialSubject": {"models": []}},
                {"credentialSubject": {"models": ["m"], "nodeIds": "x"}}, {"credentialSubject": [{}, {}]}):
        with pytest.raises(ValueError):
            node_grant(bad)
    for kwargs in ({"models": []}, {"models": [""]}, {"models": ["m"], "node_ids": ["a/#"]},
                   {"models": ["m"], "valid_for": 0}, {"models": ["m"], "valid_for": 5, "valid_until": "2030-01-01T00:00:00Z"}):
        with pytest.raises(ValueError):
            issue_node_credential(issuer, node.did, **kwargs)


def test_router_needs_a_node_trust_policy() -> None:
    with pytest.raises(NoNodeTrust) as info:
        Mesh("mqtt://127.0.0.1:1", Key.generate())
    assert info.value.reason == "no_node_trust"
    with pytest.raises(TypeError):
        Mesh("mqtt://127.0.0.1:1", Key.generate(), node_policy="did:key:z6Mk")  # type: ignore[arg-type]
    issuer = Key.generate()
    mesh = Mesh("mqtt://127.0.0.1:1", Key.generate(), node_policy=TrustPolicy({issuer.did: {NODE_CREDENTIAL}}))
    assert isinstance(mesh.node_policy, NodePolicy)
    assert NodePolicy.trusting(issuer.did).trust.allows(issuer.did, [NODE_CREDENTIAL])
    assert Mesh("mqtt://127.0.0.1:1", Key.generate(), require_node_credential=False).node_policy is None


def test_request_bodies_round_trip_and_bad_ones() -> None:
    req = GenerationRequest(prompt="hi", max_new_tokens=7, temperature=0.0, stop=("x",))
    model, fields, held = parse_request(request_body(req, model="m"))
    assert (model, held) == ("m", 0)
    assert GenerationRequest(**fields) == GenerationRequest(prompt="hi", max_new_tokens=7, temperature=0.0,
                                                            stop=("x",))
    resumed = request_body(req, model="m", prompt_token_ids=[1, 2, 3], held=1, max_new_tokens=4)
    _, fields, held = parse_request(resumed)
    assert fields["prompt_token_ids"] == [1, 2, 3] and fields["max_new_tokens"] == 4 and held == 1
    for bad in ("nope", {"prompt": "x"}, {"model": "m"}, {"model": "m", "prompt": "a", "messages": []},
                {"model": "m", "prompt": "a", "held": 1}, {"model": "m", "prompt": "a", "stop": "x"}):
        with pytest.raises(Refusal) as info:
            parse_request(bad)
        assert info.value.reason == "invalid_request"


def advert(key: Key, node: str, seq: int, *, online: bool = True, did: str | None = None) -> dict[str, Any]:
    return NodeAdvert(node_id=node, did=did or key.did, epoch=1.0, seq=seq, models=("m",), online=online,
                      interval_s=1.0).to_body()


@pytest.mark.broker
async def test_router_trusts_only_well_signed_adverts(embedded_broker: Any) -> None:
    good, evil = Key.generate(), Key.generate()
    async with SecureClient(embedded_broker.url, good) as node, SecureClient(embedded_broker.url, evil) as other, \
            Mesh(embedded_broker.url, Key.generate(), require_node_credential=False) as mesh:
        await other.publish(mesh_topics.inference_ad("n1"), advert(evil, "n1", 1, did=good.did), type=ADVERT)
        await other.publish(mesh_topics.inference_ad("n2"), advert(evil, "n1", 1), type=ADVERT)  # wrong topic
        await other.publish(mesh_topics.inference_ad("n3"), advert(evil, "n3", 1), type="event")  # wrong type
        await node.publish(mesh_topics.inference_ad("n1"), advert(good, "n1", 1), type=ADVERT, retain=True, ttl=3)
        live = await mesh.wait_for_nodes(1, model="m", timeout=5)
        assert [a.node_id for a in live] == ["n1"] and live[0].did == good.did
        for _ in range(100):
            if mesh.counters["adverts_rejected"] >= 3:
                break
            await asyncio.sleep(0.02)
        assert mesh.counters["adverts_rejected"] == 3
        await node.publish(mesh_topics.inference_ad("n1"), advert(good, "n1", 2, online=False), type=ADVERT, retain=True)
        for _ in range(100):
            if not mesh.nodes():
                break
            await asyncio.sleep(0.02)
        assert mesh.nodes() == []
        with pytest.raises(NoNode) as info:
            await mesh.generate(prompt="hi", max_new_tokens=2, model="m")
        assert info.value.reason == "no_node"
        with pytest.raises(NoNode):
            await mesh.wait_for_nodes(1, timeout=0.2)


def test_live_status_never_goes_back_to_an_older_list() -> None:
    from datetime import UTC, datetime, timedelta

    from sdk.identity import StatusList, create_status_list_credential, status_entry
    from sdk.mesh import AccessPolicy
    from sdk.messaging.status import status_list_url

    issuer, holder = Key.generate(), Key.generate()
    url = status_list_url(issuer.did)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    bits = StatusList()

    def signed(n: int) -> Any:
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        return create_status_list_credential(issuer, url, status_list=bits,
                                             valid_from=(base + timedelta(seconds=n)).strftime(fmt),
                                             valid_until=(base + timedelta(hours=1)).strftime(fmt))

    before = signed(1)
    policy = AccessPolicy(TrustPolicy({issuer.did: {ACCESS_CREDENTIAL}}), status={url: before})
    changed: list[str] = []
    policy.status.add_listener(changed.append)
    vc = issue_access_credential(issuer, holder.did, credential_status=status_entry(url, 3))
    verify = dict(policy.requirement.verify_options)

    def ok() -> bool:
        return verify_credential(vc, trust=policy.requirement.trust, **verify).verified

    assert ok()
    bits.set(3)
    policy.status.put(url, signed(2))  # the revocation
    assert not ok() and changed == [url]
    policy.status.put(url, before)  # the pre-revocation list again (re-delivered, relayed...)
    assert not ok() and changed == [url]
    other = Key.generate()  # a list signed by an issuer the policy does not trust is not taken
    policy.status.put(status_list_url(other.did), create_status_list_credential(
        other, status_list_url(other.did), valid_from=base.strftime("%Y-%m-%dT%H:%M:%SZ"),
        valid_until=(base + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")))
    assert changed == [url]
