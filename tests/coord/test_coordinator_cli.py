"""`autoglm coordinator` / `autoglm devices`: config errors, device listing from the state store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.coord.events import screen_available
from tests.coord.test_coordinator import Mesh, mesh  # noqa: F401 - the fixture

runner = CliRunner()


def test_coordinator_refuses_malformed_rules(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text('[[rules]]\nname = "r"\nevent = "screen_available"\n'
                                         '[rules.when]\n"event.widht" = 800\n'
                                         '[rules.target]\nselect = "sender"\n[rules.config]\na = 1\n')
    (tmp_path / "c.toml").write_text('rules_file = "rules.toml"\n[coordinator]\nbroker = "embedded"\n')
    result = runner.invoke(app, ["coordinator", "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 2
    assert "invalid_rule" in result.output and "no field 'widht'" in result.output


def test_coordinator_refuses_unknown_config_key(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[coordinator]\nbroker = "embedded"\nheartbeat = 3\n')
    result = runner.invoke(app, ["coordinator", "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 2 and "invalid_config_file" in result.output


def test_devices_without_state_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["devices", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no coordinator state" in result.output


@pytest.mark.broker
async def test_devices_lists_state_and_metrics(mesh: Mesh) -> None:  # noqa: F811
    coord = await mesh.start_coordinator()
    display = await mesh.device("display")
    phone = await mesh.device("phone", record=[])
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    await mesh.wait_for("converged")
    coord._write_status()                                  # noqa: SLF001 - the sweeper does this every second
    result = runner.invoke(app, ["devices", "--data-dir", str(mesh.data_dir), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    rows = {d["did"]: d for d in status["devices"]}
    assert rows[phone.did]["desired_version"] == 1 and rows[phone.did]["reported_version"] == 1
    assert rows[display.did]["kind"] == "display" and rows[display.did]["state"] == "online"
    assert status["metrics"]["convergence_ms"]["count"] == 1
    table = runner.invoke(app, ["devices", "--data-dir", str(mesh.data_dir)])
    assert table.exit_code == 0 and "convergence p50" in table.output and "phone" in table.output


def test_coordinator_refuses_a_corrupt_store_unless_fresh(tmp_path: Path) -> None:
    from sdk.coord.coordinator.auth import coordinator_credential
    from sdk.identity import Key

    key = Key.generate()
    (tmp_path / "vc.json").write_text(json.dumps(coordinator_credential(Key.generate(), key.did)))
    data = tmp_path / "data"
    data.mkdir()
    (data / "coordinator.db").write_bytes(b"")
    (tmp_path / "c.toml").write_text(f'[coordinator]\nbroker = "mqtt://127.0.0.1:1"\ndata_dir = "{data}"\n'
                                     f'[identity]\nkey = "{key.private_key_multibase}"\n'
                                     'credential = "vc.json"\n')
    result = runner.invoke(app, ["coordinator", "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 1 and "store_corrupt" in result.output and "--fresh" in result.output
    result = runner.invoke(app, ["coordinator", "--config", str(tmp_path / "c.toml"), "--fresh"])
    assert "store_corrupt" not in result.output                 # past the store (no broker there)
    assert list(data.glob("coordinator.db.corrupt-*"))
