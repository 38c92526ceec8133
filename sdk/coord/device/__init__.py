"""Device SDK: authenticate to the coordinator, announce presence, publish events, apply configs.

    async with Device(key, credential, broker=url, coordinator=coord_did, on_config=apply) as dev:
        await dev.publish_event(events.screen_available(800, 600, density=160))

* Mutual authentication (DID + VP, :mod:`sdk.coord.handshake`): the device sends a nonce and
  checks the coordinator's CoordinatorCredential presentation over it, then answers the
  coordinator's fresh challenge with a presentation of its DeviceCredential. Failure raises
  :class:`~sdk.coord.errors.AdmissionError` (reason: untrusted_issuer, revoked, expired,
  wrong_challenge, untrusted_coordinator, timeout...).
* State: :attr:`Device.state` is a :class:`DeviceState` (``state.py`` draws the machine); every
  change goes through one method and is logged with its reason.
* Credentials: when the coordinator says the credential expired, the device re-authenticates
  with a fresh one from ``credential_provider`` (or :meth:`Device.update_credential`), else it
  stays EXPIRED with that reason.
* Presence: retained online/offline on the device's presence topic (a pre-signed will covers
  unclean disconnects) and heartbeats every ``heartbeat_ttl / 3`` (the coordinator expires
  silence; the TTL is the coordinator's configured one, default 30 s, unless the device asks).
* Configs: what arrives on the config topic must be signed by the coordinator (the client's
  ``senders`` policy), be for this device, and be a newer version than any accepted before
  (``Retained.STATE`` ordered by config version), so a replayed or re-published config never
  applies twice. The app sees them through ``on_config`` (return = applied, raise = failed) or
  ``async for cfg in dev.configs()`` (``await cfg.ack()`` / ``await cfg.fail(reason)``).
  Commands (notices, event acknowledgements) are messages: retained copies are checked for
  freshness and replay like live ones.
* Catch-up: every (re)authentication states the last version handled (kept in ``state_file``);
  the coordinator sends what changed since, and each version reaches the app exactly once.
* Outbox (:class:`Outbox`): each event carries an ``event_id`` and stays queued, in an
  append-only journal next to ``state_file``, until the coordinator acknowledges it
  (``coord.event_ack``); unacknowledged events are re-sent in order after every (re)admission
  and every heartbeat TTL, and the coordinator applies each id once.
* Credential lifecycle (:mod:`sdk.coord.device.enrollment`): :meth:`Device.enroll` obtains a
  DeviceCredential with a one-time token or a manufacturer credential; ``renew_after=`` renews it
  before expiry without losing admission; :meth:`Device.rotate_key` moves it to a new key.
"""

from sdk.coord.device.client import Admission, ConfigCallback, CredentialProvider, Device
from sdk.coord.device.configs import Config
from sdk.coord.device.enrollment import EnrollmentError, enroll, rotate_key
from sdk.coord.device.outbox import MAX_OUTBOX, Outbox
from sdk.coord.device.state import DeviceState
from sdk.coord.device.sync import SyncDevice

CLOSED = DeviceState.CLOSED
CONNECTING = DeviceState.CONNECTING
AUTHENTICATING = DeviceState.AUTHENTICATING
ADMITTED = DeviceState.ADMITTED
WAITING = DeviceState.WAITING
REAUTHENTICATING = DeviceState.REAUTHENTICATING
EXPIRED = DeviceState.EXPIRED
REVOKED = DeviceState.REVOKED

__all__ = [
    "Admission", "Config", "ConfigCallback", "CredentialProvider", "Device", "DeviceState", "Outbox",
    "SyncDevice", "MAX_OUTBOX", "CLOSED", "CONNECTING", "AUTHENTICATING", "ADMITTED", "WAITING",
    "REAUTHENTICATING", "EXPIRED", "REVOKED", "EnrollmentError", "enroll", "rotate_key",
]
