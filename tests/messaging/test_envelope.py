"""Envelope wire format, encryption and every receiver check (no broker needed)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from sdk.identity import Key
from sdk.messaging import errors
from sdk.messaging.envelope import Signer, Verifier, VerifyPolicy, b64d, b64e
from sdk.messaging.replay import ReplayCache

NOW = 1767225600.0
TOPIC = "autoglm/v1/inf/req/node1"
VECTORS = json.loads((Path(__file__).parent / "vectors" / "envelope.json").read_text())


@pytest.fixture(scope="module")
def alice() -> Key:
    return Key.from_seed(bytes(range(32)))


@pytest.fixture(scope="module")
def bob() -> Key:
    return Key.from_seed(bytes(range(32, 64)))


def _verifier(key: Key | None = None, **policy: float) -> Verifier:
    return Verifier(key=key, policy=VerifyPolicy(**policy) if policy else VerifyPolicy())


@pytest.mark.parametrize("vec", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vectors_reproduce_and_verify(vec: dict) -> None:
    sender = Key.from_seed(bytes.fromhex(vec["sender_seed_hex"]))
    kw = dict(vec["seal"])
    body = kw.pop("body")
    if "nonce_hex" in kw:
        kw["nonce"] = bytes.fromhex(kw.pop("nonce_hex"))
    _, wire = Signer(sender).seal(vec["topic"], body, **kw)
    assert wire.decode() == vec["wire"]  # deterministic: Ed25519 + fixed id/time/nonce
    recipient = Key.from_seed(bytes.fromhex(vec["recipient_seed_hex"])) if vec["recipient_seed_hex"] else None
    msg = _verifier(recipient).open(vec["topic"], vec["wire"].encode(), now=NOW + 1)
    assert msg.body == vec["expect"]["body"]
    assert msg.encrypted is vec["expect"]["encrypted"]
    assert msg.sender == sender.did and msg.kid == sender.verification_method


def test_signing_input_is_jws(alice: Key) -> None:
    _, wire = Signer(alice).seal(TOPIC, {"a": 1}, type="event", now=NOW)
    h, p, s = wire.split(b".")
    assert json.loads(b64d(h)) == {"alg": "EdDSA", "kid": alice.verification_method, "typ": "autoglm-msg+jws"}
    alice.public.verify(b64d(s), h + b"." + p)  # independent Ed25519 check of the JWS signing input
    payload = json.loads(b64d(p))
    assert payload["top"] == TOPIC and payload["iat"] == int(NOW * 1000) and payload["body"] == {"a": 1}


def test_round_trip_fields(alice: Key, bob: Key) -> None:
    _, wire = Signer(alice).seal(
        TOPIC, [1, "x"], type="t", now=NOW, ttl=5, reply_to="autoglm/v1/reply/c", correlation_id="c1", seq=3,
        credentials=[{"type": ["VerifiableCredential"]}],
    )
    m = _verifier(bob).open(TOPIC, wire, now=NOW)
    assert (m.type, m.body, m.reply_to, m.correlation_id, m.seq) == ("t", [1, "x"], "autoglm/v1/reply/c", "c1", 3)
    assert m.issued_at == NOW and m.expires_at == NOW + 5 and m.credentials == ({"type": ["VerifiableCredential"]},)


def test_encrypted_body_is_not_in_clear_and_opens_only_for_recipient(alice: Key, bob: Key) -> None:
    _, wire = Signer(alice).seal(TOPIC, {"secret": "launch codes"}, type="t", now=NOW, encrypt_to=bob.did)
    assert b"launch" not in wire and b"launch" not in b64d(wire.split(b".")[1])
    assert _verifier(bob).open(TOPIC, wire, now=NOW).body == {"secret": "launch codes"}
    with pytest.raises(errors.DecryptFailed):
        _verifier(Key.generate()).open(TOPIC, wire, now=NOW)


def test_tampered_ciphertext_is_bad_signature_and_resigned_tamper_is_decrypt_failed(alice: Key, bob: Key) -> None:
    signer = Signer(alice)
    _, wire = signer.seal(TOPIC, {"x": 1}, type="t", now=NOW, encrypt_to=bob.did)
    h, p, _s = wire.split(b".")
    payload = json.loads(b64d(p))
    ct = bytearray(b64d(payload["enc"]["ct"]))
    ct[0] ^= 1
    payload["enc"]["ct"] = b64e(bytes(ct)).decode()
    p2 = b64e(json.dumps(payload).encode())
    with pytest.raises(errors.BadSignature):
        _verifier(bob).open(TOPIC, h + b"." + p2 + b"." + _s, now=NOW)
    # the sender itself re-signing a corrupted ciphertext: signature fine, AEAD fails
    resigned = h + b"." + p2
    resigned += b"." + b64e(alice.sign(resigned))
    with pytest.raises(errors.DecryptFailed):
        _verifier(bob).open(TOPIC, resigned, now=NOW)


def test_forged_signature(alice: Key) -> None:
    _, wire = Signer(alice).seal(TOPIC, {"amount": 1}, type="t", now=NOW)
    h, p, s = wire.split(b".")
    forged = json.loads(b64d(p))
    forged["body"]["amount"] = 1000
    with pytest.raises(errors.BadSignature):
        _verifier().open(TOPIC, h + b"." + b64e(json.dumps(forged).encode()) + b"." + s, now=NOW)
    mallory = Key.generate()  # signed by someone else but claiming alice's kid
    bad = h + b"." + p
    with pytest.raises(errors.BadSignature):
        _verifier().open(TOPIC, bad + b"." + b64e(mallory.sign(bad)), now=NOW)


def test_unknown_sender() -> None:
    header = b64e(json.dumps({"alg": "EdDSA", "kid": "did:web:nowhere.example#k1", "typ": "autoglm-msg+jws"}).encode())
    payload = b64e(json.dumps({"id": "a", "typ": "t", "top": TOPIC, "iat": int(NOW * 1000)}).encode())
    wire = header + b"." + payload + b"." + b64e(b"\0" * 64)
    with pytest.raises(errors.UnknownSender):
        _verifier().open(TOPIC, wire, now=NOW)


def test_pluggable_resolver(alice: Key) -> None:
    _, wire = Signer(alice).seal(TOPIC, 1, type="t", now=NOW)
    only_bob = Verifier(resolver=lambda kid: (_ for _ in ()).throw(LookupError(kid)))
    with pytest.raises(errors.UnknownSender):
        only_bob.open(TOPIC, wire, now=NOW)
    table = Verifier(resolver={alice.verification_method: alice.public}.__getitem__)
    assert table.open(TOPIC, wire, now=NOW).body == 1


def test_replayed(alice: Key) -> None:
    _, wire = Signer(alice).seal(TOPIC, 1, type="t", now=NOW)
    v = _verifier()
    v.open(TOPIC, wire, now=NOW)
    with pytest.raises(errors.Replayed):
        v.open(TOPIC, wire, now=NOW + 1)
    with pytest.raises(errors.Replayed):  # the retain flag is no licence to replay
        v.open(TOPIC, wire, retained=True, now=NOW + 2)
    # state topics (ordered by their own version by the caller) skip the replay cache
    assert v.open(TOPIC, wire, retained=True, state=True, now=NOW + 2).retained


def test_expired_and_clock_skew(alice: Key) -> None:
    signer = Signer(alice)
    _, wire = signer.seal(TOPIC, 1, type="t", now=NOW, ttl=10)
    with pytest.raises(errors.Expired):
        _verifier().open(TOPIC, wire, now=NOW + 11)
    with pytest.raises(errors.Expired):  # expiry applies to retained messages too
        _verifier().open(TOPIC, wire, retained=True, state=True, now=NOW + 11)
    _, future = signer.seal(TOPIC, 1, type="t", now=NOW + 60)
    with pytest.raises(errors.ClockSkew):
        _verifier(clock_skew=30).open(TOPIC, future, now=NOW)
    _, old = signer.seal(TOPIC, 1, type="t", now=NOW - 400)
    with pytest.raises(errors.ClockSkew):
        _verifier(max_age=300).open(TOPIC, old, now=NOW)
    with pytest.raises(errors.ClockSkew):  # an old retained message is still old
        _verifier(max_age=300).open(TOPIC, old, retained=True, now=NOW)
    assert _verifier(max_age=300).open(TOPIC, old, retained=True, state=True, now=NOW).body == 1


@pytest.mark.parametrize("payload", [
    b'{"id":"a","id":"b","typ":"t","top":"' + TOPIC.encode() + b'","iat":1}',
    b'{"id":"a","typ":"t","top":"' + TOPIC.encode() + b'","iat":1,"body":NaN}',
    b'{"id":"a","typ":"t","top":"' + TOPIC.encode() + b'","iat":1,"body":[Infinity]}',
    b'{"id":"a","typ":"t","top":"' + TOPIC.encode() + b'","iat":1,"body":1e999}',
])
def test_duplicate_members_and_non_finite_numbers_are_malformed(alice: Key, payload: bytes) -> None:
    from sdk.messaging.envelope import b64e

    header = b64e(b'{"alg":"EdDSA","kid":"' + alice.verification_method.encode() + b'","typ":"autoglm-msg+jws"}')
    signing_input = header + b"." + b64e(payload)
    wire = signing_input + b"." + b64e(alice.sign(signing_input))
    with pytest.raises(errors.Malformed):
        _verifier().open(TOPIC, wire, now=NOW)


def test_non_canonical_base64url_is_malformed(alice: Key) -> None:
    _, wire = Signer(alice).seal(TOPIC, 1, type="t", now=NOW)
    header, payload, sig = wire.split(b".")
    # flip the unused low bits of the signature's last character: same bytes, another wire form
    last = sig[-1:]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = bytes([alphabet[alphabet.index(last) | 0b11]])
    assert twin != last
    with pytest.raises(errors.Malformed):
        _verifier().open(TOPIC, b".".join([header, payload, sig[:-1] + twin]), now=NOW)


def test_wrong_topic(alice: Key) -> None:
    _, wire = Signer(alice).seal(TOPIC, 1, type="t", now=NOW)
    with pytest.raises(errors.WrongTopic):
        _verifier().open("autoglm/v1/inf/req/node2", wire, now=NOW)


def test_too_large(alice: Key) -> None:
    signer = Signer(alice, max_bytes=1000)
    with pytest.raises(errors.TooLarge):
        signer.seal(TOPIC, "x" * 2000, type="t", now=NOW)
    _, wire = Signer(alice).seal(TOPIC, "x" * 2000, type="t", now=NOW)
    with pytest.raises(errors.TooLarge):
        _verifier(max_bytes=1000).open(TOPIC, wire, now=NOW)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"a.b", b"a.b.c.d", b"\xff\xfe.\x00.\x01", b"!!!.@@@.###",
     b64e(b'{"alg":"none","kid":"x","typ":"autoglm-msg+jws"}') + b".e30.AA",
     b64e(b"[1,2]") + b".e30.AA", b64e(b"[" * 100_000) + b".e30.AA", b64e(b"{" + b" " * 3000 + b"}") + b".e30.AA"],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(errors.Malformed):
        _verifier().open(TOPIC, data, now=NOW)


def test_malformed_payload_after_valid_signature(alice: Key) -> None:
    h = Signer(alice)._prefix  # noqa: SLF001 - build a correctly signed but ill-typed payload
    for payload in (b"[]", b'{"id":"a","typ":"t","top":"' + TOPIC.encode() + b'","iat":"now"}', b"not json"):
        si = h + b64e(payload)
        with pytest.raises(errors.Malformed):
            _verifier().open(TOPIC, si + b"." + b64e(alice.sign(si)), now=NOW)


def test_replay_cache_bounds() -> None:
    cache = ReplayCache(window=10, max_entries=3)
    for i in range(3):
        cache.check_and_add("s", str(i), issued_at=100 + i, now=100 + i)
    cache.check_and_add("s", "3", issued_at=104, now=104)  # evicts "0", floor = 100
    assert len(cache) == 3
    with pytest.raises(errors.Replayed):
        cache.check_and_add("s", "old", issued_at=100, now=104)  # cannot be proved fresh
    with pytest.raises(errors.Replayed):
        cache.check_and_add("s", "3", issued_at=104, now=105)
    cache.check_and_add("s", "late", issued_at=130, now=130)  # purge drops expired entries
    assert len(cache) == 1


def test_ids_are_unique(alice: Key) -> None:
    signer = Signer(alice)
    ids = {signer.seal(TOPIC, None, type="t")[0] for _ in range(1000)}
    assert len(ids) == 1000


def test_b64d_rejects_bad_input() -> None:
    with pytest.raises(errors.Malformed):
        b64d("é")
    with pytest.raises(errors.Malformed):
        b64d(b"abcde")
    assert b64d(base64.urlsafe_b64encode(b"xyz").rstrip(b"=")) == b"xyz"


@pytest.mark.filterwarnings("ignore::Warning:joserfc.*")
def test_interop_with_an_independent_jose_library(alice: Key) -> None:
    """joserfc verifies our envelopes, and our Verifier accepts a JWS that joserfc built."""
    from joserfc import jws
    from joserfc.jwk import OKPKey

    _, wire = Signer(alice).seal(TOPIC, {"a": 1}, type="event", now=NOW)
    obj = jws.deserialize_compact(wire.decode(), OKPKey.import_key(alice.public.to_jwk()), algorithms=["EdDSA"])
    assert obj.headers()["kid"] == alice.verification_method and json.loads(obj.payload)["body"] == {"a": 1}
    header = {"alg": "EdDSA", "kid": alice.verification_method, "typ": "autoglm-msg+jws"}
    payload = json.dumps({"id": "x1", "typ": "event", "top": TOPIC, "iat": int(NOW * 1000), "body": 5})
    token = jws.serialize_compact(header, payload, OKPKey.import_key(alice.to_jwk(private=True)), algorithms=["EdDSA"])
    assert _verifier().open(TOPIC, token.encode(), now=NOW).body == 5


def test_header_cache_is_an_lru_of_its_configured_size() -> None:
    keys = [Key.from_seed(bytes([i]) * 32) for i in range(4)]
    resolved: list[str] = []

    def resolve(kid: str) -> object:
        resolved.append(kid.partition("#")[0])
        return Key.from_seed(bytes([[k.did for k in keys].index(kid.partition("#")[0])]) * 32).public

    v = Verifier(resolver=resolve, header_cache=3)
    assert v.header_cache_size == 3

    def send(key: Key, n: int) -> None:
        _, wire = Signer(key).seal(TOPIC, n, type="t", now=NOW)
        assert v.open(TOPIC, wire, now=NOW).sender == key.did

    for i, k in enumerate(keys[:3]):
        send(k, i)
    send(keys[0], 10)                      # a hit: 0 becomes the most recently used
    assert resolved == [k.did for k in keys[:3]]
    send(keys[3], 11)                      # full: evicts 1, the least recently used (not 0, the oldest)
    assert len(v._headers) == 3
    send(keys[0], 12)
    send(keys[2], 13)
    assert resolved == [k.did for k in keys[:4]]
    send(keys[1], 14)                      # 1 was evicted: resolved again
    assert resolved[-1] == keys[1].did and len(resolved) == 5
    v.resize_header_cache(1)               # shrinking keeps the most recent
    assert len(v._headers) == 1
    send(keys[1], 15)
    assert len(resolved) == 5
    with pytest.raises(ValueError):
        Verifier(header_cache=0)


def test_replay_cache_refuses_replays_at_its_bound(alice: Key, bob: Key) -> None:
    cache = ReplayCache(window=100, max_entries=4)
    for i in range(4):
        cache.check_and_add(alice.did, f"m{i}", issued_at=100 + i, now=100 + i)
    for i in range(4):                      # full, every remembered pair is still refused
        with pytest.raises(errors.Replayed):
            cache.check_and_add(alice.did, f"m{i}", issued_at=100 + i, now=104)
    cache.check_and_add(bob.did, "m0", issued_at=104, now=104)   # same id, other sender: new; evicts m0
    assert len(cache) == 4
    with pytest.raises(errors.Replayed):    # the evicted pair is below the floor: still refused
        cache.check_and_add(alice.did, "m0", issued_at=100, now=104)
    for i in (1, 2, 3):
        with pytest.raises(errors.Replayed):
            cache.check_and_add(alice.did, f"m{i}", issued_at=100 + i, now=105)
    with pytest.raises(errors.Replayed):
        cache.check_and_add(bob.did, "m0", issued_at=104, now=105)
    # sender and id are kept apart: ("ab", "c") and ("a", "bc") are different pairs
    other = ReplayCache(window=100, max_entries=10)
    other.check_and_add("ab", "c", issued_at=100, now=100)
    other.check_and_add("a", "bc", issued_at=100, now=100)
    other.check_and_add("a", "b\ud800", issued_at=100, now=100)   # lone surrogates do not raise
    assert len(other) == 3
