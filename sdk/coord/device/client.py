"""The device's connection to the coordination mesh: :class:`Device` (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdk.coord import properties as reported_properties
from sdk.coord import protocol
from sdk.coord.backpressure import busy_delay
from sdk.coord.device.commands import CommandHandler, Commands, H
from sdk.coord.device.configs import Config
from sdk.coord.device.enrollment import DEFAULT_RENEW_AFTER, Renewal, enroll
from sdk.coord.device.outbox import MAX_OUTBOX, Outbox
from sdk.coord.device.state import STUCK, DeviceState, allowed
from sdk.coord.device.state_file import StateFile
from sdk.coord.errors import AdmissionError, MalformedConfig, NotAdmitted
from sdk.coord.events import Event, battery, custom, input_methods, network, screen_available, screen_lost
from sdk.coord.handshake import COORDINATOR_CREDENTIAL, check_presentation, present
from sdk.coord.protocol import ConfigVersion
from sdk.identity import Key, StatusChecker, TrustPolicy
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.client import ClientConfig, SecureClient
from sdk.messaging.envelope import Message, Signer, new_id
from sdk.messaging.errors import MessagingError, RejectedMessage, RemoteError, RequestTimeout
from sdk.messaging.policy import Retained
from sdk.messaging.status import MqttStatusListSource
from sdk.messaging.transport import Backoff, backoff_delay
from sdk.messaging.will import presigned_will

log = logging.getLogger(__name__)

Credential = dict[str, Any] | str
ConfigCallback = Callable[[Config], Awaitable[Any] | Any]
#: ``provider() -> credential or None`` (sync or async): a fresh credential when the current one expired
CredentialProvider = Callable[[], Credential | Awaitable[Credential | None] | None]

_TRANSIENT = ("timeout", "busy", "status_unavailable")   # worth another try at connect()
_CONNECT_ATTEMPTS = 3
_BUSY_ATTEMPTS = 100              # busy refusals connect() waits out (each after the coordinator's hint)
_CONFIG_KEY = "config"            # the one state key of the config topic (per sender: the coordinator)
_MAX_REJECTED = 64
_WILL_TTL = 365 * 86400
_EXPIRED = ("expired", "credential_expired")     # notice reasons meaning "present a fresh credential"
_TICKET_TTL = 600.0               # a ticket's lifetime when the coordinator does not say
_TICKET_RENEW_AT = (0.5, 0.7)     # renew a ticket at a random share of its lifetime in this range
_TICKET_RETRY = (0.05, 5.0)       # a renewal refused: try again after this share of it (at least 5 s)

S = DeviceState


@dataclass(frozen=True)
class Admission:
    """The result of a successful authentication."""

    coordinator: str
    session: str
    boot: str
    heartbeat_ttl: float
    pending: int


class Device:
    """One device's connection to the coordination mesh (``async with``).

    ``credential_provider`` is asked for a fresh credential when the coordinator says the
    current one expired (or refuses it as expired); :meth:`update_credential` hands one over
    at any time. ``state_file`` keeps the last handled config version; the outbox journal lives
    next to it (``outbox_file`` to choose), ``durability`` as :class:`~sdk.coord.device.Outbox`.
    ``renew_after`` (default 2/3) renews a credential that has a ``validUntil`` at that fraction
    of its validity through the coordinator and re-authenticates with it while admitted (a
    coordinator that did not issue it, or has no issuer, says so once and renewal stops);
    ``None`` turns renewal off; ``credential_file`` keeps the renewed credential on disk.
    """

    #: ``await Device.enroll(key, broker=, coordinator=, token= | manufacturer_credential=)`` -> credential
    enroll = staticmethod(enroll)          # -- enrollment (enrollment.py)

    def __init__(
        self,
        key: Key,
        credential: Credential,
        *,
        broker: str,
        coordinator: str,
        trust: TrustPolicy | None = None,
        on_config: ConfigCallback | None = None,
        heartbeat_ttl: float | None = None,
        last_version: int = 0,
        state_file: str | Path | None = None,
        outbox_file: str | Path | None = None,
        durability: str = "normal",
        credential_provider: CredentialProvider | None = None,
        capabilities: Iterable[str] | None = None,
        attributes: dict[str, Any] | None = None,
        auth_timeout: float = 5.0,
        direct_admission: bool = True,
        client_config: ClientConfig | None = None,
        max_outbox: int = MAX_OUTBOX,
        renew_after: float | None = DEFAULT_RENEW_AFTER,
        credential_file: str | Path | None = None,
        **transport_options: Any,
    ) -> None:
        if not isinstance(key, Key):
            raise TypeError("key must be an sdk.identity.Key")
        if max_outbox < 1:
            raise ValueError("max_outbox must be at least 1")
        if heartbeat_ttl is not None and heartbeat_ttl <= 0:
            raise ValueError("heartbeat_ttl must be positive")
        if credential_provider is not None and not callable(credential_provider):
            raise TypeError("credential_provider must be callable")
        self.key = key
        self.did = key.did
        self.credential = credential
        self.credential_provider = credential_provider
        self.coordinator = coordinator.partition("#")[0]
        self.trust = trust if trust is not None else TrustPolicy(
            {_issuer_of(credential): {COORDINATOR_CREDENTIAL}})
        self.on_config = on_config
        self.heartbeat_ttl = heartbeat_ttl
        self.auth_timeout = auth_timeout
        #: a first admission presents directly (over its request's own id, one round trip)
        self.direct_admission = direct_admission
        self._direct = True     # off once the coordinator refused it; on when a reply says it takes it
        self.capabilities = None if capabilities is None else sorted(capabilities)
        self.attributes = dict(attributes or {})
        self.state_file = Path(state_file) if state_file is not None else None
        self._state_store = StateFile(self.state_file) if self.state_file is not None else None
        if outbox_file is None and self.state_file is not None:
            outbox_file = self.state_file.with_name(self.state_file.stem + ".outbox.jsonl")
        # compactions run on a worker thread (_compact_if_due): the event loop only appends
        self._outbox = Outbox(outbox_file, max_entries=max_outbox, durability=durability, auto_compact=False)
        self._compacting = False
        self.last_version = last_version
        if self._state_store is not None:
            self.last_version, legacy = self._state_store.load(last_version)
            for body in legacy:             # a state file from before the journal
                self._outbox.add(body)
            if legacy:
                self._state_store.save(self.last_version)
        self._state = S.CLOSED
        self.state_reason: str | None = None
        self._state_changed = asyncio.Event()
        self.admission: Admission | None = None
        self.rejected_configs: deque[str] = deque(maxlen=_MAX_REJECTED)   # reasons, before the app
        self.status_source = MqttStatusListSource(self.trust)   # lists ordered, never rolled back
        self._checker = StatusChecker(self.status_source)
        self._token = protocol.token(self.did)
        self.token = self._token  # the device's topic id (its DID's method-specific id)
        self._coord_cmd = protocol.device_commands(protocol.token(self.coordinator))
        self._config_topic = protocol.device_config(self._token)
        presence = protocol.device_presence(self._token)
        options = {**did_credentials(key), **transport_options}
        options.setdefault("will", presigned_will(
            Signer(key), presence, {"state": "offline", "reason": "connection_lost", "did": self.did},
            type=protocol.PRESENCE, ttl=_WILL_TTL))
        self._user_on_reject = options.pop("on_reject", None)
        self.client = SecureClient(broker, key, config=client_config or ClientConfig(qos=0),
                                   on_reject=self._on_reject, **options)
        self._send_lock = asyncio.Lock()
        self._admission_gen = 0
        self._presented: Credential | None = None      # the credential of the current admission
        self._inbox: asyncio.Queue[ConfigVersion] = asyncio.Queue()
        self._app_queue: asyncio.Queue[Config] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._parsed: tuple[tuple[str, str], ConfigVersion | None] = (("", ""), None)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reauth: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._coordinator_boot: str | None = None
        # -- resumption tickets: good with any instance of the coordinator's deployment (one store)
        self._ticket: tuple[str, str] | None = None    # (next_challenge, deployment it came from)
        self._announced: str | None = None               # deployment of the coordinator's last "online" note
        self._ticket_renew_at = 0.0                      # clock() from which the ticket is renewed
        self._ticket_ttl = _TICKET_TTL
        #: monotonic seconds, injectable (tests): when a ticket is due for renewal
        self.clock: Callable[[], float] = time.monotonic
        #: tickets renewed while admitted (``coord.ticket``)
        self.tickets_renewed = 0
        # -- end resumption tickets
        #: authentications retried after a busy coordinator
        self.busy_retries = 0
        self._last_delivered: Config | None = None
        # -- credential renewal (enrollment.py): at renew_after of the validity, written to credential_file
        self.renewal: Renewal | None = None if renew_after is None else Renewal(
            self, renew_after=renew_after, credential_file=credential_file)
        self._broker = broker                      # for rotate_key(): the same broker and transport
        self._rotation_options = {k: v for k, v in transport_options.items()
                                  if k not in ("username", "password", "will", "on_reject")}
        # -- end credential renewal
        #: direct-command handlers, answering the coordinator's ``coord.call`` requests
        self.commands = Commands()

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> DeviceState:
        """Where the device stands (:class:`DeviceState`); ``state_reason`` says why."""
        return self._state

    @property
    def admitted(self) -> bool:
        """True while the coordinator has admitted this device."""
        return self._state is S.ADMITTED

    @property
    def refused_reason(self) -> str | None:
        """The reason of the last refusal, while not admitted."""
        return None if self._state is S.ADMITTED else self.state_reason

    def _set_state(self, new: DeviceState, reason: str | None = None) -> bool:
        """The one place the state changes: checks the transition, logs it, runs entry/exit work."""
        old = self._state
        if new is not old and not allowed(old, new):
            log.warning("device %s: no transition %s -> %s (%s); staying %s", self.did, old, new, reason, old)
            return False
        self._state, self.state_reason = new, reason
        if new is old:
            return True
        log.info("device %s: %s -> %s%s", self.did, old, new, f" ({reason})" if reason else "")
        if old is S.ADMITTED:
            self._stop_heartbeat()
        if new is S.ADMITTED and self.admission is not None:
            self._start_heartbeat(self.admission.heartbeat_ttl)
        self._state_changed.set()
        self._state_changed = asyncio.Event()
        return True

    async def wait_admitted(self, timeout: float | None = None) -> None:
        """Wait until (re-)admitted; :class:`NotAdmitted` when revoked, expired, closed or on timeout."""
        async def wait() -> None:
            while self._state is not S.ADMITTED:
                if self._state in STUCK:
                    raise NotAdmitted(f"device {self._state} ({self.state_reason})",
                                      reason=self.state_reason or str(self._state))
                await self._state_changed.wait()
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise NotAdmitted(f"not admitted within {timeout}s ({self.state_reason or self._state})",
                              reason=self.state_reason or "not_admitted") from None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Device:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self, *, authenticate: bool = True) -> None:
        """Connect, subscribe, announce presence and (by default) authenticate.

        Raises :class:`AdmissionError` when authentication fails (the device stays connected,
        in :attr:`state` WAITING, EXPIRED or REVOKED); a broker failure closes it and re-raises.
        """
        if self._state is not S.CLOSED or self._worker is not None:
            raise RuntimeError("connect() once per Device")
        self._set_state(S.CONNECTING)
        try:
            if not self.client.transport.connected:
                await self.client.transport.connect()
            coordinator = {self.coordinator}
            # the status lists and the coordinator's presence come through one broker subscription
            # (the broadcast tree): every device shares it, and a broker pays for each filter
            # shared by the fleet at every subscribe. Both handlers are registered first.
            await self.client.subscribe(protocol.coordinator_presence(protocol.token(self.coordinator)),
                                        self._on_coordinator_presence, senders=coordinator,
                                        retained=Retained.DROP, qos=1, local=True)
            await self.status_source.attach(self.client, local=True)
            # subscribed together, the reply topic (client.connect) too, with the presence after
            # them: the packets leave in one or two writes and are acknowledged in one round trip
            # (each handler is in place before its SUBSCRIBE is sent). The coordinator acts on no
            # "online" presence, so the handshake need not wait for that one apart.
            await asyncio.gather(
                self.client.connect(),
                self.client.cover(protocol.STATUS_TREE, qos=1),
                self.client.subscribe(
                    self._config_topic, self._on_config_msg, senders=coordinator, retained=Retained.STATE,
                    order=self._config_order, floors={(self.coordinator, _CONFIG_KEY): self.last_version},
                    gate=self._config_gate, qos=1),
                self.client.subscribe(protocol.device_commands(self._token), self._on_command,
                                      senders=coordinator, retained=Retained.MESSAGES, qos=1),
                self._publish_presence("online"))
            self.client.transport.add_on_connect(self._on_reconnect)
            self._worker = asyncio.ensure_future(self._config_worker())
        except BaseException:
            await self.aclose()
            raise
        if not authenticate:
            self._set_state(S.WAITING, "not authenticated yet")
            return
        attempt = busy = 0
        while True:
            try:
                await self.authenticate()
                return
            except AdmissionError as exc:
                if exc.reason == "expired" and await self._fresh_credential():
                    attempt += 1
                    continue
                # -- back-pressure: a busy coordinator says when to come back; wait around that
                if exc.reason == "busy" and busy < _BUSY_ATTEMPTS:
                    busy += 1
                    self.busy_retries += 1
                    delay = busy_delay(str(exc), fallback=0.1 * 2 ** min(busy, 5))
                    log.info("coordinator busy; authenticating again in %.2fs", delay)
                    await asyncio.sleep(delay)
                    continue
                # -- end back-pressure
                attempt += 1
                if exc.reason not in _TRANSIENT or attempt >= _CONNECT_ATTEMPTS:
                    raise
                log.info("authentication attempt %d failed (%s); retrying", attempt, exc.reason)
                await asyncio.sleep(backoff_delay(attempt, base=0.1, cap=2.0))

    async def aclose(self) -> None:
        """Say offline (retained), stop tasks and disconnect."""
        if self._state is S.CLOSED and self._worker is None:
            return
        prev = self._state
        self._set_state(S.CLOSED, "closed")
        with contextlib.suppress(MessagingError, OSError):
            if prev is not S.REVOKED and self.client.connected:
                await self._publish_presence("offline", reason="closed")
        for task in [self._reauth, self._heartbeat, self._worker, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.renewal is not None:        # -- credential renewal
            await self.renewal.aclose()
        self._worker = self._heartbeat = self._reauth = None
        await self.client.aclose()
        self._outbox.close()

    # ------------------------------------------------------------------ credentials
    def update_credential(self, credential: Credential) -> None:
        """Present ``credential`` from now on; an expired device re-authenticates with it at once."""
        self.credential = credential
        if self._state is S.EXPIRED:
            self._schedule_reauth("credential updated")

    # -- key rotation (enrollment.py)
    async def rotate_key(self, new_key: Key, *, credential_file: str | Path | None = None) -> dict[str, Any]:
        """Hand this device's credential to ``new_key`` (this key proves it): returns the new DID's
        credential; the coordinator revokes this DID, so go on with a new Device for ``new_key``."""
        from sdk.coord.device.enrollment import rotate_key

        trust = TrustPolicy({_issuer_of(self.credential): {"DeviceCredential"}})
        return await rotate_key(self.key, new_key, broker=self._broker, coordinator=self.coordinator,
                                trust=trust, credential_file=credential_file, timeout=self.auth_timeout,
                                **self._rotation_options)
    # -- end key rotation

    async def _fresh_credential(self) -> bool:
        """Ask ``credential_provider`` for a credential other than the current one; True if one came."""
        if self.credential_provider is None:
            return False
        try:
            fresh = self.credential_provider()
            if inspect.isawaitable(fresh):
                fresh = await fresh
        except Exception:   # the app's provider failing is logged, not raised
            log.exception("device %s: credential provider failed", self.did)
            return False
        if fresh is None or fresh == self.credential:
            log.warning("device %s: credential provider has no fresh credential", self.did)
            return False
        self.credential = fresh
        log.info("device %s: fresh credential from the provider", self.did)
        return True

    # ------------------------------------------------------------------ authentication
    async def authenticate(self, *, resume: bool = True) -> Admission:
        """Run the mutual DID+VP handshake; raises :class:`AdmissionError` with a reason.

        After a first admission the coordinator hands out a single-use ``next_challenge``; with
        ``resume`` the next authentication answers it directly (one round trip, the coordinator's
        presentation comes back in the admission reply). A stale one falls back to the full form.
        """
        if self._state is S.CLOSED:
            raise NotAdmitted("device is closed", reason="closed")
        if self._state not in (S.REAUTHENTICATING, S.ADMITTED):   # admitted: the session goes on meanwhile
            self._set_state(S.AUTHENTICATING, "authenticate")
        try:
            return await self._handshake(resume)
        except AdmissionError as exc:
            self._refused(exc)
            raise

    def _refused(self, exc: AdmissionError) -> None:
        if exc.reason == "revoked":
            self._set_state(S.REVOKED, "revoked")
        elif exc.reason == "expired":
            self._set_state(S.EXPIRED, "expired")
        elif self._state is S.REAUTHENTICATING:
            self.state_reason = exc.reason           # the loop tries again
        elif self._state is not S.CLOSED:
            self._set_state(S.WAITING, exc.reason)

    async def _handshake(self, resume: bool) -> Admission:
        ticket, self._ticket = self._ticket, None
        if resume and ticket is not None and self._announced in (None, ticket[1]):
            # the ticket came from this coordinator deployment (any instance over its store honours
            # it; a coordinator started on an empty store announces another deployment and is not
            # asked), and the reply is signed by its key: no coordinator presentation needed
            try:
                return await self._present(ticket[0])
            except AdmissionError as exc:
                if exc.reason == "busy" and self._ticket is None:
                    # refused before it was looked at (too many requests in progress): the retry
                    # resumes with it again, not with a hello and a presentation the coordinator
                    # must sign (a ticket it did consume is answered wrong_challenge, then a hello)
                    self._ticket = ticket
                if exc.reason not in ("wrong_challenge", "timeout"):
                    raise
                log.debug("resumed authentication refused (%s); full handshake", exc.reason)
        # Direct: the presentation's challenge is the id of the request carrying it (fresh and
        # single use by the envelope checks), so no hello is needed; a coordinator that does not
        # take it answers wrong_challenge and gets the hello next (and from then on).
        if self.direct_admission and self._direct:
            request_id = new_id()
            try:
                return await self._present(request_id, nonce=secrets.token_urlsafe(16), request_id=request_id)
            except AdmissionError as exc:
                if exc.reason != "wrong_challenge":
                    raise
                self._direct = False
                log.info("device %s: coordinator takes no direct presentation; hello first", self.did)
        # A nonce-less hello costs the coordinator no signature (an unauthenticated flood stays
        # cheap); the coordinator proves itself in the present reply, checked before admission.
        hello = await self._request(protocol.HELLO, {})
        body = hello.body if isinstance(hello.body, dict) else {}
        challenge = body.get("challenge")
        if not isinstance(challenge, str):
            raise AdmissionError("coordinator sent no challenge", reason="malformed")
        return await self._present(challenge, nonce=secrets.token_urlsafe(16))

    def _check_coordinator(self, vp: Any, nonce: str) -> None:
        try:
            check_presentation(vp, challenge=nonce, domain=self.did, trust=self.trust,
                               status=self._checker, credential_type=COORDINATOR_CREDENTIAL,
                               expected_holder=self.coordinator)
        except AdmissionError as exc:
            log.warning("coordinator %s failed mutual authentication: %s", self.coordinator, exc)
            raise AdmissionError(f"coordinator not trusted: {exc}", reason="untrusted_coordinator") from exc

    async def _present(self, challenge: str, *, nonce: str | None = None,
                       request_id: str | None = None) -> Admission:
        credential = self.credential
        vp = present(credential, self.key, challenge=challenge, domain=self.coordinator)
        req: dict[str, Any] = {"challenge": challenge, "vp": vp, "last_version": self.last_version}
        if self.heartbeat_ttl is not None:      # else the coordinator's configured TTL applies
            req["heartbeat_ttl"] = self.heartbeat_ttl
        if nonce is not None:
            req["nonce"] = nonce
        if self.capabilities is not None:
            req["capabilities"] = self.capabilities
        if self.attributes:
            req["attributes"] = self.attributes
        reply = await self._request(protocol.PRESENT, req, request_id=request_id)
        rb = reply.body if isinstance(reply.body, dict) else {}
        if nonce is not None:
            self._check_coordinator(rb.get("vp"), nonce)
        try:
            admission = Admission(self.coordinator, str(rb["session"]), str(rb["boot"]),
                                  float(rb.get("heartbeat_ttl") or self.heartbeat_ttl or 30.0),
                                  int(rb.get("pending", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise AdmissionError("malformed admission reply", reason="malformed") from exc
        self._take_ticket(rb, admission.boot)
        if rb.get("direct") is True:
            self._direct = True
        self._admit(admission, credential)
        return admission

    def _take_ticket(self, body: Mapping[str, Any], boot: str | None) -> None:
        """Keep the ``next_challenge`` of an admission or ticket reply (with its deployment)."""
        ticket = body.get("next_challenge")
        if not isinstance(ticket, str):
            return
        deployment = body.get("deployment")
        key = deployment if isinstance(deployment, str) else boot
        if key is None:
            return
        ttl = body.get("ticket_ttl")
        self._ticket = (ticket, key)
        self._ticket_ttl = float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) \
            and 0 < ttl <= 86400 else _TICKET_TTL
        # spread over part of the lifetime: a fleet admitted at once does not renew at once
        self._ticket_renew_at = self.clock() + self._ticket_ttl * random.uniform(*_TICKET_RENEW_AT)

    def ticket_due(self) -> bool:
        """True when the resumption ticket is due for renewal (past half its lifetime or more)."""
        return self._ticket is not None and self.clock() >= self._ticket_renew_at

    async def renew_ticket(self) -> bool:
        """Ask the coordinator for a fresh resumption ticket (admitted only; one signed request, no
        presentation); True when one came. Done by the heartbeat once a ticket is half-way to expiry,
        so a broker restart long after admission still re-admits the fleet by ticket."""
        if self._state is not S.ADMITTED:
            return False
        share, least = _TICKET_RETRY                     # asked now: the next try, if this one fails
        self._ticket_renew_at = self.clock() + max(least, self._ticket_ttl * share)
        try:
            reply = await self._request(protocol.TICKET, {})
        except (AdmissionError, MessagingError) as exc:     # refused, or the broker went away
            log.info("device %s: resumption ticket not renewed (%s)", self.did, exc.reason)
            return False
        body = reply.body if isinstance(reply.body, dict) else {}
        if not isinstance(body.get("next_challenge"), str):
            return False
        self._take_ticket(body, self.admission.boot if self.admission is not None else None)
        self.tickets_renewed += 1
        return True

    def _admit(self, admission: Admission, credential: Credential) -> None:
        self.admission = admission
        self._presented = credential
        self._coordinator_boot = admission.boot
        self._admission_gen += 1
        if self._state is S.ADMITTED:          # authenticated again while admitted: a new session
            self.state_reason = f"session {admission.session}"
            self._start_heartbeat(admission.heartbeat_ttl)
            log.info("device %s: admitted again (session %s)", self.did, admission.session)
        else:
            self._set_state(S.ADMITTED, f"session {admission.session}")
        if len(self._outbox):   # queued before, sent before the waiters' new events (same lock, order)
            self._spawn(self._drain())
        if self.renewal is not None:        # -- credential renewal: timed from the admitted credential
            self.renewal.schedule()

    async def _request(self, type_: str, body: dict[str, Any], *, request_id: str | None = None) -> Message:
        try:
            return await self.client.request(self._coord_cmd, body, type=type_, timeout=self.auth_timeout,
                                             expect_from=self.coordinator, request_id=request_id)
        except RemoteError as exc:
            raise AdmissionError(f"coordinator refused: {exc}", reason=exc.reason) from exc
        except RequestTimeout as exc:
            raise AdmissionError(f"no answer from coordinator: {exc}", reason="timeout") from exc

    def _schedule_reauth(self, reason: str) -> None:
        if self._state in (S.CLOSED, S.REVOKED, S.CONNECTING, S.AUTHENTICATING) \
                or (self._reauth is not None and not self._reauth.done()):
            return
        if self._set_state(S.REAUTHENTICATING, reason):
            self._reauth = asyncio.ensure_future(self._reauth_loop(expired=reason == "expired"))

    async def _reauth_loop(self, *, expired: bool) -> None:
        backoff = Backoff(0.05, 5.0)       # jittered: a fleet re-authenticating does not retry in step
        while self._state is S.REAUTHENTICATING:
            delay: float | None = None
            if expired:     # the admitted credential expired: present another or stop
                expired = False
                if self.credential is self._presented and not await self._fresh_credential():
                    self._set_state(S.EXPIRED, "expired")
                    return
            try:
                await self.client.transport.wait_connected(timeout=None)
                await self.authenticate()
                return
            except AdmissionError as exc:
                if exc.reason == "revoked":
                    return
                if exc.reason == "expired":
                    if not await self._fresh_credential():
                        return                  # EXPIRED until update_credential()
                    self._set_state(S.REAUTHENTICATING, "fresh credential")
                if exc.reason == "busy":
                    self.busy_retries += 1
                    delay = busy_delay(str(exc), fallback=backoff.next())
                log.info("re-authentication failed (%s), retrying", exc.reason)
            except MessagingError as exc:
                log.info("re-authentication interrupted (%s), retrying", exc.reason)
            await asyncio.sleep(backoff.next() if delay is None else delay)

    def _on_reconnect(self, session_present: bool) -> None:
        if self._state in (S.CLOSED, S.REVOKED):
            return
        self._spawn(self._publish_presence("online"))
        if self._state not in (S.CONNECTING, S.AUTHENTICATING, S.EXPIRED):
            self._schedule_reauth("reconnected")

    # ------------------------------------------------------------------ presence
    async def _publish_presence(self, state: str, *, reason: str | None = None) -> None:
        ttl = self.admission.heartbeat_ttl if self.admission is not None else self.heartbeat_ttl
        body: dict[str, Any] = {"state": state, "did": self.did, "ttl": ttl}
        if reason:
            body["reason"] = reason
        await self.client.publish(protocol.device_presence(self._token), body, type=protocol.PRESENCE,
                                  retain=True, qos=1)

    def _start_heartbeat(self, ttl: float) -> None:
        self._stop_heartbeat()
        self._heartbeat = asyncio.ensure_future(self._heartbeat_loop(ttl))

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        self._heartbeat = None

    async def _heartbeat_loop(self, ttl: float) -> None:
        seq = 0
        while self._state is S.ADMITTED:
            await asyncio.sleep(ttl / 3)
            seq += 1
            try:
                await self.client.publish(protocol.device_presence(self._token), {"seq": seq},
                                          type=protocol.HEARTBEAT, qos=0)
            except MessagingError as exc:
                log.debug("heartbeat not sent: %s", exc.reason)
            if self.ticket_due():       # -- resumption ticket: renewed well before it expires
                self._spawn(self.renew_ticket())
            stale = time.monotonic() - ttl
            resend = False
            for entry in self._outbox.entries():     # unacknowledged for a whole TTL: send again
                if entry.sent_gen >= 0 and entry.sent_at < stale:
                    entry.sent_gen = -1
                resend = resend or entry.sent_gen < 0
            if resend:
                self._spawn(self._drain())

    def pause_heartbeats(self) -> None:
        """Stop sending heartbeats (for tests and apps going silent on purpose)."""
        self._stop_heartbeat()

    # ------------------------------------------------------------------ events
    async def publish_event(self, event: Event, *, wait_admitted: float | None = 5.0) -> str:
        """Queue a validated event and send it; returns its ``event_id``.

        It stays in the outbox until the coordinator acknowledges it. While the coordinator is
        away this waits up to ``wait_admitted`` s, then returns with the event still queued (it
        goes out on re-admission). Raises :class:`NotAdmitted` only when revoked.
        """
        if not isinstance(event, Event):
            raise TypeError("event must be an sdk.coord.events.Event (use the helpers)")
        if self._state is S.REVOKED:
            raise NotAdmitted("device credential revoked", reason="revoked")
        event_id = new_id()
        await self._journal(self._outbox.add, {**event.to_body(), "event_id": event_id})
        if self._state is not S.ADMITTED:
            try:
                await self.wait_admitted(wait_admitted)
            except NotAdmitted as exc:
                if exc.reason == "revoked":
                    await self._journal(self._outbox.drop, event_id)
                    raise
                log.info("event %s queued until the coordinator admits %s (%s)", event_id, self.did,
                         exc.reason)
                return event_id
        await self._drain()
        return event_id

    @property
    def outbox(self) -> list[str]:
        """Ids of the events not yet acknowledged by the coordinator, oldest first."""
        return self._outbox.ids()

    async def _journal(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run an outbox change: inline (one buffered append), or on a thread when it fsyncs."""
        if self._outbox.durability == "full":
            out = await asyncio.to_thread(fn, *args)
        else:
            out = fn(*args)
        self._compact_if_due()
        return out

    def _compact_if_due(self) -> None:
        if self._outbox.compact_due and not self._compacting:
            self._compacting = True
            self._spawn(self._compact())

    async def _compact(self) -> None:
        try:
            await asyncio.to_thread(self._outbox.compact)
        except OSError as exc:
            log.error("device %s: outbox compaction failed: %s", self.did, exc)
        finally:
            self._compacting = False

    async def _drain(self) -> None:
        """Send every queued event not yet sent in this admission, in order (one sender at a time)."""
        async with self._send_lock:
            for entry in self._outbox.entries():
                if self._state is not S.ADMITTED:
                    return
                if entry.sent_gen == self._admission_gen or entry.event_id not in self._outbox:
                    continue
                gen = self._admission_gen
                try:
                    await self.client.publish(protocol.device_events(self._token), entry.body,
                                              type=protocol.EVENT, qos=1)
                except MessagingError as exc:
                    log.info("event %s not sent (%s); it stays queued", entry.event_id, exc.reason)
                    return
                entry.sent_gen, entry.sent_at = gen, time.monotonic()

    def _on_event_ack(self, msg: Message) -> None:
        body = msg.body if isinstance(msg.body, dict) else {}
        event_id = body.get("event_id")
        if not isinstance(event_id, str) or event_id not in self._outbox:
            return
        if body.get("status") == protocol.ACK_REJECTED:
            log.warning("coordinator rejected event %s: %s", event_id, body.get("reason"))
        if self._outbox.durability == "full":
            self._spawn(self._journal(self._outbox.ack, event_id))
        else:
            self._outbox.ack(event_id)
            self._compact_if_due()

    async def screen_available(self, width: int, height: int, *, density: float | None = None,
                               screen_id: str | None = None) -> str:
        """Publish ``screen_available``."""
        return await self.publish_event(screen_available(width, height, density=density, screen_id=screen_id))

    async def screen_lost(self, *, screen_id: str | None = None) -> str:
        """Publish ``screen_lost``."""
        return await self.publish_event(screen_lost(screen_id=screen_id))

    async def input_methods(self, methods: list[str]) -> str:
        """Publish ``input_methods``."""
        return await self.publish_event(input_methods(methods))

    async def battery(self, battery_class: str, *, level: float | None = None) -> str:
        """Publish ``battery``."""
        return await self.publish_event(battery(battery_class, level=level))

    async def network(self, network_class: str) -> str:
        """Publish ``network``."""
        return await self.publish_event(network(network_class))

    async def custom_event(self, event_type: str, **fields: Any) -> str:
        """Publish any other event."""
        return await self.publish_event(custom(event_type, **fields))

    async def announce(self, *, capabilities: Iterable[str] | None = None,
                       attributes: dict[str, Any] | None = None) -> None:
        """Tell the coordinator about capabilities/attributes beyond the credential's."""
        if capabilities is not None:
            self.capabilities = sorted(capabilities)
        if attributes:
            self.attributes.update(attributes)
        body: dict[str, Any] = {"attributes": self.attributes}
        if self.capabilities is not None:
            body["capabilities"] = self.capabilities
        await self.client.publish(protocol.device_events(self._token), body, type=protocol.ANNOUNCE, qos=1)

    async def report_properties(self, properties: Mapping[str, Any]) -> None:
        """Update this device's reported properties on the coordinator (``None`` deletes a key).

        Checked here first (a bounded strict JSON object, see :mod:`sdk.coord.properties`):
        raises :class:`~sdk.coord.properties.InvalidProperties` before anything is sent."""
        body = {"properties": reported_properties.check(dict(properties))}
        await self.client.publish(protocol.device_events(self._token), body, type=protocol.PROPERTIES, qos=1)

    # ------------------------------------------------------------------ configs
    def _parse_config(self, msg: Message) -> ConfigVersion | None:
        """The message's config document, or None (parsed once per message)."""
        if self._parsed[0] == (msg.sender, msg.id):
            return self._parsed[1]
        cfg: ConfigVersion | None = None
        if msg.type == protocol.CONFIG:
            try:
                cfg = ConfigVersion.from_body(msg.body)
            except MalformedConfig as exc:
                log.warning("device %s: malformed config from %s: %s", self.did, msg.sender, exc)
        self._parsed = ((msg.sender, msg.id), cfg)
        return cfg

    def _config_order(self, msg: Message) -> tuple[str, int] | None:
        """Retained-state order of the config topic: the document's version."""
        cfg = self._parse_config(msg)
        return None if cfg is None else (_CONFIG_KEY, cfg.version)

    def _config_gate(self, msg: Message) -> RejectedMessage | None:
        cfg = self._parse_config(msg)
        if cfg is None:
            return None
        if cfg.did != self.did:
            return RejectedMessage(f"config for {cfg.did}, not this device", reason="wrong_device")
        return None

    def _on_reject(self, topic: str, exc: RejectedMessage) -> None:
        if topic == self._config_topic:
            self.rejected_configs.append(exc.reason)
        if self._user_on_reject is not None:
            self._user_on_reject(topic, exc)

    def _on_config_msg(self, msg: Message) -> None:
        cfg = self._parse_config(msg)
        if cfg is not None:
            self._inbox.put_nowait(cfg)

    async def _config_worker(self) -> None:
        while True:
            cfg = await self._inbox.get()
            if cfg.version <= self.last_version:
                log.debug("dropping config v%d (already handled v%d)", cfg.version, self.last_version)
                continue
            if cfg.version != self.last_version + 1:
                log.warning("config v%d after v%d: versions in between were superseded",
                            cfg.version, self.last_version)
            status, reason, apply_ms = await self._deliver(cfg)
            self.last_version = cfg.version
            if self._state_store is not None:
                try:
                    await asyncio.to_thread(self._state_store.save, cfg.version)
                except OSError as exc:
                    log.error("device %s: could not save state file %s: %s", self.did, self.state_file, exc)
            self._changed.set()
            self._changed = asyncio.Event()
            try:
                body: dict[str, Any] = {"version": cfg.version, "status": status, "apply_ms": apply_ms}
                if reason:
                    body["reason"] = reason
                await self.client.publish(protocol.device_events(self._token), body, type=protocol.REPORT,
                                          qos=1)
            except MessagingError as exc:
                log.warning("could not report config v%d: %s", cfg.version, exc.reason)

    async def _deliver(self, cv: ConfigVersion) -> tuple[str, str | None, float]:
        cfg = Config(cv, time.time())
        t0 = time.perf_counter()
        if self.on_config is not None:
            try:
                res = self.on_config(cfg)
                if inspect.isawaitable(res):
                    await res
                status, reason = protocol.APPLIED, None
            except Exception as exc:  # noqa: BLE001 - the app's failure is reported, not raised
                log.warning("config v%d failed to apply: %s", cv.version, exc)
                status, reason = protocol.FAILED, f"{type(exc).__name__}: {exc}"[:200]
        else:
            done: asyncio.Future[tuple[str, str | None]] = asyncio.get_running_loop().create_future()
            cfg = Config(cv, cfg.received_at, _done=done)
            self._app_queue.put_nowait(cfg)
            status, reason = await done
        return status, reason, round((time.perf_counter() - t0) * 1000, 3)

    async def configs(self) -> AsyncIterator[Config]:
        """Verified configs, in version order (without ``on_config``); unacked ones ack on next()."""
        if self.on_config is not None:
            raise RuntimeError("configs() is for devices without an on_config callback")
        while True:
            prev = self._last_delivered
            if prev is not None:
                await prev.ack()
            cfg = await self._app_queue.get()
            self._last_delivered = cfg
            yield cfg

    async def wait_version(self, version: int, timeout: float | None = None) -> None:
        """Wait until config ``version`` (or later) has been handled."""
        async def wait() -> None:
            while self.last_version < version:
                await self._changed.wait()
        await asyncio.wait_for(wait(), timeout)

    # ------------------------------------------------------------------ direct commands
    def register_command(self, name: str, handler: CommandHandler) -> None:
        """Answer the coordinator's calls to ``name`` with ``handler(args)`` (sync or async, returns JSON)."""
        self.commands.register(name, handler)

    def command(self, name: str) -> Callable[[H], H]:
        """Decorator: ``@device.command("reboot")`` registers the function as command ``name``."""
        return self.commands.command(name)

    # ------------------------------------------------------------------ from the coordinator
    def _on_command(self, msg: Message) -> None:
        """Notices, event acknowledgements and calls (the subscription admits only the coordinator)."""
        if msg.type == protocol.EVENT_ACK:
            self._on_event_ack(msg)
        elif msg.type == protocol.CALL:
            self._spawn(self.commands.answer(self.client, msg))
        elif msg.type == protocol.NOTICE:
            body = msg.body if isinstance(msg.body, dict) else {}
            self._on_notice(body.get("notice"), body.get("reason"))

    def _on_notice(self, notice: Any, reason: Any) -> None:
        if self._state is S.CLOSED:
            return
        if notice == protocol.NOTICE_REVOKED:
            log.warning("device %s: coordinator says credential revoked", self.did)
            self._set_state(S.REVOKED, "revoked")
        elif notice == protocol.NOTICE_EXPIRED or (
                notice in (protocol.NOTICE_REAUTH, protocol.NOTICE_NOT_ADMITTED) and reason in _EXPIRED):
            log.warning("device %s: coordinator says the credential expired", self.did)
            if self._state is S.EXPIRED:
                return
            if self._state is S.REAUTHENTICATING:       # the running attempt will hear "expired"
                return
            self._schedule_reauth("expired")
        elif notice in (protocol.NOTICE_REAUTH, protocol.NOTICE_NOT_ADMITTED):
            self._schedule_reauth(str(reason or notice))

    def _on_coordinator_presence(self, msg: Message) -> None:
        if msg.type != protocol.PRESENCE:
            return
        body = msg.body if isinstance(msg.body, dict) else {}
        if body.get("state") == "offline":
            # a coordinator that stood down late (its will, after a standby took over) says nothing
            # about the one that admitted this device: only an offline note of that boot counts
            if self._state is S.ADMITTED and body.get("boot") in (None, self._coordinator_boot):
                self._set_state(S.WAITING, "coordinator offline")
            return
        if body.get("state") == "online" and isinstance(body.get("boot"), str):
            deployment = body.get("deployment")
            self._announced = deployment if isinstance(deployment, str) else body["boot"]
        if body.get("state") == "online" and (
                self._state is S.WAITING
                or (self._state is S.ADMITTED and body.get("boot") != self._coordinator_boot)):
            self._schedule_reauth(f"coordinator online (boot {body.get('boot')})")

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _issuer_of(credential: Any) -> str:
    if isinstance(credential, dict):
        issuer = credential.get("issuer")
        if isinstance(issuer, dict):
            issuer = issuer.get("id")
        if isinstance(issuer, str):
            return issuer
    if isinstance(credential, str):  # VC-JWT: iss claim
        from sdk.identity.errors import IdentityError
        from sdk.identity.jwt_vc import unverified_claims

        try:
            claims = unverified_claims(credential)
            if isinstance(claims.get("iss"), str):
                return str(claims["iss"])
        except IdentityError:
            pass
    raise ValueError("cannot tell the credential's issuer; pass trust= explicitly")


__all__ = ["Admission", "Device", "CredentialProvider", "ConfigCallback"]
