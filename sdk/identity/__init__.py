"""Identity layer: Ed25519 keys, DIDs, Verifiable Credentials and Presentations, revocation.

The safe API: ``issue_credential`` / ``verify_credential`` / ``create_presentation`` /
``verify_presentation`` (trust is an explicit ``TrustPolicy``), ``Key``, status lists
(``StatusListStore``, ``StatusChecker``), ``load_key`` and ``load_credential``. Primitives (JCS,
multibase, Data Integrity internals, raw key bytes, proof backends) live in
``sdk.identity.hazmat``. Imports neither MQTT nor torch.
"""

from sdk.identity.credentials import (
    V1_CONTEXT,
    V2_CONTEXT,
    issue_credential,
    verify_credential,
)
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
from sdk.identity.files import CredentialFileError, load_credential
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
    StatusListExpired,
    StatusListRejected,
    StatusListSource,
    StatusListStore,
    create_status_list_credential,
    needs_refresh,
    status_entry,
    status_list_document,
)
from sdk.identity.trust import TrustPolicy

__all__ = [
    "Keystore",
    "KeystoreError",
    "load_key",
    "load_credential",
    "CredentialFileError",
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
    "V1_CONTEXT",
    "V2_CONTEXT",
    # trust and status
    "TrustPolicy",
    "StatusList",
    "StatusListSource",
    "StatusListStore",
    "StatusListRejected",
    "StatusListExpired",
    "StatusChecker",
    "needs_refresh",
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
