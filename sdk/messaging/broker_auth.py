"""DID proof used as the MQTT CONNECT password, so a broker admits only DID key holders.

Wire format: the CONNECT username is the client's DID (``did:key:z6Mk...``) and the password is a
compact JWS (RFC 7515) signed with EdDSA (Ed25519) by that DID's key::

    header  = {"alg": "EdDSA", "typ": "autoglm-mqtt-connect", "kid": "<did>#<fragment>"}
    payload = {"iss": "<did>", "aud": "autoglm-mqtt", "cid": "<MQTT client id>",
               "iat": <unix seconds, int>, "jti": "<16 random bytes, base64url>"}
    password = b64url(JCS-free compact JSON header) "." b64url(payload) "." b64url(signature)

The signature covers ``ASCII(header_b64 "." payload_b64)``. The broker checks: well-formed, alg
EdDSA, kid resolves (did:key) to the key that signed, iss == username, cid == the CONNECT client
id, aud matches, |now - iat| <= window, and jti not seen from that DID within the window (replay;
:class:`ProofReplayGuard` bounds memory per DID, so one DID's flood refuses only that DID).
Imports only ``sdk.identity`` so the broker plugin can use it without paho.
"""

from __future__ import annotations

import heapq
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping

from sdk.identity import Key, public_key_from_did_key
from sdk.identity.errors import IdentityError, InvalidSignature
from sdk.identity.hazmat import json as strict_json
from sdk.identity.hazmat.b64 import b64url_encode
from sdk.identity.hazmat.jws import join_compact, split_compact
from sdk.messaging.errors import BrokerAuthError

log = logging.getLogger(__name__)

AUDIENCE = "autoglm-mqtt"
PROOF_TYPE = "autoglm-mqtt-connect"
DEFAULT_WINDOW = 60.0
MAX_PROOF_LEN = 2048
MAX_JTI_LEN = 64


def _b64u(data: bytes) -> str:
    return b64url_encode(data).decode("ascii")


def _compact(obj: Mapping[str, object]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def make_connect_password(
    key: Key, client_id: str, /, *, now: float | None = None, audience: str = AUDIENCE
) -> str:
    """A fresh proof for one CONNECT of ``client_id`` (use ``key.did`` as the username)."""
    if not isinstance(client_id, str) or not client_id:
        raise ValueError("client_id must be a non-empty str")
    header = {"alg": "EdDSA", "kid": key.verification_method, "typ": PROOF_TYPE}  # sorted, as on the wire
    payload = {
        "iss": key.did,
        "aud": audience,
        "cid": client_id,
        "iat": int(time.time() if now is None else now),
        "jti": _b64u(secrets.token_bytes(16)),
    }
    return join_compact(header, _compact(payload), key.sign)


def did_password(key: Key, /, *, audience: str = AUDIENCE) -> Callable[[str], str]:
    """A password callable for ``TransportConfig.password``: a new proof at every CONNECT."""
    return lambda client_id: make_connect_password(key, client_id, audience=audience)


def did_credentials(key: Key, /, *, audience: str = AUDIENCE) -> dict[str, object]:
    """``username``/``password`` keyword arguments for ``MqttTransport``."""
    return {"username": key.did, "password": did_password(key, audience=audience)}


class ProofReplayGuard:
    """Remembers proof ids (jti) per identity until their window has passed; bounded in memory.

    Proof ids are kept per DID (a proof is bound to its DID by the signature, so one DID's ids
    never collide with another's). Two bounds keep one identity from crowding out the others:

    * ``max_per_identity``: a DID holding that many live proofs is refused further CONNECTs
      (reason ``too_many_proofs``) until its older proofs expire: a flood hurts only its sender;
    * ``max_entries``: when all identities together hold that many, the oldest proof of the
      identity holding the most is forgotten, and that identity's proofs issued at or before it
      are refused from then on (``too_many_proofs``), so a forgotten proof can never be replayed.
      A new identity is never refused because the guard is full.

    Every operation is O(log n) (a heap orders expiries); nothing scans the whole guard.
    """

    def __init__(
        self, *, window: float = DEFAULT_WINDOW, max_entries: int = 100_000, max_per_identity: int = 1_000
    ) -> None:
        if max_entries < 1 or max_per_identity < 1:
            raise ValueError("max_entries and max_per_identity must be >= 1")
        self.window = window
        self.max_entries = max_entries
        self.max_per_identity = max_per_identity
        self._buckets: dict[str, _Bucket] = {}
        self._size = 0
        self._by_count: dict[int, set[str]] = {}  # live proof count -> identities holding that many
        self._heaviest = 0
        # (expiry, seq, identity, jti or None for a bucket's floor); stale items are skipped
        self._expiries: list[tuple[float, int, str, str | None]] = []
        self._seq = 0
        self._evictions = 0
        self._next_eviction_log = 0.0

    def __len__(self) -> int:
        return self._size

    def count(self, identity: str) -> int:
        """Live proofs remembered for ``identity``."""
        bucket = self._buckets.get(identity)
        return len(bucket.seen) if bucket is not None else 0

    def check_and_add(self, jti: str, *, iat: float, now: float, identity: str = "") -> None:
        """Record ``jti`` for ``identity`` or raise :class:`BrokerAuthError` (``replayed_proof``,
        ``too_many_proofs``)."""
        self._expire(now)
        bucket = self._buckets.get(identity)
        if bucket is not None:
            if jti in bucket.seen:
                raise BrokerAuthError("proof already used", reason="replayed_proof")
            if bucket.floor is not None and iat <= bucket.floor:
                raise BrokerAuthError(
                    "too many recent proofs from this DID; make a fresh one", reason="too_many_proofs")
            if len(bucket.seen) >= self.max_per_identity:
                raise BrokerAuthError(
                    f"more than {self.max_per_identity} CONNECT proofs from this DID in {self.window:.0f}s; "
                    "retry later", reason="too_many_proofs")
        if self._size >= self.max_entries:
            self._evict_from_heaviest(now)
        if bucket is None:
            bucket = self._buckets[identity] = _Bucket()
        expiry = max(iat + self.window, now) + 1.0
        self._move(identity, len(bucket.seen), +1)
        bucket.seen[jti] = (iat, expiry)
        self._size += 1
        self._push(expiry, identity, jti)

    # -- internals
    def _push(self, expiry: float, identity: str, jti: str | None) -> None:
        self._seq += 1
        heapq.heappush(self._expiries, (expiry, self._seq, identity, jti))

    def _move(self, identity: str, count: int, delta: int) -> None:
        if count:
            holders = self._by_count[count]
            holders.discard(identity)
            if not holders:
                del self._by_count[count]
        new = count + delta
        if new:
            self._by_count.setdefault(new, set()).add(identity)
            self._heaviest = max(self._heaviest, new)
        while self._heaviest and self._heaviest not in self._by_count:
            self._heaviest -= 1

    def _drop_if_idle(self, identity: str, bucket: _Bucket) -> None:
        if not bucket.seen and bucket.floor is None:
            del self._buckets[identity]

    def _expire(self, now: float) -> None:
        heap = self._expiries
        while heap and heap[0][0] < now:
            expiry, _, identity, jti = heapq.heappop(heap)
            bucket = self._buckets.get(identity)
            if bucket is None:
                continue
            if jti is None:  # the floor's horizon: every proof it covered is stale now
                if bucket.floor is not None and bucket.floor + self.window + 1.0 <= expiry:
                    bucket.floor = None
            else:
                entry = bucket.seen.get(jti)
                if entry is None or entry[1] != expiry:
                    continue  # evicted earlier (or re-added later)
                del bucket.seen[jti]
                self._size -= 1
                self._move(identity, len(bucket.seen) + 1, -1)
            self._drop_if_idle(identity, bucket)

    def _evict_from_heaviest(self, now: float) -> None:
        identity = next(iter(self._by_count[self._heaviest]))
        bucket = self._buckets[identity]
        jti, (iat, _) = next(iter(bucket.seen.items()))
        del bucket.seen[jti]
        self._size -= 1
        self._move(identity, len(bucket.seen) + 1, -1)
        if bucket.floor is None or iat > bucket.floor:
            bucket.floor = iat
            self._push(iat + self.window + 1.0, identity, None)
        self._evictions += 1
        if now >= self._next_eviction_log:  # one line per 10 s, not one per CONNECT
            log.warning("CONNECT proof guard full (%d): forgot %d proof(s) of the heaviest DIDs, last of %s",
                        self.max_entries, self._evictions, identity[:64])
            self._evictions = 0
            self._next_eviction_log = now + 10.0


class _Bucket:
    """One identity's live proof ids (insertion order) and its replay floor."""

    __slots__ = ("floor", "seen")

    def __init__(self) -> None:
        self.seen: dict[str, tuple[float, float]] = {}  # jti -> (iat, expiry), oldest first
        self.floor: float | None = None  # proofs with iat <= floor are refused (some were forgotten)


def verify_connect_password(
    username: str | None,
    password: str | bytes | None,
    client_id: str,
    /,
    *,
    now: float | None = None,
    window: float = DEFAULT_WINDOW,
    replay: ProofReplayGuard | None = None,
    audience: str = AUDIENCE,
) -> str:
    """Return the authenticated DID, or raise :class:`BrokerAuthError` with a distinct reason."""
    now = time.time() if now is None else now
    if isinstance(password, bytes):
        try:
            password = password.decode("ascii")
        except UnicodeDecodeError:
            raise BrokerAuthError("password is not ASCII", reason="malformed_proof") from None
    if not username or not password or len(password) > MAX_PROOF_LEN:
        raise BrokerAuthError("username (DID) and proof password required", reason="malformed_proof")
    try:
        jws = split_compact(password, max_len=MAX_PROOF_LEN)
        payload = strict_json.loads(jws.payload, max_bytes=MAX_PROOF_LEN, max_depth=4)
    except ValueError as exc:
        raise BrokerAuthError(f"proof does not decode: {exc}", reason="malformed_proof") from None
    header, signature = jws.header, jws.signature
    if not isinstance(payload, dict):
        raise BrokerAuthError("proof header/payload must be JSON objects", reason="malformed_proof")
    if header.get("alg") != "EdDSA" or header.get("typ") != PROOF_TYPE:
        raise BrokerAuthError("proof must be an EdDSA autoglm-mqtt-connect JWS", reason="malformed_proof")
    iat, jti, kid = payload.get("iat"), payload.get("jti"), header.get("kid")
    if (not isinstance(iat, int) or isinstance(iat, bool) or not 0 <= iat < 2**53
            or not isinstance(jti, str) or not jti
            or len(jti) > MAX_JTI_LEN or not isinstance(kid, str)):
        raise BrokerAuthError("proof lacks iat/jti/kid", reason="malformed_proof")
    if payload.get("iss") != username or kid.partition("#")[0] != username:
        raise BrokerAuthError("proof was made by another DID than the username", reason="bad_proof")
    try:
        public = public_key_from_did_key(kid)
        public.verify(signature, jws.signing_input)
    except InvalidSignature:
        raise BrokerAuthError("proof signature does not verify", reason="bad_proof") from None
    except IdentityError as exc:
        raise BrokerAuthError(f"proof key not resolvable: {exc}", reason="bad_proof") from None
    if payload.get("cid") != client_id:
        raise BrokerAuthError("proof is for another client id", reason="wrong_client")
    if payload.get("aud") != audience:
        raise BrokerAuthError("proof is for another audience", reason="wrong_client")
    if abs(now - iat) > window:
        raise BrokerAuthError(f"proof issued {now - iat:.0f}s from now (window {window}s)",
                              reason="stale_proof")
    if replay is not None:
        replay.check_and_add(jti, iat=iat, now=now, identity=username)
    return username


__all__ = [
    "AUDIENCE",
    "DEFAULT_WINDOW",
    "make_connect_password",
    "did_password",
    "did_credentials",
    "verify_connect_password",
    "ProofReplayGuard",
]
