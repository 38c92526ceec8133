"""Who may use a node: credential, issuer trust, revocation, scope and per-peer rate limits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sdk.identity import Key, StatusChecker, TrustPolicy
from sdk.inference import GenerationRequest
from sdk.mesh import (
    ACCESS_CREDENTIAL,
    AccessPolicy,
    MeshOverloaded,
    NotPermitted,
    RateLimit,
    issue_access_credential,
)
from tests.fixtures.identity import StatusRegistry
from tests.fixtures.waiting import until
from tests.mesh.conftest import MODEL, MeshEnv

pytestmark = [pytest.mark.model, pytest.mark.broker]


def tiny(max_new_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(prompt="Hello", max_new_tokens=max_new_tokens, temperature=0.0)


async def refused(env: MeshEnv, key: Key, credentials: list[Any], request: GenerationRequest) -> NotPermitted:
    mesh = await env.router(key, credentials)
    with pytest.raises(NotPermitted) as info:
        await mesh.generate(request)
    assert info.value.reason == "not_permitted"
    return info.value


async def test_refusals_carry_the_nodes_reason(embedded_env: MeshEnv, access_issuer: Key) -> None:
    registry = StatusRegistry(access_issuer, url="https://issuer.example/mesh-status")
    access = AccessPolicy(TrustPolicy({access_issuer.did: {ACCESS_CREDENTIAL}}), status=StatusChecker(registry.fetch))
    node = await embedded_env.node(0, access=access)

    nobody = Key.generate()
    assert (await refused(embedded_env, nobody, [], tiny())).node_reason == "not_authorized"

    stranger = Key.generate()  # an access credential from an issuer the node does not trust
    foreign = issue_access_credential(Key.generate(), stranger.did, models=[MODEL])
    assert (await refused(embedded_env, stranger, [foreign], tiny())).node_reason == "not_authorized"

    thief = Key.generate()  # someone else's credential: the subject is not the sender
    other = issue_access_credential(access_issuer, Key.generate().did, models=[MODEL])
    assert (await refused(embedded_env, thief, [other], tiny())).node_reason == "not_authorized"

    narrow = Key.generate()
    wrong_model = issue_access_credential(access_issuer, narrow.did, models=["some-other-model"])
    assert (await refused(embedded_env, narrow, [wrong_model], tiny())).node_reason == "scope_model"

    frugal = Key.generate()
    few_tokens = issue_access_credential(access_issuer, frugal.did, models=[MODEL], max_tokens=3)
    assert (await refused(embedded_env, frugal, [few_tokens], tiny(4))).node_reason == "scope_max_tokens"

    revoked = Key.generate()
    cred = issue_access_credential(access_issuer, revoked.did, models=["*"], credential_status=registry.entry(7))
    registry.bits.set(7)
    registry.publish()
    assert (await refused(embedded_env, revoked, [cred], tiny())).node_reason == "revoked"

    good = Key.generate()
    ok = issue_access_credential(access_issuer, good.did, models=[MODEL], max_tokens=4,
                                 credential_status=registry.entry(8))
    mesh = await embedded_env.router(good, [ok])
    result = await mesh.generate(tiny(4))
    assert result.usage.completion_tokens >= 1
    assert node.refusals == {"not_authorized": 3, "scope_model": 1, "scope_max_tokens": 1, "revoked": 1}


async def test_rate_limit_per_peer(embedded_env: MeshEnv, peer_key: Key, access_vc: Any,
                                   access_issuer: Key) -> None:
    await embedded_env.node(0, rate_limit=RateLimit(rate=0.001, burst=1))
    mesh = await embedded_env.router(peer_key, [access_vc])
    await mesh.generate(tiny(2))
    with pytest.raises(MeshOverloaded) as info:
        await mesh.generate(tiny(2))
    assert info.value.reason == "overloaded" and "rate_limited" in str(info.value)
    other = Key.generate()  # another peer has its own bucket
    mesh2 = await embedded_env.router(other, [issue_access_credential(access_issuer, other.did)])
    assert (await mesh2.generate(tiny(2))).usage.completion_tokens >= 1


async def test_revocation_over_mqtt_refuses_the_next_request(mesh_env: MeshEnv, access_issuer: Key) -> None:
    """A peer with a cached grant: the issuer publishes a new status list, the next request is refused."""
    status = mesh_env.status_list(access_issuer)
    await status.publish()
    node = await mesh_env.node(0)  # AccessPolicy(trust): follows the issuers' status lists on the broker
    await until(lambda: node.access.status.updates >= 1, what="the node took the first status list")
    peer = Key.generate()
    cred = issue_access_credential(access_issuer, peer.did, models=[MODEL], credential_status=status.entry(9))
    mesh = await mesh_env.router(peer, [cred])
    await mesh.generate(tiny(2))
    await mesh.generate(tiny(2))  # served from the node's grant cache
    assert node.served == 2

    loop = asyncio.get_running_loop()
    revoked_at = loop.time()
    await status.publish(9)
    await until(lambda: node.access.status.updates >= 2, timeout=5, what="the node took the new status list")
    with pytest.raises(NotPermitted) as info:
        await mesh.generate(tiny(2))
    took = loop.time() - revoked_at
    assert info.value.node_reason == "revoked"
    assert node.served == 2 and node.refusals["revoked"] == 1
    assert took < 2.0, f"revoke -> refusal took {took:.2f}s"


async def test_rate_limit_counts_refused_requests(embedded_env: MeshEnv, peer_key: Key, access_vc: Any) -> None:
    """Requests without a grant spend the sender's tokens too: past the burst they are refused as
    rate_limited before any credential is verified."""
    node = await embedded_env.node(0, rate_limit=RateLimit(rate=0.001, burst=2))
    stranger = Key.generate()
    mesh = await embedded_env.router(stranger, [])
    for _ in range(2):
        with pytest.raises(NotPermitted):
            await mesh.generate(tiny(2))
    with pytest.raises(MeshOverloaded) as info:
        await mesh.generate(tiny(2))
    assert "rate_limited" in str(info.value)
    assert node.refusals == {"not_authorized": 2, "rate_limited": 1}
    good = await embedded_env.router(peer_key, [access_vc])  # another peer's bucket is untouched
    assert (await good.generate(tiny(2))).usage.completion_tokens >= 1


async def test_concurrent_streams_per_peer_are_capped(embedded_env: MeshEnv, peer_key: Key, access_vc: Any) -> None:
    node = await embedded_env.node(0, max_streams_per_peer=1)
    mesh = await embedded_env.router(peer_key, [access_vc])
    long = mesh.stream(tiny(40))
    first = await anext(long)  # one stream running on the node
    assert first is not None and node.active == 1
    with pytest.raises(MeshOverloaded) as info:
        await mesh.generate(tiny(2))
    assert "too_many_streams" in str(info.value)
    assert node.refusals["too_many_streams"] == 1
    await long.aclose()
    await until(lambda: node.active == 0 and len(node._streams) == 0, what="the stream slot freed")
    assert (await mesh.generate(tiny(2))).usage.completion_tokens >= 1
