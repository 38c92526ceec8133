"""Secure MQTT messaging: transport (paho, asyncio) → signed envelope → secure client.

Typical use::

    async with SecureClient("mqtt://127.0.0.1:1883", key) as client:
        await client.serve("autoglm/v1/inf/req/node1", handler, require=requirement)
        reply = await client.request("autoglm/v1/inf/req/node1", {"prompt": "hi"},
                                     encrypt_to=node_did, timeout=10)
        async for chunk in client.stream(topic, body, encrypt_to=node_did): ...

Wire format and topic layout: docs/PROTOCOL.md. Importing this package is cheap: names are
loaded on first use, and nothing here imports the coordinator, the mesh, amqtt or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdk._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    # client
    "SecureClient": "client",
    "ClientConfig": "client",
    "ClientStats": "client",
    "Subscription": "client",
    "ResponseStream": "client",
    "RESPONSE": "client",
    "ERROR": "client",
    "CHUNK": "client",
    "END": "client",
    "CANCEL": "client",
    "SyncSecureClient": "sync_client",
    "CredentialRequirement": "authz",
    "Authorizer": "authz",
    # envelope
    "Message": "envelope",
    "Signer": "envelope",
    "Verifier": "envelope",
    "VerifyPolicy": "envelope",
    "ReplayCache": "replay",
    # transport
    "MqttTransport": "transport",
    "TransportConfig": "transport",
    "TLSConfig": "transport",
    "Will": "transport",
    # per-subscription inbound policy
    "Retained": "policy",
    "InboundPolicy": "policy",
    # status lists over MQTT
    "MqttStatusListSource": "status",
    "publish_status_list": "status",
    # errors
    "MessagingError": "errors",
    "RejectedMessage": "errors",
    "Malformed": "errors",
    "TooLarge": "errors",
    "BadSignature": "errors",
    "UnknownSender": "errors",
    "WrongTopic": "errors",
    "ClockSkew": "errors",
    "Expired": "errors",
    "Replayed": "errors",
    "DecryptFailed": "errors",
    "WrongSender": "errors",
    "NotAuthorized": "errors",
    "NotEncrypted": "errors",
    "MissingExpiry": "errors",
    "RequestTimeout": "errors",
    "RemoteError": "errors",
    "TransportError": "errors",
    "SubscribeFailed": "errors",
    "BrokerAuthError": "errors",
}
_SUBMODULES = {"topics", "errors", "envelope", "transport", "client", "sync_client", "authz", "replay",
               "sealing", "broker_auth", "status", "jws", "policy", "will", "loop_thread"}

__all__ = [
    "Authorizer",
    "BadSignature",
    "BrokerAuthError",
    "CANCEL",
    "CHUNK",
    "ClientConfig",
    "ClientStats",
    "ClockSkew",
    "CredentialRequirement",
    "DecryptFailed",
    "END",
    "ERROR",
    "Expired",
    "InboundPolicy",
    "Malformed",
    "Message",
    "MessagingError",
    "MissingExpiry",
    "MqttStatusListSource",
    "MqttTransport",
    "NotAuthorized",
    "NotEncrypted",
    "RESPONSE",
    "RejectedMessage",
    "RemoteError",
    "ReplayCache",
    "Replayed",
    "RequestTimeout",
    "ResponseStream",
    "Retained",
    "SecureClient",
    "Signer",
    "SubscribeFailed",
    "Subscription",
    "SyncSecureClient",
    "TLSConfig",
    "TooLarge",
    "TransportConfig",
    "TransportError",
    "UnknownSender",
    "Verifier",
    "VerifyPolicy",
    "Will",
    "WrongSender",
    "WrongTopic",
    "publish_status_list",
    "topics",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, _SUBMODULES)


if TYPE_CHECKING:
    from sdk.messaging import topics
    from sdk.messaging.authz import Authorizer, CredentialRequirement
    from sdk.messaging.client import (
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
    from sdk.messaging.envelope import Message, Signer, Verifier, VerifyPolicy
    from sdk.messaging.errors import (
        BadSignature,
        BrokerAuthError,
        ClockSkew,
        DecryptFailed,
        Expired,
        Malformed,
        MessagingError,
        MissingExpiry,
        NotAuthorized,
        NotEncrypted,
        RejectedMessage,
        RemoteError,
        Replayed,
        RequestTimeout,
        SubscribeFailed,
        TooLarge,
        TransportError,
        UnknownSender,
        WrongSender,
        WrongTopic,
    )
    from sdk.messaging.policy import InboundPolicy, Retained
    from sdk.messaging.replay import ReplayCache
    from sdk.messaging.status import MqttStatusListSource, publish_status_list
    from sdk.messaging.sync_client import SyncSecureClient
    from sdk.messaging.transport import MqttTransport, TLSConfig, TransportConfig, Will
