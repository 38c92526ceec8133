"""The coordinator as a mesh peer: its own key and InferenceAccessCredential ask a node (FakeEngine)
over a real broker for a constrained config; the answer is validated, committed and recorded."""

from __future__ import annotations

import dataclasses
import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator import Coordinator
from sdk.coord.coordinator.rules import parse_rules
from sdk.coord.device import Device
from sdk.coord.events import screen_available
from sdk.identity import Key, TrustPolicy
from sdk.inference.types import GenerationRequest
from sdk.mesh import (
    ACCESS_CREDENTIAL,
    NODE_CREDENTIAL,
    AccessPolicy,
    MeshNode,
    NodeConfig,
    NodePolicy,
    issue_access_credential,
    issue_node_credential,
)
from sdk.mesh.advisor import MeshAdvisor, response_format
from sdk.mesh.protocol import parse_request
from sdk.testing.fake_engine import FakeEngine
from tests.coord.test_model_policy import SCHEMA, model_rule

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
MODEL = "layout-model"


async def test_coordinator_asks_the_mesh_with_its_own_credential(broker: Any, tmp_path: Path) -> None:
    access_issuer, node_issuer, issuer = Key.generate(), Key.generate(), Key.generate()
    coord_key, node_key = Key.generate(), Key.generate()
    engine = FakeEngine(model=MODEL, version="2024-11", reply='{"ui.layout": "compact"}')
    node_vc = issue_node_credential(node_issuer, node_key.did, models=[MODEL], node_ids=["layout-node"])
    access = AccessPolicy(TrustPolicy({access_issuer.did: {ACCESS_CREDENTIAL}}))
    access_vc = issue_access_credential(access_issuer, coord_key.did, models=[MODEL], max_tokens=256)
    async with AsyncExitStack() as stack:
        node = MeshNode(engine, broker.url, key=node_key, access=access, credential=node_vc,
                        config=NodeConfig(node_id="layout-node", advert_interval=1.0), **broker.credentials(node_key))
        await node.start()
        stack.push_async_callback(node.aclose)
        advisor = MeshAdvisor.connect(broker.url, coord_key, credential=access_vc, model=MODEL,
                                      node_policy=NodePolicy(TrustPolicy({node_issuer.did: {NODE_CREDENTIAL}})),
                                      **broker.credentials(coord_key))
        await advisor.start()
        stack.push_async_callback(advisor.aclose)
        await advisor.backend.wait_for_nodes(1, model=MODEL, timeout=10)
        coord = Coordinator(coord_key, broker=broker.url, data_dir=tmp_path / "coord", trust=TrustPolicy({}),
                            issuer=issuer, rules=parse_rules([model_rule()]), advisor=advisor,
                            **broker.credentials(coord_key))
        await coord.start()
        stack.push_async_callback(coord.stop)
        devices = {}
        got: list[Any] = []
        for kind in ("display", "phone"):
            key = Key.generate()
            cred = coord.issue_device_credential(key.did, kind=kind, groups=["room:living"])
            dev = Device(key, cred, broker=broker.url, coordinator=coord_key.did, attributes={"input": ["touch"]},
                         on_config=got.append if kind == "phone" else None, **broker.credentials(key))
            await dev.connect()
            stack.push_async_callback(dev.aclose)
            devices[kind] = dev
        await devices["display"].publish_event(screen_available(800, 600))
        await devices["phone"].wait_version(1, 15)
        layout = got[-1].state["ui.layout"]
        assert layout in SCHEMA["properties"]["ui.layout"]["enum"]
        assert coord.store is not None
        origin = coord.store.history(devices["phone"].did, limit=1)[0]["origin"]
        assert origin["policy"] == "model", origin
        assert origin["model"] == MODEL and origin["model_version"] == "2024-11" and origin["cached"] is False
        assert node.served == 1 and advisor.calls == 1
        (req,) = engine.requests                 # what the node's engine was asked
        assert req.prompt_token_ids is not None
        assert "Screen 800x600" in engine.tokenizer.decode(req.prompt_token_ids)
        if _mesh_carries_constraints():
            assert getattr(req, "response_format", None) == response_format(SCHEMA)


def _mesh_carries_constraints() -> bool:
    """Whether the mesh request protocol carries ``response_format`` to the node's engine."""
    if "response_format" not in {f.name for f in dataclasses.fields(GenerationRequest)}:
        return False
    _, fields, _ = parse_request({"model": MODEL, "prompt": "x", "response_format": response_format(SCHEMA)})
    return fields.get("response_format") is not None


async def test_coordinator_command_wires_the_advisor_from_model_settings(broker: Any, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from sdk.cli.coord_cmds import _start_advisor
    from sdk.coord.coordinator.model_policy import ModelSettings

    access_issuer, node_issuer, coord_key = Key.generate(), Key.generate(), Key.generate()
    vc_file = tmp_path / "access-vc.json"
    vc_file.write_text(json.dumps(issue_access_credential(access_issuer, coord_key.did, models=[MODEL])))
    coord = Coordinator(coord_key, broker=broker.url, data_dir=tmp_path / "coord", trust=TrustPolicy({}),
                        issuer=Key.generate(), rules=parse_rules([model_rule()]), **broker.credentials(coord_key))
    await coord.start()
    try:
        missing = SimpleNamespace(model=ModelSettings(credential=tmp_path / "nope.json",
                                                      node_issuers=(node_issuer.did,)))
        assert await _start_advisor(missing, coord, broker.url) is None     # logged; rules use their fallback
        assert coord.model_policy.advisor is None
        settings = ModelSettings(credential=vc_file, node_issuers=(node_issuer.did,), name=MODEL, max_pending=3)
        advisor = await _start_advisor(SimpleNamespace(model=settings), coord, broker.url)
        try:
            assert isinstance(advisor, MeshAdvisor) and coord.model_policy.advisor is advisor
            assert coord.model_policy.max_pending == 3 and advisor.model == MODEL
            assert advisor.backend.did == coord.did                 # the coordinator's own key on the mesh
        finally:
            await advisor.aclose()
    finally:
        await coord.stop()


@pytest.mark.slow
async def test_coordinator_daemon_with_model_section_makes_model_configs(broker: Any, tmp_path: Path) -> None:
    """`autoglm coordinator` with [model], as a process: the tablet's config is the node's answer."""
    import asyncio
    import subprocess
    import sys

    from sdk.coord.coordinator.auth import coordinator_credential, device_credential
    from sdk.coord.events import input_methods

    issuer, access_issuer, node_issuer = Key.generate(), Key.generate(), Key.generate()
    ckey, node_key = Key.generate(), Key.generate()
    engine = FakeEngine(model=MODEL, version="9", reply='{"ui.layout": "compact"}')
    node = MeshNode(engine, broker.url, key=node_key, access=AccessPolicy(TrustPolicy({access_issuer.did: {
        ACCESS_CREDENTIAL}})), credential=issue_node_credential(node_issuer, node_key.did, models=[MODEL],
                                                                node_ids=["layout-node"]),
        config=NodeConfig(node_id="layout-node", advert_interval=1.0), **broker.credentials(node_key))
    await node.start()
    (tmp_path / "coord-vc.json").write_text(json.dumps(coordinator_credential(issuer, ckey.did)))
    (tmp_path / "access-vc.json").write_text(json.dumps(issue_access_credential(access_issuer, ckey.did,
                                                                                models=[MODEL])))
    (tmp_path / "rules.toml").write_text(
        (Path(__file__).resolve().parents[2] / "examples" / "rules.toml").read_text(encoding="utf-8"))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'rules_file = "rules.toml"\n[coordinator]\nbroker = "{broker.url}"\n'
                   f'data_dir = "{tmp_path / "data"}"\n[identity]\nkey = "{ckey.private_key_multibase}"\n'
                   f'credential = "coord-vc.json"\n[[trust]]\nissuer = "{issuer.did}"\ntypes = ["DeviceCredential"]\n'
                   f'[model]\ncredential = "access-vc.json"\nnode_issuers = ["{node_issuer.did}"]\nname = "{MODEL}"\n')
    # its log goes to a file: a pipe nobody reads fills up (a shared broker's retained lists from
    # other tests each log a line) and blocks the daemon
    log_file = (tmp_path / "coordinator.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", "from sdk.cli import main; main()", "coordinator",
                             "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=log_file)
    got: list[Any] = []
    key = Key.generate()
    cred = device_credential(issuer, key.did, kind="tablet", groups=["room:x"])
    tablet = None
    try:
        for _ in range(200):                                  # the daemon may still be starting
            tablet = Device(key, cred, broker=broker.url, coordinator=ckey.did, on_config=got.append,
                            attributes={"screen": "10-inch"}, auth_timeout=2, **broker.credentials(key))
            try:
                await tablet.connect()
                break
            except Exception:                                # noqa: BLE001
                await tablet.aclose()
                tablet = None
                await asyncio.sleep(0.1)
        assert tablet is not None, "the daemon never admitted the tablet"
        for attempt in range(50):                             # the advisor may still be finding the node
            await tablet.publish_event(input_methods(["touch", "pen"]))
            await tablet.wait_version(attempt + 1, 15)
            if got[-1].state.get("ui.layout") != "standalone":      # not the rule's fallback
                break
            await asyncio.sleep(0.2)
        assert got[-1].state["ui.layout"] in SCHEMA["properties"]["ui.layout"]["enum"], got[-1].state
        assert got[-1].state["ui.layout"] != "standalone" and node.served >= 1
    finally:
        if tablet is not None:
            await tablet.aclose()
        proc.terminate()                    # waited for off the loop: the embedded broker runs on it
        await asyncio.to_thread(proc.wait, timeout=30)
        log_file.close()
        await node.aclose()
    assert proc.returncode == 0, (tmp_path / "coordinator.log").read_text(errors="replace")[-2000:]
    from sdk.coord.coordinator.store import Store

    store = Store(tmp_path / "data" / "coordinator.db")
    try:
        origin = store.history(key.did, limit=1)[0]["origin"]
    finally:
        store.close()
    assert origin["policy"] == "model" and origin["model"] == MODEL and origin["model_version"] == "9", origin
    assert origin["rule"] == "tablet-layout-by-model" and origin["prompt_hash"].startswith("sha256:")
