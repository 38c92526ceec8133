"""Encrypted keystore: round trip, file format and mode, wrong passphrase, corruption, atomicity."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sdk.identity import Key
from sdk.identity.hazmat.keys import raw_private_bytes
from sdk.identity.keystore import (
    KdfParams,
    Keystore,
    KeystoreError,
    default_keystore_path,
    load_key,
    passphrase_from_env,
)

# Cheap Argon2id parameters so the many corruption cases stay fast; one test uses the defaults.
FAST = KdfParams(opslimit=1, memlimit=64 * 1024)
PASS = "correct horse battery staple"


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "id" / "keystore.json"


@pytest.fixture
def created(store_path):
    key = Key.generate()
    Keystore.create(store_path, PASS, key, kdf=FAST)
    return store_path, key


def test_round_trip_with_default_kdf(store_path):
    key = Key.generate()
    store = Keystore.create(store_path, PASS, key)
    assert store.kdf == KdfParams.interactive()
    reopened = Keystore.open(store_path, PASS)
    assert reopened.key == key
    assert raw_private_bytes(reopened.key) == raw_private_bytes(key)
    assert reopened.key.did == key.did


def test_create_generates_a_key_when_none_given(store_path):
    store = Keystore.create(store_path, PASS, kdf=FAST)
    assert raw_private_bytes(Keystore.open(store_path, PASS).key) == raw_private_bytes(store.key)


def test_file_mode_is_0600_and_format_fields_present(created):
    path, key = created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert doc["kdf"]["name"] == "argon2id"
    assert doc["kdf"]["opslimit"] == FAST.opslimit and doc["kdf"]["memlimit"] == FAST.memlimit
    assert len(base64.b64decode(doc["kdf"]["salt"])) == 16
    assert len(base64.b64decode(doc["cipher"]["nonce"])) == 24
    assert doc["public"] == {"default": key.did}
    # the private key never appears in clear
    raw = path.read_text()
    assert key.private_key_multibase not in raw
    assert key.to_jwk(private=True)["d"] not in raw


def test_peek_reads_dids_without_passphrase(created):
    path, key = created
    assert Keystore.peek(path) == {"default": key.did}


def test_named_keys_round_trip(created):
    path, key = created
    store = Keystore.open(path, PASS)
    other = store.add(name="mqtt")
    store.add(Key.generate(), name="gpu", default=True)
    store.save()
    reopened = Keystore.open(path, PASS)
    assert reopened.names == ["default", "gpu", "mqtt"]
    assert reopened.default_name == "gpu"
    assert reopened.get("mqtt") == other
    assert reopened.get("default") == key
    reopened.set_default("default")
    reopened.remove("gpu")
    reopened.save()
    again = Keystore.open(path, PASS)
    assert again.names == ["default", "mqtt"] and again.key == key
    with pytest.raises(KeystoreError) as exc:
        again.get("gpu")
    assert exc.value.reason == "unknown_key"


def test_remove_default_and_duplicate_names_are_caller_errors(created):
    store = Keystore.open(created[0], PASS)
    with pytest.raises(ValueError):
        store.remove("default")
    with pytest.raises(ValueError):
        store.add(name="default")
    with pytest.raises(ValueError):
        store.add(name="")


def test_each_save_uses_a_fresh_nonce(created):
    path, _ = created
    store = Keystore.open(path, PASS)
    before = json.loads(path.read_text())["cipher"]["nonce"]
    store.save()
    assert json.loads(path.read_text())["cipher"]["nonce"] != before


def test_wrong_passphrase_is_a_distinct_error_and_file_untouched(created):
    path, _ = created
    before = path.read_bytes()
    with pytest.raises(KeystoreError) as exc:
        Keystore.open(path, "not the passphrase")
    assert exc.value.reason == "wrong_passphrase"
    assert path.read_bytes() == before


def test_change_passphrase(created):
    path, key = created
    Keystore.open(path, PASS).change_passphrase("new secret")
    with pytest.raises(KeystoreError) as exc:
        Keystore.open(path, PASS)
    assert exc.value.reason == "wrong_passphrase"
    assert Keystore.open(path, "new secret").key == key


def test_create_refuses_to_overwrite(created):
    path, key = created
    with pytest.raises(KeystoreError) as exc:
        Keystore.create(path, PASS, kdf=FAST)
    assert exc.value.reason == "keystore_exists"
    assert Keystore.open(path, PASS).key == key
    replaced = Keystore.create(path, PASS, kdf=FAST, overwrite=True)
    assert Keystore.open(path, PASS).key == replaced.key != key


def test_missing_file(tmp_path):
    with pytest.raises(KeystoreError) as exc:
        Keystore.open(tmp_path / "nope.json", PASS)
    assert exc.value.reason == "keystore_not_found"


def test_empty_passphrase_is_a_caller_error(store_path):
    with pytest.raises(ValueError):
        Keystore.create(store_path, "", kdf=FAST)
    assert not store_path.exists()


def _mutate(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _flip_ciphertext(doc):
    ct = bytearray(base64.b64decode(doc["cipher"]["ciphertext"]))
    ct[len(ct) // 2] ^= 0x01
    doc["cipher"]["ciphertext"] = base64.b64encode(bytes(ct)).decode()


CORRUPTIONS = {
    "ciphertext_bitflip": lambda d: _flip_ciphertext(d),
    "ciphertext_truncated": lambda d: d["cipher"].update(ciphertext=d["cipher"]["ciphertext"][:8]),
    "nonce_missing": lambda d: d["cipher"].pop("nonce"),
    "nonce_bad_base64": lambda d: d["cipher"].update(nonce="***"),
    "salt_wrong_length": lambda d: d["kdf"].update(salt=base64.b64encode(b"short").decode()),
    "kdf_unknown": lambda d: d["kdf"].update(name="scrypt"),
    "kdf_huge_memlimit": lambda d: d["kdf"].update(memlimit=1 << 40),
    "version_unknown": lambda d: d.update(version=99),
    "check_missing": lambda d: d.pop("check"),
    "public_swapped": lambda d: d.update(public={"default": Key.generate().did}),
    "not_a_keystore": lambda d: d.pop("format"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_is_reported_and_never_overwritten(created, case):
    path, _ = created
    _mutate(path, CORRUPTIONS[case])
    corrupted = path.read_bytes()
    with pytest.raises(KeystoreError) as exc:
        Keystore.open(path, PASS)
    assert exc.value.reason == "corrupt_keystore"
    assert path.read_bytes() == corrupted


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_truncated_file_is_corrupt(created, cut):
    path, _ = created
    original = path.read_bytes()
    truncated = original[: cut % len(original)]
    assume(truncated.rstrip() != original.rstrip())     # dropping only the final newline is no damage
    try:
        path.write_bytes(truncated)
        with pytest.raises(KeystoreError) as exc:
            Keystore.open(path, PASS)
        assert exc.value.reason == "corrupt_keystore"
    finally:
        path.write_bytes(original)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_bit_flip_opens_to_the_same_key_or_fails_cleanly(created, position, bit):
    """A flipped bit anywhere either changes nothing that matters or is a typed error."""
    path, key = created
    original = path.read_bytes()
    data = bytearray(original)
    data[position % len(data)] ^= 1 << bit
    try:
        path.write_bytes(bytes(data))
        try:
            store = Keystore.open(path, PASS)
        except KeystoreError as exc:
            assert exc.reason in ("corrupt_keystore", "wrong_passphrase")
        else:
            assert store.key == key and raw_private_bytes(store.key) == raw_private_bytes(key)
        assert path.read_bytes() == bytes(data)
    finally:
        path.write_bytes(original)


def test_oversized_file_is_corrupt(created):
    path, _ = created
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(KeystoreError) as exc:
        Keystore.open(path, PASS)
    assert exc.value.reason == "corrupt_keystore"


def test_failed_write_leaves_previous_store_intact(created, monkeypatch):
    path, key = created
    store = Keystore.open(path, PASS)
    store.add(name="extra")
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeystoreError) as exc:
        store.save()
    assert exc.value.reason == "keystore_io"
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert Keystore.open(path, PASS).names == ["default"]


def test_passphrase_from_env(monkeypatch):
    monkeypatch.delenv("AUTOGLM_PASSPHRASE", raising=False)
    assert passphrase_from_env() is None
    monkeypatch.setenv("AUTOGLM_PASSPHRASE", "s3cret")
    assert passphrase_from_env() == "s3cret"
    monkeypatch.setenv("OTHER_VAR", "x")
    assert passphrase_from_env("OTHER_VAR") == "x"


def test_load_key_for_daemons(created, monkeypatch):
    path, key = created
    monkeypatch.delenv("AUTOGLM_PASSPHRASE", raising=False)
    monkeypatch.setenv("AUTOGLM_KEYSTORE", str(path))
    assert default_keystore_path() == path
    with pytest.raises(KeystoreError) as exc:
        load_key()
    assert exc.value.reason == "no_passphrase"
    monkeypatch.setenv("AUTOGLM_PASSPHRASE", PASS)
    assert load_key() == key
    assert load_key(path, passphrase=PASS, name="default") == key
    monkeypatch.setenv("AUTOGLM_PASSPHRASE", "wrong")
    with pytest.raises(KeystoreError) as exc:
        load_key()
    assert exc.value.reason == "wrong_passphrase"


def test_kdf_params_are_validated():
    with pytest.raises(ValueError):
        KdfParams(opslimit=0)
    with pytest.raises(ValueError):
        KdfParams(memlimit=1)
    assert KdfParams.moderate().memlimit > KdfParams.interactive().memlimit
