"""Ordered status lists: validFrom/sequence/validUntil signed inside, a store that never goes back."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sdk.identity import (
    Key,
    StatusChecker,
    StatusList,
    StatusListExpired,
    StatusListRejected,
    StatusListStore,
    TrustPolicy,
    create_status_list_credential,
    needs_refresh,
    status_entry,
    verify_credential,
)
from tests.fixtures.identity import NOW, STATUS_URL

ANY = TrustPolicy.ANY


def _list(key: Key, *, revoked: tuple[int, ...] = (), at=NOW, **kwargs):
    bits = StatusList()
    for i in revoked:
        bits.set(i)
    return create_status_list_credential(key, STATUS_URL, status_list=bits, now=at, **kwargs)


@pytest.fixture
def trust(issuer_key: Key) -> TrustPolicy:
    return TrustPolicy({issuer_key.did: {"DeviceCredential"}})


def test_new_lists_carry_signed_order_and_expiry(issuer_key: Key) -> None:
    first = _list(issuer_key)
    second = _list(issuer_key)
    assert first["validFrom"] == "2026-06-01T12:00:00Z"
    assert first["validUntil"] == "2026-06-02T12:00:00Z"  # default ttl: 24 h
    assert second["credentialSubject"]["sequence"] > first["credentialSubject"]["sequence"]
    assert _list(issuer_key, ttl=3600)["validUntil"] == "2026-06-01T13:00:00Z"
    assert verify_credential(first, now=NOW, trust=ANY).verified
    assert verify_credential(first, now=NOW + timedelta(days=2), trust=ANY).errors == ["expired"]


def test_replayed_pre_revocation_list_is_ignored(
    make_credential, issuer_key: Key, trust: TrustPolicy
) -> None:
    cred = make_credential(status=status_entry(STATUS_URL, 42))
    store = StatusListStore(trust)
    before = _list(issuer_key)
    after = _list(issuer_key, revoked=(42,), at=NOW + timedelta(minutes=5))
    assert store.offer(before, now=NOW)
    assert verify_credential(cred, now=NOW, trust=trust, status=store).verified
    assert store.offer(after, now=NOW + timedelta(minutes=5))
    revoked = verify_credential(cred, now=NOW + timedelta(minutes=6), trust=trust, status=store)
    assert revoked.errors == ["revoked"]
    # the revoked device (or the broker) re-delivers the old list: it is refused, the store keeps the new one
    assert not store.offer(before, now=NOW + timedelta(minutes=7))
    with pytest.raises(StatusListRejected) as exc:
        store.add(before, now=NOW + timedelta(minutes=7))
    assert exc.value.problem == "stale" and exc.value.reason == "status_unavailable"
    assert store(STATUS_URL) == after
    assert verify_credential(cred, now=NOW + timedelta(minutes=8), trust=trust, status=store).errors == [
        "revoked"
    ]


def test_same_second_republish_is_ordered_by_sequence(make_credential, issuer_key: Key, trust) -> None:
    cred = make_credential(status=status_entry(STATUS_URL, 7))
    store = StatusListStore(trust)
    clear, revoked = _list(issuer_key), _list(issuer_key, revoked=(7,))
    assert clear["validFrom"] == revoked["validFrom"]
    assert store.offer(clear, now=NOW) and store.offer(revoked, now=NOW)
    assert not store.offer(clear, now=NOW)
    assert verify_credential(cred, now=NOW, trust=trust, status=store).errors == ["revoked"]


def test_newer_list_accepted_identical_is_a_no_op_and_listeners_fire_once(issuer_key: Key, trust) -> None:
    store = StatusListStore(trust)
    seen: list[str] = []
    store.add_listener(lambda url, cred: seen.append(url))
    first = _list(issuer_key)
    assert store.add(first, now=NOW) is True
    assert store.add(dict(first), now=NOW) is False  # equal and identical: nothing changes
    newer = _list(issuer_key, revoked=(1,), at=NOW + timedelta(hours=1))
    assert store.offer(newer, now=NOW + timedelta(hours=1))
    assert seen == [STATUS_URL, STATUS_URL]
    assert store.verified(STATUS_URL).bits.get(1)


def test_conflicting_list_with_the_same_order_is_refused(issuer_key: Key, trust) -> None:
    store = StatusListStore(trust)
    a = _list(issuer_key, sequence=5)
    b = _list(issuer_key, revoked=(3,), sequence=5)
    assert store.offer(a, now=NOW)
    with pytest.raises(StatusListRejected) as exc:
        store.add(b, now=NOW)
    assert exc.value.problem == "conflict"


def test_expired_list_fails_closed(make_credential, issuer_key: Key, trust) -> None:
    cred = make_credential(status=status_entry(STATUS_URL, 1))
    store = StatusListStore(trust)
    assert store.offer(_list(issuer_key, ttl=600), now=NOW)
    assert verify_credential(cred, now=NOW, trust=trust, status=store).verified
    late = NOW + timedelta(minutes=30)
    result = verify_credential(cred, now=late, trust=trust, status=store)
    assert result.errors == ["status_unavailable"] and "expired" in result.messages[0]
    with pytest.raises(StatusListExpired):
        StatusChecker(store).check(cred["credentialStatus"], issuer=issuer_key.did, now=late)
    # an expired list is not accepted either
    with pytest.raises(StatusListExpired):
        store.add(_list(issuer_key, ttl=600), now=late)
    # the same through a plain url -> credential source
    source = {STATUS_URL: _list(issuer_key, ttl=600)}
    assert verify_credential(cred, now=NOW, trust=trust, status=source).verified
    assert verify_credential(cred, now=late, trust=trust, status=source).errors == ["status_unavailable"]


def test_store_checks_proof_issuer_trust_and_order_fields(issuer_key: Key, other_key: Key, trust) -> None:
    store = StatusListStore(trust)
    with pytest.raises(StatusListRejected) as exc:
        store.add(_list(other_key), now=NOW)
    assert exc.value.problem == "untrusted"
    tampered = _list(issuer_key)
    tampered["credentialSubject"] = {
        **tampered["credentialSubject"],
        "encodedList": StatusList().encode(),
        "sequence": tampered["credentialSubject"]["sequence"] + 1,
    }
    with pytest.raises(StatusListRejected) as exc:
        store.add(tampered, now=NOW)
    assert exc.value.problem == "invalid"
    unordered = create_status_list_credential(issuer_key, STATUS_URL, now=NOW)
    del unordered["proof"]
    del unordered["validUntil"]
    from sdk.identity import issue_credential

    with pytest.raises(StatusListRejected) as exc:
        store.add(issue_credential(unordered, issuer_key), now=NOW)
    assert exc.value.problem == "unordered"
    assert not store.offer("not.a.jwt", now=NOW) and not store.offer({"junk": 1}, now=NOW)
    assert len(store) == 0
    with pytest.raises(TypeError):
        StatusListStore(None)  # type: ignore[arg-type]


def test_a_url_stays_with_its_issuer(issuer_key: Key, other_key: Key) -> None:
    store = StatusListStore(TrustPolicy.ANY)
    assert store.offer(_list(issuer_key), now=NOW)
    with pytest.raises(StatusListRejected) as exc:
        store.add(_list(other_key, at=NOW + timedelta(hours=1)), now=NOW + timedelta(hours=1))
    assert exc.value.problem == "issuer_changed"


def test_jwt_lists_are_ordered_too(make_credential, issuer_key: Key, trust) -> None:
    cred = make_credential(status=status_entry(STATUS_URL, 9))
    store = StatusListStore(trust)
    old = _list(issuer_key, proof_format="jwt")
    new = _list(issuer_key, revoked=(9,), proof_format="jwt")
    assert store.offer(old, now=NOW) and store.offer(new, now=NOW) and not store.offer(old, now=NOW)
    assert verify_credential(cred, now=NOW, trust=trust, status=store).errors == ["revoked"]


def test_refresh_before_valid_until(issuer_key: Key, trust) -> None:
    store = StatusListStore(trust)
    cred = _list(issuer_key, ttl=timedelta(hours=2))
    store.offer(cred, now=NOW)
    assert store.needs_refresh(NOW, margin=timedelta(minutes=30)) == []
    assert store.needs_refresh(NOW + timedelta(minutes=95), margin=timedelta(minutes=30)) == [STATUS_URL]
    assert store.needs_refresh(NOW + timedelta(minutes=95), issuer=issuer_key.did + "x") == []
    assert not needs_refresh(cred, now=NOW, margin=timedelta(minutes=30))
    assert needs_refresh(cred, now=NOW + timedelta(minutes=95), margin=timedelta(minutes=30))
    jwt = _list(issuer_key, ttl=timedelta(hours=2), proof_format="jwt")
    assert not needs_refresh(jwt, now=NOW) and needs_refresh(jwt, now=NOW + timedelta(hours=2))


def test_checker_on_a_plain_source_never_goes_back(make_credential, issuer_key: Key) -> None:
    cred = make_credential(status=status_entry(STATUS_URL, 4))
    revoked = _list(issuer_key, revoked=(4,))
    older = _list(issuer_key, at=NOW - timedelta(minutes=1))
    published = {STATUS_URL: revoked}
    checker = StatusChecker(published.get, ttl=0)
    assert verify_credential(cred, now=NOW, trust=ANY, status=checker).errors == ["revoked"]
    published[STATUS_URL] = older  # a source that went back (cache, mirror, replay)
    assert verify_credential(cred, now=NOW, trust=ANY, status=checker).errors == ["revoked"]
    with pytest.raises(StatusListRejected):
        checker.update(STATUS_URL, older, now=NOW)


def test_unverified_order_for_transports(issuer_key: Key) -> None:
    from sdk.identity.status_list import status_list_order

    a, b = _list(issuer_key), _list(issuer_key, proof_format="jwt")
    assert status_list_order(a) < status_list_order(b)
    assert status_list_order(a)[0] == NOW
    for junk in (
        None,
        "x.y.z",
        {"validFrom": ["x"]},
        {"validFrom": "2026-01-01T00:00:00Z", "credentialSubject": {"sequence": -1}},
    ):
        assert status_list_order(junk) is None


def test_valid_from_keeps_sub_second_order(issuer_key: Key) -> None:
    at = NOW + timedelta(microseconds=250)
    a = _list(issuer_key, at=at)
    b = _list(issuer_key, at=at + timedelta(microseconds=1))
    assert a["validFrom"] == "2026-06-01T12:00:00.000250Z" and a["validFrom"] < b["validFrom"]
    assert verify_credential(a, now=at, trust=ANY).verified
