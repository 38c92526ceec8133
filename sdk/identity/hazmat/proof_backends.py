"""Registry of verifiers for proof types other than ``DataIntegrityProof`` (e.g. didkit's LD proofs).

A backend is ``fn(credential, *, proof_purpose) -> verification method id`` and raises an
``IdentityError`` when the proof does not verify.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

ProofBackend = Callable[..., str]

_BACKENDS: dict[str, ProofBackend] = {}
_LOCK = threading.Lock()


def register_proof_backend(proof_type: str, verifier: ProofBackend | None) -> None:
    """Route credentials whose ``proof.type`` is ``proof_type`` to ``verifier`` (None removes)."""
    if not isinstance(proof_type, str) or not proof_type:
        raise ValueError("proof_type must be a non-empty string")
    with _LOCK:
        if verifier is None:
            _BACKENDS.pop(proof_type, None)
        else:
            _BACKENDS[proof_type] = verifier


def proof_backend(proof_type: object) -> ProofBackend | None:
    """The verifier registered for ``proof_type`` (None if none, or if it is not a string)."""
    return _BACKENDS.get(proof_type) if isinstance(proof_type, str) else None


__all__ = ["ProofBackend", "register_proof_backend", "proof_backend"]
