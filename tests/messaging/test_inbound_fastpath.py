"""The inbound fast paths give the answers of the plain forms they replace (differential).

Strict JSON: one shared decoder against ``json.loads`` with the same hooks per call. Routing:
``SecureClient._matching`` (exact lookup, pre-split wildcard filters) against matching every
filter with :func:`topics.matches`; :func:`topics.matches_levels` against :func:`topics.matches`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdk.identity import Key
from sdk.identity.hazmat import json as strict
from sdk.messaging import topics
from sdk.messaging.client import SecureClient


def _reference(text: str | bytes | bytearray) -> Any:
    """``strict.loads`` as written with a ``json.loads`` call (and its hooks) per document."""
    try:
        return json.loads(text, object_pairs_hook=strict._no_duplicates,
                          parse_constant=strict._no_constant, parse_float=strict._float)
    except UnicodeDecodeError as exc:
        raise ValueError("JSON is not UTF-8") from exc


def _outcome(fn: Any, text: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(text)
    except ValueError as exc:
        return type(exc).__name__, str(exc)


EDGE_CASES: list[str | bytes | bytearray] = [
    '{"a":1}', '{"a":1,"a":2}', '{"a":{"b":1,"b":1}}', '[{"x":1},{"x":2}]', "NaN", "[Infinity]",
    "-Infinity", "1e999", "-1e999", "1.5", "[1e308, 2.5e-3]", '"\\ud800"', "", " ", "{", '{"a":1} x',
    "\ufeff{}", b"\xef\xbb\xbf{}", '{"a":1}'.encode("utf-16"), '{"a":1}'.encode("utf-32-le"),
    '{"é":"ü"}'.encode(), b'{"a":"\xff"}', bytearray(b'{"k":[1,2,3]}'), b"[1,2", '{"a":NaN}',
    '{"__proto__":1,"__proto__":2}', "[" * 10 + "]" * 10, "true", "null", '"s"', "-0", "0.0e0",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_strict_loads_matches_reference_on_edge_cases(text: str | bytes | bytearray) -> None:
    assert _outcome(strict.loads, text) == _outcome(_reference, text)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json_values, st.sampled_from(["str", "bytes"]), st.booleans())
def test_strict_loads_matches_reference(value: Any, kind: str, duplicate: bool) -> None:
    text = json.dumps(value)
    if duplicate and text.startswith("{") and len(text) > 2:  # repeat the first member
        first = json.dumps(dict([next(iter(value.items()))]))[1:-1]
        text = "{" + first + "," + text[1:]
    doc: str | bytes = text.encode() if kind == "bytes" else text
    assert _outcome(strict.loads, doc) == _outcome(_reference, doc)


_level = st.sampled_from(["a", "b", "$SYS", "$x", "", "+", "#"])


@st.composite
def _filters(draw: Any) -> str:
    levels = draw(st.lists(_level, min_size=1, max_size=4))
    text = "/".join(levels)
    try:
        return topics.validate_filter(text)
    except ValueError:
        return "/".join(lv for lv in levels if lv != "#") + "/#"


_topic = st.lists(st.sampled_from(["a", "b", "$SYS", "$x", ""]), min_size=1, max_size=5).map("/".join)


@settings(max_examples=500, deadline=None)
@given(_filters(), _topic)
def test_matches_levels_matches_matches(topic_filter: str, topic: str) -> None:
    assert topics.matches_levels(topic_filter.split("/"), topic.split("/")) == topics.matches(topic_filter, topic)


def _bare_client() -> SecureClient:
    return SecureClient("mqtt://127.0.0.1:1", Key.from_seed(bytes(32)), did_auth=False)


def _reference_route(client: SecureClient, topic: str) -> list[Any]:
    return [sub for f, group in client._subs.items() if topics.matches(f, topic)
            for sub in group]


@settings(max_examples=300, deadline=None)
@given(st.lists(_filters(), min_size=0, max_size=6), st.lists(_topic, min_size=1, max_size=6),
       st.data())
def test_routing_matches_every_filter_in_subscription_order(filters: list[str], topic_list: list[str],
                                                            data: st.DataObject) -> None:
    client = _bare_client()
    subs: dict[str, list[Any]] = client._subs
    for i, f in enumerate(filters + [t for t in topic_list if data.draw(st.booleans())]):
        subs.setdefault(f, []).append(("sub", i))
    client._index_filters()
    for topic in topic_list:
        assert client._matching(topic) == _reference_route(client, topic)
    if subs:  # a filter gone and back moves to the end of the order
        gone = next(iter(subs))
        group = subs.pop(gone)
        client._index_filters()
        subs[gone] = group
        client._index_filters()
        for topic in topic_list:
            assert client._matching(topic) == _reference_route(client, topic)


def test_routing_exact_and_wildcard_keep_subscription_order() -> None:
    client = _bare_client()
    table: dict[str, list[Any]] = client._subs
    table.update({"x/+": [1], "x/y": [2], "#": [3]})
    client._index_filters()
    route: Any = client._matching
    assert route("x/y") == [1, 2, 3]
    assert route("$SYS/y") == []
    assert route("x/z") == [1, 3]
