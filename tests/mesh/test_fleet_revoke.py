"""``device.revoke`` of a DID cuts it off from coordination and from the mesh: the access
credential the coordinator's issuer gave it carries an entry of the same status list, recorded
against the DID (``Coordinator.status_entry_for``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator import Coordinator, operator_credential
from sdk.coord.device import Device, DeviceState
from sdk.coord.operator import OperatorClient
from sdk.identity import Key, TrustPolicy
from sdk.inference import GenerationRequest
from sdk.mesh import (
    ACCESS_CREDENTIAL,
    NODE_CREDENTIAL,
    AccessPolicy,
    Mesh,
    MeshNode,
    NodeConfig,
    NodePolicy,
    NotPermitted,
    issue_access_credential,
    issue_node_credential,
)
from sdk.testing import FakeEngine
from tests.fixtures.waiting import until

MODEL = "fake-model"


async def test_fleet_revoke_cuts_the_device_off_from_the_mesh(broker: Any, tmp_path: Path) -> None:
    issuer, coord_key, node_key, admin_key, phone_key = (Key.generate() for _ in range(5))
    coord = Coordinator(coord_key, broker=broker.url, data_dir=tmp_path / "coord", trust=TrustPolicy({}),
                        issuer=issuer)
    await coord.start()
    closers: list[Any] = []
    try:
        phone = Device(phone_key, coord.issue_device_credential(phone_key.did, kind="phone"), broker=broker.url,
                       coordinator=coord_key.did, **broker.credentials(phone_key))
        await phone.connect()
        closers.append(phone.aclose)
        access = issue_access_credential(issuer, phone_key.did, models=[MODEL],
                                         credential_status=coord.status_entry_for(phone_key.did))
        trust = TrustPolicy({issuer.did: {ACCESS_CREDENTIAL, NODE_CREDENTIAL}})
        node = MeshNode(FakeEngine(), broker.url, key=node_key, access=AccessPolicy(trust),
                        credential=issue_node_credential(issuer, node_key.did, models=[MODEL]),
                        config=NodeConfig(advert_interval=0.5), **broker.credentials(node_key))
        await node.start()
        closers.append(node.aclose)
        await until(lambda: node.access.status.updates >= 1, what="the node took the coordinator's status list")
        mesh = Mesh(broker.url, phone_key, credentials=[access], node_policy=NodePolicy(trust),
                    **broker.credentials(phone_key))
        await mesh.start()
        closers.append(mesh.aclose)
        await mesh.wait_for_nodes(1, model=MODEL, timeout=10)
        await mesh.generate(GenerationRequest(prompt="hi", max_new_tokens=2, model=MODEL))
        assert node.served == 1

        op = OperatorClient(broker.url, admin_key, operator_credential(issuer, admin_key.did, roles=("admin",)),
                            coordinator=coord_key.did, timeout=10.0, **broker.credentials(admin_key))
        await op.connect()
        closers.append(op.aclose)
        updates = node.access.status.updates
        result = await op.revoke(phone_key.did, reason="stolen")
        assert len(result["revoked"]) == 2                    # the device credential and the access credential
        await until(lambda: phone.state is DeviceState.REVOKED, what="the device told it is revoked")
        await until(lambda: node.access.status.updates > updates, what="the node took the new list")
        with pytest.raises(NotPermitted) as info:
            await mesh.generate(GenerationRequest(prompt="hi", max_new_tokens=2, model=MODEL))
        assert info.value.node_reason == "revoked" and node.served == 1
    finally:
        for close in reversed(closers):
            await close()
        await coord.stop()
