"""The device's connection state: one enum and the transitions allowed between its members.

    CLOSED            -> CONNECTING          connect()
    CONNECTING        -> AUTHENTICATING      or WAITING with connect(authenticate=False)
    AUTHENTICATING    -> ADMITTED            or WAITING when refused for a passing reason (timeout...)
    ADMITTED          -> WAITING             the coordinator says it is offline
                      -> REAUTHENTICATING    reauth notice, broker reconnect, coordinator restarted
    WAITING           -> REAUTHENTICATING    the coordinator is online again, broker reconnect
                      -> AUTHENTICATING      the app calls authenticate()
    REAUTHENTICATING  -> ADMITTED            (it retries with backoff until then)
    EXPIRED           -> REAUTHENTICATING    Device.update_credential()
    any               -> REVOKED             the credential is revoked
    any               -> EXPIRED             the credential expired and no fresh one was available
    any               -> CLOSED              aclose()

REVOKED is final for automatic transitions; only an explicit ``authenticate()`` may try again.
"""

from __future__ import annotations

import enum


class DeviceState(enum.StrEnum):
    """Where a device stands with the coordinator (``Device.state``); compares equal to its value."""

    CLOSED = "closed"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    ADMITTED = "admitted"
    WAITING = "waiting"
    REAUTHENTICATING = "reauthenticating"
    EXPIRED = "expired"
    REVOKED = "revoked"


_S = DeviceState

#: state -> the states it may move to
TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    _S.CLOSED: frozenset({_S.CONNECTING}),
    _S.CONNECTING: frozenset({_S.AUTHENTICATING, _S.WAITING, _S.REVOKED, _S.CLOSED}),
    _S.AUTHENTICATING: frozenset({_S.ADMITTED, _S.WAITING, _S.EXPIRED, _S.REVOKED, _S.CLOSED}),
    _S.ADMITTED: frozenset({_S.REAUTHENTICATING, _S.WAITING, _S.EXPIRED, _S.REVOKED, _S.CLOSED}),
    _S.WAITING: frozenset({_S.AUTHENTICATING, _S.REAUTHENTICATING, _S.EXPIRED, _S.REVOKED, _S.CLOSED}),
    _S.REAUTHENTICATING: frozenset({_S.ADMITTED, _S.EXPIRED, _S.REVOKED, _S.CLOSED}),
    _S.EXPIRED: frozenset({_S.AUTHENTICATING, _S.REAUTHENTICATING, _S.REVOKED, _S.CLOSED}),
    _S.REVOKED: frozenset({_S.AUTHENTICATING, _S.CLOSED}),
}

#: states in which the device will not become admitted without the app doing something
STUCK = frozenset({_S.CLOSED, _S.EXPIRED, _S.REVOKED})


def allowed(old: DeviceState, new: DeviceState) -> bool:
    """True when ``old -> new`` is a transition of the device state machine."""
    return new in TRANSITIONS[old]


__all__ = ["DeviceState", "TRANSITIONS", "STUCK", "allowed"]
