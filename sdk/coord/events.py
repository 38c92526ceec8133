"""Typed device events: the common ones (screens, input, battery, network) plus custom events.

An event is a type name and a flat dict of JSON fields. Known types have a schema that the
device checks before publishing and the coordinator checks on receipt (and rules are checked
against at load, so a template naming a field the event never carries is a load error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sdk.errors import CoordinationError
from sdk.identity.hazmat.json import value_problem

SCREEN_AVAILABLE = "screen_available"
SCREEN_LOST = "screen_lost"
INPUT_METHODS = "input_methods"
BATTERY = "battery"
NETWORK = "network"

BATTERY_CLASSES = ("critical", "low", "normal", "charging", "full")
NETWORK_CLASSES = ("offline", "metered", "cellular", "wifi", "ethernet")
INPUT_METHOD_NAMES = ("touch", "keyboard", "mouse", "voice", "remote", "pen", "gamepad")

_EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: Nesting allowed inside an event field value.
MAX_FIELD_DEPTH = 8


class InvalidEvent(CoordinationError):
    """An event's type or fields do not match its schema."""

    reason = "invalid_event"


@dataclass(frozen=True)
class FieldSpec:
    """One field of a known event type: its JSON type(s), whether required, allowed values."""

    types: tuple[type, ...]
    required: bool = True
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None


#: Schemas of the known event types. Custom types carry any JSON fields.
EVENT_SCHEMAS: dict[str, dict[str, FieldSpec]] = {
    SCREEN_AVAILABLE: {
        "width": FieldSpec((int,), minimum=1),
        "height": FieldSpec((int,), minimum=1),
        "density": FieldSpec((int, float), required=False, minimum=0),
        "screen_id": FieldSpec((str,), required=False),
    },
    SCREEN_LOST: {"screen_id": FieldSpec((str,), required=False)},
    INPUT_METHODS: {"methods": FieldSpec((list,))},
    BATTERY: {
        "battery_class": FieldSpec((str,), choices=BATTERY_CLASSES),
        "level": FieldSpec((int, float), required=False, minimum=0),
    },
    NETWORK: {"network_class": FieldSpec((str,), choices=NETWORK_CLASSES)},
}


@dataclass(frozen=True)
class Event:
    """A device event: ``type`` and its ``fields`` (JSON-compatible values)."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:
        """The JSON body sent on the wire."""
        return {"type": self.type, "fields": dict(self.fields)}

    @classmethod
    def from_body(cls, body: Any) -> Event:
        """Parse and validate a wire body; raises :class:`InvalidEvent`."""
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            raise InvalidEvent("event body must be an object with a string 'type'")
        fields = body.get("fields", {})
        if not isinstance(fields, dict):
            raise InvalidEvent("event 'fields' must be an object")
        return validate_event(cls(body["type"], fields))


def validate_event(event: Event) -> Event:
    """Check an event against its schema (known types) or the generic rules (custom types)."""
    if not _EVENT_TYPE_RE.match(event.type):
        raise InvalidEvent(f"bad event type {event.type!r} (lowercase letters, digits, _ . -)")
    for name, value in event.fields.items():
        if not isinstance(name, str) or not _FIELD_RE.match(name):
            raise InvalidEvent(f"bad field name {name!r} in event {event.type!r}")
        problem = _json_problem(value)
        if problem:
            raise InvalidEvent(f"event {event.type!r} field {name!r}: {problem}")
    schema = EVENT_SCHEMAS.get(event.type)
    if schema is None:
        return event
    for name, spec in schema.items():
        if name not in event.fields:
            if spec.required:
                raise InvalidEvent(f"event {event.type!r} needs field {name!r}")
            continue
        value = event.fields[name]
        if isinstance(value, bool) or not isinstance(value, spec.types):
            want = "/".join(t.__name__ for t in spec.types)
            raise InvalidEvent(f"event {event.type!r} field {name!r} must be {want}, got {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise InvalidEvent(f"event {event.type!r} field {name!r} must be one of {spec.choices}")
        if spec.minimum is not None and isinstance(value, (int, float)) and value < spec.minimum:
            raise InvalidEvent(f"event {event.type!r} field {name!r} must be >= {spec.minimum}")
    if event.type == INPUT_METHODS:
        methods = event.fields["methods"]
        if not all(isinstance(m, str) and m for m in methods):
            raise InvalidEvent("input_methods 'methods' must be a list of names")
    return event


def _json_problem(value: object) -> str | None:
    """Why ``value`` is not plain JSON with finite numbers (None when it is)."""
    return value_problem(value, max_depth=MAX_FIELD_DEPTH)


def screen_available(width: int, height: int, *, density: float | None = None,
                     screen_id: str | None = None) -> Event:
    """A screen of ``width`` x ``height`` pixels (optional density in dpi) became available."""
    fields: dict[str, Any] = {"width": width, "height": height}
    if density is not None:
        fields["density"] = density
    if screen_id is not None:
        fields["screen_id"] = screen_id
    return validate_event(Event(SCREEN_AVAILABLE, fields))


def screen_lost(*, screen_id: str | None = None) -> Event:
    """A previously announced screen went away."""
    return validate_event(Event(SCREEN_LOST, {} if screen_id is None else {"screen_id": screen_id}))


def input_methods(methods: list[str] | tuple[str, ...]) -> Event:
    """The input methods the device currently offers (e.g. ``["touch", "voice"]``)."""
    return validate_event(Event(INPUT_METHODS, {"methods": list(methods)}))


def battery(battery_class: str, *, level: float | None = None) -> Event:
    """Battery class (one of :data:`BATTERY_CLASSES`), optional level in percent."""
    fields: dict[str, Any] = {"battery_class": battery_class}
    if level is not None:
        fields["level"] = level
    return validate_event(Event(BATTERY, fields))


def network(network_class: str) -> Event:
    """Network class (one of :data:`NETWORK_CLASSES`)."""
    return validate_event(Event(NETWORK, {"network_class": network_class}))


def custom(event_type: str, **fields: Any) -> Event:
    """Any other event: a type name and JSON fields."""
    return validate_event(Event(event_type, fields))


__all__ = [
    "Event",
    "FieldSpec",
    "InvalidEvent",
    "EVENT_SCHEMAS",
    "SCREEN_AVAILABLE",
    "SCREEN_LOST",
    "INPUT_METHODS",
    "BATTERY",
    "NETWORK",
    "BATTERY_CLASSES",
    "NETWORK_CLASSES",
    "INPUT_METHOD_NAMES",
    "validate_event",
    "screen_available",
    "screen_lost",
    "input_methods",
    "battery",
    "network",
    "custom",
]
