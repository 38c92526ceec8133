"""RFC 8785 JSON canonicalization: published vectors and properties."""

from __future__ import annotations

import json
import math
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdk.identity.hazmat.jcs import canonicalize, canonicalize_str, format_number
from tests.fixtures.identity import load_vectors

RFC = load_vectors("rfc8785")


def _double(hex_bits: str) -> float:
    return struct.unpack(">d", bytes.fromhex(hex_bits))[0]


@pytest.mark.parametrize("case", RFC["numbers"], ids=lambda c: c["ieee754"])
def test_rfc8785_number_vectors(case: dict) -> None:
    assert format_number(_double(case["ieee754"])) == case["expected"]


@pytest.mark.parametrize("bits", RFC["invalid_numbers"])
def test_nan_and_infinity_rejected(bits: str) -> None:
    with pytest.raises(ValueError):
        canonicalize([_double(bits)])


@pytest.mark.parametrize("case", RFC["documents"], ids=lambda c: c["name"])
def test_rfc8785_document_vectors(case: dict) -> None:
    assert canonicalize_str(json.loads(case["input"])) == case["expected"]
    assert canonicalize(json.loads(case["input"])) == case["expected"].encode("utf-8")


def test_utf16_key_order_differs_from_code_point_order() -> None:
    # U+1F600 (surrogates D83D DE00) sorts before U+FB33 in UTF-16, after it by code point.
    assert canonicalize_str({"\ufb33": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufb33":1}'


@pytest.mark.parametrize(
    "bad",
    [{1: "int key"}, {None: 1}, {"a": {2.5: 1}}, {"s": "\ud800"}, {"\udfff": 1}, [float("nan")],
     {"x": object()}, {"b": b"bytes"}, [2**1100]],
)
def test_invalid_values_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        canonicalize(bad)


def test_integers_and_float_forms() -> None:
    # Integers beyond 2**53 are doubles in JCS: 2**60 prints as ECMAScript does.
    assert canonicalize_str([1.0, -0.0, 1e16, 1e-7, 123, 2**53, 2**60, True, False, None]) == (
        "[1,0,10000000000000000,1e-7,123,9007199254740992,1152921504606847000,true,false,null]"
    )


def test_string_escaping_matches_ecmascript() -> None:
    s = "".join(chr(c) for c in range(0x20)) + '"\\/\x7f\u2028é'
    expected = ('"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r'
                '\\u000e\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018'
                '\\u0019\\u001a\\u001b\\u001c\\u001d\\u001e\\u001f\\"\\\\/\x7f\u2028é"')
    assert canonicalize_str(s) == expected
    assert canonicalize_str({"k": s, "f": 0.5}) == '{"f":0.5,"k":' + expected + "}"  # slow path too


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=25,
)


def _no_lone_surrogates(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shuffled(value: object, rnd: random.Random) -> object:
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(json_values, st.integers(0, 2**32))
def test_stable_under_key_reordering(value: object, seed: int) -> None:
    if not _no_lone_surrogates(value):
        with pytest.raises(ValueError):
            canonicalize(value)
        return
    assert canonicalize(_shuffled(value, random.Random(seed))) == canonicalize(value)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_parse_serialize_idempotent(value: object) -> None:
    if not _no_lone_surrogates(value):
        return
    once = canonicalize(value)
    assert canonicalize(json.loads(once)) == once


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_round_trip(x: float) -> None:
    text = format_number(x)
    assert float(text) == x or (x == 0 and float(text) == 0)
    assert "e" not in text or ("e+" in text or "e-" in text)
    if text.find("e") == -1 and 1e-6 <= abs(x) < 1e21 and "." not in text:
        assert float(text).is_integer()
    assert not math.isnan(float(text))


def test_slow_path_equals_fast_path() -> None:
    # The same document with an int vs an equal float takes the two encoder paths.
    doc = {"b": [1, "two", {"z": None, "a": True}], "a": "é\n"}
    fast = canonicalize({**doc, "n": 3})
    slow = canonicalize({**doc, "n": 3.0})
    assert fast == slow
