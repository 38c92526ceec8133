"""Model-made adaptation configs: a rule with ``policy = "model"`` asks a model for its config.

    [[rules]]
    name = "layout-by-model"
    event = "screen_available"
    policy = "model"
    [rules.model]
    prompt = "Screen {event.width}x{event.height}; input {device.attributes.input}; habits: {habits}."
    schema = { type = "object", properties = { "ui.layout" = { enum = ["companion", "compact"] } },
               required = ["ui.layout"], additionalProperties = false }
    timeout = 5.0                 # seconds for the whole decision; then the fallback
    cache_ttl = 600               # seconds a decision is reused for the same context (0: never)
    [rules.config]                # the fallback, and the keys the model may set (unless keys = [...])
    "ui.layout" = "companion"

For each target device the prompt is rendered (bounded sizes) from the event, the sender, the
target's view (kind, attributes such as input methods...) and its habit summary; the advisor
(:class:`ConfigAdvisor`, e.g. the mesh-backed ``sdk.mesh.advisor.MeshAdvisor``) is asked for a
completion constrained to the schema; the coordinator validates the answer itself (strict
JSON, allowed keys, the schema) and commits it, or commits the rule's declarative config when
the model is slow, unavailable or wrong. Each version records how it was made (``origin``):
``{"policy": "model", "model", "model_version", "prompt_hash", "cached"}`` or
``{"policy": "fallback", "reason"}`` with a reason from :data:`REASONS`.

Decisions run off the event path (:class:`ModelPolicy`): an event whose rules need the model is
committed, in one transaction as any other, when its advice arrives or its deadline passes; a
later event of the same sender waits behind it, so one device's events still commit in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sdk.coord.coordinator.errors import InvalidValue
from sdk.coord.coordinator.values import check_json, strict_dumps
from sdk.errors import AutoGLMError, CoordinationError
from sdk.identity.hazmat import json as strict_json

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator
    from sdk.coord.coordinator.rules import Action
    from sdk.coord.events import Event
    from sdk.messaging.envelope import Message

log = logging.getLogger(__name__)

#: Why a model-policy rule fell back to its declarative config.
REASONS = ("model_timeout", "model_invalid_json", "model_schema_violation", "model_key_not_allowed",
           "model_unavailable", "model_busy")
#: Bounds: the prompt template, one substituted value, the rendered prompt, the schema, the answer.
MAX_TEMPLATE_CHARS = 4096
MAX_VALUE_CHARS = 256
MAX_PROMPT_CHARS = 8192
MAX_SCHEMA_BYTES = 16 * 1024
MAX_SCHEMA_DEPTH = 16
MAX_ANSWER_BYTES = 64 * 1024
_MODEL_KEYS = {"prompt", "schema", "keys", "timeout", "cache_ttl", "max_tokens", "temperature", "habit_window",
               "habit_limit"}
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_\-]+)*)\}")
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


# ---------------------------------------------------------------- the advisor contract
@dataclass(frozen=True)
class Advice:
    """A model's answer: the completion text and which model (and version) wrote it."""

    text: str
    model: str
    model_version: str = ""


class AdviceLike(Protocol):
    """What an advisor returns (an :class:`Advice`, or its own type with these fields)."""

    @property
    def text(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def model_version(self) -> str: ...


class ConfigAdvisor(Protocol):
    """Asks a model for a completion constrained to ``schema`` (a JSON Schema), within ``timeout`` s
    (at most ``max_tokens`` new tokens, sampled at ``temperature``).

    Raises on failure: ``TimeoutError`` (or an error whose ``reason`` mentions ``timeout``) counts
    as ``model_timeout``, anything else as ``model_unavailable``. The caller validates the answer.
    """

    async def advise(self, prompt: str, schema: dict[str, Any], *, timeout: float, max_tokens: int = 256,
                     temperature: float = 0.0) -> AdviceLike: ...


class ModelPolicyError(CoordinationError):
    """A model's answer was refused (or never came); ``reason`` is one of :data:`REASONS`."""

    reason = "model_unavailable"


# ---------------------------------------------------------------- the rule's [rules.model] table
@dataclass(frozen=True)
class ModelSpec:
    """A validated ``[rules.model]`` table."""

    prompt: str
    schema: dict[str, Any]
    keys: frozenset[str]
    timeout: float = 5.0
    cache_ttl: float = 600.0
    max_tokens: int = 256
    temperature: float = 0.0
    habit_window: float = 3600.0
    habit_limit: int = 5
    schema_hash: str = field(default="", compare=False)


def _number(where: str, table: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    from sdk.coord.coordinator.rules import _fail

    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise _fail(where, f"'{key}' must be a number from {low} to {high}, got {value!r}")
    return float(value)


def _schema_validator(schema: Mapping[str, Any]) -> Any:
    """A jsonschema validator for ``schema`` (Draft 2020-12 unless it names another)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


_VALIDATORS: OrderedDict[str, Any] = OrderedDict()      # schema hash -> validator (built once; 256 kept)


def _validator(spec: ModelSpec) -> Any:
    """The rule's schema validator, built once per schema (building one checks the schema)."""
    found = _VALIDATORS.get(spec.schema_hash) if spec.schema_hash else None
    if found is None:
        found = _schema_validator(spec.schema)
        if spec.schema_hash:
            _VALIDATORS[spec.schema_hash] = found
            while len(_VALIDATORS) > 256:
                _VALIDATORS.popitem(last=False)
    return found


def parse_model_spec(where: str, raw: Any, *, event_type: str, config: Mapping[str, Any]) -> ModelSpec:
    """Validate a rule's ``[rules.model]`` (``where`` names the rule); raises :class:`RuleError`."""
    from sdk.coord.coordinator.rules import _KEY_RE, _check_finite, _check_path, _fail

    where = f"{where} model"
    if not isinstance(raw, dict):
        raise _fail(where, "policy = \"model\" needs a [rules.model] table (prompt, schema)")
    unknown = set(raw) - _MODEL_KEYS
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)} (allowed: {sorted(_MODEL_KEYS)})")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_TEMPLATE_CHARS:
        raise _fail(where, f"'prompt' must be a non-empty string of at most {MAX_TEMPLATE_CHARS} characters")
    for m in _PLACEHOLDER_RE.finditer(prompt):
        if m.group(1) != "habits":
            _check_path(f"{where} prompt {m.group(0)}", m.group(1), ("event", "sender", "device"), event_type)
    keys_raw = raw.get("keys")
    if keys_raw is None:
        keys = frozenset(config)
    elif isinstance(keys_raw, list) and keys_raw and all(isinstance(k, str) and _KEY_RE.match(k) for k in keys_raw):
        keys = frozenset(keys_raw)
    else:
        raise _fail(where, "'keys' must be a non-empty list of config keys")
    if not keys:
        raise _fail(where, "the model may set no key: give [rules.config] (the fallback) or 'keys'")
    schema = raw.get("schema")
    if not isinstance(schema, dict):
        raise _fail(where, "'schema' must be a table (a JSON Schema for the config object)")
    _check_finite(f"{where} schema", schema)
    try:
        check_json(schema, what="schema", max_depth=MAX_SCHEMA_DEPTH)
        text = strict_dumps(schema, sort_keys=True)
    except InvalidValue as exc:
        raise _fail(where, f"'schema': {exc}") from exc
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise _fail(where, f"'schema' is over {MAX_SCHEMA_BYTES} bytes")
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict) \
            or not schema["properties"]:
        raise _fail(where, "'schema' must describe an object: type = \"object\" with 'properties'")
    outside = sorted(set(schema["properties"]) - keys)
    if outside:
        raise _fail(where, f"schema properties {outside} are not keys the rule allows ({sorted(keys)})")
    try:
        _schema_validator(schema)
    except ImportError as exc:
        raise _fail(where, "policy = \"model\" needs jsonschema (pip install 'open-autoglm-sdk[coordinator]')") \
            from exc
    except Exception as exc:  # jsonschema.SchemaError and what check_schema raises for odd input
        raise _fail(where, f"'schema' is not a valid JSON Schema: {getattr(exc, 'message', exc)}") from exc
    max_tokens = raw.get("max_tokens", 256)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise _fail(where, f"'max_tokens' must be an integer from 1 to 4096, got {max_tokens!r}")
    limit = raw.get("habit_limit", 5)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 20:
        raise _fail(where, f"'habit_limit' must be an integer from 0 to 20, got {limit!r}")
    return ModelSpec(
        prompt=prompt, schema=schema, keys=keys,
        timeout=_number(where, raw, "timeout", 5.0, 0.05, 120.0),
        cache_ttl=_number(where, raw, "cache_ttl", 600.0, 0.0, 86400.0),
        max_tokens=max_tokens,
        temperature=_number(where, raw, "temperature", 0.0, 0.0, 2.0),
        habit_window=_number(where, raw, "habit_window", 3600.0, 0.0, 30 * 86400.0),
        habit_limit=limit,
        schema_hash="sha256:" + hashlib.sha256(text.encode()).hexdigest(),
    )


# ---------------------------------------------------------------- the config's [model] section
_SETTINGS_KEYS = {"broker", "name", "credential", "node_issuers", "max_pending", "max_calls"}


@dataclass(frozen=True)
class ModelSettings:
    """The coordinator config's ``[model]``: how the coordinator reaches the inference mesh.

    ``credential``: the coordinator's ``InferenceAccessCredential`` (a JSON file); ``node_issuers``:
    DIDs trusted to issue ``InferenceNodeCredential``; ``broker``: None = the coordinator's.
    """

    credential: Path
    node_issuers: tuple[str, ...]
    name: str | None = None
    broker: str | None = None
    max_pending: int = 64
    max_calls: int = 4


def parse_model_settings(table: Any, *, path: Callable[[Any, str], Path | None]) -> ModelSettings:
    """Validate ``[model]`` (``path`` resolves file names against the config's directory)."""
    from sdk.coord.coordinator.errors import ConfigFileError

    def bad(message: str) -> ConfigFileError:
        log.warning("coordinator config rejected: %s", message)
        return ConfigFileError(message)

    if not isinstance(table, dict):
        raise bad("[model] must be a table")
    unknown = set(table) - _SETTINGS_KEYS
    if unknown:
        raise bad(f"unknown key(s) in [model]: {sorted(unknown)} (allowed: {sorted(_SETTINGS_KEYS)})")
    credential = path(table.get("credential"), "model.credential")
    if credential is None:
        raise bad("[model] needs 'credential': the coordinator's InferenceAccessCredential file")
    issuers = table.get("node_issuers")
    if not isinstance(issuers, list) or not issuers or not all(isinstance(d, str) and d.startswith("did:")
                                                               for d in issuers):
        raise bad("model.node_issuers must be a non-empty list of DIDs (issuers of InferenceNodeCredential)")
    name = table.get("name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 256):
        raise bad("model.name must be a model name")
    broker = table.get("broker")
    if broker is not None and (not isinstance(broker, str) or not broker.startswith(("mqtt://", "mqtts://"))):
        raise bad(f"model.broker must be an mqtt:// or mqtts:// URL, got {broker!r}")
    counts = {}
    for key, default, high in (("max_pending", 64, 4096), ("max_calls", 4, 64)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise bad(f"model.{key} must be an integer from 1 to {high}, got {value!r}")
        counts[key] = value
    return ModelSettings(credential=credential, node_issuers=tuple(issuers), name=name, broker=broker, **counts)


# ---------------------------------------------------------------- prompt and habits
@dataclass(frozen=True)
class Habit:
    """A key this device's user changed back after a config set it."""

    key: str
    set_to: Any
    changed_to: Any
    version: int


def habit_summary(history: Iterable[Mapping[str, Any]], properties: Mapping[str, Any], properties_at: float,
                  keys: Iterable[str], *, window: float, limit: int) -> list[Habit]:
    """Keys the user changed back: for each of ``keys``, the newest version in ``history`` (the
    store's rows, newest first) that set it to ``v``; a habit when the device's reported
    property of that name holds another value and the properties last changed after that version,
    within ``window`` seconds of it. At most ``limit``, newest version first."""
    wanted = set(keys)
    newest: dict[str, tuple[int, Any, float]] = {}
    for row in history:
        changes = row.get("changes") or {}
        for key, value in changes.items():
            if key in wanted and key not in newest and value is not None:
                newest[key] = (int(row.get("version", 0)), value, float(row.get("created", 0.0)))
    out: list[Habit] = []
    for key, (version, value, created) in newest.items():
        if key not in properties or properties[key] is None or properties[key] == value:
            continue
        if not created <= properties_at <= created + window:
            continue
        out.append(Habit(key, value, properties[key], version))
    out.sort(key=lambda h: (-h.version, h.key))
    return out[:max(limit, 0)]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else strict_dumps(value, sort_keys=True)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 1] + "…"


def format_habits(habits: Iterable[Habit]) -> str:
    """One line for the prompt: ``ui.layout set to compact, changed back to companion; ...`` (or none)."""
    parts = [f"{h.key} set to {_short(h.set_to)}, changed back to {_short(h.changed_to)}" for h in habits]
    return "; ".join(parts) if parts else "none"


def render_prompt(template: str, ctx: Mapping[str, Any], habits: str) -> str:
    """Fill ``{event.x}`` / ``{sender.x}`` / ``{device.x}`` / ``{habits}``; every value at most
    :data:`MAX_VALUE_CHARS`, the whole prompt at most :data:`MAX_PROMPT_CHARS` characters."""
    from sdk.coord.coordinator.rules import _MISSING, lookup

    def sub(m: re.Match[str]) -> str:
        if m.group(1) == "habits":
            return habits[:MAX_VALUE_CHARS * 4]
        found = lookup(ctx, m.group(1))
        return "unknown" if found is _MISSING or found is None else _short(found)

    return _PLACEHOLDER_RE.sub(sub, template)[:MAX_PROMPT_CHARS]


def prompt_hash(prompt: str) -> str:
    """``sha256:<hex>`` of the rendered prompt (recorded in each model-made version's origin)."""
    return "sha256:" + hashlib.sha256(prompt.encode()).hexdigest()


# ---------------------------------------------------------------- the answer
def validate_answer(spec: ModelSpec, text: str) -> dict[str, Any]:
    """The config in a model's answer: strict JSON object, only allowed keys, valid per the schema.

    Raises :class:`ModelPolicyError` with ``model_invalid_json``, ``model_key_not_allowed`` or
    ``model_schema_violation``."""
    body = text.strip()
    fenced = _FENCE_RE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        value = strict_json.loads(body, max_bytes=MAX_ANSWER_BYTES)
    except ValueError as exc:
        raise ModelPolicyError(f"the answer is not strict JSON: {exc}", reason="model_invalid_json") from exc
    if not isinstance(value, dict):
        raise ModelPolicyError(f"the answer is a JSON {type(value).__name__}, not an object",
                               reason="model_schema_violation")
    extra = sorted(set(value) - spec.keys)
    if extra:
        raise ModelPolicyError(f"the answer sets key(s) {extra} the rule does not allow",
                               reason="model_key_not_allowed")
    errors = sorted(_validator(spec).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.path) or "(root)"
        raise ModelPolicyError(f"the answer violates the schema at {where}: {first.message[:200]}",
                               reason="model_schema_violation")
    try:
        check_json(value, what="answer")
    except InvalidValue as exc:
        raise ModelPolicyError(str(exc), reason="model_schema_violation") from exc
    return value


# ---------------------------------------------------------------- cache
class AdviceCache:
    """Validated decisions by context (rule, schema, rendered prompt), each for its rule's TTL;
    at most ``max_entries`` (least recently used evicted)."""

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, dict[str, Any], Advice]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str, str], *, now: float) -> tuple[dict[str, Any], Advice] | None:
        """The decision for ``key`` while fresh, else None (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return dict(entry[1]), entry[2]

    def put(self, key: tuple[str, str, str], changes: Mapping[str, Any], advice: Advice, *, ttl: float,
            now: float) -> None:
        """Keep a decision for ``ttl`` seconds (0: not kept)."""
        if ttl <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (now + ttl, dict(changes), advice)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


# ---------------------------------------------------------------- the coordinator's side
@dataclass
class _Decision:
    """One target's outcome: its changes and how they were made."""

    changes: dict[str, Any]
    origin: dict[str, Any]


class ModelPolicy:
    """Runs the coordinator's model decisions: bounded queue, cache, per-sender order, fallback.

    ``max_pending`` events may wait for advice at once (beyond it an event commits its fallback
    at once, reason ``model_busy``); ``max_calls`` advisor calls run at once.
    """

    def __init__(self, advisor: ConfigAdvisor | None = None, *, max_pending: int = 64, max_calls: int = 4,
                 cache_size: int = 1024) -> None:
        if max_pending < 1 or max_calls < 1:
            raise ValueError("max_pending and max_calls must be >= 1")
        self.advisor = advisor
        self.max_pending = max_pending
        self.cache = AdviceCache(cache_size)
        self.outcomes: Counter[str] = Counter()    # model, cached, fallback:<reason>
        self.calls = 0
        self._calls = asyncio.Semaphore(max_calls)
        self._pending: set[tuple[str, str]] = set()
        self._chains: dict[str, asyncio.Task[Any]] = {}
        self._inflight: dict[tuple[str, str, str], asyncio.Task[_Decision]] = {}
        self._counter: Any = None

    def limit(self, *, max_pending: int, max_calls: int) -> None:
        """Resize the queue of pending events and the advisor calls run at once (``[model]``)."""
        if max_pending < 1 or max_calls < 1:
            raise ValueError("max_pending and max_calls must be >= 1")
        self.max_pending = max_pending
        self._calls = asyncio.Semaphore(max_calls)

    @property
    def pending(self) -> int:
        """Events waiting for advice now."""
        return len(self._pending)

    def bind_metrics(self, registry: Any) -> None:
        """Count outcomes in ``autoglm_coord_model_configs_total{outcome}`` on a Prometheus registry."""
        with contextlib.suppress(ImportError, ValueError):
            from prometheus_client import Counter as PromCounter

            self._counter = PromCounter("autoglm_coord_model_configs", "Model-policy decisions by outcome",
                                        ["outcome"], registry=registry)

    def stats(self) -> dict[str, Any]:
        """Outcome counts, calls made, pending events and cache size."""
        return {"outcomes": dict(self.outcomes), "calls": self.calls, "pending": len(self._pending),
                "cached": len(self.cache)}

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self._counter is not None:
            self._counter.labels(outcome).inc()

    # -- the event path
    def defer(self, coord: Coordinator, msg: Message, event: Event, event_id: str, actions: list[Action],
              t0: float) -> bool:
        """Take the event off the event path when a rule needs the model or the sender has an
        event waiting for advice; True when taken (the commit and ack follow from a task, or, when
        the queue is full behind a waiting event of this sender, never: the device sends it again)."""
        sender = msg.sender
        needs_model = any(a.model is not None for a in actions)
        chain = self._chains.get(sender)
        if not needs_model and chain is None:
            return False
        if (sender, event_id) in self._pending:
            log.info("event %s from %s is waiting for the model; re-send ignored", event_id, sender)
            return True
        plan: tuple[list[Action], dict[str, dict[str, Any]]] | None = None
        if len(self._pending) >= self.max_pending:
            if chain is not None:       # behind this sender's waiting event: refused, not reordered
                log.warning("model decisions queue full (%d); event %s from %s not taken (it is sent again)",
                            self.max_pending, event_id, sender, extra={"event": "model_config",
                                                                       "reason": "model_busy"})
                return True
            log.warning("model decisions queue full (%d); event %s from %s commits its fallback", self.max_pending,
                        event_id, sender, extra={"event": "model_config", "reason": "model_busy"})
            plan = self._fallback_all(actions, "model_busy")
        self._pending.add((sender, event_id))

        async def run() -> None:
            try:
                if chain is not None:
                    await asyncio.wait([chain])     # its outcome is its own; a cancel of this task still ends it
                resolved = plan if plan is not None else await self.resolve(coord, sender, actions)
                await coord.commit_actions(msg, event, event_id, resolved[0], t0, origins=resolved[1])
            finally:
                self._pending.discard((sender, event_id))
                if self._chains.get(sender) is task:
                    del self._chains[sender]

        task = coord._spawn(run())             # noqa: SLF001 - cancelled with the coordinator
        self._chains[sender] = task             # this sender's next event waits for this one
        return True

    def _fallback_all(self, actions: list[Action], reason: str
                      ) -> tuple[list[Action], dict[str, dict[str, Any]]]:
        origins: dict[str, dict[str, Any]] = {}
        for action in actions:
            if action.model is not None:
                self._count(f"fallback:{reason}")
                for did in action.targets:
                    origins[did] = {"policy": "fallback", "reason": reason, "rule": action.rule}
        return [_declarative(a) for a in actions], origins

    async def resolve(self, coord: Coordinator, sender: str, actions: list[Action]
                      ) -> tuple[list[Action], dict[str, dict[str, Any]]]:
        """Each model-policy action split per target with its decided changes; plus origins per DID."""
        from sdk.coord.coordinator.rules import Action

        out: list[Action] = []
        origins: dict[str, dict[str, Any]] = {}
        jobs: list[tuple[Action, str, asyncio.Future[_Decision]]] = []
        for action in actions:
            if action.model is None:
                out.append(action)
                continue
            deadline = time.monotonic() + action.model.timeout
            for did in action.targets:
                jobs.append((action, did, asyncio.ensure_future(self._decide(coord, action, did, deadline))))
        for action, did, job in jobs:
            decision = await job
            changes = {**decision.changes, **{k: None for k in _unset(action)}}
            out.append(Action(action.rule, (did,), changes))
            origins[did] = {**decision.origin, "rule": action.rule}
        return out, origins

    async def _decide(self, coord: Coordinator, action: Action, did: str, deadline: float) -> _Decision:
        spec = action.model
        assert spec is not None
        fallback = {k: v for k, v in action.changes.items() if v is not None}
        if self.advisor is None:
            return self._fell_back(action, did, fallback, "model_unavailable", "no model advisor is configured")
        view = coord.registry.view(did) or {"did": did}
        rec = coord.registry.get(did)
        history = coord.store.history(did, limit=20) if coord.store is not None else []
        habits = habit_summary(history, rec.properties if rec is not None else {},
                               rec.properties_at if rec is not None else 0.0, spec.keys,
                               window=spec.habit_window, limit=spec.habit_limit)
        prompt = render_prompt(spec.prompt, {**action.context, "device": view}, format_habits(habits))
        phash = prompt_hash(prompt)
        key = (action.rule, spec.schema_hash, phash)
        hit = self.cache.get(key, now=time.monotonic())
        if hit is not None:
            changes, advice = hit
            self._count("cached")
            log.info("model config for %s (rule %s) from cache (%s)", did, action.rule, phash[:19],
                     extra={"event": "model_config", "outcome": "cached"})
            return _Decision(changes, _model_origin(advice, phash, cached=True))
        task = self._inflight.get(key)
        if task is None:       # one call per context; stopped with the coordinator's other tasks
            task = coord._spawn(self._ask(spec, prompt, phash, key, deadline))  # noqa: SLF001
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        try:
            outcome = await asyncio.wait_for(asyncio.shield(task), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            return self._fell_back(action, did, fallback, "model_timeout", f"no answer within {spec.timeout:g} s")
        if isinstance(outcome, ModelPolicyError):
            return self._fell_back(action, did, fallback, outcome.reason, str(outcome))
        return outcome

    async def _ask(self, spec: ModelSpec, prompt: str, phash: str, key: tuple[str, str, str],
                   deadline: float) -> _Decision | ModelPolicyError:
        """One advisor call (shared by every target with the same context), its refusal returned
        rather than raised; a valid answer is cached even when it comes after the deadline."""
        async with self._calls:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ModelPolicyError("no time left for the model", reason="model_timeout")
            self.calls += 1
            assert self.advisor is not None
            try:
                advice = await self.advisor.advise(prompt, spec.schema, timeout=remaining,
                                                   max_tokens=spec.max_tokens, temperature=spec.temperature)
            except TimeoutError as exc:
                return ModelPolicyError(f"the model did not answer in time: {exc}", reason="model_timeout")
            except AutoGLMError as exc:
                reason = "model_timeout" if "timeout" in exc.reason else "model_unavailable"
                return ModelPolicyError(f"the model is unavailable: {exc.reason}: {exc}", reason=reason)
            except Exception as exc:  # an advisor is outside code: whatever it raises means no advice
                log.exception("model advisor failed")
                return ModelPolicyError(f"the model advisor failed: {exc!r}", reason="model_unavailable")
        text = getattr(advice, "text", None)
        if not isinstance(text, str):
            return ModelPolicyError("the advisor returned no text", reason="model_unavailable")
        advice = Advice(text, str(getattr(advice, "model", ""))[:256], str(getattr(advice, "model_version", ""))[:256])
        try:
            changes = validate_answer(spec, advice.text)
        except ModelPolicyError as exc:
            return exc
        self.cache.put(key, changes, advice, ttl=spec.cache_ttl, now=time.monotonic())
        self._count("model")
        log.info("model config from %s %s: %s (%s)", advice.model, advice.model_version, changes, phash[:19],
                 extra={"event": "model_config", "outcome": "model"})
        return _Decision(changes, _model_origin(advice, phash, cached=False))

    def _done(self, key: tuple[str, str, str], _task: asyncio.Task[Any]) -> None:
        self._inflight.pop(key, None)

    def _fell_back(self, action: Action, did: str, fallback: dict[str, Any], reason: str, why: str) -> _Decision:
        self._count(f"fallback:{reason}")
        log.warning("rule %s: model config for %s refused (%s: %s); fallback config committed", action.rule, did,
                    reason, why, extra={"event": "model_config", "reason": reason})
        return _Decision(dict(fallback), {"policy": "fallback", "reason": reason})


def _model_origin(advice: Advice, phash: str, *, cached: bool) -> dict[str, Any]:
    return {"policy": "model", "model": advice.model, "model_version": advice.model_version,
            "prompt_hash": phash, "cached": cached}


def _unset(action: Action) -> list[str]:
    return [k for k, v in action.changes.items() if v is None]


def _declarative(action: Action) -> Action:
    from sdk.coord.coordinator.rules import Action as RuleAction

    return RuleAction(action.rule, action.targets, dict(action.changes)) if action.model is not None else action


__all__ = ["REASONS", "Advice", "AdviceCache", "AdviceLike", "ConfigAdvisor", "Habit", "ModelPolicy", "ModelPolicyError",
           "ModelSettings", "ModelSpec", "format_habits", "habit_summary", "parse_model_settings", "parse_model_spec", "prompt_hash", "render_prompt",
           "validate_answer"]
