"""Direct commands: named handlers on a device, answering the coordinator's ``coord.call`` requests.

The coordinator sends ``{method, args}`` as an encrypted request with an expiry on the device's
command topic; the device's subscription there admits only its coordinator. The reply is
``{"result": ...}``, or an error reply whose ``reason`` is ``no_such_method``, ``handler_error``
(the handler raised: its exception's type and text), ``invalid_params`` or ``busy``::

    @device.command("reboot")
    async def reboot(args: dict) -> dict:
        return {"scheduled": args.get("delay", 0)}
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sdk.identity.hazmat.json import value_problem
from sdk.messaging.client import ERROR, RESPONSE
from sdk.messaging.errors import MessagingError

if TYPE_CHECKING:
    from sdk.messaging.client import SecureClient
    from sdk.messaging.envelope import Message

log = logging.getLogger(__name__)

#: ``handler(args) -> JSON result`` (or an awaitable of it)
CommandHandler = Callable[[dict[str, Any]], Awaitable[Any] | Any]
H = TypeVar("H", bound=CommandHandler)

MAX_NAME = 128
#: the largest ``args`` object a call may carry, and the largest result a handler may return
MAX_ARGS_BYTES = 16 * 1024
MAX_RESULT_BYTES = 64 * 1024
#: calls answered at the same time; beyond it a call gets ``busy``
MAX_RUNNING = 64
_MAX_ERROR_TEXT = 512


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())


class Commands:
    """A device's command handlers by name, and the answering of calls to them."""

    def __init__(self) -> None:
        self._handlers: dict[str, CommandHandler] = {}
        self._running = 0

    def register(self, name: str, handler: CommandHandler) -> None:
        """Answer calls to ``name`` with ``handler(args)`` (sync or async; replaces an earlier one)."""
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"a command name is a string of 1-{MAX_NAME} characters")
        if not callable(handler):
            raise TypeError("handler must be callable")
        self._handlers[name] = handler

    def command(self, name: str) -> Callable[[H], H]:
        """Decorator form of :meth:`register`."""
        def decorate(handler: H) -> H:
            self.register(name, handler)
            return handler
        return decorate

    def names(self) -> list[str]:
        """The registered command names."""
        return sorted(self._handlers)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    async def answer(self, client: SecureClient, msg: Message) -> None:
        """Run the handler a ``coord.call`` names and reply; never raises."""
        if msg.retained or msg.reply_to is None:
            log.info("call %s from %s dropped: %s", msg.id, msg.sender,
                     "retained" if msg.retained else "no reply topic")
            return
        if not msg.reply_to.startswith(client.config.reply_prefix):
            log.warning("call %s from %s dropped: reply-to %r outside %r", msg.id, msg.sender, msg.reply_to,
                        client.config.reply_prefix)
            return
        if msg.expires_at is None:
            log.warning("call %s from %s dropped: it carries no expiry", msg.id, msg.sender)
            return
        if not msg.encrypted:
            await self._error(client, msg, "not_encrypted", "calls must be end-to-end encrypted")
            return
        body = msg.body if isinstance(msg.body, dict) else {}
        method, args = body.get("method"), body.get("args", {})
        if not isinstance(method, str) or not 0 < len(method) <= MAX_NAME:
            await self._error(client, msg, "invalid_params", f"method must be a string of 1-{MAX_NAME} characters")
            return
        if not isinstance(args, dict) or value_problem(args) is not None or _size(args) > MAX_ARGS_BYTES:
            await self._error(client, msg, "invalid_params",
                              f"args must be a JSON object of at most {MAX_ARGS_BYTES} bytes")
            return
        handler = self._handlers.get(method)
        if handler is None:
            log.info("call to unknown method %r from %s", method, msg.sender)
            await self._error(client, msg, "no_such_method", f"no method {method!r} on this device")
            return
        if self._running >= MAX_RUNNING:
            await self._error(client, msg, "busy", f"{MAX_RUNNING} calls already running")
            return
        self._running += 1
        try:
            result = await self._run(handler, method, dict(args), msg)
        except TimeoutError:
            log.warning("command %r from %s still running at the call's expiry; cancelled", method, msg.sender)
            return
        except Exception as exc:  # noqa: BLE001 - the handler's failure is answered, not raised
            log.warning("command %r failed: %s: %s", method, type(exc).__name__, exc)
            await self._error(client, msg, "handler_error", f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_TEXT])
            return
        finally:
            self._running -= 1
        problem = value_problem(result)
        if problem is None and _size(result) > MAX_RESULT_BYTES:
            problem = f"larger than {MAX_RESULT_BYTES} bytes"
        if problem is not None:
            log.warning("command %r returned an unusable result: %s", method, problem)
            await self._error(client, msg, "handler_error", f"result is not usable JSON: {problem}"[:_MAX_ERROR_TEXT])
            return
        await self._reply(client, msg, {"result": result}, RESPONSE)

    @staticmethod
    async def _run(handler: CommandHandler, method: str, args: dict[str, Any], msg: Message) -> Any:
        out = handler(args)
        if inspect.isawaitable(out):
            assert msg.expires_at is not None
            out = await asyncio.wait_for(out, max(0.0, msg.expires_at - time.time()))
        return out

    async def _error(self, client: SecureClient, msg: Message, reason: str, text: str) -> None:
        await self._reply(client, msg, {"reason": reason, "message": text}, ERROR)

    @staticmethod
    async def _reply(client: SecureClient, msg: Message, body: Any, type_: str) -> None:
        assert msg.reply_to is not None
        try:
            await client.publish(msg.reply_to, body, type=type_, correlation_id=msg.correlation_id or msg.id,
                                 encrypt_to=msg.sender, qos=1)
        except MessagingError as exc:
            log.warning("reply to call %s not sent: %s", msg.id, exc.reason)


__all__ = ["Commands", "CommandHandler", "MAX_ARGS_BYTES", "MAX_RESULT_BYTES"]
