"""The coordinator config's [issuer] section: defaults, durations, and a typed error per bad key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator.config import DEFAULT_RENEW_AFTER, parse_config
from sdk.coord.coordinator.enrollment import load_issuer_key
from sdk.coord.coordinator.errors import ConfigFileError
from sdk.errors import CoordinationError
from sdk.identity import Key


def _parse(issuer: dict[str, Any], **ident: Any) -> Any:
    return parse_config({"identity": {"key": Key.generate().private_key_multibase, **ident}, "issuer": issuer},
                        base_dir=Path("/srv/coord"))


def test_issuer_section_defaults_and_durations() -> None:
    assert parse_config({}).issuer is None
    cfg = _parse({"keystore": "issuer.keystore"}, passphrase_env="COORD_PASS").issuer
    assert cfg is not None and cfg.keystore == Path("/srv/coord/issuer.keystore")
    assert cfg.passphrase_env == "COORD_PASS"                       # that of [identity] by default
    assert cfg.credential_valid_for == 30 * 86400 and cfg.renew_after == DEFAULT_RENEW_AFTER
    assert cfg.status_list_size == 131072 and cfg.manufacturer_approve == "manual"
    for text, seconds in (("12h", 43200), ("90m", 5400), ("2w", 14 * 86400), (600, 600), ("45s", 45)):
        c = _parse({"keystore": "k", "credential_valid_for": text}).issuer
        assert c is not None and c.credential_valid_for == seconds
    key = Key.generate()
    c = _parse({"key": key.private_key_multibase, "status_list_size": 262144, "renew_after": 0.5,
                "manufacturer_approve": "auto"}).issuer
    assert c is not None and load_issuer_key(c) == key and c.status_list_size == 262144


@pytest.mark.parametrize(("issuer", "named"), [
    ({"keystore": "k", "colour": "blue"}, "colour"),
    ({}, "keystore"),
    ({"keystore": "k", "key": "z123"}, "keystore"),
    ({"keystore": "k", "credential_valid_for": "soon"}, "credential_valid_for"),
    ({"keystore": "k", "credential_valid_for": 0}, "credential_valid_for"),
    ({"keystore": "k", "renew_after": 1.5}, "renew_after"),
    ({"keystore": "k", "renew_after": True}, "renew_after"),
    ({"keystore": "k", "status_list_size": 1000}, "status_list_size"),
    ({"keystore": "k", "status_list_size": 131073}, "status_list_size"),
    ({"keystore": "k", "manufacturer_approve": "yes"}, "manufacturer_approve"),
    ({"keystore": "k", "passphrase_env": ""}, "passphrase_env"),
])
def test_bad_issuer_values_are_named(issuer: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigFileError) as info:
        _parse(issuer)
    assert named in str(info.value) and info.value.reason == "invalid_config_file"


def test_issuer_must_be_a_table_and_key_must_load(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigFileError):
        parse_config({"issuer": "issuer.keystore"})
    cfg = _parse({"keystore": "missing.keystore", "passphrase_env": "H3_NO_SUCH_ENV"}).issuer
    monkeypatch.delenv("H3_NO_SUCH_ENV", raising=False)
    assert cfg is not None
    with pytest.raises(CoordinationError) as info:
        load_issuer_key(cfg)
    assert "H3_NO_SUCH_ENV" in str(info.value) and info.value.reason == "invalid_config_file"
    bad_key = _parse({"key": "not-multibase"}).issuer
    assert bad_key is not None
    with pytest.raises(CoordinationError) as bad:
        load_issuer_key(bad_key)
    assert bad.value.reason == "invalid_config_file"


def test_broker_list_is_failover_urls() -> None:
    cfg = parse_config({"coordinator": {"broker": ["mqtts://a:8883", "mqtts://b:8883"]}})
    assert cfg.broker == "mqtts://a:8883,mqtts://b:8883"
    from sdk.messaging.transport import MqttTransport

    transport = MqttTransport(cfg.broker)
    assert list(transport.broker_urls) == ["mqtts://a:8883", "mqtts://b:8883"]


@pytest.mark.parametrize("broker", [[], ["embedded"], ["mqtt://a:1", 5], ["mqtt://a:1,mqtt://b:2"]])
def test_bad_broker_lists_are_refused(broker: Any) -> None:
    with pytest.raises(ConfigFileError, match=r"coordinator\.broker"):
        parse_config({"coordinator": {"broker": broker}})


def test_coordinator_send_queue_waits_for_room() -> None:
    from sdk.coord.coordinator import Coordinator
    from sdk.identity import TrustPolicy

    issuer = Key.generate()
    coord = Coordinator(Key.generate(), broker="mqtt://127.0.0.1:1", data_dir="/nonexistent-unused",
                        trust=TrustPolicy({}), issuer=issuer)
    assert coord.client.transport.config.queue_wait > 0          # a big fan-out never fails queue_full
