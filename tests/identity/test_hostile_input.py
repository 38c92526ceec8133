"""Hostile input: wrong field types, oversized encodings, small-order keys, non-canonical or
duplicate-member encodings. Every one gets a typed error or a result with a reason, cheaply."""

from __future__ import annotations

import base64
import copy
import json
import os
import random
import stat
import time
from collections.abc import Callable
from typing import Any

import nacl.bindings
import pytest

from sdk.identity import (
    DidKeyResolver,
    InvalidKey,
    Key,
    KeystoreError,
    PublicKey,
    ResolutionError,
    TrustPolicy,
    create_presentation,
    load_credential,
    public_key_from_did_key,
    verify_credential,
    verify_presentation,
)
from sdk.identity.errors import ERRORS_BY_REASON, MalformedError
from sdk.identity.files import CredentialFileError
from sdk.identity.hazmat.b64 import b64url_encode
from sdk.identity.hazmat.data_integrity import DataIntegrityProof
from sdk.identity.hazmat.ed25519 import is_small_order
from sdk.identity.hazmat.multibase import b58decode, multibase_decode
from sdk.identity.keystore import KdfParams, Keystore
from sdk.identity.status_list import StatusList
from tests.fixtures.identity import NOW, StatusRegistry, unsigned_credential

ANY = TrustPolicy.ANY
HOSTILE_LEN = 180_000


def _reasons_ok(result: Any) -> None:
    assert not result.verified
    assert result.errors and all(e in ERRORS_BY_REASON for e in result.errors), result.errors


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return mutate


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


# (id, mutation, re-sign after mutating?) -- re-signed ones get past the signature to the later checks
CREDENTIAL_CASES = [
    ("proof.created list", _set(("proof", "created"), ["2024"]), False),
    ("proof.created dict", _set(("proof", "created"), {"a": 1}), False),
    ("proof.created number", _set(("proof", "created"), 5), False),
    ("proof.type list", _set(("proof", "type"), ["DataIntegrityProof"]), False),
    ("proof.type dict", _set(("proof", "type"), {}), False),
    ("proof list of junk", _set(("proof",), [5, "x"]), False),
    ("proof string", _set(("proof",), "z3"), False),
    ("proofValue number", _set(("proof", "proofValue"), 5), False),
    ("proofValue huge", _set(("proof", "proofValue"), "z" + "2" * HOSTILE_LEN), False),
    ("verificationMethod list", _set(("proof", "verificationMethod"), ["did:key:z"]), False),
    (
        "verificationMethod huge",
        _set(("proof", "verificationMethod"), "did:key:z" + "6" * HOSTILE_LEN),
        False,
    ),
    ("proofPurpose list", _set(("proof", "proofPurpose"), ["assertionMethod"]), False),
    ("cryptosuite list", _set(("proof", "cryptosuite"), ["eddsa-jcs-2022"]), False),
    ("type number", _set(("type",), 5), True),
    ("type dict", _set(("type",), {"VerifiableCredential": 1}), True),
    ("type list of numbers", _set(("type",), [5, None]), True),
    ("issuer number", _set(("issuer",), 5), False),
    ("issuer list", _set(("issuer",), ["did:key:z"]), False),
    ("issuer object id number", _set(("issuer",), {"id": 5}), False),
    ("credentialSubject string", _set(("credentialSubject",), "did:key:z"), True),
    ("credentialSubject number", _set(("credentialSubject",), 5), True),
    ("credentialSubject list of strings", _set(("credentialSubject",), ["x"]), True),
    ("credentialSubject.id number", _set(("credentialSubject", "id"), 5), True),
    ("validFrom list", _set(("validFrom",), ["2024-01-01T00:00:00Z"]), True),
    ("validFrom number", _set(("validFrom",), 1700000000), True),
    ("validFrom huge", _set(("validFrom",), "2024-01-01T" + "0" * HOSTILE_LEN), True),
    ("validFrom out of range", _set(("validFrom",), "0001-01-01T00:00:00+05:00"), True),
    ("validUntil dict", _set(("validUntil",), {"t": 1}), True),
    ("@context number", _set(("@context",), 5), False),
    ("@context list of lists", _set(("@context",), [["https://www.w3.org/ns/credentials/v2"]]), False),
    ("credentialStatus string", _set(("credentialStatus",), "revoked?"), True),
    ("credentialStatus list of numbers", _set(("credentialStatus",), [1, 2]), True),
    (
        "statusListIndex infinity-like",
        _set(
            ("credentialStatus",),
            {
                "type": "BitstringStatusListEntry",
                "statusPurpose": "revocation",
                "statusListCredential": "https://issuer.example/status/1",
                "statusListIndex": 1e308,
            },
        ),
        True,
    ),
    (
        "statusListIndex huge digits",
        _set(
            ("credentialStatus",),
            {
                "type": "BitstringStatusListEntry",
                "statusPurpose": "revocation",
                "statusListCredential": "https://issuer.example/status/1",
                "statusListIndex": "9" * 5000,
            },
        ),
        True,
    ),
    (
        "statusPurpose list",
        _set(
            ("credentialStatus",),
            {
                "type": "BitstringStatusListEntry",
                "statusPurpose": ["revocation"],
                "statusListCredential": "https://issuer.example/status/1",
                "statusListIndex": "1",
            },
        ),
        True,
    ),
    (
        "statusListCredential dict",
        _set(
            ("credentialStatus",),
            {
                "type": "BitstringStatusListEntry",
                "statusPurpose": "revocation",
                "statusListCredential": {"url": 1},
                "statusListIndex": "1",
            },
        ),
        True,
    ),
    ("deeply nested subject", _set(("credentialSubject", "deep"), _deep(5000)), False),
]


@pytest.mark.parametrize(
    "mutate,resign", [c[1:] for c in CREDENTIAL_CASES], ids=[c[0] for c in CREDENTIAL_CASES]
)
def test_hostile_credential_fields_give_a_reason_not_an_exception(
    issuer_key: Key, holder_key: Key, mutate, resign: bool
) -> None:
    cred = unsigned_credential(holder_key.did)
    cred["issuer"] = issuer_key.did
    signed = DataIntegrityProof.sign(cred, issuer_key, created="2024-01-01T00:00:00Z")
    doc = copy.deepcopy(signed)
    mutate(doc)
    if resign:
        doc = DataIntegrityProof.sign(
            {k: v for k, v in doc.items() if k != "proof"}, issuer_key, created="2024-01-01T00:00:00Z"
        )
    status = StatusRegistry(issuer_key).published
    result = verify_credential(doc, now=NOW, trust=ANY, status=status)
    _reasons_ok(result)
    trusted = TrustPolicy({issuer_key.did: {"DeviceCredential"}})
    _reasons_ok(verify_credential(doc, now=NOW, trust=trusted, status=status))
    # the same credential inside a holder-signed presentation
    try:
        vp = DataIntegrityProof.sign(
            {
                "@context": [cred["@context"][0]],
                "type": ["VerifiablePresentation"],
                "holder": holder_key.did,
                "verifiableCredential": [doc],
            },
            holder_key,
            proof_purpose="authentication",
            challenge="c",
        )
    except MalformedError:  # too deep to canonicalize, so it cannot be signed either
        return
    _reasons_ok(verify_presentation(vp, challenge="c", now=NOW, trust=ANY, status=status))


@pytest.mark.parametrize("bad", [None, 5, 1.5, [], ["x"], "", "a.b", "a.b.c", "x" * HOSTILE_LEN, b"{}"])
def test_hostile_credential_values(bad: Any) -> None:
    _reasons_ok(verify_credential(bad, trust=ANY))
    _reasons_ok(verify_presentation(bad, challenge="c", trust=ANY))


VP_CASES = [
    ("type number", {"type": 5}),
    ("type dict", {"type": {"VerifiablePresentation": 1}}),
    ("type list of numbers", {"type": [5]}),
    ("holder number", {"holder": 5}),
    ("holder object id list", {"holder": {"id": ["did:key:z"]}}),
    ("verifiableCredential number", {"verifiableCredential": 5}),
    ("verifiableCredential list of junk", {"verifiableCredential": [5, None, "x.y.z", []]}),
    ("enveloped junk", {"verifiableCredential": [{"type": "EnvelopedVerifiableCredential", "id": 5}]}),
    ("@context dict", {"@context": {"x": 1}}),
]


@pytest.mark.parametrize("extra", [c[1] for c in VP_CASES], ids=[c[0] for c in VP_CASES])
def test_hostile_presentation_fields(holder_key: Key, extra: dict[str, Any]) -> None:
    vp = {
        "@context": ["https://www.w3.org/ns/credentials/v2"],
        "type": ["VerifiablePresentation"],
        "holder": holder_key.did,
        **extra,
    }
    signed = DataIntegrityProof.sign(
        vp,
        holder_key,
        proof_purpose="authentication",
        challenge="c",
        verification_method=holder_key.verification_method,
    )
    _reasons_ok(verify_presentation(signed, challenge="c", now=NOW, trust=ANY))
    mangled = copy.deepcopy(signed)
    mangled["proof"]["challenge"] = ["c"]
    mangled["proof"]["domain"] = {"d": 1}
    _reasons_ok(verify_presentation(mangled, challenge="c", domain="d", now=NOW, trust=ANY))


def test_missing_or_wrong_trust_is_a_reason(make_credential) -> None:
    cred = make_credential()
    with pytest.raises(TypeError):
        verify_credential(cred, now=NOW)  # type: ignore[call-arg]  # trust is required
    assert verify_credential(cred, now=NOW, trust=None).errors == ["malformed"]  # type: ignore[arg-type]
    assert verify_credential(cred, now=NOW, trust={"did": ["*"]}).errors == ["malformed"]  # type: ignore[arg-type]
    assert verify_credential(cred, now=NOW, trust=ANY).verified


# -- bounded decoders -------------------------------------------------------------------------------


def _hostile_did() -> str:
    return "did:key:z" + "".join(
        random.choice("123456789ABCDEFGHJKLMNPQRSTUVWXYZabc") for _ in range(HOSTILE_LEN)
    )


@pytest.mark.parametrize(
    "decode,error",
    [
        (public_key_from_did_key, ResolutionError),
        (lambda s: public_key_from_did_key(s + "#" + s[8:]), ResolutionError),
        (lambda s: DidKeyResolver().resolve(s + "#z6Mk"), ResolutionError),
        (lambda s: PublicKey.from_multibase(s[8:]), InvalidKey),
        (lambda s: Key.from_multibase(s[8:]), InvalidKey),
        (lambda s: multibase_decode(s[8:]), ValueError),
        (lambda s: b58decode(s[9:]), ValueError),
    ],
)
def test_oversized_did_key_and_multibase_are_refused_before_decoding(decode, error) -> None:
    hostile = _hostile_did()
    start = time.perf_counter()
    with pytest.raises(error) as exc:
        decode(hostile)
    elapsed = time.perf_counter() - start
    assert "longer than" in str(exc.value)  # the length cap fired, not a decode failure
    print(f"rejected {len(hostile)}-char input in {elapsed * 1e3:.3f} ms")


def test_oversized_verification_method_in_a_credential_is_cheap(make_credential) -> None:
    doc = make_credential()
    doc["proof"]["verificationMethod"] = _hostile_did() + "#z6Mk"
    start = time.perf_counter()
    result = verify_credential(doc, now=NOW, trust=ANY)
    elapsed = time.perf_counter() - start
    assert result.errors == ["unresolvable"] and "longer than" in result.messages[0]
    print(f"credential with a {HOSTILE_LEN}-char verificationMethod rejected in {elapsed * 1e3:.3f} ms")


def test_a_real_did_key_still_decodes() -> None:
    key = Key.generate()
    assert public_key_from_did_key(key.verification_method) == key.public
    assert Key.from_multibase(key.private_key_multibase) == key


# -- small-order keys -------------------------------------------------------------------------------


def _torsion_encodings() -> set[bytes]:
    """The 8 points of order dividing 8, found independently: L * (random point), then multiples."""
    p = 2**255 - 19
    d = (-121665 * pow(121666, p - 2, p)) % p
    order = 2**252 + 27742317777372353535851937790883648493
    sqrt_m1 = pow(2, (p - 1) // 4, p)

    def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        (x1, y1), (x2, y2) = a, b
        t = d * x1 * x2 * y1 * y2 % p
        return (
            (x1 * y2 + x2 * y1) * pow(1 + t, p - 2, p) % p,
            (y1 * y2 + x1 * x2) * pow(1 - t, p - 2, p) % p,
        )

    def mul(k: int, pt: tuple[int, int]) -> tuple[int, int]:
        acc = (0, 1)
        while k:
            if k & 1:
                acc = add(acc, pt)
            pt, k = add(pt, pt), k >> 1
        return acc

    rng = random.Random(8)
    points: set[tuple[int, int]] = set()
    while len(points) < 8:
        y = rng.randrange(p)
        xx = (y * y - 1) * pow(d * y * y + 1, p - 2, p) % p
        x = pow(xx, (p + 3) // 8, p)
        if (x * x - xx) % p:
            x = x * sqrt_m1 % p
        if (x * x - xx) % p:
            continue
        t, q = mul(order, (x, y)), (0, 1)
        for _ in range(8):
            points.add(q)
            q = add(q, t)
    out = set()
    for x, y in points:
        raw = bytearray(y.to_bytes(32, "little"))
        raw[31] |= (x & 1) << 7
        out.add(bytes(raw))
    return out


SMALL_ORDER = [
    *sorted(_torsion_encodings()),
    bytes.fromhex("ed" + "ff" * 30 + "7f"),  # y = p (non-canonical 0)
    bytes.fromhex("ee" + "ff" * 30 + "7f"),  # y = p + 1 (non-canonical 1)
    bytes.fromhex("01" + "00" * 30 + "80"),  # neutral point with the x sign bit set
]


@pytest.mark.parametrize("raw", SMALL_ORDER, ids=lambda r: r.hex()[:12])
def test_small_order_public_keys_are_refused(raw: bytes) -> None:
    assert not nacl.bindings.crypto_core_ed25519_is_valid_point(raw)  # libsodium agrees
    assert is_small_order(raw)
    with pytest.raises(InvalidKey):
        PublicKey(raw)
    from sdk.identity.hazmat.multibase import ED25519_PUB, encode_key

    multibase = encode_key(ED25519_PUB, raw)
    with pytest.raises(ResolutionError):
        public_key_from_did_key(f"did:key:{multibase}")
    with pytest.raises(InvalidKey):
        PublicKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw).decode()})


def test_all_zero_key_and_real_keys() -> None:
    assert bytes(32) in SMALL_ORDER
    for _ in range(50):
        raw = Key.generate().public.raw
        assert not is_small_order(raw) and PublicKey(raw).raw == raw


# -- strict encodings -------------------------------------------------------------------------------


def test_jwk_needs_canonical_base64url() -> None:
    key = Key.generate()
    x = b64url_encode(key.public.raw).decode()
    assert PublicKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "x": x}) == key.public
    tweaked = (
        x[:-1] + chr(ord(x[-1]) + 1) if x[-1] in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxy" else x
    )
    for bad in (x + "=", x[:-1] + "+", tweaked, x + "AA", 5):
        if bad == x:
            continue
        with pytest.raises(InvalidKey):
            PublicKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "x": bad})


def test_encoded_list_needs_multibase_canonical_base64url() -> None:
    good = StatusList(64).encode()
    assert StatusList.decode(good).size == 64
    bads = [good[1:], good + "=", good[:-1] + "+", "z" + good[1:]]
    if len(good[1:]) % 4 in (2, 3):  # the last character has unused low bits: flip one
        alias = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        bads.append(good[:-1] + alias[alias.index(good[-1]) + 1])
    for bad in bads:
        with pytest.raises(MalformedError):
            StatusList.decode(bad)


def _jws(key: Key, header: bytes, payload: bytes) -> str:
    signing_input = b64url_encode(header) + b"." + b64url_encode(payload)
    sig = key.sign(signing_input)
    return (signing_input + b"." + b64url_encode(sig)).decode()


def _claims(issuer: Key, holder: Key) -> dict[str, Any]:
    return {
        "iss": issuer.did,
        "sub": holder.did,
        "nbf": 1704067200,
        "vc": {
            "@context": ["https://www.w3.org/2018/credentials/v1"],
            "type": ["VerifiableCredential", "DeviceCredential"],
            "credentialSubject": {"role": "x"},
        },
    }


def test_vc_jwt_with_duplicate_members_is_malformed(issuer_key: Key, holder_key: Key) -> None:
    header = json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": issuer_key.verification_method}).encode()
    payload = json.dumps(_claims(issuer_key, holder_key)).encode()
    assert verify_credential(_jws(issuer_key, header, payload), now=NOW, trust=ANY).verified
    # a second "sub" member: one signature, two readings (first vs last wins) -- refused
    dup = payload[:-1] + b', "sub": "' + issuer_key.did.encode() + b'"}'
    assert verify_credential(_jws(issuer_key, header, dup), now=NOW, trust=ANY).errors == ["malformed"]
    dup_header = header[:-1] + b', "kid": "' + holder_key.verification_method.encode() + b'"}'
    assert verify_credential(_jws(issuer_key, dup_header, payload), now=NOW, trust=ANY).errors == [
        "malformed"
    ]
    nan = payload[:-1] + b', "x": NaN}'
    assert verify_credential(_jws(issuer_key, header, nan), now=NOW, trust=ANY).errors == ["malformed"]


def test_vc_jwt_with_non_canonical_base64url_is_malformed(issuer_key: Key, holder_key: Key) -> None:
    header = json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": issuer_key.verification_method}).encode()
    token = _jws(issuer_key, header, json.dumps(_claims(issuer_key, holder_key)).encode())
    head, body, sig = token.split(".")
    assert verify_credential(token, now=NOW, trust=ANY).verified
    last = sig[-1]
    alias = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = alias[alias.index(last) + 1]  # same decoded bytes, other unused low bits
    assert base64.urlsafe_b64decode(sig[:-1] + sibling + "==") == base64.urlsafe_b64decode(sig + "==")
    for bad in (f"{head}.{body}.{sig[:-1]}{sibling}", f"{head}.{body}.{sig}=", f"{head}=.{body}.{sig}"):
        assert verify_credential(bad, now=NOW, trust=ANY).errors == ["malformed"], bad


def test_load_credential_strict(tmp_path, make_credential) -> None:
    cred = make_credential()
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cred))
    assert load_credential(path) == cred
    jwt = make_credential(proof_format="jwt")
    (tmp_path / "c.jwt").write_text(jwt + "\n")
    assert load_credential(tmp_path / "c.jwt") == jwt
    (tmp_path / "q.jwt").write_text(json.dumps(jwt))
    assert load_credential(tmp_path / "q.jwt") == jwt
    (tmp_path / "dup.json").write_text('{"a": 1, "a": 2}')
    (tmp_path / "deep.json").write_text("{" + '"a":[' * 5000 + "]" * 5000 + "}")
    (tmp_path / "junk.txt").write_text("hello world")
    for name in ("dup.json", "deep.json", "junk.txt"):
        with pytest.raises(CredentialFileError) as exc:
            load_credential(tmp_path / name)
        assert exc.value.reason == "malformed"
    with pytest.raises(CredentialFileError) as exc:
        load_credential(tmp_path / "missing.json")
    assert exc.value.reason == "credential_not_found"


# -- keystore ---------------------------------------------------------------------------------------

FAST = KdfParams(1, 8192)


def test_keystore_deeply_nested_json_is_a_typed_error(tmp_path) -> None:
    path = tmp_path / "ks.json"
    path.write_text(
        '{"format": "autoglm-keystore", "version": 1, "kdf": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    os.chmod(path, 0o600)
    for read in (lambda: Keystore.open(path, "pw"), lambda: Keystore.peek(path)):
        with pytest.raises(KeystoreError) as exc:
            read()
        assert exc.value.reason == "corrupt_keystore"


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640, 0o660])
def test_keystore_readable_by_others_is_refused(tmp_path, mode: int) -> None:
    path = tmp_path / "ks.json"
    key = Key.generate()
    Keystore.create(path, "pw", key, kdf=FAST)
    os.chmod(path, mode)
    with pytest.raises(KeystoreError) as exc:
        Keystore.open(path, "pw")
    assert exc.value.reason == "insecure_permissions"
    assert "chmod 600" in str(exc.value) and str(path) in str(exc.value)
    from sdk.identity import load_key

    with pytest.raises(KeystoreError):
        load_key(path, passphrase="pw")
    assert Keystore.peek(path) == {"default": key.did}  # the public part stays readable
    os.chmod(path, 0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and Keystore.open(path, "pw").key == key


def test_presentations_still_verify(make_credential, holder_key: Key, issuer_key: Key) -> None:
    vp = create_presentation([make_credential()], holder_key, challenge="c", created="2026-06-01T12:00:00Z")
    trust = TrustPolicy({issuer_key.did: {"DeviceCredential"}})
    assert verify_presentation(vp, challenge="c", now=NOW, trust=trust).verified
