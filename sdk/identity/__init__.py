"""Identity layer: Ed25519 keys, DIDs, Verifiable Credentials and Presentations, revocation.

High level: ``issue_credential`` / ``verify_credential`` / ``create_presentation`` /
``verify_presentation``, ``TrustPolicy``, status lists. Low level (own modules): ``jcs``,
``multibase``, ``data_integrity``, ``jwt_vc``, ``ed25519_fast``. Imports neither MQTT nor torch.
"""

from sdk.identity.credentials import (
    V1_CONTEXT,
    V2_CONTEXT,
    issue_credential,
    register_proof_backend,
    verify_credential,
)
from sdk.identity.data_integrity import DataIntegrityProof
from sdk.identity.did_key import did_key_document, public_key_from_did_key
from sdk.identity.errors import (
    Expired,
    HolderMismatch,
    IdentityError,
    InvalidKey,
    InvalidSignature,
    KeyNotAuthorized,
    MalformedError,
    NotYetValid,
    ResolutionError,
    Revoked,
    StatusUnavailable,
    Suspended,
    UnsupportedProof,
    UntrustedIssuer,
    WrongChallenge,
    WrongDomain,
    WrongProofPurpose,
)
from sdk.identity.keys import Key, PublicKey
from sdk.identity.keystore import Keystore, KeystoreError, load_key
from sdk.identity.presentations import create_presentation, verify_presentation
from sdk.identity.resolver import (
    DidKeyResolver,
    DidWebResolver,
    ResolvedKey,
    Resolver,
    ResolverChain,
    StaticResolver,
    default_resolver,
)
from sdk.identity.results import VerificationResult
from sdk.identity.status_list import (
    StatusChecker,
    StatusList,
    StatusListSource,
    create_status_list_credential,
    status_entry,
    status_list_document,
)
from sdk.identity.trust import TrustPolicy

__all__ = [
    "Keystore",
    "KeystoreError",
    "load_key",
    # keys and DIDs
    "Key",
    "PublicKey",
    "did_key_document",
    "public_key_from_did_key",
    # resolution
    "Resolver",
    "ResolvedKey",
    "StaticResolver",
    "DidKeyResolver",
    "DidWebResolver",
    "ResolverChain",
    "default_resolver",
    # credentials and presentations
    "issue_credential",
    "verify_credential",
    "create_presentation",
    "verify_presentation",
    "VerificationResult",
    "DataIntegrityProof",
    "register_proof_backend",
    "V1_CONTEXT",
    "V2_CONTEXT",
    # trust and status
    "TrustPolicy",
    "StatusList",
    "StatusListSource",
    "StatusChecker",
    "status_entry",
    "status_list_document",
    "create_status_list_credential",
    # errors
    "IdentityError",
    "InvalidKey",
    "InvalidSignature",
    "ResolutionError",
    "MalformedError",
    "UnsupportedProof",
    "WrongProofPurpose",
    "KeyNotAuthorized",
    "Expired",
    "NotYetValid",
    "Revoked",
    "Suspended",
    "StatusUnavailable",
    "UntrustedIssuer",
    "WrongChallenge",
    "WrongDomain",
    "HolderMismatch",
]
