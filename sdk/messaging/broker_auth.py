"""DID proof used as the MQTT CONNECT password, so a broker admits only DID key holders.

Wire format: the CONNECT username is the client's DID (``did:key:z6Mk...``) and the password is a
compact JWS (RFC 7515) signed with EdDSA (Ed25519) by that DID's key::

    header  = {"alg": "EdDSA", "typ": "autoglm-mqtt-connect", "kid": "<did>#<fragment>"}
    payload = {"iss": "<did>", "aud": "autoglm-mqtt", "cid": "<MQTT client id>",
               "iat": <unix seconds, int>, "jti": "<16 random bytes, base64url>"}
    password = b64url(JCS-free compact JSON header) "." b64url(payload) "." b64url(signature)

The signature covers ``ASCII(header_b64 "." payload_b64)``. The broker checks: well-formed, alg
EdDSA, kid resolves (did:key) to the key that signed, iss == username, cid == the CONNECT client
id, aud matches, |now - iat| <= window, and jti not seen within the window (replay). Imports only
``sdk.identity`` so the broker plugin can use it without paho.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from sdk.identity import Key, public_key_from_did_key
from sdk.identity.errors import IdentityError, InvalidSignature
from sdk.messaging.errors import BrokerAuthError

log = logging.getLogger(__name__)

AUDIENCE = "autoglm-mqtt"
PROOF_TYPE = "autoglm-mqtt-connect"
DEFAULT_WINDOW = 60.0
MAX_PROOF_LEN = 2048


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _compact(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def make_connect_password(
    key: Key, client_id: str, /, *, now: float | None = None, audience: str = AUDIENCE
) -> str:
    """A fresh proof for one CONNECT of ``client_id`` (use ``key.did`` as the username)."""
    if not isinstance(client_id, str) or not client_id:
        raise ValueError("client_id must be a non-empty str")
    header = {"alg": "EdDSA", "typ": PROOF_TYPE, "kid": key.verification_method}
    payload = {
        "iss": key.did,
        "aud": audience,
        "cid": client_id,
        "iat": int(time.time() if now is None else now),
        "jti": _b64u(secrets.token_bytes(16)),
    }
    signing_input = _b64u(_compact(header)) + "." + _b64u(_compact(payload))
    return signing_input + "." + _b64u(key.sign(signing_input.encode("ascii")))


def did_password(key: Key, /, *, audience: str = AUDIENCE) -> Callable[[str], str]:
    """A password callable for ``TransportConfig.password``: a new proof at every CONNECT."""
    return lambda client_id: make_connect_password(key, client_id, audience=audience)


def did_credentials(key: Key, /, *, audience: str = AUDIENCE) -> dict[str, object]:
    """``username``/``password`` keyword arguments for ``MqttTransport``."""
    return {"username": key.did, "password": did_password(key, audience=audience)}


class ProofReplayGuard:
    """Remembers proof ids (jti) until their window has passed; bounded in memory."""

    def __init__(self, *, window: float = DEFAULT_WINDOW, max_entries: int = 100_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check_and_add(self, jti: str, *, iat: float, now: float) -> None:
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if jti in self._seen:
            raise BrokerAuthError("proof already used", reason="replayed_proof")
        if len(self._seen) >= self.max_entries:
            raise BrokerAuthError("too many recent proofs; retry later", reason="replayed_proof")
        self._seen[jti] = max(iat + self.window, now) + 1.0


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
    parts = password.split(".")
    if len(parts) != 3:
        raise BrokerAuthError("proof is not a compact JWS", reason="malformed_proof")
    try:
        header = json.loads(_unb64u(parts[0]))
        payload = json.loads(_unb64u(parts[1]))
        signature = _unb64u(parts[2])
    except (ValueError, TypeError) as exc:
        raise BrokerAuthError(f"proof does not decode: {exc}", reason="malformed_proof") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise BrokerAuthError("proof header/payload must be JSON objects", reason="malformed_proof")
    if header.get("alg") != "EdDSA" or header.get("typ") != PROOF_TYPE:
        raise BrokerAuthError("proof must be an EdDSA autoglm-mqtt-connect JWS", reason="malformed_proof")
    iat, jti, kid = payload.get("iat"), payload.get("jti"), header.get("kid")
    if not isinstance(iat, int) or not isinstance(jti, str) or not jti or not isinstance(kid, str):
        raise BrokerAuthError("proof lacks iat/jti/kid", reason="malformed_proof")
    try:
        public = public_key_from_did_key(kid)
        public.verify(signature, (parts[0] + "." + parts[1]).encode("ascii"))
    except InvalidSignature:
        raise BrokerAuthError("proof signature does not verify", reason="bad_proof") from None
    except IdentityError as exc:
        raise BrokerAuthError(f"proof key not resolvable: {exc}", reason="bad_proof") from None
    if payload.get("iss") != username or kid.partition("#")[0] != username:
        raise BrokerAuthError("proof was made by another DID than the username", reason="bad_proof")
    if payload.get("cid") != client_id:
        raise BrokerAuthError("proof is for another client id", reason="wrong_client")
    if payload.get("aud") != audience:
        raise BrokerAuthError("proof is for another audience", reason="wrong_client")
    if abs(now - iat) > window:
        raise BrokerAuthError(f"proof issued {now - iat:.0f}s from now (window {window}s)", reason="stale_proof")
    if replay is not None:
        replay.check_and_add(jti, iat=iat, now=now)
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
