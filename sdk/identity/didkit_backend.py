"""Optional didkit 0.3.3 backend: Ed25519Signature2018/2020 Linked Data proofs and interop helpers.

didkit's Rust core is async (pyo3-asyncio over a tokio runtime). Its worker threads still touch
the interpreter for an instant after each call returns, and if the interpreter is finalizing
then, the process aborts or segfaults at exit. :func:`install_exit_guard` (installed on first use)
registers an ``atexit`` hook that waits for calls in flight, stops the backend's loop thread and
lets the tokio threads drain before finalization starts.

Sync functions run didkit on one dedicated event loop thread (safe from sync code and from inside
another running loop); ``a``-prefixed coroutines run on the caller's loop. Only ``did:key``
verification methods are accepted, so didkit never touches the network.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from sdk.errors import IdentityError
from sdk.identity.errors import ERRORS_BY_REASON
from sdk.identity.hazmat.proof_backends import register_proof_backend
from sdk.identity.keys import Key

log = logging.getLogger(__name__)

_didkit: Any
try:  # optional dependency: the [interop] extra
    import didkit as _didkit
except ImportError:  # pragma: no cover - exercised where didkit is absent
    _didkit = None

LD_PROOF_TYPES = frozenset({"Ed25519Signature2018", "Ed25519Signature2020"})
ED25519_2020_CONTEXT = "https://w3id.org/security/suites/ed25519-2020/v1"
CALL_TIMEOUT_S = 30.0
#: Seconds the exit guard lets tokio threads settle; 1 ms sufficed in tests, this is headroom.
EXIT_DRAIN_S = 0.05
#: Longest the exit guard waits for didkit calls still in flight (e.g. on an abandoned loop).
EXIT_WAIT_S = 5.0

T = TypeVar("T")


class DidkitUnavailable(IdentityError):
    """didkit is not installed (``pip install 'open-autoglm-sdk[interop]'``)."""

    reason = "didkit_unavailable"


def available() -> bool:
    """Whether didkit can be imported."""
    return _didkit is not None


def version() -> str | None:
    """The installed didkit version, or None."""
    return _didkit.get_version() if _didkit is not None else None


def _lib() -> Any:
    if _didkit is None:
        raise DidkitUnavailable("didkit is not installed; install the [interop] extra")
    return _didkit


# -- crash guard --------------------------------------------------------------------------------

_guard_lock = threading.Lock()
_guard_installed = False
_in_flight = 0
_idle = threading.Condition(_guard_lock)


def install_exit_guard() -> None:
    """Register (once) the atexit hook that keeps didkit from crashing the interpreter at exit."""
    global _guard_installed
    with _guard_lock:
        if _guard_installed:
            return
        _guard_installed = True
    atexit.register(_drain_at_exit)


def _drain_at_exit() -> None:
    with _idle:
        _idle.wait_for(lambda: _in_flight == 0, timeout=EXIT_WAIT_S)
    _runner.stop()
    time.sleep(EXIT_DRAIN_S)  # releases the GIL so tokio threads finish their last Python touch


async def _call(fn_name: str, *args: str) -> str:
    """Await one didkit coroutine function on the running loop, tracking calls in flight."""
    global _in_flight
    lib = _lib()
    install_exit_guard()
    with _idle:
        _in_flight += 1
    try:
        return await getattr(lib, fn_name)(*args)
    finally:
        with _idle:
            _in_flight -= 1
            _idle.notify_all()


class _LoopThread:
    """One daemon thread running an event loop that every sync didkit call is submitted to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, factory: Callable[[], Awaitable[T]], timeout: float = CALL_TIMEOUT_S) -> T:
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="didkit-loop", daemon=True
                )
                self._thread.start()
            loop = self._loop

        async def job() -> T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(job(), loop).result(timeout)

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


_runner = _LoopThread()


def _sync(factory: Callable[[], Awaitable[T]]) -> T:
    _lib()
    try:
        return _runner.run(factory)
    except concurrent.futures.TimeoutError:
        log.error("didkit call did not finish within %.0f s", CALL_TIMEOUT_S)
        raise DidkitUnavailable(f"didkit call timed out after {CALL_TIMEOUT_S:.0f} s",
                                reason="didkit_timeout") from None


# -- helpers ------------------------------------------------------------------------------------

def _jwk_json(key: Key | Mapping[str, Any] | str) -> tuple[str, Key]:
    """didkit takes a private OKP JWK as a JSON string; accept our Key, a JWK dict or a string."""
    if isinstance(key, Key):
        return json.dumps(key.to_jwk(private=True)), key
    jwk = json.loads(key) if isinstance(key, str) else dict(key)
    return json.dumps(jwk), Key.from_jwk(jwk)


def _report(raw: str) -> tuple[bool, list[str]]:
    try:
        report = json.loads(raw)
        errors = [str(e) for e in report.get("errors", [])]
        checks = report.get("checks", [])
    except (ValueError, AttributeError) as exc:
        return False, [f"didkit returned an unreadable report: {exc}"]
    if not errors and not checks:
        errors = ["didkit performed no checks"]
    return not errors, errors


def _vm_problem(doc: Mapping[str, Any], controller_member: str) -> tuple[str, str] | None:
    """(reason, message) if the proof is not one did:key LD proof controlled by issuer/holder."""
    proof = doc.get("proof")
    if isinstance(proof, list) and len(proof) == 1:
        proof = proof[0]
    if not isinstance(proof, Mapping):
        return "malformed", "expected exactly one proof object"
    if proof.get("type") not in LD_PROOF_TYPES:
        return "unsupported_proof", f"unsupported proof type {proof.get('type')!r}"
    vm = proof.get("verificationMethod")
    if not isinstance(vm, str) or not vm.startswith("did:key:"):
        return "unresolvable", "verificationMethod must be a did:key DID URL (the backend stays offline)"
    controller = doc.get(controller_member)
    if isinstance(controller, Mapping):
        controller = controller.get("id")
    if vm.partition("#")[0] != controller:
        return "key_not_authorized", f"{vm} is not controlled by {controller_member} {controller!r}"
    return None


def _reason_of(message: str) -> str:
    """Map a didkit error message to one of the identity layer's reason codes."""
    text = message.lower()
    if "no applicable proof" in text:
        return "wrong_proof_purpose"
    if "context" in text or "expansion" in text or "parsing" in text or "malformed" in text:
        return "malformed"
    return "bad_signature"


def is_ld_credential(credential: Any) -> bool:
    """Whether ``credential`` carries an Ed25519Signature2018/2020 proof (this backend's job)."""
    if not isinstance(credential, Mapping):
        return False
    proof = credential.get("proof")
    proofs = proof if isinstance(proof, list) else [proof]
    return any(isinstance(p, Mapping) and p.get("type") in LD_PROOF_TYPES for p in proofs)


# -- verification -------------------------------------------------------------------------------

async def _uncovered_types(doc: Mapping[str, Any], fn_name: str, options: dict[str, Any]) -> list[str]:
    """Types that JSON-LD silently drops (not defined by the @context), so the proof does not sign.

    A trust policy decides on ``type``; an attacker could add ``DeviceCredential`` to a signed
    LD credential without breaking the proof. Probe: rename each type; if the proof still
    verifies, that type was never signed.
    """
    types = doc.get("type")
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list):
        return []
    uncovered = []
    for i, name in enumerate(types):
        if name in ("VerifiableCredential", "VerifiablePresentation") or not isinstance(name, str):
            continue
        probe = dict(doc)
        probe["type"] = [*types[:i], f"{name}UncoveredProbe", *types[i + 1:]]
        try:
            ok, _ = _report(await _call(fn_name, json.dumps(probe), json.dumps(options)))
        except Exception:  # noqa: BLE001 - a probe that fails to verify means the type is covered
            ok = False
        if ok:
            uncovered.append(name)
    return uncovered


async def _acheck(
    doc: Mapping[str, Any], controller_member: str, fn_name: str, options: dict[str, Any]
) -> tuple[str | None, list[str]]:
    """Run one didkit verification; ``(None, [])`` when it passes, else (reason, messages)."""
    problem = _vm_problem(doc, controller_member)
    if problem:
        return problem[0], [problem[1]]
    try:
        raw = await _call(fn_name, json.dumps(doc), json.dumps(options))
    except (ValueError, TypeError) as exc:  # didkit raises ValueError on unparsable input
        return "malformed", [f"malformed input: {exc}"]
    except DidkitUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - DIDKitException is a bare Exception subclass
        return _reason_of(str(exc)), [f"didkit: {exc}"]
    ok, errors = _report(raw)
    if ok and controller_member == "issuer":
        uncovered = await _uncovered_types(doc, fn_name, options)
        if uncovered:
            log.warning("LD credential claims types its proof does not cover: %s", uncovered)
            return "malformed", [f"type {t!r} is not covered by the LD proof (undefined in @context)"
                                 for t in uncovered]
    if ok:
        return None, []
    log.info("didkit rejected a %s: %s", (controller_member == "issuer" and "credential") or "presentation",
             "; ".join(errors))
    return _reason_of(errors[0]), errors


async def averify_ld_credential(
    credential: Mapping[str, Any], *, proof_purpose: str = "assertionMethod"
) -> tuple[bool, list[str]]:
    """Verify the LD proof of a credential with didkit: ``(ok, error messages)``.

    Checks the signature, the purpose and that the did:key belongs to the issuer; validity
    dates, status and trust are the caller's job (didkit 0.3.3 ignores expiry).
    """
    reason, errors = await _acheck(credential, "issuer", "verify_credential", {"proofPurpose": proof_purpose})
    return reason is None, errors


def verify_ld_credential(
    credential: Mapping[str, Any], *, proof_purpose: str = "assertionMethod"
) -> tuple[bool, list[str]]:
    """Sync facade of :func:`averify_ld_credential`."""
    return _sync(lambda: averify_ld_credential(credential, proof_purpose=proof_purpose))


def ld_proof_verifier(credential: Mapping[str, Any], *, proof_purpose: str = "assertionMethod") -> str:
    """Proof backend for ``verify_credential``: the verification method id, or raise.

    Raises the :class:`IdentityError` subclass matching the failure (bad_signature,
    key_not_authorized, wrong_proof_purpose, malformed, ...).
    """
    reason, errors = _sync(
        lambda: _acheck(credential, "issuer", "verify_credential", {"proofPurpose": proof_purpose})
    )
    if reason is not None:
        cls = ERRORS_BY_REASON.get(reason, IdentityError)
        raise cls("; ".join(errors), reason=reason)
    proof = credential["proof"]
    proof = proof[0] if isinstance(proof, list) else proof
    return str(proof["verificationMethod"])


def register_backend() -> bool:
    """Route Ed25519Signature2018/2020 credentials in ``verify_credential`` to didkit, if installed."""
    if not available():
        return False
    for proof_type in sorted(LD_PROOF_TYPES):
        register_proof_backend(proof_type, ld_proof_verifier)
    return True


async def averify_ld_presentation(
    presentation: Mapping[str, Any], *, challenge: str, domain: str | None = None
) -> tuple[bool, list[str]]:
    """didkit's own presentation check (proof, challenge, domain; not the credentials inside)."""
    options: dict[str, Any] = {"proofPurpose": "authentication", "challenge": challenge}
    if domain is not None:
        options["domain"] = domain
    reason, errors = await _acheck(presentation, "holder", "verify_presentation", options)
    return reason is None, errors


def verify_ld_presentation(
    presentation: Mapping[str, Any], *, challenge: str, domain: str | None = None
) -> tuple[bool, list[str]]:
    """Sync facade of :func:`averify_ld_presentation`."""
    return _sync(lambda: averify_ld_presentation(presentation, challenge=challenge, domain=domain))


async def averify_jwt_credential(token: str) -> tuple[bool, list[str]]:
    """Verify a VC-JWT with didkit (signature via the did:key in ``kid``)."""
    try:
        raw = await _call(
            "verify_credential", token, json.dumps({"proofPurpose": "assertionMethod", "proofFormat": "jwt"})
        )
    except DidkitUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001
        return False, [f"didkit: {exc}"]
    return _report(raw)


def verify_jwt_credential(token: str) -> tuple[bool, list[str]]:
    """Sync facade of :func:`averify_jwt_credential`."""
    return _sync(lambda: averify_jwt_credential(token))


# -- issuance (interop tests and the benchmark) --------------------------------------------------

async def aissue_ld_credential(
    credential: Mapping[str, Any],
    key: Key | Mapping[str, Any] | str,
    *,
    proof_type: str = "Ed25519Signature2018",
) -> dict[str, Any]:
    """Sign a VC 1.1 credential with didkit's LD suite (adds the 2020 context when needed)."""
    if proof_type not in LD_PROOF_TYPES:
        raise ValueError(f"proof_type must be one of {sorted(LD_PROOF_TYPES)}")
    jwk, ours = _jwk_json(key)
    doc = dict(credential)
    if proof_type == "Ed25519Signature2020":
        ctx = doc.get("@context", [])
        ctx = [ctx] if isinstance(ctx, str) else list(ctx)
        if ED25519_2020_CONTEXT not in ctx:
            doc["@context"] = [*ctx, ED25519_2020_CONTEXT]
    options = {
        "proofPurpose": "assertionMethod",
        "verificationMethod": ours.verification_method,
        "type": proof_type,
    }
    return json.loads(await _call("issue_credential", json.dumps(doc), json.dumps(options), jwk))


def issue_ld_credential(
    credential: Mapping[str, Any],
    key: Key | Mapping[str, Any] | str,
    *,
    proof_type: str = "Ed25519Signature2018",
) -> dict[str, Any]:
    """Sync facade of :func:`aissue_ld_credential`."""
    return _sync(lambda: aissue_ld_credential(credential, key, proof_type=proof_type))


async def aissue_jwt_credential(credential: Mapping[str, Any], key: Key | Mapping[str, Any] | str) -> str:
    """Sign a VC 1.1 credential as a VC-JWT with didkit."""
    jwk, ours = _jwk_json(key)
    options = {
        "proofPurpose": "assertionMethod",
        "verificationMethod": ours.verification_method,
        "proofFormat": "jwt",
    }
    return await _call("issue_credential", json.dumps(dict(credential)), json.dumps(options), jwk)


def issue_jwt_credential(credential: Mapping[str, Any], key: Key | Mapping[str, Any] | str) -> str:
    """Sync facade of :func:`aissue_jwt_credential`."""
    return _sync(lambda: aissue_jwt_credential(credential, key))


async def aissue_ld_presentation(
    presentation: Mapping[str, Any],
    key: Key | Mapping[str, Any] | str,
    *,
    challenge: str,
    domain: str | None = None,
) -> dict[str, Any]:
    """Sign a VC 1.1 presentation (DID Auth) with didkit's Ed25519Signature2018."""
    jwk, ours = _jwk_json(key)
    options: dict[str, Any] = {
        "proofPurpose": "authentication",
        "verificationMethod": ours.verification_method,
        "challenge": challenge,
    }
    if domain is not None:
        options["domain"] = domain
    signed = await _call("issue_presentation", json.dumps(dict(presentation)), json.dumps(options), jwk)
    return json.loads(signed)


def issue_ld_presentation(
    presentation: Mapping[str, Any],
    key: Key | Mapping[str, Any] | str,
    *,
    challenge: str,
    domain: str | None = None,
) -> dict[str, Any]:
    """Sync facade of :func:`aissue_ld_presentation`."""
    return _sync(lambda: aissue_ld_presentation(presentation, key, challenge=challenge, domain=domain))


__all__ = [
    "LD_PROOF_TYPES",
    "DidkitUnavailable",
    "available",
    "version",
    "install_exit_guard",
    "is_ld_credential",
    "verify_ld_credential",
    "averify_ld_credential",
    "ld_proof_verifier",
    "register_backend",
    "verify_ld_presentation",
    "averify_ld_presentation",
    "verify_jwt_credential",
    "averify_jwt_credential",
    "issue_ld_credential",
    "aissue_ld_credential",
    "issue_jwt_credential",
    "aissue_jwt_credential",
    "issue_ld_presentation",
    "aissue_ld_presentation",
]
