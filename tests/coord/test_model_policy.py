"""Model-made adaptation configs: ``policy = "model"`` rules validated at load; the model's answer
applied (origin in the history), refused answers and timeouts falling back with a typed reason,
decisions cached by context, and the event path never waiting for the model."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from typing import Any

import pytest

from sdk.coord.coordinator.errors import RuleError
from sdk.coord.coordinator.model_policy import (
    Advice,
    AdviceCache,
    ModelPolicy,
    ModelPolicyError,
    format_habits,
    habit_summary,
    parse_model_spec,
    prompt_hash,
    render_prompt,
    validate_answer,
)
from sdk.coord.coordinator.rules import parse_rules
from sdk.coord.events import battery, screen_available
from sdk.mesh.advisor import MeshAdvisor
from sdk.testing.fake_engine import FakeEngine
from tests.coord.test_coordinator import Mesh, mesh, until

__all__ = ["mesh"]

SCHEMA: dict[str, Any] = {"type": "object",
                          "properties": {"ui.layout": {"enum": ["companion", "standalone", "compact"]}},
                          "required": ["ui.layout"], "additionalProperties": False}
PROMPT = ("Screen {event.width}x{event.height}; device input {device.attributes.input}; habits: {habits}. "
          "Choose a layout.")


def model_rule(**model: Any) -> dict[str, Any]:
    return {"name": "layout-by-model", "event": "screen_available", "policy": "model",
            "target": {"select": "group", "group_prefix": "room:", "where": {"device.kind": "phone"}},
            "model": {"prompt": PROMPT, "schema": copy.deepcopy(SCHEMA), "timeout": 5.0, "cache_ttl": 600,
                      **model},
            "config": {"ui.layout": "companion"}}


BATTERY_RULE = {"name": "battery-saver", "event": "battery", "target": {"select": "sender"},
                "config": {"power.mode": "saver"}}


# ---------------------------------------------------------------- load-time validation
def _broken(change: Any) -> dict[str, Any]:
    rule = model_rule()
    change(rule)
    return rule


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.update(policy="oracle"), "'policy' must be one of declarative, model"),
    (lambda r: r.pop("model"), "needs a [rules.model] table"),
    (lambda r: r.update(policy="declarative"), "[rules.model] needs policy = \"model\""),
    (lambda r: (r.pop("config"), r.update(unset=["ui.extra"])), "needs [rules.config]"),
    (lambda r: r.update(rollout={"canary": {"count": 1}}), "cannot be combined with [rules.rollout]"),
    (lambda r: r["model"].update(temperture=0.5), "unknown key(s) ['temperture']"),
    (lambda r: r["model"].update(prompt=""), "'prompt' must be a non-empty string"),
    (lambda r: r["model"].update(prompt="x" * 5000), "at most 4096 characters"),
    (lambda r: r["model"].update(prompt="input {device.colour}"), "devices have no field 'colour'"),
    (lambda r: r["model"].update(prompt="size {event.depth}"), "has no field 'depth'"),
    (lambda r: r["model"].update(prompt="layout {oops}"), "path 'oops' must start with one of"),
    (lambda r: r["model"].update(schema="object"), "'schema' must be a table"),
    (lambda r: r["model"].update(schema={"type": "array"}), "must describe an object"),
    (lambda r: r["model"]["schema"]["properties"].update({"ui.theme": {"type": "string"}}),
     "schema properties ['ui.theme'] are not keys the rule allows"),
    (lambda r: r["model"]["schema"]["properties"]["ui.layout"].update(type=7), "not a valid JSON Schema"),
    (lambda r: r["model"]["schema"]["properties"]["ui.layout"].update(maximum=float("nan")), "non-finite"),
    (lambda r: r["model"].update(keys=[]), "'keys' must be a non-empty list"),
    (lambda r: r["model"].update(timeout=0), "'timeout' must be a number from 0.05 to 120"),
    (lambda r: r["model"].update(cache_ttl=-1), "'cache_ttl' must be a number"),
    (lambda r: r["model"].update(max_tokens=0), "'max_tokens' must be an integer from 1 to 4096"),
    (lambda r: r["model"].update(habit_limit=99), "'habit_limit' must be an integer from 0 to 20"),
])
def test_model_rules_are_validated_at_load(change: Any, message: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules([_broken(change)])
    assert "rule 'layout-by-model'" in str(info.value) and message in str(info.value), str(info.value)
    assert info.value.reason == "invalid_rule"


def test_model_rule_parses_with_defaults_and_keys() -> None:
    (rule,) = parse_rules([model_rule()]).rules
    spec = rule.model
    assert spec is not None and spec.keys == {"ui.layout"} and spec.timeout == 5.0 and spec.cache_ttl == 600
    assert spec.max_tokens == 256 and spec.temperature == 0.0 and spec.habit_limit == 5
    assert spec.schema_hash.startswith("sha256:") and len(spec.schema_hash) == 71
    wider = model_rule(keys=["ui.layout", "ui.theme"])
    wider["model"]["schema"]["properties"]["ui.theme"] = {"type": "string"}
    (rule,) = parse_rules([wider]).rules
    assert rule.model is not None and rule.model.keys == {"ui.layout", "ui.theme"}
    (plain,) = parse_rules([BATTERY_RULE]).rules
    assert plain.model is None


# ---------------------------------------------------------------- answers, prompts, habits, cache
SPEC = parse_model_spec("rule 'r'", model_rule()["model"], event_type="screen_available",
                        config={"ui.layout": "companion"})


@pytest.mark.parametrize(("text", "reason"), [
    ("I suggest the compact layout.", "model_invalid_json"),
    ('{"ui.layout": "compact"', "model_invalid_json"),
    ('{"ui.layout": "compact", "ui.layout": "standalone"}', "model_invalid_json"),     # duplicate key
    ('{"ui.layout": NaN}', "model_invalid_json"),
    ('["compact"]', "model_schema_violation"),
    ('{"ui.layout": "huge"}', "model_schema_violation"),
    ("{}", "model_schema_violation"),
    ('{"ui.layout": "compact", "ui.theme": "dark"}', "model_key_not_allowed"),
])
def test_refused_answers_carry_their_reason(text: str, reason: str) -> None:
    with pytest.raises(ModelPolicyError) as info:
        validate_answer(SPEC, text)
    assert info.value.reason == reason


def test_valid_answers() -> None:
    assert validate_answer(SPEC, '{"ui.layout": "compact"}') == {"ui.layout": "compact"}
    assert validate_answer(SPEC, '  ```json\n{"ui.layout": "standalone"}\n```\n') == {"ui.layout": "standalone"}


def test_prompt_rendering_is_bounded() -> None:
    ctx = {"event": {"width": 800, "height": 600}, "device": {"attributes": {"input": ["touch", "voice"]}}}
    text = render_prompt(PROMPT, ctx, "none")
    assert text == ('Screen 800x600; device input ["touch","voice"]; habits: none. Choose a layout.')
    long = render_prompt(PROMPT, {"event": {"width": "9" * 1000}}, "none")
    assert "9" * 255 + "…" in long and "9" * 256 not in long and "device input unknown" in long
    assert len(render_prompt("{event.width}" * 40, {"event": {"width": "w" * 300}}, "")) == 8192
    assert prompt_hash("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


def test_habit_summary() -> None:
    history = [  # newest first, as Store.history returns them
        {"version": 3, "changes": {"ui.layout": "compact"}, "created": 1000.0},
        {"version": 2, "changes": {"ui.theme": "dark", "ui.layout": "standalone"}, "created": 900.0},
        {"version": 1, "changes": {"ui.font": "large"}, "created": 800.0},
    ]
    keys = {"ui.layout", "ui.theme", "ui.font"}
    props = {"ui.layout": "companion", "ui.theme": "dark", "ui.font": "small", "battery": 40}
    habits = habit_summary(history, props, 1200.0, keys, window=600, limit=5)
    assert [(h.key, h.set_to, h.changed_to, h.version) for h in habits] == [
        ("ui.layout", "compact", "companion", 3),      # newest version that set it; the user changed it back
        ("ui.font", "large", "small", 1)]              # ui.theme kept as set: no habit
    assert format_habits(habits) == ("ui.layout set to compact, changed back to companion; "
                                     "ui.font set to large, changed back to small")
    assert format_habits([]) == "none"
    assert habit_summary(history, props, 1200.0, keys, window=600, limit=1)[0].key == "ui.layout"
    assert [h.key for h in habit_summary(history, props, 1200.0, keys, window=250, limit=5)] == ["ui.layout"]
    # properties last changed before v3 was made: its ui.layout was not changed back
    assert [h.key for h in habit_summary(history, props, 950.0, keys, window=600, limit=5)] == ["ui.font"]
    assert habit_summary(history, props, 1200.0, {"ui.theme"}, window=600, limit=5) == []


def test_cache_ttl_and_bound() -> None:
    cache = AdviceCache(max_entries=2)
    advice = Advice("{}", "m", "1")
    cache.put(("r", "s", "a"), {"k": 1}, advice, ttl=10, now=0)
    cache.put(("r", "s", "b"), {"k": 2}, advice, ttl=10, now=0)
    assert cache.get(("r", "s", "a"), now=5) == ({"k": 1}, advice)
    cache.put(("r", "s", "c"), {"k": 3}, advice, ttl=10, now=0)        # evicts b (least recently used)
    assert cache.get(("r", "s", "b"), now=5) is None and len(cache) == 2
    assert cache.get(("r", "s", "a"), now=10) is None                  # expired
    cache.put(("r", "s", "d"), {"k": 4}, advice, ttl=0, now=0)         # ttl 0: not kept
    assert cache.get(("r", "s", "d"), now=0) is None


# ---------------------------------------------------------------- through a coordinator on a real broker
async def _room(mesh: Mesh, *, phones: int = 1, inputs: tuple[str, ...] = ("touch",)
                ) -> tuple[Any, list[Any], list[list[Any]]]:
    display = await mesh.device("display")
    got: list[list[Any]] = [[] for _ in range(phones)]
    devices = [await mesh.device("phone", record=got[i], attributes={"input": list(inputs)}) for i in range(phones)]
    return display, devices, got


def _origin(mesh: Mesh, did: str) -> dict[str, Any] | None:
    coord = mesh.coordinator
    assert coord is not None and coord.store is not None
    origin: dict[str, Any] | None = coord.store.history(did, limit=1)[0]["origin"]
    return origin


def _advisor(engine: FakeEngine) -> MeshAdvisor:
    return MeshAdvisor(engine, constrain=False)     # the engine's text as it is: validated by the coordinator


@pytest.mark.broker
async def test_model_answer_is_applied_and_recorded(mesh: Mesh) -> None:
    engine = FakeEngine(reply='{"ui.layout": "compact"}', version="7")
    await mesh.start_coordinator(rules=parse_rules([model_rule()]), advisor=_advisor(engine))
    display, (phone,), (got,) = await _room(mesh)
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    assert got[-1].state == {"ui.layout": "compact"}
    (req,) = engine.requests
    assert req.messages is not None
    system, prompt = req.messages[0]["content"], req.messages[1]["content"]
    assert prompt == 'Screen 800x600; device input ["touch"]; habits: none. Choose a layout.'
    assert json.loads(system.split("JSON Schema: ", 1)[1]) == SCHEMA
    assert _origin(mesh, phone.did) == {"policy": "model", "model": "fake-model", "model_version": "7",
                                        "prompt_hash": prompt_hash(prompt), "cached": False,
                                        "rule": "layout-by-model"}
    await until(lambda: display.outbox == [], what="event acknowledged")
    coord = mesh.coordinator
    assert coord is not None and coord.model_policy.outcomes == {"model": 1}
    assert 'autoglm_coord_model_configs_total{outcome="model"} 1.0' in coord.metrics.prometheus().decode()


@pytest.mark.broker
@pytest.mark.parametrize(("reply", "reason"), [
    ("Compact, I think.", "model_invalid_json"),
    ('{"ui.layout": "huge"}', "model_schema_violation"),
    ('{"ui.layout": "compact", "ui.theme": "dark"}', "model_key_not_allowed"),
])
async def test_refused_answer_commits_the_fallback(mesh: Mesh, reply: str, reason: str) -> None:
    engine = FakeEngine(reply=reply)
    await mesh.start_coordinator(rules=parse_rules([model_rule()]), advisor=_advisor(engine))
    display, (phone,), (got,) = await _room(mesh)
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    assert got[-1].state == {"ui.layout": "companion"}
    assert _origin(mesh, phone.did) == {"policy": "fallback", "reason": reason, "rule": "layout-by-model"}
    assert len(engine.requests) == 1


@pytest.mark.broker
async def test_timeout_and_no_advisor_fall_back(mesh: Mesh) -> None:
    engine = FakeEngine(reply='{"ui.layout": "compact"}', first_token_delay=3.0)
    coord = await mesh.start_coordinator(rules=parse_rules([model_rule(timeout=0.3)]), advisor=_advisor(engine))
    display, (phone,), (got,) = await _room(mesh)
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    assert got[-1].state == {"ui.layout": "companion"}
    assert _origin(mesh, phone.did) == {"policy": "fallback", "reason": "model_timeout", "rule": "layout-by-model"}
    coord.model_policy.advisor = None          # no [model] settings: the rule still works, on its fallback
    await display.publish_event(screen_available(1024, 768))
    await phone.wait_version(2, 10)
    assert _origin(mesh, phone.did) == {"policy": "fallback", "reason": "model_unavailable",
                                        "rule": "layout-by-model"}


@pytest.mark.broker
async def test_same_context_is_answered_from_cache(mesh: Mesh) -> None:
    engine = FakeEngine(reply='{"ui.layout": "standalone"}')
    await mesh.start_coordinator(rules=parse_rules([model_rule()]), advisor=_advisor(engine))
    display, phones, got = await _room(mesh, phones=2)       # same attributes: one context, one call
    await display.publish_event(screen_available(800, 600))
    for phone in phones:
        await phone.wait_version(1, 10)
    assert len(engine.requests) == 1
    assert [g[-1].state for g in got] == [{"ui.layout": "standalone"}] * 2
    await display.publish_event(screen_available(800, 600))   # a new event, the same context
    for phone in phones:
        await phone.wait_version(2, 10)
    assert len(engine.requests) == 1
    origin = _origin(mesh, phones[0].did)
    assert origin is not None and origin["policy"] == "model" and origin["cached"] is True
    await display.publish_event(screen_available(1280, 720))   # another context: asked again
    await phones[0].wait_version(3, 10)
    assert len(engine.requests) == 2


@pytest.mark.broker
async def test_habits_reach_the_prompt(mesh: Mesh) -> None:
    engine = FakeEngine(reply='{"ui.layout": "compact"}')
    coord = await mesh.start_coordinator(rules=parse_rules([model_rule()]), advisor=_advisor(engine))
    display, (phone,), _ = await _room(mesh)
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(1, 10)
    await phone.report_properties({"ui.layout": "companion"})         # the user switched back
    await until(lambda: (rec := coord.registry.get(phone.did)) is not None and bool(rec.properties),
                what="properties received")
    await display.publish_event(screen_available(800, 600))
    await phone.wait_version(2, 10)
    assert len(engine.requests) == 2                                  # another context: not cached
    messages = engine.requests[-1].messages
    assert messages is not None
    assert "habits: ui.layout set to compact, changed back to companion." in messages[1]["content"]


@pytest.mark.broker
async def test_event_path_not_blocked_while_the_model_is_slow(mesh: Mesh) -> None:
    gate = asyncio.Event()

    class Held(FakeEngine):
        async def generate(self, request: Any) -> Any:
            await gate.wait()
            return await super().generate(request)

    engine = Held(reply='{"ui.layout": "compact"}')
    coord = await mesh.start_coordinator(rules=parse_rules([model_rule(timeout=30), BATTERY_RULE]),
                                         advisor=_advisor(engine))
    display, (phone,), (got,) = await _room(mesh)
    saver_got: list[Any] = []
    other = await mesh.device("tablet", room="room:elsewhere", record=saver_got)
    eid = await display.publish_event(screen_available(800, 600))
    await until(lambda: coord.model_policy.pending == 1, what="model decision pending")
    display._outbox.add({**screen_available(800, 600).to_body(), "event_id": eid})   # re-sent meanwhile
    await display._drain()
    await other.publish_event(battery("low"))                           # another sender: committed at once
    await other.wait_version(1, 10)
    assert saver_got[-1].state == {"power.mode": "saver"}
    assert got == [] and coord.model_policy.pending == 1
    gate.set()
    await phone.wait_version(1, 10)
    assert got[-1].state == {"ui.layout": "compact"}
    await until(lambda: coord.model_policy.pending == 0 and display.outbox == [], what="event acknowledged")
    assert [c.version for c in got] == [1]                            # the re-send committed nothing
    assert len(engine.requests) == 1


@pytest.mark.broker
async def test_full_queue_commits_the_fallback_at_once(mesh: Mesh) -> None:
    gate = asyncio.Event()

    class Held(FakeEngine):
        async def generate(self, request: Any) -> Any:
            await gate.wait()
            return await super().generate(request)

    engine = Held(reply='{"ui.layout": "compact"}')
    coord = await mesh.start_coordinator(rules=parse_rules([model_rule(timeout=30)]), advisor=_advisor(engine))
    coord.model_policy = ModelPolicy(coord.model_policy.advisor, max_pending=1)
    display, (phone,), _ = await _room(mesh)
    display2 = await mesh.device("display", room="room:den")
    phone2_got: list[Any] = []
    phone2 = await mesh.device("phone", room="room:den", record=phone2_got)
    await display.publish_event(screen_available(800, 600))
    await until(lambda: coord.model_policy.pending == 1, what="model decision pending")
    await display2.publish_event(screen_available(800, 600))
    await phone2.wait_version(1, 10)
    assert _origin(mesh, phone2.did) == {"policy": "fallback", "reason": "model_busy", "rule": "layout-by-model"}
    gate.set()
    await phone.wait_version(1, 10)
    origin = _origin(mesh, phone.did)
    assert origin is not None and origin["policy"] == "model"


def test_example_model_rule() -> None:
    from pathlib import Path

    from sdk.coord.coordinator import load_rules
    from sdk.coord.coordinator.registry import Registry
    from sdk.coord.events import input_methods

    rules = load_rules(Path(__file__).resolve().parents[2] / "examples" / "rules.toml")
    reg = Registry()
    reg.register("did:tablet", {"kind": "tablet", "groups": ["room:living"]})
    (action,) = rules.evaluate(input_methods(["touch", "pen"]), "did:tablet", reg)
    assert action.rule == "tablet-layout-by-model" and action.targets == ("did:tablet",)
    assert action.model is not None and action.model.keys == {"ui.layout"}
    assert action.changes == {"ui.layout": "standalone"}                      # the fallback
    assert render_prompt(action.model.prompt, {**action.context, "device": {}}, "none") == (
        "A tablet with a unknown screen offers input [\"touch\",\"pen\"]. The user's habits: none. "
        "Choose its layout.")


def test_model_settings_in_the_coordinator_config(tmp_path: Any) -> None:
    from sdk.coord.coordinator import load_config
    from sdk.coord.coordinator.errors import ConfigFileError

    base = '[coordinator]\nbroker = "mqtt://127.0.0.1:1883"\n[model]\n'
    good = base + ('credential = "access-vc.json"\nnode_issuers = ["did:key:z6MkNodeIssuer"]\n'
                   'name = "SmolLM2-135M-Instruct"\nmax_pending = 8\n')
    (tmp_path / "c.toml").write_text(good)
    settings = load_config(tmp_path / "c.toml").model
    assert settings is not None and settings.credential == tmp_path / "access-vc.json"
    assert settings.node_issuers == ("did:key:z6MkNodeIssuer",) and settings.name == "SmolLM2-135M-Instruct"
    assert settings.max_pending == 8 and settings.max_calls == 4 and settings.broker is None
    (tmp_path / "none.toml").write_text('[coordinator]\nbroker = "mqtt://127.0.0.1:1883"\n')
    assert load_config(tmp_path / "none.toml").model is None
    for body, message in [
        ('node_issuers = ["did:key:z6Mk"]\n', "needs 'credential'"),
        ('credential = "a.json"\n', "node_issuers must be a non-empty list of DIDs"),
        ('credential = "a.json"\nnode_issuers = ["issuer"]\n', "node_issuers must be a non-empty list of DIDs"),
        ('credential = "a.json"\nnode_issuers = ["did:key:z6Mk"]\nbroker = "http://x"\n', "model.broker"),
        ('credential = "a.json"\nnode_issuers = ["did:key:z6Mk"]\nmax_calls = 0\n', "model.max_calls"),
        ('credential = "a.json"\nnode_issuers = ["did:key:z6Mk"]\nmodle = "x"\n', "unknown key(s) in [model]"),
    ]:
        (tmp_path / "bad.toml").write_text(base + body)
        with pytest.raises(ConfigFileError) as info:
            load_config(tmp_path / "bad.toml")
        assert message in str(info.value) and info.value.reason == "invalid_config_file"


@pytest.mark.broker
async def test_a_senders_later_event_commits_after_its_model_decision(mesh: Mesh) -> None:
    from sdk.coord.events import input_methods

    gate = asyncio.Event()

    class Held(FakeEngine):
        async def generate(self, request: Any) -> Any:
            await gate.wait()
            return await super().generate(request)

    own = {"name": "own-layout", "event": "input_methods", "policy": "model", "target": {"select": "sender"},
           "model": {"prompt": "Input {event.methods}. Choose a layout.", "schema": copy.deepcopy(SCHEMA)},
           "config": {"ui.layout": "companion"}}
    coord = await mesh.start_coordinator(rules=parse_rules([own, BATTERY_RULE]),
                                         advisor=_advisor(Held(reply='{"ui.layout": "compact"}')))
    got: list[Any] = []
    tablet = await mesh.device("tablet", record=got)
    await tablet.publish_event(input_methods(["touch", "pen"]))
    await until(lambda: coord.model_policy.pending == 1, what="model decision pending")
    await tablet.publish_event(battery("low"))          # the same sender: waits behind its first event
    await until(lambda: coord.model_policy.pending == 2, what="second event queued behind the first")
    assert got == []
    gate.set()
    await tablet.wait_version(2, 10)
    assert [c.state for c in got] == [{"ui.layout": "compact"}, {"ui.layout": "compact", "power.mode": "saver"}]
    assert _origin(mesh, tablet.did) is None                                  # v2: a declarative rule's
    await until(lambda: coord.model_policy.pending == 0 and tablet.outbox == [], what="both acknowledged")
