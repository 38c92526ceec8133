"""Rules engine: validation at load (clear errors) and evaluation against a real registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdk.coord.coordinator.config import load_config
from sdk.coord.coordinator.errors import ConfigFileError, RuleError
from sdk.coord.coordinator.registry import Registry
from sdk.coord.coordinator.rules import load_rules, parse_rules
from sdk.coord.events import battery, custom, screen_available, screen_lost

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _registry() -> Registry:
    reg = Registry()
    reg.register("did:display", {"kind": "display", "groups": ["room:living"]})
    reg.register("did:phone", {"kind": "phone", "groups": ["room:living", "user:ann"]})
    reg.register("did:phone2", {"kind": "phone", "groups": ["room:kitchen"]})
    reg.register("did:tablet", {"kind": "tablet", "groups": ["room:living"], "capabilities": ["ui.companion"]})
    return reg


def test_example_rule_targets_phone_in_same_room() -> None:
    rules = load_rules(EXAMPLES / "rules.toml")
    actions = rules.evaluate(screen_available(800, 600, density=160), "did:display", _registry())
    assert len(actions) == 1
    (action,) = actions
    assert action.rule == "phone-companion-layout"
    assert action.targets == ("did:phone",)
    assert action.changes["ui.layout"] == "companion"
    assert action.changes["ui.companion.resolution"] == "800x600"
    assert action.changes["ui.companion.width"] == 800          # single placeholder keeps its type
    assert action.changes["ui.companion.display"] == "did:display"


def test_example_rule_ignores_non_display_and_small_screens() -> None:
    rules = load_rules(EXAMPLES / "rules.toml")
    reg = _registry()
    assert rules.evaluate(screen_available(800, 600), "did:tablet", reg) == []
    assert rules.evaluate(screen_available(100, 600), "did:display", reg) == []


def test_unset_and_sender_target() -> None:
    rules = load_rules(EXAMPLES / "rules.toml")
    reg = _registry()
    (lost,) = rules.evaluate(screen_lost(), "did:display", reg)
    assert lost.changes["ui.companion.width"] is None and lost.changes["ui.layout"] == "standalone"
    (saver,) = rules.evaluate(battery("critical"), "did:phone2", reg)
    assert saver.targets == ("did:phone2",) and saver.changes["ui.refresh_hz"] == 30
    assert rules.evaluate(battery("full"), "did:phone2", reg) == []


def test_capability_target_and_custom_event() -> None:
    rules = parse_rules([{
        "name": "r", "event": "doorbell", "when": {"event.floor": {"lte": 2}},
        "target": {"select": "capability", "capability": "ui.companion"},
        "config": {"ui": {"banner": "door {event.floor}"}},
    }])
    (a,) = rules.evaluate(custom("doorbell", floor=1), "did:phone", _registry())
    assert a.targets == ("did:tablet",) and a.changes == {"ui.banner": "door 1"}
    assert rules.evaluate(custom("doorbell", floor=7), "did:phone", _registry()) == []
    assert rules.evaluate(custom("doorbell"), "did:phone", _registry()) == []   # missing field


def test_revoked_devices_are_not_targets() -> None:
    reg = _registry()
    reg.set_state("did:phone", "revoked")
    rules = load_rules(EXAMPLES / "rules.toml")
    assert rules.evaluate(screen_available(800, 600), "did:display", reg) == []


@pytest.mark.parametrize("rule, message", [
    ({"event": "screen_available", "target": {"select": "sender"}, "config": {"a": 1}}, "name"),
    ({"name": "x", "target": {"select": "sender"}, "config": {"a": 1}}, "needs 'event'"),
    ({"name": "x", "event": "screen_available", "config": {"a": 1}}, "[target]"),
    ({"name": "x", "event": "screen_available", "target": {"select": "room"}, "config": {"a": 1}},
     "'select' must be one of"),
    ({"name": "x", "event": "screen_available", "target": {"select": "capability"}, "config": {"a": 1}},
     "needs 'capability'"),
    ({"name": "x", "event": "screen_available", "when": {"event.widht": 800},
      "target": {"select": "sender"}, "config": {"a": 1}}, "no field 'widht'"),
    ({"name": "x", "event": "screen_available", "when": {"event.width": {"bigger": 1}},
      "target": {"select": "sender"}, "config": {"a": 1}}, "unknown operator 'bigger'"),
    ({"name": "x", "event": "screen_available", "when": {"width": 1},
      "target": {"select": "sender"}, "config": {"a": 1}}, "must start with"),
    ({"name": "x", "event": "screen_available", "target": {"select": "sender"},
      "config": {"a": "{event.depth}"}}, "no field 'depth'"),
    ({"name": "x", "event": "screen_available", "target": {"select": "sender"},
      "config": {"a": "{oops.x}"}}, "must start with"),
    ({"name": "x", "event": "screen_available", "target": {"select": "sender"}}, "produces nothing"),
    ({"name": "x", "event": "screen_available", "target": {"select": "sender"}, "config": {"a": 1},
      "colour": "red"}, "unknown key"),
    ({"name": "x", "event": "screen_available", "target": {"select": "group", "where": {"sender.kind": 1}},
      "config": {"a": 1}}, "must start with one of device."),
    ({"name": "x", "event": "screen_available", "when": {"event.width": {"in": 800}},
      "target": {"select": "sender"}, "config": {"a": 1}}, "needs a list"),
])
def test_malformed_rules_rejected_with_clear_error(rule: dict, message: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules([rule])
    assert message in str(info.value)
    assert info.value.reason == "invalid_rule"


def test_duplicate_rule_names_rejected() -> None:
    r = {"name": "same", "event": "battery", "target": {"select": "sender"}, "config": {"a": 1}}
    with pytest.raises(RuleError, match="duplicate"):
        parse_rules([r, dict(r)])


def test_malformed_rules_file_rejected_at_config_load(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text('[[rules]]\nname = "x"\nevent = "screen_available"\n'
                                         '[rules.target]\nselect = "everyone"\n[rules.config]\na = 1\n')
    (tmp_path / "c.toml").write_text('rules_file = "rules.toml"\n[coordinator]\nbroker = "embedded"\n')
    with pytest.raises(RuleError, match="'select' must be one of"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "bad.toml").write_text("[coordinator\n")
    with pytest.raises(ConfigFileError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text("[coordinator]\nheartbeat_ttl = -1\n")
    with pytest.raises(ConfigFileError, match="heartbeat_ttl"):
        load_config(tmp_path / "bad2.toml")


def test_example_coordinator_config_loads() -> None:
    cfg = load_config(EXAMPLES / "coordinator.toml")
    assert cfg.heartbeat_ttl == 30 and len(cfg.rules) == 4
    assert cfg.trust[0].types[0] == "DeviceCredential"
    assert cfg.data_dir == EXAMPLES / "coordinator-data"


_HEAD = '[[rules]]\nname = "r"\nevent = "battery"\n'
_TAIL = '[rules.target]\nselect = "sender"\n[rules.config]\n'


@pytest.mark.parametrize("toml", [
    _HEAD + _TAIL + '"x" = nan\n',
    _HEAD + _TAIL + '"x" = [1, inf]\n',
    _HEAD + '[rules.when]\n"event.level" = { gte = nan }\n' + _TAIL + '"x" = 1\n',
    _HEAD + '[rules.when]\n"event.level" = -inf\n' + _TAIL + '"x" = 1\n',
])
def test_non_finite_numbers_in_rules_rejected(toml: str) -> None:
    import tomllib

    with pytest.raises(RuleError, match="non-finite"):
        parse_rules(tomllib.loads(toml)["rules"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e9"])
def test_non_finite_or_huge_config_numbers_rejected(tmp_path: Path, value: str) -> None:
    (tmp_path / "c.toml").write_text(f'[coordinator]\nbroker = "embedded"\nheartbeat_ttl = {value}\n')
    with pytest.raises(ConfigFileError, match="finite number"):
        load_config(tmp_path / "c.toml")


@pytest.mark.parametrize("fields", [{"level": float("nan")}, {"x": [1, float("inf")]},
                                    {"x": {"y": float("-inf")}}])
def test_events_with_non_finite_numbers_rejected(fields: dict) -> None:
    from sdk.coord.events import Event, InvalidEvent

    with pytest.raises(InvalidEvent, match="non-finite"):
        Event.from_body({"type": "custom-thing", "fields": fields})
    with pytest.raises(InvalidEvent):
        Event.from_body({"type": "battery", "fields": {"battery_class": "low", **fields}})
