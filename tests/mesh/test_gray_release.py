"""Gray release: a signed, retained routing policy sends a share of a model's traffic to a new version."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdk.identity import Key, TrustPolicy
from sdk.inference import GenerationRequest
from sdk.mesh import RateLimit
from sdk.mesh.capacity import AdvertFieldError
from sdk.mesh.routing_policy import (
    POLICY_CREDENTIAL,
    PolicyBook,
    RoutingPolicy,
    issue_policy_credential,
    policy_topic,
    publish_policy,
)
from sdk.messaging import SecureClient
from sdk.testing import FakeEngine
from tests.fixtures.brokers import BROKER_PARAMS
from tests.fixtures.waiting import until
from tests.mesh.routing_env import MODEL, FakeMesh, fake_mesh

FAST = RateLimit(1000, 1000)


def test_policy_validation() -> None:
    assert RoutingPolicy(MODEL, 1, {"2": 10}).choose(5.0) == ("2", frozenset({"2"}))
    assert RoutingPolicy(MODEL, 1, {"2": 10}).choose(10.0) == (None, frozenset({"2"}))
    for bad in ({"2": 101}, {"2": 60, "3": 50}, {"2": float("nan")}, {"": 5}, {"2": "10%"}):
        with pytest.raises(AdvertFieldError):
            RoutingPolicy(MODEL, 1, bad)
    for body in ({"model": MODEL, "seq": 0, "weights": {}}, {"model": MODEL, "seq": 1.5, "weights": {}},
                 {"model": MODEL, "seq": 1, "weights": [1]}, {"model": MODEL, "seq": 1, "weights": {}, "x": 1}):
        with pytest.raises(AdvertFieldError) as info:
            RoutingPolicy.from_body(body)
        assert info.value.reason == "malformed_advert"
    assert policy_topic("org/model name").rsplit("/", 1)[1].startswith("h-")  # unsafe in a topic: hashed


def test_split_is_deterministic_per_request_id_and_seeded_without_one() -> None:
    book = PolicyBook(seed=3)
    points = [book.point(f"req-{i}") for i in range(2000)]
    assert points == [PolicyBook().point(f"req-{i}") for i in range(2000)]
    assert abs(sum(p < 10 for p in points) / 2000 - 0.10) < 0.02
    assert [PolicyBook(seed=3).point(None) for _ in range(3)] == [PolicyBook(seed=3).point(None)] * 3


async def _operator(env: FakeMesh, models: list[str] | None = None, *, issuer: Key | None = None) -> SecureClient:
    key = Key.generate()
    client = SecureClient(env.broker.url, key, credentials=[issue_policy_credential(
        issuer or env.issuer.key, key.did, models=models or [MODEL])], **env.broker.credentials(key))
    await client.connect()
    return client


async def _mesh(env: FakeMesh) -> tuple[Any, Any]:
    for version in ("1", "1", "2"):
        await env.node(FakeEngine(version=version), rate_limit=FAST)
    mesh = await env.router(policy_trust=TrustPolicy({env.issuer.did: {POLICY_CREDENTIAL}}))
    await mesh.wait_for_nodes(3, model=MODEL)
    return mesh, next(n for n in env.nodes if n.metadata["version"] == "2")


async def _route(mesh: Any, n: int, tag: str) -> dict[str, int]:
    mesh.by_version.clear()
    for i in range(n):
        await mesh.generate(GenerationRequest(prompt="hi", max_new_tokens=1, request_id=f"{tag}-{i}"), model=MODEL)
    return dict(mesh.by_version)


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_a_share_goes_to_the_new_version_and_moves_back(kind: str) -> None:
    async with fake_mesh(kind) as env:
        mesh, canary = await _mesh(env)
        operator = await _operator(env)
        try:
            await publish_policy(operator, RoutingPolicy(MODEL, 1, {"2": 10}))
            await until(lambda: mesh.policies.get(MODEL) is not None)
            split = await _route(mesh, 300, "a")
            assert split.get("1", 0) + split.get("2", 0) == 300
            assert 0.06 <= split.get("2", 0) / 300 <= 0.14, split
            assert canary.served == split["2"]
            await publish_policy(operator, RoutingPolicy(MODEL, 2, {"2": 100}))  # promote
            await until(lambda: mesh.policies.get(MODEL).seq == 2)
            assert await _route(mesh, 20, "b") == {"2": 20}
            await publish_policy(operator, RoutingPolicy(MODEL, 3, {"2": 0}))  # move back
            await until(lambda: mesh.policies.get(MODEL).seq == 3)
            assert await _route(mesh, 20, "c") == {"1": 20}
            # a router started later gets the retained policy at once
            late = await env.router(policy_trust=TrustPolicy({env.issuer.did: {POLICY_CREDENTIAL}}))
            await until(lambda: late.policies.get(MODEL) is not None and late.policies.get(MODEL).seq == 3)
        finally:
            await operator.aclose()


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_unsigned_unauthorized_and_replayed_policies_are_ignored(kind: str) -> None:
    async with fake_mesh(kind) as env:
        mesh, canary = await _mesh(env)
        operator = await _operator(env)
        strangers = [await _operator(env, issuer=Key.generate()),  # an untrusted issuer
                     await _operator(env, models=["other-model"])]  # a credential for another model
        plain = Key.generate()
        nobody = SecureClient(env.broker.url, plain, **env.broker.credentials(plain))  # no credential at all
        await nobody.connect()
        try:
            await publish_policy(operator, RoutingPolicy(MODEL, 5, {"2": 0}))
            await until(lambda: mesh.policies.get(MODEL) is not None)
            rejected = mesh.counters["policies_rejected"]
            for i, client in enumerate([*strangers, nobody]):
                await publish_policy(client, RoutingPolicy(MODEL, 100 + i, {"2": 100}))
                await until(lambda i=i: mesh.counters["policies_rejected"] >= rejected + i + 1)
            await nobody.transport.publish(policy_topic(MODEL), json.dumps(
                {"model": MODEL, "seq": 200, "weights": {"2": 100}}).encode(), qos=1, retain=True)  # unsigned
            await until(lambda: mesh.counters["policies_rejected"] >= rejected + 4)
            # an older policy, signed again by another permitted operator: the seq held wins
            other = await _operator(env)
            strangers.append(other)
            ignored = mesh.counters["policies_ignored"]
            await publish_policy(other, RoutingPolicy(MODEL, 4, {"2": 100}))
            await until(lambda: mesh.counters["policies_ignored"] > ignored)
            assert mesh.policies.get(MODEL).seq == 5
            assert await _route(mesh, 10, "x") == {"1": 10} and canary.served == 0
        finally:
            for client in (operator, nobody, *strangers):
                await client.aclose()
