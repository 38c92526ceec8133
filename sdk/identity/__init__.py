"""Identity layer: Ed25519 keys, DIDs, Verifiable Credentials and Presentations, revocation.

Imports neither MQTT nor torch.
"""

from sdk.identity.did_key import did_key_document, public_key_from_did_key
from sdk.identity.errors import IdentityError, InvalidKey, InvalidSignature, ResolutionError
from sdk.identity.keys import Key, PublicKey

__all__ = [
    "Key",
    "PublicKey",
    "did_key_document",
    "public_key_from_did_key",
    "IdentityError",
    "InvalidKey",
    "InvalidSignature",
    "ResolutionError",
]
