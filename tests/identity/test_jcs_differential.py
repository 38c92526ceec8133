"""JCS: byte-identical to a plain RFC 8785 encoder on random documents and on every escape."""

from __future__ import annotations

import random
from typing import Any

import pytest

from sdk.identity import Key, create_presentation, issue_credential
from sdk.identity.hazmat.jcs import _plain, canonicalize, format_number

# -- the reference: one value at a time, in Python (numbers by the vector-tested format_number) --


def _es_quote(s: str) -> str:
    """ECMAScript JSON.stringify of a string, written out from RFC 8785 §3.2.2.2."""
    out = ['"']
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    for ch in s:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValueError("lone surrogate")
        if ch in short:
            out.append(short[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def ref_canonicalize(value: Any) -> bytes:
    def enc(v: Any) -> str:
        if isinstance(v, str):
            return _es_quote(v)
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise ValueError("non-string key")
            keys = sorted(v, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
            return "{" + ",".join(_es_quote(k) + ":" + enc(v[k]) for k in keys) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(enc(x) for x in v) + "]"
        if v is True:
            return "true"
        if v is False:
            return "false"
        if v is None:
            return "null"
        if isinstance(v, (int, float)):
            return format_number(v)
        raise ValueError(f"not JSON: {type(v).__name__}")

    return enc(value).encode("utf-8")


def _outcome(fn, value) -> tuple[str, bytes | None]:
    try:
        return "ok", fn(value)
    except ValueError:
        return "ValueError", None


# -- random documents ------------------------------------------------------------------------------

_CHARS = (
    [chr(c) for c in range(0x80)]
    + ["é", "ß", "€", "\u2028", "\u2029", "\ufeff", "\ue000", "\uffff", "😀", "\U0001f600", "\U00010000", "𝄞"]
)


def _string(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz:/#-_") for _ in range(rng.randint(0, 12)))
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, 8)))


def _number(rng: random.Random) -> int | float:
    return rng.choice([
        rng.randint(-1000, 1000), 2**53, -(2**53), 2**53 + 1, 10**21, 10**30,
        rng.uniform(-1e6, 1e6), rng.random() * 1e-7, 1e21, 1e-7, 0.0, -0.0, 100.0, 5e-324,
    ])


def _value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        return rng.choice([_string(rng), _string(rng), True, False, None, rng.randint(-(10**6), 10**6)])
    if roll < 0.45:
        return _number(rng)
    if roll < 0.72:
        return {_string(rng): _value(rng, depth + 1) for _ in range(rng.randint(0, 6))}
    items = [_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return tuple(items) if rng.random() < 0.1 else items


def test_random_documents_match_the_reference() -> None:
    rng = random.Random(8785)
    plain = 0
    for _ in range(4000):
        doc = _value(rng, 0)
        expected = ref_canonicalize(doc)
        assert canonicalize(doc) == expected, doc
        plain += _plain(doc)
    assert plain > 100  # the C-encoder fast path was exercised, not only the slow one


def test_key_order_is_utf16_not_code_point() -> None:
    doc = {"\ue000": 1, "😀": 2, "a": 3, "\uffff": 4, "€": 5}
    assert canonicalize(doc) == ref_canonicalize(doc)
    assert canonicalize(doc).decode().index("😀") < canonicalize(doc).decode().index("\ue000")


@pytest.mark.parametrize("code", range(0x80))
def test_every_ascii_character_escapes_as_ecmascript(code: int) -> None:
    s = chr(code)
    expected = ref_canonicalize([s, {s: s}])
    assert canonicalize([s, {s: s}]) == expected           # fast path (C encoder)
    assert canonicalize([s, {s: s}, 0.5]) == expected[:-1] + b",0.5]"  # slow path


@pytest.mark.parametrize("s", ["é", "\u2028", "\u2029", "\ufeff", "\U0001f600", "\x7f\x00\x1f", 'a"b\\c'])
def test_non_ascii_strings_are_kept_as_utf8(s: str) -> None:
    doc = {s: [s, 1.5], "k": s}
    assert canonicalize(doc) == ref_canonicalize(doc)
    assert canonicalize({"k": s}) == ref_canonicalize({"k": s})


@pytest.mark.parametrize(
    "bad",
    [
        "\ud800", ["a", "\udfff"], {"\ud83d": 1}, {"k": "\ud83d", "f": 1.5}, {1: "a"}, {None: 1},
        {True: 1}, [float("nan")], {"x": float("inf")}, [b"bytes"], [{1, 2}], {"k": object()},
    ],
    ids=repr,
)
def test_invalid_values_raise_value_error_like_the_reference(bad: Any) -> None:
    assert _outcome(canonicalize, bad) == _outcome(ref_canonicalize, bad) == ("ValueError", None)


def test_subclasses_and_circular_values() -> None:
    class D(dict):
        pass

    class S(str):
        pass

    doc = D(b=[S("x"), 1], a=True)
    assert canonicalize(doc) == ref_canonicalize(doc) == b'{"a":true,"b":["x",1]}'
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError):
        canonicalize(loop)


def test_a_real_presentation_matches_the_reference() -> None:
    issuer, holder = Key.generate(), Key.generate()
    credential = issue_credential(
        {"@context": ["https://www.w3.org/ns/credentials/v2"], "type": ["VerifiableCredential"],
         "issuer": issuer.did, "credentialSubject": {"id": holder.did, "name": "Zoë ☃ 😀", "n": 3}},
        issuer,
    )
    vp = create_presentation([credential], holder, challenge="c\n1", domain="mesh.local")
    assert canonicalize(vp) == ref_canonicalize(vp)
