"""Secure MQTT messaging: transport (paho, asyncio) → signed envelope → secure client.

Typical use::

    async with SecureClient("mqtt://127.0.0.1:1883", key) as client:
        await client.serve(topics.inference_requests("node1"), handler, require=requirement)
        reply = await client.request(topics.inference_requests("node1"), {"prompt": "hi"},
                                     encrypt_to=node_did, timeout=10)
        async for chunk in client.stream(topic, body, encrypt_to=node_did): ...

Wire format and topic layout: docs/PROTOCOL.md.
"""

from sdk.coord import topics
from sdk.coord.authz import Authorizer, CredentialRequirement
from sdk.coord.client import (
    CANCEL,
    CHUNK,
    END,
    ERROR,
    RESPONSE,
    ClientConfig,
    ClientStats,
    ResponseStream,
    SecureClient,
    Subscription,
)
from sdk.coord.envelope import Message, Signer, Verifier, VerifyPolicy
from sdk.coord.errors import (
    BadSignature,
    ClockSkew,
    DecryptFailed,
    Expired,
    Malformed,
    MessagingError,
    NotAuthorized,
    RejectedMessage,
    RemoteError,
    Replayed,
    RequestTimeout,
    TooLarge,
    UnknownSender,
    WrongSender,
    WrongTopic,
)
from sdk.coord.replay import ReplayCache
from sdk.coord.sync_client import SyncSecureClient
from sdk.coord.transport import MqttTransport, TLSConfig, TransportConfig, Will

__all__ = [
    # client
    "SecureClient",
    "SyncSecureClient",
    "ClientConfig",
    "ClientStats",
    "Subscription",
    "ResponseStream",
    "Message",
    "CredentialRequirement",
    "Authorizer",
    "RESPONSE",
    "ERROR",
    "CHUNK",
    "END",
    "CANCEL",
    # envelope
    "Signer",
    "Verifier",
    "VerifyPolicy",
    "ReplayCache",
    # transport
    "MqttTransport",
    "TransportConfig",
    "TLSConfig",
    "Will",
    # topics
    "topics",
    # errors
    "MessagingError",
    "RejectedMessage",
    "Malformed",
    "TooLarge",
    "BadSignature",
    "UnknownSender",
    "WrongTopic",
    "ClockSkew",
    "Expired",
    "Replayed",
    "DecryptFailed",
    "WrongSender",
    "NotAuthorized",
    "RequestTimeout",
    "RemoteError",
]

# Coordination on top of the secure client (engineer D; docs/COORDINATOR.md).
from sdk.coord import events  # noqa: E402
from sdk.coord.coordinator import Coordinator  # noqa: E402
from sdk.coord.device import Config, Device, SyncDevice  # noqa: E402

__all__ += ["events", "Coordinator", "Device", "SyncDevice", "Config"]
