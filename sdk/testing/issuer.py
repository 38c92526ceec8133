"""A test issuer: one key that issues every credential type of the SDK, revocably.

    issuer = TestIssuer()
    vc = issuer.device(device_key, kind="phone", groups=["room:a"])
    coordinator = Coordinator(key, ..., trust=issuer.trust, credential=issuer.coordinator(key))
    await issuer.publish(client)          # its status list, retained on the broker
    await issuer.revoke(vc)               # sets the credential's bit and publishes again

Every credential carries a status entry in the issuer's one status list (published over MQTT
at ``status_list_url(issuer.did)``), so a revocation reaches coordinators, devices, nodes and
routers the way a real issuer's does. ``trust`` trusts this issuer for all those types.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from sdk.identity import Key, StatusList, TrustPolicy, create_status_list_credential, status_entry

log = logging.getLogger(__name__)

DEVICE = "DeviceCredential"
COORDINATOR = "CoordinatorCredential"
OPERATOR = "OperatorCredential"
ACCESS = "InferenceAccessCredential"
NODE = "InferenceNodeCredential"
#: Every type :class:`TestIssuer` issues (its ``trust`` allows them all).
TYPES = (DEVICE, COORDINATOR, OPERATOR, ACCESS, NODE)

KeyOrDid = Key | str


def _did(subject: KeyOrDid) -> str:
    if isinstance(subject, Key):
        return subject.did
    if isinstance(subject, str) and subject.startswith("did:"):
        return subject.partition("#")[0]
    raise TypeError("give a Key or a DID string")


def _subject_of(credential: Mapping[str, Any]) -> str | None:
    subject = credential.get("credentialSubject")
    if isinstance(subject, list) and subject:
        subject = subject[0]
    sid = subject.get("id") if isinstance(subject, Mapping) else None
    return sid if isinstance(sid, str) else None


class TestIssuer:
    """Issues device, coordinator, operator, inference-access and inference-node credentials.

    ``key`` defaults to a fresh one. ``issued`` lists ``(did, index, credential)`` in issue order;
    :meth:`revoke` takes a credential, a DID (all its credentials) or a key.
    """

    __test__ = False  # not a test class, whatever pytest's collection rules say

    def __init__(self, key: Key | None = None, *, status_list_size: int = 131072) -> None:
        from sdk.messaging.status import status_list_url

        self.key = key or Key.generate()
        self.did = self.key.did
        self.status_url = status_list_url(self.did)
        self.bits = StatusList(status_list_size)
        self.issued: list[tuple[str, int, dict[str, Any]]] = []
        self.revoked: set[int] = set()
        self._next = 0
        self._client: Any = None
        self._broker: tuple[str, dict[str, Any]] | None = None

    @property
    def trust(self) -> TrustPolicy:
        """A policy trusting this issuer for every type it issues."""
        return TrustPolicy({self.did: set(TYPES)})

    def trust_for(self, *types: str) -> TrustPolicy:
        """A policy trusting this issuer for ``types`` only."""
        return TrustPolicy({self.did: set(types)})

    # ------------------------------------------------------------------ issuing
    def _entry(self) -> tuple[int, dict[str, Any]]:
        index = self._next
        if index >= self.bits.size:
            raise ValueError("the test issuer's status list is full")
        self._next += 1
        return index, status_entry(self.status_url, index)

    def _record(self, did: str, index: int, credential: Any) -> Any:
        self.issued.append((did, index, credential))
        return credential

    def device(self, subject: KeyOrDid, *, kind: str = "device", groups: Iterable[str] = (),
               capabilities: Iterable[str] = (), name: str | None = None,
               valid_for: float = 365 * 86400) -> dict[str, Any]:
        """A ``DeviceCredential`` (kind, groups, capabilities) for a device key or DID."""
        from sdk.coord.coordinator.auth import device_credential

        did = _did(subject)
        index, entry = self._entry()
        return self._record(did, index, device_credential(
            self.key, did, kind=kind, groups=groups, capabilities=capabilities, name=name, status=entry,
            valid_for=valid_for))

    def coordinator(self, subject: KeyOrDid, *, name: str = "coordinator",
                    valid_for: float = 365 * 86400) -> dict[str, Any]:
        """The ``CoordinatorCredential`` devices check in the handshake."""
        from sdk.coord.coordinator.auth import coordinator_credential

        did = _did(subject)
        return self._record(did, -1, coordinator_credential(self.key, did, name=name, valid_for=valid_for))

    def operator(self, subject: KeyOrDid, *, roles: Iterable[str] = ("read",), name: str | None = None,
                 valid_for: float = 90 * 86400) -> dict[str, Any]:
        """An ``OperatorCredential`` with ``roles`` (``read`` / ``write`` / ``admin``, cumulative)."""
        from sdk.coord.coordinator.auth import operator_credential

        did = _did(subject)
        index, entry = self._entry()
        return self._record(did, index, operator_credential(self.key, did, roles=roles, name=name,
                                                            valid_for=valid_for, status=entry))

    def access(self, subject: KeyOrDid, *, models: Iterable[str] = ("*",), max_tokens: int | None = None,
               valid_until: str | None = None) -> Any:
        """An ``InferenceAccessCredential``: who may generate on mesh nodes, for which models."""
        from sdk.mesh.credentials import issue_access_credential

        did = _did(subject)
        index, entry = self._entry()
        return self._record(did, index, issue_access_credential(
            self.key, did, models=models, max_tokens=max_tokens, valid_until=valid_until,
            credential_status=entry))

    def node(self, subject: KeyOrDid, *, models: Iterable[str] = ("*",), node_ids: Iterable[str] = (),
             valid_for: float | None = None) -> Any:
        """An ``InferenceNodeCredential``: who may serve ``models`` as a mesh node."""
        from sdk.mesh.credentials import issue_node_credential

        did = _did(subject)
        index, entry = self._entry()
        return self._record(did, index, issue_node_credential(
            self.key, did, models=models, node_ids=node_ids, valid_for=valid_for, credential_status=entry))

    # ------------------------------------------------------------------ revocation
    def indexes(self, target: Any) -> list[int]:
        """Status indexes of ``target``: a credential, a DID or a key (all of its credentials)."""
        if isinstance(target, Mapping) or (isinstance(target, str) and not target.startswith("did:")):
            return [i for _, i, c in self.issued if (c is target or c == target) and i >= 0]
        did = _did(target)
        return [i for d, i, _ in self.issued if d == did and i >= 0]

    def status_list(self) -> dict[str, Any]:
        """The signed status list credential as it stands (each one newer than the last)."""
        cred = create_status_list_credential(self.key, self.status_url, status_list=self.bits)
        assert isinstance(cred, dict)
        return cred

    def bind(self, url: str, credentials: Mapping[str, Any] | None = None) -> None:
        """Publish on the broker at ``url`` when no client is given (the plugin binds its broker)."""
        self._broker = (url, dict(credentials or {}))

    async def publish(self, client: Any = None) -> dict[str, Any]:
        """Sign the list and publish it retained, through ``client`` or the bound broker."""
        from sdk.messaging.status import publish_status_list

        if client is None:
            client = await self._own_client()
        cred = self.status_list()
        await publish_status_list(client, cred)
        return cred

    async def revoke(self, target: Any, *, client: Any = None, publish: bool = True) -> list[int]:
        """Revoke ``target`` (credential, DID or key) and publish the list; the indexes set."""
        found = self.indexes(target)
        if not found:
            raise LookupError(f"{type(self).__name__} issued no revocable credential to {target!r:.80}")
        for index in found:
            self.bits.set(index)
            self.revoked.add(index)
        log.info("test issuer %s revoked status indexes %s", self.did, found)
        if publish and (client is not None or self._broker is not None or self._client is not None):
            await self.publish(client)
        return found

    async def _own_client(self) -> Any:
        if self._client is None:
            if self._broker is None:
                raise RuntimeError("no broker to publish on: pass a connected SecureClient, or bind(url) first")
            from sdk.messaging import SecureClient
            from sdk.messaging.broker_auth import did_credentials

            url, options = self._broker
            client = SecureClient(url, self.key, **(options or did_credentials(self.key)))
            await client.connect()
            self._client = client
        return self._client

    async def aclose(self) -> None:
        """Disconnect the issuer's own client (if it opened one)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


__all__ = ["TestIssuer", "TYPES", "DEVICE", "COORDINATOR", "OPERATOR", "ACCESS", "NODE"]
