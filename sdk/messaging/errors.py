"""Messaging-layer errors (transport, envelope, secure client), each with a stable ``reason``.

    MessagingError                    sdk.errors root of this layer
    ├── RejectedMessage               an inbound message failed a check (see ``reason``)
    │   ├── Malformed                 malformed            (not a parseable envelope)
    │   ├── TooLarge                  too_large            (payload over the size limit)
    │   ├── BadSignature              bad_signature
    │   ├── UnknownSender             unknown_sender       (kid cannot be resolved to a key)
    │   ├── WrongTopic                wrong_topic          (signed topic != delivery topic)
    │   ├── ClockSkew                 clock_skew           (issued-at outside the window)
    │   ├── Expired                   expired              (past its ``exp``)
    │   ├── Replayed                  replayed             (id already seen)
    │   ├── DecryptFailed             decrypt_failed       (E2E body not for us / tampered)
    │   ├── WrongSender               wrong_sender         (reply from an unexpected DID)
    │   ├── NotAuthorized             not_authorized       (required credential missing/invalid)
    │   ├── NotEncrypted              not_encrypted        (subscription requires an E2E body)
    │   └── MissingExpiry             no_expiry            (a request without ``exp``)
    ├── RequestTimeout                timeout              (no reply / stream idle or overall)
    ├── RemoteError                   <remote reason>      (the peer answered with an error reply)
    ├── TransportError                transport            (broker connection; sdk.messaging.transport)
    │   ├── ConnectFailed             connect_failed | not_authorized | bad_credentials
    │   │                             | unsupported_protocol | connect_timeout
    │   ├── NotConnected              not_connected        (QoS 0 publish / subscribe while offline)
    │   ├── ConnectionLost            connection_lost      (dropped while a SUBACK was awaited)
    │   ├── SendQueueFull             queue_full           (too many unacknowledged publishes)
    │   ├── PublishFailed             publish_failed | not_authorized (broker refused a PUBLISH)
    │   ├── PublishTimeout            publish_timeout      (no PUBACK/PUBCOMP in time)
    │   └── SubscribeFailed           subscribe_denied     (SUBACK failure code)
    └── BrokerAuthError               malformed_proof | bad_proof | stale_proof | replayed_proof
                                      | wrong_client      (DID proof in CONNECT; sdk.messaging.broker_auth)
"""

from __future__ import annotations

from sdk.errors import MessagingError


class RejectedMessage(MessagingError):
    """An inbound message failed verification; ``reason`` says which check."""

    reason = "rejected"


class Malformed(RejectedMessage):
    reason = "malformed"


class TooLarge(RejectedMessage):
    reason = "too_large"


class BadSignature(RejectedMessage):
    reason = "bad_signature"


class UnknownSender(RejectedMessage):
    reason = "unknown_sender"


class WrongTopic(RejectedMessage):
    reason = "wrong_topic"


class ClockSkew(RejectedMessage):
    reason = "clock_skew"


class Expired(RejectedMessage):
    reason = "expired"


class Replayed(RejectedMessage):
    reason = "replayed"


class DecryptFailed(RejectedMessage):
    reason = "decrypt_failed"


class WrongSender(RejectedMessage):
    reason = "wrong_sender"


class NotAuthorized(RejectedMessage):
    reason = "not_authorized"


class NotEncrypted(RejectedMessage):
    reason = "not_encrypted"


class MissingExpiry(RejectedMessage):
    reason = "no_expiry"


class RequestTimeout(MessagingError):
    """No reply (or no stream chunk) within the timeout."""

    reason = "timeout"


class RemoteError(MessagingError):
    """The peer answered a request with an error reply; ``reason`` is the peer's reason code."""

    reason = "remote_error"


class TransportError(MessagingError):
    """The broker connection failed or refused an operation."""

    reason = "transport"


class ConnectFailed(TransportError):
    reason = "connect_failed"


class NotConnected(TransportError):
    reason = "not_connected"


class ConnectionLost(TransportError):
    reason = "connection_lost"


class SendQueueFull(TransportError):
    reason = "queue_full"


class PublishFailed(TransportError):
    reason = "publish_failed"


class PublishTimeout(TransportError):
    reason = "publish_timeout"


class SubscribeFailed(TransportError):
    reason = "subscribe_denied"


class BrokerAuthError(MessagingError):
    """A DID proof used as MQTT CONNECT password is malformed, forged, stale or replayed."""

    reason = "bad_proof"


__all__ = [
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
    "NotEncrypted",
    "MissingExpiry",
    "RequestTimeout",
    "RemoteError",
    "TransportError",
    "ConnectFailed",
    "NotConnected",
    "ConnectionLost",
    "SendQueueFull",
    "PublishFailed",
    "PublishTimeout",
    "SubscribeFailed",
    "BrokerAuthError",
]
