"""amqtt plugins: admit only DID holders (CONNECT proof) and keep each client to its own topics.

Load them through amqtt's ``plugins`` config (``EmbeddedBroker`` does this for you)::

    "brokers.did_auth.DIDAuthPlugin":  {"window": 60.0, "max_proofs_per_identity": 1000}
    "brokers.did_auth.DIDTopicPlugin": {"acl": "brokers.did_auth.own_topics_acl", "admins": [coordinator_did]}

The ACL is any importable callable ``acl(did, topic, action, admins) -> bool`` (action is
``"publish"``, ``"subscribe"`` or ``"receive"``; ``receive`` is asked for every message, live or
retained, before it is delivered), so deployments can swap in their own rules. amqtt drops a
denied PUBLISH silently (the publisher still gets its PUBACK): upper layers must not treat a
PUBACK as proof of delivery. amqtt itself does not ask ``receive`` for retained messages; the
``EmbeddedBroker`` does (see ``brokers.embedded``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from sdk.messaging.broker_auth import AUDIENCE, DEFAULT_WINDOW, ProofReplayGuard, verify_connect_password
from sdk.messaging.errors import BrokerAuthError
from sdk.messaging.topics import ROOT

log = logging.getLogger(__name__)

TopicACL = Callable[[str | None, str, str, Sequence[str]], bool]

# kinds of topic: who may publish / subscribe (see sdk/messaging/topics.py for the layout)
_OWNER_PUBLISHES = {("dev", "presence"), ("dev", "events"), ("inf", "ads"), ("status", None)}
_INBOX = {("dev", "cmd"), ("inf", "req"), ("reply", None)}
_PUBLIC_READ = {("dev", "presence"), ("dev", "events"), ("dev", "config"), ("inf", "ads"), ("status", None),
                ("status", "presence")}


def _token(did: str | None) -> str | None:
    if not did:
        return None
    return did.partition("#")[0].rsplit(":", 1)[-1]


def _classify(topic: str) -> tuple[tuple[str, str | None], str] | None:
    """``((area, kind), id)`` for a topic in the layout, else None."""
    if not topic.startswith(ROOT + "/"):
        return None
    levels = topic[len(ROOT) + 1:].split("/")
    match levels:
        case ["dev", ident, kind]:
            return ("dev", kind), ident
        case ["inf", kind, ident]:
            return ("inf", kind), ident
        case ["reply", ident]:
            return ("reply", None), ident
        case ["status", ident]:
            return ("status", None), ident
        case ["status", ident, "presence"]:
            return ("status", "presence"), ident    # a coordinator's presence: admins publish it
    return None


def own_topics_acl(did: str | None, topic: str, action: str, admins: Sequence[str] = ()) -> bool:
    """Default ACL: publish only your own presence/events/ads/status list, write to anyone's inbox,
    subscribe to (and receive from) only your own inboxes (cmd, inference requests, replies) and
    public topics. Device configs (and anything else) are written only by ``admins`` (the
    coordinator): with no admins, nobody may publish a config."""
    if did is not None and did in admins:
        return True
    if action == "receive":
        # what a subscription to exactly this topic would be granted (retained copies included)
        if "+" in topic or "#" in topic:
            return False
        action = "subscribe"
    own = _token(did)
    if own is None:
        return False
    if action == "subscribe" and topic == f"{ROOT}/dev/{own}/#":
        return True  # everything about yourself: config, commands, presence, events
    parsed = _classify(topic)
    if parsed is None:
        return False
    kind, ident = parsed
    if action == "publish":
        if "+" in ident or "#" in ident:
            return False
        if kind in _OWNER_PUBLISHES:
            return ident == own
        if kind == ("dev", "config"):
            return False  # only admins (the coordinator) write configs
        return kind in _INBOX
    if action == "subscribe":
        if kind in _INBOX:
            return ident == own
        if kind == ("status", None) and ident == "#":
            return True     # the broadcast tree: status lists and coordinators' presence
        return kind in _PUBLIC_READ and (ident in ("+", own) or ("+" not in ident and "#" not in ident))
    return False


def open_acl(did: str | None, topic: str, action: str, admins: Sequence[str] = ()) -> bool:
    """Allow everything to every authenticated client (tests, trusted networks)."""
    return True


def _load(path: str) -> TopicACL:
    module, _, name = path.rpartition(".")
    fn = getattr(import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{path} is not callable")
    return fn


class DIDAuthPlugin(BaseAuthPlugin):
    """CONNECT username = DID, password = fresh DID-signed proof (``sdk.messaging.broker_auth``)."""

    @dataclass
    class Config:
        window: float = DEFAULT_WINDOW
        audience: str = AUDIENCE
        max_recent_proofs: int = 100_000
        max_proofs_per_identity: int = 1_000

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.window = float(self._get_config_option("window", DEFAULT_WINDOW))
        self.audience = str(self._get_config_option("audience", AUDIENCE))
        self.replay = ProofReplayGuard(
            window=self.window,
            max_entries=int(self._get_config_option("max_recent_proofs", 100_000)),
            max_per_identity=int(self._get_config_option("max_proofs_per_identity", 1_000)),
        )
        #: ``(client_id, reason)`` of recent refusals, newest last (operators and tests read it).
        self.rejections: list[tuple[str, str]] = []

    async def authenticate(self, *, session: Session) -> bool:
        try:
            did = verify_connect_password(
                session.username, session.password, session.client_id,
                window=self.window, replay=self.replay, audience=self.audience,
            )
        except BrokerAuthError as exc:
            log.warning("refused CONNECT from client %r (%s): %s", session.client_id, exc.reason, exc)
            self.rejections.append((session.client_id, exc.reason))
            del self.rejections[:-1000]
            return False
        log.debug("client %r authenticated as %s", session.client_id, did)
        return True


class DIDTopicPlugin(BaseTopicPlugin):
    """Topic ACL keyed by the authenticated DID (the session username)."""

    @dataclass
    class Config:
        acl: str = "brokers.did_auth.own_topics_acl"
        admins: list[str] = field(default_factory=list)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.acl: TopicACL = _load(str(self._get_config_option("acl", "brokers.did_auth.own_topics_acl")))
        #: DIDs the ACL lets do anything (the coordinator); ``EmbeddedBroker.add_admin`` extends it.
        self.admins: tuple[str, ...] = tuple(self._get_config_option("admins", []) or [])

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if not topic or action is None:
            return False
        did = session.username if session is not None else None
        try:
            allowed = bool(self.acl(did, topic, str(action), self.admins))
        except Exception:
            log.exception("topic ACL raised for %s %s %s", did, action, topic)
            allowed = False
        if not allowed:
            log.info("ACL denied %s of %r to %s", action, topic, did)
        return allowed

    def allows(self, did: str | None, topic: str, action: str) -> bool:
        """The ACL's answer (a raising ACL denies), for callers outside amqtt's hooks."""
        try:
            return bool(self.acl(did, topic, action, self.admins))
        except Exception:
            log.exception("topic ACL raised for %s %s %s", did, action, topic)
            return False


__all__ = ["DIDAuthPlugin", "DIDTopicPlugin", "own_topics_acl", "open_acl", "TopicACL"]
