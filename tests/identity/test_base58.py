"""base58btc: the table-driven encoder/decoder against the plain digit-by-digit reference."""

from __future__ import annotations

import random

import pytest

from sdk.identity.hazmat.multibase import (
    ED25519_PUB,
    KEY_B58_CHARS,
    MAX_B58_CHARS,
    b58_length_bound,
    b58decode,
    b58encode,
    decode_key,
    is_canonical_b58,
    multibase_decode,
)
from tests.fixtures.identity import load_vectors

# -- the reference: the straightforward implementation the fast one replaced ---------------------

_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}


def ref_b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, r = divmod(n, 58)
        out.append(_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return (b"1" * pad + bytes(reversed(out))).decode("ascii")


def ref_b58decode(text: str | bytes, *, max_len: int = MAX_B58_CHARS) -> bytes:
    if not isinstance(text, (str, bytes)):
        raise ValueError(f"base58 must be str or bytes, not {type(text).__name__}")
    if len(text) > max_len:
        raise ValueError(f"base58 text longer than {max_len} characters")
    try:
        raw = text.encode("ascii", "strict") if isinstance(text, str) else text
    except UnicodeEncodeError:
        raise ValueError("non-ASCII base58") from None
    n = 0
    for c in raw:
        try:
            n = n * 58 + _INDEX[c]
        except KeyError:
            raise ValueError(f"invalid base58 character {chr(c)!r}") from None
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(raw) - len(raw.lstrip(b"1"))
    return b"\0" * pad + body


def _outcome(fn, *args, **kwargs) -> tuple[str, object]:
    try:
        return "ok", fn(*args, **kwargs)
    except ValueError as exc:
        return "ValueError", str(exc)


# -- identical results ---------------------------------------------------------------------------


def _random_bytes(rng: random.Random) -> bytes:
    zeros = rng.choice((0, 0, 1, 2, 5))
    return b"\0" * zeros + rng.randbytes(rng.randint(0, 100))


def test_encode_and_decode_match_the_reference_on_random_bytes() -> None:
    rng = random.Random(58)
    for _ in range(3000):
        data = _random_bytes(rng)
        text = b58encode(data)
        assert text == ref_b58encode(data), data.hex()
        assert b58decode(text, max_len=200) == ref_b58decode(text, max_len=200) == data
        assert b58decode(text.encode("ascii"), max_len=200) == data


@pytest.mark.parametrize("data", [b"", b"\0", b"\0" * 7, b"\x01", b"\0\x01", b"\xff" * 64, b"\0\0\xff", bytes(range(100))])
def test_edge_cases_match_the_reference(data: bytes) -> None:
    assert b58encode(data) == ref_b58encode(data)
    assert b58decode(b58encode(data), max_len=200) == data


def test_decode_matches_the_reference_on_random_text() -> None:
    """Any alphabet string (leading '1's included) decodes to what the reference gives."""
    rng = random.Random(1)
    alphabet = _ALPHABET.decode()
    for _ in range(3000):
        text = "1" * rng.choice((0, 0, 1, 3)) + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 100)))
        assert b58decode(text, max_len=200) == ref_b58decode(text, max_len=200), text
        # one spelling per byte string: the decoded bytes encode back to the very same text
        assert b58encode(b58decode(text, max_len=200)) == text


@pytest.mark.parametrize(
    "text",
    ["0", "O", "I", "l", "+", "/", " ", "abc0def", "1110", "z\x00", "é", "abc\u2028", b"\x80abc", b"ab\xff", b"0",
     "\ud800", 12, None, ["a"], bytearray(b"abc")],
)
def test_bad_input_gives_the_same_typed_error_as_the_reference(text) -> None:
    got = _outcome(b58decode, text)
    assert got == _outcome(ref_b58decode, text)
    assert got[0] == "ValueError"


def test_the_length_bound_is_checked_before_the_characters() -> None:
    for max_len in (0, 5, KEY_B58_CHARS, MAX_B58_CHARS):
        hostile = "0" * (max_len + 1)  # invalid characters: only the cap may fire
        with pytest.raises(ValueError, match="longer than"):
            b58decode(hostile, max_len=max_len)
        with pytest.raises(ValueError, match="invalid base58 character"):
            b58decode("0" * max_len or "0", max_len=max(max_len, 1))
    with pytest.raises(ValueError, match="longer than"):
        multibase_decode("z" + "2" * (MAX_B58_CHARS + 1))
    with pytest.raises(ValueError, match="longer than"):
        decode_key("z" + "2" * (b58_length_bound(34) + 1), ED25519_PUB)


def test_length_bound_holds_for_every_length() -> None:
    for n in range(0, 130):
        assert len(b58encode(b"\xff" * n)) <= b58_length_bound(n)
        assert len(b58encode(b"\0" * n)) <= b58_length_bound(n)


def test_did_key_vectors_round_trip() -> None:
    (vec,) = load_vectors("eddsa_jcs_2022")
    for text in (vec["publicKeyMultibase"], vec["privateKeyMultibase"], vec["proofValue"]):
        raw = multibase_decode(text)
        assert raw == ref_b58decode(text[1:])
        assert "z" + b58encode(raw) == text
    assert multibase_decode(vec["publicKeyMultibase"]).startswith(ED25519_PUB)


# -- the canonical-form test used instead of re-encoding ----------------------------------------


def test_is_canonical_agrees_with_re_encoding() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        data = _random_bytes(rng)
        text = b58encode(data)
        assert is_canonical_b58(text, data)
        for other in ("1" + text, text.lstrip("1")):
            assert is_canonical_b58(other, data) == (b58encode(data) == other)
        decoded = b58decode(text, max_len=200)
        assert is_canonical_b58(text, decoded) == (b58encode(decoded) == text)
