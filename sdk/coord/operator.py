"""The operator's side of the operator API: signed, encrypted requests to a coordinator.

An operator holds a DID key and an ``OperatorCredential`` naming its roles; every request goes
to the coordinator's command topic as ``coord.operate`` ``{op, params}``, encrypted to the
coordinator, with the credential attached so the coordinator can authorize it::

    async with OperatorClient(url, key, credential, coordinator=coordinator_did) as op:
        page = await op.query(where={"kind": "phone", "presence": "online"}, limit=50)
        await op.set({"tag": "canary"}, {"ui.layout": "v3"})

A refusal raises :class:`~sdk.coord.errors.OperatorError` with the coordinator's ``reason``
(``not_authorized``, ``forbidden``, ``invalid_params``, ``not_found``...). Operations are listed in
docs/COORDINATOR.md ("Operator API").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from sdk.coord import protocol
from sdk.coord.errors import OperatorError
from sdk.identity import Key
from sdk.messaging.client import ClientConfig, SecureClient
from sdk.messaging.errors import MessagingError, RemoteError, RequestTimeout
from sdk.messaging.loop_thread import LoopThread

log = logging.getLogger(__name__)

T = TypeVar("T")
#: seconds added to a device call's own timeout for the round trip through the coordinator
CALL_MARGIN = 5.0

Target = Mapping[str, Any] | str


def target_of(target: Target) -> dict[str, Any]:
    """A target document: a DID string means ``{"did": ...}``; a mapping is taken as it is."""
    if isinstance(target, str):
        return {"did": target}
    if not isinstance(target, Mapping):
        raise TypeError("target must be a DID or a mapping like {'group': ...} / {'tag': ...} / {'where': ...}")
    return dict(target)


class OperatorClient:
    """Operator requests over one :class:`SecureClient` (``async with``; reusable, not re-entrant).

    ``credential`` is the operator's OperatorCredential (attached to every request);
    ``coordinator`` the coordinator's DID. ``transport_options`` go to the transport (the DID
    login for the broker is added unless a username/password is given).
    """

    def __init__(self, broker: Any, key: Key, credential: Mapping[str, Any], *, coordinator: str,
                 timeout: float = 10.0, client_config: ClientConfig | None = None,
                 **transport_options: Any) -> None:
        if not isinstance(credential, Mapping):
            raise TypeError("credential must be the OperatorCredential as a JSON object")
        if not isinstance(coordinator, str) or not coordinator.startswith("did:"):
            raise ValueError("coordinator must be the coordinator's DID")
        self.key = key
        self.did = key.did
        self.coordinator = coordinator.partition("#")[0]
        self.timeout = timeout
        self.credential = dict(credential)
        self.client = SecureClient(broker, key, config=client_config or ClientConfig(),
                                   credentials=[self.credential], **transport_options)
        self._topic = protocol.device_commands(protocol.token(self.coordinator))

    async def __aenter__(self) -> OperatorClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Connect to the broker."""
        await self.client.connect()

    async def aclose(self) -> None:
        """Disconnect."""
        await self.client.aclose()

    # ------------------------------------------------------------------ generic
    async def call(self, op: str, params: Mapping[str, Any] | None = None, *,
                   timeout: float | None = None) -> Any:
        """Run operation ``op`` with ``params``; returns its result or raises :class:`OperatorError`."""
        timeout = self.timeout if timeout is None else timeout
        body = {"op": op, "params": dict(params or {})}
        try:
            reply = await self.client.request(self._topic, body, type=protocol.OPERATE,
                                              encrypt_to=self.coordinator, timeout=timeout)
        except RemoteError as exc:
            raise OperatorError(_remote_text(exc), reason=exc.reason) from exc
        except RequestTimeout as exc:
            raise OperatorError(f"{op}: no answer from the coordinator within {timeout}s",
                                reason="timeout") from exc
        except MessagingError as exc:
            raise OperatorError(f"{op}: {exc}", reason=exc.reason) from exc
        answer = reply.body
        if not isinstance(answer, dict) or answer.get("ok") is not True or "result" not in answer:
            raise OperatorError(f"{op}: the coordinator's reply has no result", reason="bad_reply")
        return answer["result"]

    # ------------------------------------------------------------------ fleet (read)
    async def query(self, where: Mapping[str, Any] | None = None, *, limit: int = 100,
                    cursor: str | None = None, count: bool = False,
                    timeout: float | None = None) -> dict[str, Any]:
        """One page of devices matching ``where``: ``{total, devices, next_cursor}`` (or ``{total}``)."""
        params: dict[str, Any] = {"where": dict(where or {}), "limit": limit, "cursor": cursor}
        if count:
            params["count"] = True
        result: dict[str, Any] = await self.call("fleet.query", params, timeout=timeout)
        return result

    async def devices(self, where: Mapping[str, Any] | None = None, *, page: int = 500,
                      timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every device matching ``where``, page after page."""
        cursor: str | None = None
        while True:
            result = await self.query(where, limit=page, cursor=cursor, timeout=timeout)
            for row in result["devices"]:
                yield row
            cursor = result.get("next_cursor")
            if not cursor:
                return

    async def count(self, where: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> int:
        """How many devices match ``where``."""
        return int((await self.query(where, count=True, timeout=timeout))["total"])

    async def show(self, did: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Everything the coordinator knows about one device."""
        result: dict[str, Any] = await self.call("device.show", {"did": did}, timeout=timeout)
        return result

    # ------------------------------------------------------------------ desired state, tags (write)
    async def set(self, target: Target, changes: Mapping[str, Any], *,
                  timeout: float | None = None) -> dict[str, Any]:
        """Set desired keys on the target devices: ``{count, versions}``."""
        result: dict[str, Any] = await self.call(
            "desired.set", {"target": target_of(target), "changes": dict(changes)}, timeout=timeout)
        return result

    async def unset(self, target: Target, keys: Iterable[str], *,
                    timeout: float | None = None) -> dict[str, Any]:
        """Remove desired keys from the target devices: ``{count, versions}``."""
        result: dict[str, Any] = await self.call(
            "desired.unset", {"target": target_of(target), "keys": list(keys)}, timeout=timeout)
        return result

    async def tag(self, target: Target, *, add: Iterable[str] = (), remove: Iterable[str] = (),
                  timeout: float | None = None) -> dict[str, Any]:
        """Add and remove operator tags on the target devices: ``{count}``."""
        result: dict[str, Any] = await self.call(
            "tags.set", {"target": target_of(target), "add": list(add), "remove": list(remove)},
            timeout=timeout)
        return result

    async def invoke(self, did: str, method: str, args: Mapping[str, Any] | None = None, *,
                     timeout: float = 10.0) -> Any:
        """Call ``method`` on an online device through the coordinator; returns its result."""
        result = await self.call("device.call", {"did": did, "method": method, "args": dict(args or {}),
                                                 "timeout": timeout}, timeout=timeout + CALL_MARGIN)
        return result.get("result") if isinstance(result, dict) else result

    # ------------------------------------------------------------------ credentials (admin)
    async def revoke(self, did: str, *, reason: str = "", timeout: float | None = None) -> dict[str, Any]:
        """Revoke every credential the coordinator issued to ``did``."""
        result: dict[str, Any] = await self.call("device.revoke", {"did": did, "reason": reason},
                                                 timeout=timeout)
        return result

    async def token(self, *, kind: str, groups: Iterable[str] = (), uses: int = 1, ttl: float = 3600,
                    approve: str = "auto", valid_for: float | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """A new enrollment token: ``{token, expires}``."""
        params: dict[str, Any] = {"kind": kind, "groups": list(groups), "uses": uses, "ttl": ttl,
                                  "approve": approve}
        if valid_for is not None:
            params["valid_for"] = valid_for
        result: dict[str, Any] = await self.call("enroll.token", params, timeout=timeout)
        return result

    async def pending(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Enrollment requests waiting for approval."""
        result = await self.call("enroll.pending", {}, timeout=timeout)
        return list(result.get("requests", [])) if isinstance(result, dict) else []

    async def approve(self, id_or_did: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Approve a pending enrollment (by request id or DID)."""
        result: dict[str, Any] = await self.call("enroll.approve", _request_ref(id_or_did), timeout=timeout)
        return result

    async def deny(self, id_or_did: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Deny a pending enrollment (by request id or DID)."""
        result: dict[str, Any] = await self.call("enroll.deny", _request_ref(id_or_did), timeout=timeout)
        return result

    async def audit(self, *, limit: int = 50, operator: str | None = None, op: str | None = None,
                    timeout: float | None = None) -> list[dict[str, Any]]:
        """The newest audit entries (optionally one operator's or one operation's)."""
        params: dict[str, Any] = {"limit": limit}
        if operator is not None:
            params["operator"] = operator
        if op is not None:
            params["op"] = op
        result = await self.call("audit.list", params, timeout=timeout)
        return list(result.get("entries", [])) if isinstance(result, dict) else []


class SyncOperatorClient:
    """Blocking facade over :class:`OperatorClient` (``with SyncOperatorClient(...) as op:``)."""

    def __init__(self, broker: Any, key: Key, credential: Mapping[str, Any], *, coordinator: str,
                 **options: Any) -> None:
        self._lt = LoopThread("autoglm-operator")
        try:
            self.client: OperatorClient = self._call(self._make(broker, key, credential, coordinator, options))
        except BaseException:
            self._lt.stop()
            raise

    @staticmethod
    async def _make(broker: Any, key: Key, credential: Mapping[str, Any], coordinator: str,
                    options: dict[str, Any]) -> OperatorClient:
        client = OperatorClient(broker, key, credential, coordinator=coordinator, **options)
        await client.connect()
        return client

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._lt.call(coro)

    def __enter__(self) -> SyncOperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect and stop the private loop."""
        if self._lt.running:
            try:
                self._call(self.client.aclose())
            finally:
                self._lt.stop()

    def call(self, op: str, params: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        return self._call(self.client.call(op, params, **kwargs))

    def query(self, where: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        return self._call(self.client.query(where, **kwargs))

    def show(self, did: str, **kwargs: Any) -> dict[str, Any]:
        return self._call(self.client.show(did, **kwargs))

    def set(self, target: Target, changes: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._call(self.client.set(target, changes, **kwargs))

    def unset(self, target: Target, keys: Iterable[str], **kwargs: Any) -> dict[str, Any]:
        return self._call(self.client.unset(target, keys, **kwargs))

    def tag(self, target: Target, **kwargs: Any) -> dict[str, Any]:
        return self._call(self.client.tag(target, **kwargs))

    def invoke(self, did: str, method: str, args: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        return self._call(self.client.invoke(did, method, args, **kwargs))

    def revoke(self, did: str, **kwargs: Any) -> dict[str, Any]:
        return self._call(self.client.revoke(did, **kwargs))

    def token(self, **kwargs: Any) -> dict[str, Any]:
        return self._call(self.client.token(**kwargs))

    def pending(self, **kwargs: Any) -> list[dict[str, Any]]:
        return self._call(self.client.pending(**kwargs))

    def approve(self, id_or_did: str, **kwargs: Any) -> dict[str, Any]:
        return self._call(self.client.approve(id_or_did, **kwargs))

    def deny(self, id_or_did: str, **kwargs: Any) -> dict[str, Any]:
        return self._call(self.client.deny(id_or_did, **kwargs))

    def audit(self, **kwargs: Any) -> list[dict[str, Any]]:
        return self._call(self.client.audit(**kwargs))


def _request_ref(id_or_did: str) -> dict[str, str]:
    return {"did": id_or_did} if id_or_did.startswith("did:") else {"id": id_or_did}


def _remote_text(exc: RemoteError) -> str:
    """The coordinator's own message, without the client's "<did> answered with an error" prefix."""
    text = str(exc)
    marker = f": {exc.reason}: "
    return text.split(marker, 1)[1] if marker in text else text


__all__ = ["OperatorClient", "SyncOperatorClient", "target_of", "CALL_MARGIN"]
