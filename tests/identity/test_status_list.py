"""Bitstring Status List: encoding, round trip, revocation/suspension during verification."""

from __future__ import annotations

import base64
import gzip

import pytest

from sdk.identity import (
    Key,
    Revoked,
    StatusChecker,
    StatusList,
    StatusUnavailable,
    TrustPolicy,
    create_presentation,
    create_status_list_credential,
    status_entry,
    verify_credential,
    verify_presentation,
)
from sdk.identity.errors import MalformedError
from sdk.identity.status_list import MIN_ENTRIES
from tests.fixtures.identity import NOW, STATUS_URL, StatusRegistry

ANY = TrustPolicy.ANY


def test_bitstring_round_trip_and_bit_order() -> None:
    bits = StatusList()
    assert len(bits) == MIN_ENTRIES == 131072
    for i in (0, 7, 8, 94567, MIN_ENTRIES - 1):
        bits.set(i)
    bits.set(8, False)
    encoded = bits.encode()
    assert encoded.startswith("u") and "=" not in encoded
    raw = gzip.decompress(base64.urlsafe_b64decode(encoded[1:] + "=="))
    assert len(raw) == 16384 and raw[0] == 0b1000_0001 and raw[1] == 0  # index 0 = left-most bit
    decoded = StatusList.decode(encoded)
    assert [i for i in (0, 7, 8, 9, 94567, MIN_ENTRIES - 1) if decoded[i]] == [0, 7, 94567, MIN_ENTRIES - 1]
    decoded.clear(0)
    assert not decoded.get(0)
    with pytest.raises(IndexError):
        decoded.get(MIN_ENTRIES)
    with pytest.raises(ValueError):
        StatusList(12)


@pytest.mark.parametrize("bad", ["", "u!!!", "u" + base64.urlsafe_b64encode(b"not gzip").decode(), 5])
def test_bad_encoded_list(bad: object) -> None:
    with pytest.raises(MalformedError):
        StatusList.decode(bad)  # type: ignore[arg-type]


def test_entry_shape() -> None:
    entry = status_entry(STATUS_URL, 94567, purpose="suspension")
    assert entry == {"id": f"{STATUS_URL}#94567", "type": "BitstringStatusListEntry", "statusPurpose": "suspension",
                     "statusListIndex": "94567", "statusListCredential": STATUS_URL}
    with pytest.raises(ValueError):
        status_entry(STATUS_URL, 1, purpose="other")


@pytest.mark.parametrize("proof_format", ["eddsa-jcs-2022", "jwt"])
def test_revocation_round_trip(make_credential, status_registry: StatusRegistry, proof_format: str) -> None:
    cred = make_credential(proof_format=proof_format, status=status_registry.entry(42))
    checker = status_registry.checker()
    assert verify_credential(cred, now=NOW, status=checker, trust=ANY).verified
    status_registry.bits.set(42)
    status_registry.publish()
    assert verify_credential(cred, now=NOW, status=checker, trust=ANY).verified  # cached list (ttl)
    checker.invalidate(STATUS_URL)
    revoked = verify_credential(cred, now=NOW, status=checker, trust=ANY)
    assert revoked.errors == ["revoked"]
    with pytest.raises(Revoked):
        revoked.raise_for_errors()
    status_registry.bits.clear(42)
    checker.update(STATUS_URL, create_status_list_credential(status_registry.key, STATUS_URL,
                                                             status_list=status_registry.bits))
    assert verify_credential(cred, now=NOW, status=checker, trust=ANY).verified


def test_status_list_is_fetched_once_and_cached(make_credential, status_registry: StatusRegistry) -> None:
    clock = [0.0]
    checker = status_registry.checker(ttl=60, clock=lambda: clock[0])
    creds = [make_credential(status=status_registry.entry(i)) for i in range(3)]
    for c in creds:
        assert verify_credential(c, now=NOW, status=checker, trust=ANY).verified
    assert status_registry.fetches == 1
    clock[0] = 61.0
    assert verify_credential(creds[0], now=NOW, status=checker, trust=ANY).verified
    assert status_registry.fetches == 2


def test_suspension(make_credential, issuer_key: Key) -> None:
    registry = StatusRegistry(issuer_key, url="https://issuer.example/status/susp", purpose="suspension")
    registry.bits.set(5)
    registry.publish()
    cred = make_credential(status=registry.entry(5))
    assert verify_credential(cred, now=NOW, status=registry.fetch, trust=ANY).errors == ["suspended"]
    ok = make_credential(status=registry.entry(6))
    assert verify_credential(ok, now=NOW, status=registry.published, trust=ANY).verified  # a dict works as a source


def test_status_unavailable_cases(make_credential, status_registry: StatusRegistry, other_key: Key) -> None:
    cred = make_credential(status=status_registry.entry(1))
    assert verify_credential(cred, now=NOW, trust=ANY).errors == ["status_unavailable"]  # no source given
    assert verify_credential(cred, now=NOW, check_status=False, trust=ANY).verified
    assert verify_credential(cred, now=NOW, status=lambda url: None, trust=ANY).errors == ["status_unavailable"]

    def broken(url: str) -> dict:
        raise OSError("network down")

    assert verify_credential(cred, now=NOW, status=broken, trust=ANY).errors == ["status_unavailable"]
    # a list signed by someone else than the credential's issuer
    forged = StatusRegistry(other_key)
    assert verify_credential(cred, now=NOW, status=forged.fetch, trust=ANY).errors == ["status_unavailable"]
    # a tampered list (bit cleared without re-signing) does not verify
    status_registry.bits.set(1)
    status_registry.publish()
    tampered = dict(status_registry.published[STATUS_URL])
    tampered["credentialSubject"] = {**tampered["credentialSubject"], "encodedList": StatusList().encode()}
    assert verify_credential(cred, now=NOW, status={STATUS_URL: tampered}, trust=ANY).errors == ["status_unavailable"]
    with pytest.raises(StatusUnavailable):
        verify_credential(cred, now=NOW, status={STATUS_URL: tampered}, trust=ANY).raise_for_errors()
    # purpose mismatch between entry and list
    wrong = make_credential(status=status_entry(STATUS_URL, 1, purpose="suspension"))
    assert verify_credential(wrong, now=NOW, status=status_registry.fetch, trust=ANY).errors == ["status_unavailable"]


def test_malformed_status_entry(make_credential, status_registry: StatusRegistry) -> None:
    for entry in ({**status_registry.entry(1), "statusListIndex": "one"},
                  {**status_registry.entry(1), "type": "StatusList2021Entry"},
                  {**status_registry.entry(1), "statusListIndex": str(MIN_ENTRIES + 5)}):
        cred = make_credential(status=entry)
        assert verify_credential(cred, now=NOW, status=status_registry.fetch, trust=ANY).errors == ["malformed"]


def test_presentation_with_revoked_credential(make_credential, holder_key: Key,
                                              status_registry: StatusRegistry) -> None:
    status_registry.bits.set(3)
    status_registry.publish()
    creds = [make_credential(status=status_registry.entry(2)),
             make_credential(proof_format="jwt", status=status_registry.entry(3))]
    vp = create_presentation(creds, holder_key, challenge="c", created="2026-06-01T12:00:00Z")
    checker = StatusChecker(status_registry.fetch)
    result = verify_presentation(vp, challenge="c", now=NOW, status=checker, trust=ANY)
    assert result.errors == ["revoked"]
    assert [c.verified for c in result.credentials] == [True, False]


def test_short_lists_are_allowed_with_a_warning(make_credential, issuer_key: Key, caplog) -> None:
    small = StatusList(1024)
    small.set(9)
    with caplog.at_level("WARNING", logger="sdk.identity.status_list"):
        signed = create_status_list_credential(issuer_key, STATUS_URL, status_list=small, now=NOW)
    assert "below the spec" in caplog.text
    revoked = make_credential(status=status_entry(STATUS_URL, 9))
    assert verify_credential(revoked, now=NOW, status={STATUS_URL: signed}, trust=ANY).errors == ["revoked"]


def test_status_list_credential_shape(issuer_key: Key) -> None:
    cred = create_status_list_credential(issuer_key, STATUS_URL, now=NOW)
    assert cred["type"] == ["VerifiableCredential", "BitstringStatusListCredential"]
    assert cred["credentialSubject"]["type"] == "BitstringStatusList"
    assert cred["credentialSubject"]["statusPurpose"] == "revocation"
    assert verify_credential(cred, now=NOW, trust=ANY).verified
