"""Topic validation, MQTT filter matching and the messaging layer's own topics.

Every topic lives under ``autoglm/v1``. This layer owns only the topics it uses itself:

    autoglm/v1/reply/{client}           replies and stream chunks for one client
    autoglm/v1/status/{issuer}          retained status list credentials (sdk.messaging.status)

The layers above own theirs, built with :func:`build` (ids can never inject wildcards or levels):
``sdk.coord.protocol`` the device topics (``dev/...``), ``sdk.mesh.topics`` the inference topics.
"""

from __future__ import annotations

import re

ROOT = "autoglm/v1"
MAX_ID_LEN = 128
MAX_TOPIC_BYTES = 1024

_BAD_ID = re.compile(r"[+#/\x00-\x1f\x7f\s]")


def validate_id(value: str, *, what: str = "id") -> str:
    """Return ``value`` if it is safe as one topic level, else raise ``ValueError``."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value.encode("utf-8")) > MAX_ID_LEN:
        raise ValueError(f"{what} longer than {MAX_ID_LEN} bytes")
    if _BAD_ID.search(value):
        raise ValueError(f"{what} {value!r} contains '+', '#', '/', whitespace or a control character")
    if value.startswith("$"):
        raise ValueError(f"{what} {value!r} must not start with '$'")
    return value


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid concrete topic to publish to (no wildcards)."""
    if not isinstance(topic, str):
        raise TypeError("topic must be a str")
    if not topic or "\x00" in topic or len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise ValueError(f"invalid topic {topic!r}")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r} contains a wildcard")
    return topic


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT subscription filter."""
    if not isinstance(topic_filter, str):
        raise TypeError("topic filter must be a str")
    if not topic_filter or "\x00" in topic_filter or len(topic_filter.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be the whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level in {topic_filter!r}")
    return topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """True if ``topic`` matches the MQTT filter ``topic_filter``."""
    if topic_filter == topic:
        return True
    if "+" not in topic_filter and "#" not in topic_filter:
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def has_wildcard(topic_filter: str) -> bool:
    """True if ``topic_filter`` contains ``+`` or ``#`` (it can match more than itself)."""
    return "+" in topic_filter or "#" in topic_filter


def matches_levels(f_levels: list[str], t_levels: list[str]) -> bool:
    """:func:`matches` on filter and topic already split at ``/`` (a filter split once, at subscribe
    time, is matched against each message's topic split once)."""
    if t_levels[0].startswith("$") and f_levels[0] in ("+", "#"):
        return False
    n = len(t_levels)
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= n:
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == n


def build(*levels: str, what: str = "id") -> str:
    """``ROOT/level/...``; each level is validated with :func:`validate_id` (no wildcards, no '/')."""
    return "/".join([ROOT, *(validate_id(level, what=what) for level in levels)])


def client_token(did: str) -> str:
    """A topic-safe token for a DID (its method-specific id, e.g. ``z6Mk...``)."""
    ident = did.partition("#")[0].rsplit(":", 1)[-1]
    return validate_id(ident, what="client token")


def reply_topic(client: str) -> str:
    return f"{ROOT}/reply/{validate_id(client, what='client id')}"


def status_list(issuer: str) -> str:
    """Where an issuer publishes its status list credential (retained); ``issuer`` is its token."""
    return f"{ROOT}/status/{validate_id(issuer, what='issuer id')}"


#: Subscription filter over every issuer's status list.
ALL_STATUS_LISTS = f"{ROOT}/status/+"
#: The broadcast tree: issuers' status lists (``status/{issuer}``) and what sits below them
#: (a coordinator's presence, ``status/{coordinator}/presence``): one filter for a participant
#: that reads both (a device), instead of one per kind.
STATUS_TREE = f"{ROOT}/status/#"


__all__ = [
    "ROOT",
    "MAX_ID_LEN",
    "MAX_TOPIC_BYTES",
    "validate_id",
    "validate_topic",
    "validate_filter",
    "matches",
    "matches_levels",
    "has_wildcard",
    "build",
    "client_token",
    "reply_topic",
    "status_list",
    "ALL_STATUS_LISTS",
    "STATUS_TREE",
]
