"""Encrypted on-disk keystore for one or more named Ed25519 :class:`Key` s.

The file is JSON: a format version, the Argon2id parameters and salt, a passphrase check value,
the public DIDs (readable without the passphrase) and the private seeds sealed with a
``SecretBox`` (XSalsa20-Poly1305) under the passphrase-derived key. Writes are atomic (temp file
in the same directory, fsync, ``os.replace``) and the file mode is 0600. Opening never writes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash.argon2id as argon2id
import nacl.secret
import nacl.utils

from sdk.errors import IdentityError
from sdk.identity.errors import InvalidKey
from sdk.identity.hazmat import json as strict_json
from sdk.identity.keys import Key

log = logging.getLogger(__name__)

FORMAT = "autoglm-keystore"
VERSION = 1
DEFAULT_NAME = "default"
PASSPHRASE_ENV = "AUTOGLM_PASSPHRASE"
KEYSTORE_ENV = "AUTOGLM_KEYSTORE"
DEFAULT_PATH = "~/.autoglm/keystore.json"
_CHECK_LABEL = b"autoglm-keystore-passphrase-check-v1"
# Parameters read from a file are bounded so a hostile file cannot make us burn CPU or memory.
_MAX_OPSLIMIT = 16
_MAX_MEMLIMIT = 1 << 30
_MAX_FILE_BYTES = 1 << 20
_MAX_DEPTH = 8  # the format nests three levels; anything deeper is not a keystore
_CORRUPT = "corrupt_keystore"


class KeystoreError(IdentityError):
    """A keystore could not be created, opened or saved.

    ``reason`` is one of ``wrong_passphrase``, ``corrupt_keystore``, ``keystore_not_found``,
    ``keystore_exists``, ``unknown_key``, ``keystore_io``, ``no_passphrase``,
    ``insecure_permissions`` (the file is readable or writable by other users).
    """

    reason = "keystore_error"


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters (libsodium ``opslimit`` / ``memlimit`` in bytes)."""

    opslimit: int = argon2id.OPSLIMIT_INTERACTIVE
    memlimit: int = argon2id.MEMLIMIT_INTERACTIVE

    def __post_init__(self) -> None:
        if not isinstance(self.opslimit, int) or not argon2id.OPSLIMIT_MIN <= self.opslimit <= _MAX_OPSLIMIT:
            raise ValueError(f"opslimit must be an int in [{argon2id.OPSLIMIT_MIN}, {_MAX_OPSLIMIT}]")
        if not isinstance(self.memlimit, int) or not argon2id.MEMLIMIT_MIN <= self.memlimit <= _MAX_MEMLIMIT:
            raise ValueError(f"memlimit must be an int in [{argon2id.MEMLIMIT_MIN}, {_MAX_MEMLIMIT}]")

    @classmethod
    def interactive(cls) -> KdfParams:
        """libsodium's interactive limits (~64 MiB, well under a second): the default."""
        return cls(argon2id.OPSLIMIT_INTERACTIVE, argon2id.MEMLIMIT_INTERACTIVE)

    @classmethod
    def moderate(cls) -> KdfParams:
        """libsodium's moderate limits (~256 MiB): for keystores of long-lived daemons."""
        return cls(argon2id.OPSLIMIT_MODERATE, argon2id.MEMLIMIT_MODERATE)


def passphrase_from_env(var: str = PASSPHRASE_ENV) -> str | None:
    """The passphrase in environment variable ``var`` (default ``AUTOGLM_PASSPHRASE``), if set."""
    value = os.environ.get(var)
    return value if value else None


def default_keystore_path() -> Path:
    """``$AUTOGLM_KEYSTORE``, else ``~/.autoglm/keystore.json``."""
    return Path(os.environ.get(KEYSTORE_ENV) or DEFAULT_PATH).expanduser()


def load_key(
    path: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    passphrase: str | bytes | None = None,
) -> Key:
    """The one way daemons and CLIs load their key.

    Opens the keystore at ``path`` (default ``$AUTOGLM_KEYSTORE`` or ``~/.autoglm/keystore.json``)
    with ``passphrase`` or ``$AUTOGLM_PASSPHRASE`` and returns key ``name`` (default key if None).
    """
    secret = passphrase if passphrase else passphrase_from_env()
    if not secret:
        raise KeystoreError(f"no passphrase given and {PASSPHRASE_ENV} is not set", reason="no_passphrase")
    store = Keystore.open(Path(path).expanduser() if path else default_keystore_path(), secret)
    return store.get(name) if name else store.key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, field: str, length: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise KeystoreError(f"keystore field {field!r} is not a string", reason="corrupt_keystore")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise KeystoreError(f"keystore field {field!r} is not base64", reason="corrupt_keystore") from exc
    if length is not None and len(raw) != length:
        raise KeystoreError(f"keystore field {field!r} has the wrong length", reason="corrupt_keystore")
    return raw


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    if not isinstance(passphrase, (bytes, bytearray)):
        raise TypeError("passphrase must be str or bytes")
    if not passphrase:
        raise ValueError("passphrase must not be empty")
    return bytes(passphrase)


def _derive(passphrase: bytes, salt: bytes, kdf: KdfParams) -> bytes:
    return argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, opslimit=kdf.opslimit, memlimit=kdf.memlimit
    )


def _check_value(box_key: bytes) -> bytes:
    return hashlib.blake2b(_CHECK_LABEL, key=box_key, digest_size=16).digest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a 0600 temp file in the same directory + fsync + replace."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


class Keystore:
    """Named Ed25519 keys sealed under a passphrase in one JSON file.

    Build with :meth:`create` or :meth:`open`; change with :meth:`add` / :meth:`remove` and
    persist with :meth:`save`. ``key`` is the default key.
    """

    def __init__(
        self, path: Path, keys: dict[str, Key], *, default: str, kdf: KdfParams, salt: bytes, box_key: bytes
    ) -> None:
        self.path = path
        self._keys = keys
        self._default = default
        self.kdf = kdf
        self._salt = salt
        self._box_key = box_key

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        passphrase: str | bytes,
        key: Key | None = None,
        *,
        name: str = DEFAULT_NAME,
        kdf: KdfParams | None = None,
        overwrite: bool = False,
    ) -> Keystore:
        """Create a keystore at ``path`` holding ``key`` (a new key if None) and write it."""
        path = Path(path)
        if key is not None and not isinstance(key, Key):
            raise TypeError("key must be a sdk.identity.Key")
        _check_name(name)
        if path.exists() and not overwrite:
            raise KeystoreError(f"keystore already exists: {path}", reason="keystore_exists")
        kdf = kdf or KdfParams.interactive()
        salt = nacl.utils.random(argon2id.SALTBYTES)
        box_key = _derive(_passphrase_bytes(passphrase), salt, kdf)
        store = cls(path, {name: key or Key.generate()}, default=name, kdf=kdf, salt=salt, box_key=box_key)
        store.save()
        log.info("created keystore %s for %s", path, store.key.did)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], passphrase: str | bytes) -> Keystore:
        """Read and decrypt the keystore at ``path``; never writes to it."""
        path = Path(path)
        secret = _passphrase_bytes(passphrase)
        doc = _read_document(path, private=True)
        kdf, salt, nonce, ciphertext, check = _parse_document(doc, path)
        box_key = _derive(secret, salt, kdf)
        if not hmac.compare_digest(_check_value(box_key), check):
            log.warning("keystore %s: wrong passphrase", path)
            raise KeystoreError(f"wrong passphrase for keystore {path}", reason="wrong_passphrase")
        try:
            plaintext = nacl.secret.SecretBox(box_key).decrypt(ciphertext, nonce)
        except nacl.exceptions.CryptoError as exc:
            log.warning("keystore %s: ciphertext fails authentication", path)
            raise KeystoreError(f"keystore {path} is corrupted (ciphertext)", reason=_CORRUPT) from exc
        keys, default = _parse_plaintext(plaintext, path)
        public = doc.get("public")
        if public != {n: k.did for n, k in keys.items()}:
            log.warning("keystore %s: public DIDs do not match the sealed keys", path)
            raise KeystoreError(f"keystore {path} is corrupted (public DIDs)", reason="corrupt_keystore")
        return cls(path, keys, default=default, kdf=kdf, salt=salt, box_key=box_key)

    @staticmethod
    def peek(path: str | os.PathLike[str]) -> dict[str, str]:
        """Key name -> DID from the file's public section, without the passphrase (unauthenticated)."""
        path = Path(path)
        doc = _read_document(path)
        _parse_document(doc, path)
        public = doc.get("public")
        if not isinstance(public, dict) or not all(isinstance(v, str) for v in public.values()):
            raise KeystoreError(f"keystore {path} has no valid public section", reason="corrupt_keystore")
        return dict(public)

    # -- keys ---------------------------------------------------------------------------------

    @property
    def key(self) -> Key:
        """The default key."""
        return self._keys[self._default]

    @property
    def default_name(self) -> str:
        return self._default

    @property
    def keys(self) -> Mapping[str, Key]:
        """All keys by name (read-only view)."""
        return dict(self._keys)

    @property
    def names(self) -> list[str]:
        return sorted(self._keys)

    def get(self, name: str) -> Key:
        """The key called ``name``; ``KeystoreError(reason="unknown_key")`` if absent."""
        try:
            return self._keys[name]
        except KeyError:
            raise KeystoreError(f"no key named {name!r} in {self.path}", reason="unknown_key") from None

    def add(self, key: Key | None = None, *, name: str, default: bool = False, replace: bool = False) -> Key:
        """Add ``key`` (a new key if None) under ``name``; call :meth:`save` to persist."""
        _check_name(name)
        if key is not None and not isinstance(key, Key):
            raise TypeError("key must be a sdk.identity.Key")
        if name in self._keys and not replace:
            raise ValueError(f"a key named {name!r} already exists")
        key = key or Key.generate()
        self._keys[name] = key
        if default:
            self._default = name
        return key

    def remove(self, name: str) -> None:
        """Remove key ``name`` (not the default one); call :meth:`save` to persist."""
        self.get(name)
        if name == self._default:
            raise ValueError("cannot remove the default key; set another default first")
        del self._keys[name]

    def set_default(self, name: str) -> None:
        self.get(name)
        self._default = name

    # -- persistence --------------------------------------------------------------------------

    def change_passphrase(self, passphrase: str | bytes, *, kdf: KdfParams | None = None) -> None:
        """Re-key under a new passphrase (fresh salt) and save."""
        kdf = kdf or self.kdf
        salt = nacl.utils.random(argon2id.SALTBYTES)
        self._box_key = _derive(_passphrase_bytes(passphrase), salt, kdf)
        self._salt, self.kdf = salt, kdf
        self.save()

    def save(self) -> None:
        """Seal the keys with a fresh nonce and atomically replace the file (mode 0600)."""
        plaintext = json.dumps(
            {"default": self._default, "keys": {n: k.private_key_multibase for n, k in self._keys.items()}},
            sort_keys=True,
        ).encode("utf-8")
        nonce = nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE)
        sealed = nacl.secret.SecretBox(self._box_key).encrypt(plaintext, nonce)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "kdf": {
                "name": "argon2id",
                "opslimit": self.kdf.opslimit,
                "memlimit": self.kdf.memlimit,
                "salt": _b64(self._salt),
            },
            "cipher": {
                "name": "xsalsa20poly1305",
                "nonce": _b64(nonce),
                "ciphertext": _b64(sealed.ciphertext),
            },
            "check": _b64(_check_value(self._box_key)),
            "default": self._default,
            "public": {n: k.did for n, k in sorted(self._keys.items())},
        }
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path, data)
        except OSError as exc:
            log.error("cannot write keystore %s: %s", self.path, exc)
            raise KeystoreError(f"cannot write keystore {self.path}: {exc}", reason="keystore_io") from exc

    def __repr__(self) -> str:
        return f"Keystore(path={str(self.path)!r}, keys={self.names!r}, default={self._default!r})"


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or len(name) > 128 or not name.isprintable():
        raise ValueError("a key name is a non-empty printable string of at most 128 characters")


def _check_mode(path: Path, st: os.stat_result) -> None:
    """Refuse a keystore that other users can read or write (as ssh refuses such private keys)."""
    if os.name != "posix":  # pragma: no cover - POSIX permission bits only
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        log.error("keystore %s has permissive mode %o; refusing to use it", path, mode)
        raise KeystoreError(
            f"keystore {path} is accessible by other users (mode {mode:o}); "
            f"restrict it with: chmod 600 {path}", reason="insecure_permissions")


def _read_document(path: Path, *, private: bool = False) -> dict[str, Any]:
    """Read and parse the file (strict JSON, bounded); ``private`` also refuses permissive modes."""
    try:
        with path.open("rb") as fh:
            if private:
                _check_mode(path, os.fstat(fh.fileno()))
            raw = fh.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeystoreError(f"no keystore at {path}", reason="keystore_not_found") from None
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {path}: {exc}", reason="keystore_io") from exc
    if len(raw) > _MAX_FILE_BYTES:
        raise KeystoreError(f"keystore {path} is implausibly large", reason="corrupt_keystore")
    try:
        doc = strict_json.loads(raw, max_bytes=_MAX_FILE_BYTES, max_depth=_MAX_DEPTH)
    except ValueError as exc:
        log.warning("keystore %s is not valid JSON", path)
        raise KeystoreError(f"keystore {path} is corrupted (not JSON)", reason="corrupt_keystore") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeystoreError(f"{path} is not an autoglm keystore", reason="corrupt_keystore")
    if doc.get("version") != VERSION:
        raise KeystoreError(
            f"keystore {path} has unsupported version {doc.get('version')!r}", reason="corrupt_keystore"
        )
    return doc


def _parse_document(doc: dict[str, Any], path: Path) -> tuple[KdfParams, bytes, bytes, bytes, bytes]:
    kdf_doc, cipher = doc.get("kdf"), doc.get("cipher")
    if not isinstance(kdf_doc, dict) or kdf_doc.get("name") != "argon2id":
        raise KeystoreError(f"keystore {path}: missing or unknown kdf", reason="corrupt_keystore")
    if not isinstance(cipher, dict) or cipher.get("name") != "xsalsa20poly1305":
        raise KeystoreError(f"keystore {path}: missing or unknown cipher", reason="corrupt_keystore")
    try:
        kdf = KdfParams(kdf_doc.get("opslimit"), kdf_doc.get("memlimit"))  # type: ignore[arg-type]
    except ValueError as exc:
        raise KeystoreError(f"keystore {path}: bad kdf parameters ({exc})", reason=_CORRUPT) from exc
    salt = _unb64(kdf_doc.get("salt"), "kdf.salt", argon2id.SALTBYTES)
    nonce = _unb64(cipher.get("nonce"), "cipher.nonce", nacl.secret.SecretBox.NONCE_SIZE)
    ciphertext = _unb64(cipher.get("ciphertext"), "cipher.ciphertext")
    if len(ciphertext) <= nacl.secret.SecretBox.MACBYTES:
        raise KeystoreError(f"keystore {path}: ciphertext truncated", reason="corrupt_keystore")
    check = _unb64(doc.get("check"), "check", 16)
    return kdf, salt, nonce, ciphertext, check


def _parse_plaintext(plaintext: bytes, path: Path) -> tuple[dict[str, Key], str]:
    try:
        body = strict_json.loads(plaintext, max_bytes=_MAX_FILE_BYTES, max_depth=_MAX_DEPTH)
        default = body["default"]
        keys = {str(n): Key.from_multibase(mb) for n, mb in body["keys"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, InvalidKey) as exc:
        raise KeystoreError(f"keystore {path}: sealed content is malformed", reason=_CORRUPT) from exc
    if default not in keys:
        raise KeystoreError(f"keystore {path}: default key missing", reason="corrupt_keystore")
    return keys, default


__all__ = [
    "Keystore",
    "KeystoreError",
    "KdfParams",
    "load_key",
    "passphrase_from_env",
    "default_keystore_path",
    "PASSPHRASE_ENV",
    "KEYSTORE_ENV",
    "DEFAULT_NAME",
]
