"""The signed message envelope: the ONE module that owns the wire format (docs/PROTOCOL.md).

Wire form: compact JWS (RFC 7515) with EdDSA/Ed25519 (RFC 8037)::

    BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature)

header  = {"alg":"EdDSA","kid":"<sender verification method>","typ":"autoglm-msg+jws"}
payload = JSON object: id, typ, top, iat [, exp, rto, cid, seq, body | enc, vcs]

The header bytes are fixed per sender (serialised once); the payload is serialised once and
the signature covers the ASCII ``header_b64 "." payload_b64`` exactly as sent.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.bindings as _nb
import nacl.exceptions

from sdk.identity import Key, PublicKey, public_key_from_did_key
from sdk.identity.hazmat import json as strict_json
from sdk.identity.hazmat.b64 import b64url_decode, b64url_encode
from sdk.identity.hazmat.keys import signing_key_bytes
from sdk.identity.resolver import DidKeyResolver
from sdk.messaging import sealing
from sdk.messaging.errors import (
    BadSignature,
    ClockSkew,
    DecryptFailed,
    Expired,
    Malformed,
    TooLarge,
    UnknownSender,
    WrongTopic,
)
from sdk.messaging.replay import ReplayCache

logger = logging.getLogger(__name__)

ALG = "EdDSA"
TYP = "autoglm-msg+jws"
DEFAULT_MAX_BYTES = 256 * 1024
MAX_ID_LEN = 64
MAX_TYPE_LEN = 128
#: sender headers a :class:`Verifier` remembers by default: the hot senders (a device's coordinator,
#: a fleet's operators). A miss costs ~17 µs (header JSON + the did:key cache), so a fleet-sized
#: cache (~1 KB a sender) is not worth its memory; the did:key cache holds the fleet's keys.
HEADER_CACHE_SIZE = 2048
MAX_HEADER_B64 = 2048

_dumps = strict_json.dumps_compact


def _loads(data: bytes) -> Any:
    """Strict JSON: duplicate members and NaN/Infinity are malformed (one signed text, one meaning).

    Size is bounded by the receiver's ``max_bytes`` before parsing; nesting by the C parser's
    recursion guard (payloads are parsed only after their signature verified).
    """
    return strict_json.loads(data, max_bytes=DEFAULT_MAX_BYTES * 4, max_depth=None)


def b64e(data: bytes) -> bytes:
    """base64url without padding."""
    return b64url_encode(data)


def b64d(data: bytes | str) -> bytes:
    """Decode canonical base64url without padding; raise :class:`Malformed` on anything else."""
    try:
        return b64url_decode(data)
    except ValueError as exc:
        raise Malformed(str(exc)) from exc


def new_id() -> str:
    """A fresh 120-bit random message id (20 base64url characters)."""
    return base64.urlsafe_b64encode(os.urandom(15)).decode("ascii")


@dataclass(frozen=True, slots=True)
class Message:
    """A verified inbound message (what handlers receive)."""

    topic: str
    sender: str  # the sender's DID
    kid: str  # the verification method that signed it
    type: str
    id: str
    body: Any
    issued_at: float  # seconds since the epoch
    expires_at: float | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    seq: int | None = None
    retained: bool = False
    encrypted: bool = False
    credentials: tuple[Any, ...] = ()
    raw: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class VerifyPolicy:
    """Receiver limits: payload size, clock skew tolerance and freshness window (seconds)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    clock_skew: float = 30.0
    max_age: float = 300.0


_did_keys = DidKeyResolver()


def _resolve_did_key(kid: str) -> PublicKey:
    """A did:key sender's key: verification method ids through the process's did:key cache
    (a fleet's keys are decoded once, see :func:`sdk.identity.resolver.reserve_did_key_cache`)."""
    if "#" in kid:
        return _did_keys.resolve(kid).public_key
    return public_key_from_did_key(kid)


class Signer:
    """Seals envelopes for one :class:`Key` (header serialised once, shared keys cached)."""

    def __init__(self, key: Key, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.key = key
        self.max_bytes = max_bytes
        header = _dumps({"alg": ALG, "kid": key.verification_method, "typ": TYP}).encode("ascii")
        self._prefix = b64e(header) + b"."
        self._shared = sealing.SharedKeys(key)
        self._recipients: dict[str, tuple[str, PublicKey]] = {}
        # sign with libsodium directly (skips pynacl's SignedMessage wrapper)
        sk = signing_key_bytes(key)
        self._sign: Callable[[bytes], bytes] = lambda m: _nb.crypto_sign(m, sk)[:64]

    def _recipient(self, to: str | PublicKey) -> tuple[str, PublicKey]:
        if isinstance(to, PublicKey):
            return to.did, to
        hit = self._recipients.get(to)
        if hit is None:
            if not isinstance(to, str):
                raise TypeError("encrypt_to must be a did:key DID or a PublicKey")
            pub = public_key_from_did_key(to)
            hit = (pub.did, pub)
            self._recipients[to] = hit
        return hit

    def seal(
        self,
        topic: str,
        body: Any,
        *,
        type: str,  # noqa: A002 - the protocol's field name
        msg_id: str | None = None,
        now: float | None = None,
        ttl: float | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        seq: int | None = None,
        encrypt_to: str | PublicKey | None = None,
        credentials: list[Any] | tuple[Any, ...] | None = None,
        nonce: bytes | None = None,
    ) -> tuple[str, bytes]:
        """``(message id, wire bytes)``; raises :class:`TooLarge` past ``max_bytes``."""
        msg_id = new_id() if msg_id is None else msg_id
        iat = int((time.time() if now is None else now) * 1000)
        payload: dict[str, Any] = {"id": msg_id, "typ": type, "top": topic, "iat": iat}
        if ttl is not None:
            if ttl <= 0:
                raise ValueError("ttl must be positive")
            payload["exp"] = iat + int(ttl * 1000)
        if reply_to is not None:
            payload["rto"] = reply_to
        if correlation_id is not None:
            payload["cid"] = correlation_id
        if seq is not None:
            payload["seq"] = seq
        if encrypt_to is None:
            payload["body"] = body
        else:
            did, pub = self._recipient(encrypt_to)
            n, ct = sealing.encrypt(
                self._shared.get(pub), _dumps(body).encode("utf-8"), msg_id.encode("utf-8"), nonce=nonce
            )
            payload["enc"] = {"alg": sealing.ALG, "to": did, "n": b64e(n).decode(), "ct": b64e(ct).decode()}
        if credentials:
            payload["vcs"] = list(credentials)
        signing_input = self._prefix + b64e(_dumps(payload).encode("utf-8"))
        wire = signing_input + b"." + b64e(self._sign(signing_input))
        if len(wire) > self.max_bytes:
            raise TooLarge(f"message of {len(wire)} bytes exceeds the {self.max_bytes}-byte limit")
        return msg_id, wire


Resolver = Callable[[str], PublicKey] | Any


class Verifier:
    """Opens and checks envelopes (docs/PROTOCOL.md, "Receiver checks", in that order).

    ``resolver``: callable ``kid -> PublicKey`` or an ``sdk.identity`` resolver object with
    ``.resolve(kid)`` (default: did:key only). ``key``: own key, to decrypt bodies sent to us.
    """

    def __init__(
        self,
        *,
        key: Key | None = None,
        resolver: Resolver | None = None,
        policy: VerifyPolicy = VerifyPolicy(),
        replay: ReplayCache | None = None,
        header_cache: int = HEADER_CACHE_SIZE,
    ) -> None:
        if header_cache <= 0:
            raise ValueError("header_cache must be positive")
        self.policy = policy
        self.replay = replay if replay is not None else ReplayCache(window=policy.max_age + policy.clock_skew)
        self._key = key
        self._own_did = key.did if key is not None else None
        self._shared = sealing.SharedKeys(key) if key is not None else None
        if resolver is None:
            self._resolve: Callable[[str], Any] = _resolve_did_key
        elif hasattr(resolver, "resolve"):
            self._resolve = resolver.resolve
        elif callable(resolver):
            self._resolve = resolver
        else:
            raise TypeError("resolver must be callable or have .resolve()")
        #: header bytes -> (kid, sender, key), least recently used first (see :meth:`resize_header_cache`)
        self._headers: OrderedDict[bytes, tuple[str, str, PublicKey]] = OrderedDict()
        self._header_max = header_cache

    @property
    def header_cache_size(self) -> int:
        """How many distinct sender headers are remembered (least recently used evicted past it)."""
        return self._header_max

    def resize_header_cache(self, size: int) -> None:
        """Remember up to ``size`` sender headers (a receiver of N senders wants a bit more than N)."""
        if size <= 0:
            raise ValueError("header cache size must be positive")
        self._header_max = size
        headers = self._headers
        while len(headers) > size:
            headers.popitem(last=False)

    def public_key(self, kid: str) -> PublicKey:
        """The sender key for ``kid`` as resolved for verification (to encrypt replies to it)."""
        for k, _sender, pub in reversed(self._headers.values()):    # the newest first: the request's own
            if k == kid:
                return pub
        resolved = self._resolve(kid)
        return getattr(resolved, "public_key", resolved)

    def _sender(self, header_b64: bytes) -> tuple[str, str, PublicKey]:
        headers = self._headers
        hit = headers.get(header_b64)
        if hit is not None:
            headers.move_to_end(header_b64)     # most recently used last
            return hit
        if len(header_b64) > MAX_HEADER_B64:
            raise Malformed("header too long")
        try:
            header = _loads(b64d(header_b64))
        except ValueError as exc:
            raise Malformed(f"header is not strict JSON: {exc}") from exc
        if not isinstance(header, dict) or header.get("alg") != ALG or header.get("typ") != TYP:
            raise Malformed("header must have alg=EdDSA and typ=" + TYP)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or "crit" in header:
            raise Malformed("header needs a string kid and no crit")
        try:
            resolved = self._resolve(kid)
        except Exception as exc:
            raise UnknownSender(f"cannot resolve {kid!r}: {exc}") from exc
        pub = getattr(resolved, "public_key", resolved)
        if not isinstance(pub, PublicKey):
            raise UnknownSender(f"resolver returned no public key for {kid!r}")
        purposes = getattr(resolved, "purposes", None)
        if purposes is not None and "authentication" not in purposes:
            raise UnknownSender(f"{kid!r} is not an authentication key")
        sender = getattr(resolved, "controller", None) or kid.partition("#")[0]
        hit = (kid, sender, pub)
        while len(headers) >= self._header_max:
            headers.popitem(last=False)         # the least recently used
        headers[header_b64] = hit
        return hit

    def open(
        self, topic: str, data: bytes, *, retained: bool = False, state: bool = False, now: float | None = None
    ) -> Message:
        """Verify ``data`` received on ``topic``; return the :class:`Message` or raise a rejection.

        ``retained`` only records the MQTT flag: retained copies are checked like any message.
        ``state=True`` (the caller orders the topic's messages by their own version, see
        :class:`sdk.messaging.policy.Retained`) replaces the freshness window and replay cache.
        """
        policy = self.policy
        if len(data) > policy.max_bytes:
            raise TooLarge(f"{len(data)} bytes exceeds the {policy.max_bytes}-byte limit")
        if not isinstance(data, bytes):
            data = bytes(data)
        parts = data.split(b".")
        if len(parts) != 3:
            raise Malformed("not a compact JWS (need 3 dot-separated parts)")
        header_b64, payload_b64, sig_b64 = parts
        kid, sender, pub = self._sender(header_b64)
        sig = b64d(sig_b64)
        if len(sig) != 64:
            raise BadSignature(f"signature from {kid} is not 64 bytes")
        try:
            _nb.crypto_sign_open(sig + data[: len(header_b64) + 1 + len(payload_b64)], pub.raw)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as exc:
            raise BadSignature(f"signature from {kid} does not verify") from exc
        try:
            p = _loads(b64d(payload_b64))
        except ValueError as exc:
            raise Malformed(f"payload is not strict JSON: {exc}") from exc
        if not isinstance(p, dict):
            raise Malformed("payload is not a JSON object")
        msg_id, typ, top, iat = p.get("id"), p.get("typ"), p.get("top"), p.get("iat")
        if not (isinstance(msg_id, str) and 0 < len(msg_id) <= MAX_ID_LEN):
            raise Malformed("bad or missing id")
        if not (isinstance(typ, str) and 0 < len(typ) <= MAX_TYPE_LEN):
            raise Malformed("bad or missing typ")
        if not isinstance(top, str) or type(iat) is not int:
            raise Malformed("bad or missing top/iat")
        exp, rto, cid, seq = p.get("exp"), p.get("rto"), p.get("cid"), p.get("seq")
        if (
            (exp is not None and type(exp) is not int)
            or (rto is not None and not isinstance(rto, str))
            or (cid is not None and not isinstance(cid, str))
            or (seq is not None and type(seq) is not int)
        ):
            raise Malformed("bad exp/rto/cid/seq")
        if rto is not None and (not rto or "+" in rto or "#" in rto or "\x00" in rto):
            raise Malformed("reply-to must be a concrete topic")
        vcs = p.get("vcs", ())
        if not isinstance(vcs, (list, tuple)):
            raise Malformed("vcs must be a list")
        if top != topic:
            raise WrongTopic(f"signed for topic {top!r}, delivered on {topic!r}")
        now = time.time() if now is None else now
        now_ms = now * 1000
        if exp is not None and now_ms > exp:
            raise Expired(f"message {msg_id} expired {(now_ms - exp) / 1000:.3f}s ago")
        if iat > now_ms + policy.clock_skew * 1000:
            raise ClockSkew(f"issued {(iat - now_ms) / 1000:.3f}s in the future")
        if not state:
            if iat < now_ms - policy.max_age * 1000:
                raise ClockSkew(f"issued {(now_ms - iat) / 1000:.3f}s ago (max age {policy.max_age}s)")
            self.replay.check_and_add(sender, msg_id, issued_at=iat / 1000, now=now)
        enc = p.get("enc")
        if enc is None:
            body, encrypted = p.get("body"), False
        else:
            body, encrypted = self._decrypt(enc, pub, msg_id), True
        return Message(
            topic=topic,
            sender=sender,
            kid=kid,
            type=typ,
            id=msg_id,
            body=body,
            issued_at=iat / 1000,
            expires_at=None if exp is None else exp / 1000,
            reply_to=rto,
            correlation_id=cid,
            seq=seq,
            retained=retained,
            encrypted=encrypted,
            credentials=tuple(vcs),
            raw=data,
        )

    def _decrypt(self, enc: Any, sender: PublicKey, msg_id: str) -> Any:
        if not isinstance(enc, dict) or enc.get("alg") != sealing.ALG:
            raise Malformed("enc must be an object with alg=" + sealing.ALG)
        if self._shared is None or enc.get("to") != self._own_did:
            raise DecryptFailed(f"encrypted for {enc.get('to')!r}, not for us")
        n, ct = enc.get("n"), enc.get("ct")
        if not isinstance(n, str) or not isinstance(ct, str):
            raise Malformed("enc needs n and ct strings")
        plain = sealing.decrypt(self._shared.get(sender), b64d(n), b64d(ct), msg_id.encode("utf-8"))
        try:
            return _loads(plain)
        except ValueError as exc:
            raise Malformed(f"decrypted body is not strict JSON: {exc}") from exc


__all__ = [
    "ALG",
    "TYP",
    "DEFAULT_MAX_BYTES",
    "HEADER_CACHE_SIZE",
    "Message",
    "VerifyPolicy",
    "Signer",
    "Verifier",
    "b64e",
    "b64d",
    "new_id",
]
