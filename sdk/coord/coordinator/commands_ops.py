"""``device.call``: an operator calls a named method on one device and gets its result.

The coordinator sends ``{method, args}`` as a ``coord.call`` request, encrypted to the device, on
the device's command topic, with the call's timeout as the request's expiry. Outcomes map to
operator reasons: ``not_found`` (unknown device), ``offline`` (not admitted now: answered at once),
``timeout`` (no reply in time), ``no_such_method`` and ``handler_error`` (the device's answer).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sdk.coord import protocol
from sdk.coord.coordinator.errors import InvalidValue
from sdk.coord.coordinator.operations import OperatorRequest
from sdk.coord.coordinator.values import check_json, finite, strict_dumps
from sdk.coord.errors import OperatorError
from sdk.messaging.errors import MessagingError, RemoteError, RequestTimeout

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator

log = logging.getLogger(__name__)

MAX_METHOD = 128
MAX_ARGS_BYTES = 16 * 1024
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 60.0
_MAX_MESSAGE = 512
#: reasons a device's error reply may carry through to the operator as they are
_DEVICE_REASONS = frozenset({"no_such_method", "handler_error", "invalid_params", "busy"})


def _params(params: Any) -> tuple[str, str, dict[str, Any], float]:
    if not isinstance(params, dict):
        raise OperatorError("params must be an object", reason="invalid_params")
    did, method = params.get("did"), params.get("method")
    if not isinstance(did, str) or not did:
        raise OperatorError("did: a device DID is required", reason="invalid_params")
    if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD:
        raise OperatorError(f"method: a name of 1-{MAX_METHOD} characters is required", reason="invalid_params")
    args = params.get("args", {})
    if args is None:
        args = {}
    try:
        if not isinstance(args, dict):
            raise InvalidValue("must be an object")
        check_json(args, what="args")
        if len(strict_dumps(args).encode()) > MAX_ARGS_BYTES:
            raise InvalidValue(f"larger than {MAX_ARGS_BYTES} bytes")
    except InvalidValue as exc:
        raise OperatorError(f"args: {exc}", reason="invalid_params") from exc
    timeout = params.get("timeout", DEFAULT_TIMEOUT)
    try:
        timeout = finite(timeout, what="timeout", maximum=MAX_TIMEOUT)
        if timeout <= 0:
            raise InvalidValue("timeout must be above 0")
    except InvalidValue as exc:
        raise OperatorError(f"timeout: {exc} (0 < timeout <= {MAX_TIMEOUT:g})", reason="invalid_params") from exc
    return did, method, args, timeout


async def call_device(coordinator: Coordinator, did: str, method: str, args: dict[str, Any], *,
                      timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Call ``method(args)`` on admitted device ``did``; its result, or :class:`OperatorError`."""
    rec = coordinator.registry.get(did)
    if rec is None:
        raise OperatorError(f"no device {did}", reason="not_found")
    if rec.session is not None and rec.session.expired():
        raise OperatorError(f"device {did} is not admitted (credential expired)", reason="offline")
    if not rec.admitted:
        raise OperatorError(f"device {did} is {rec.state}, not admitted", reason="offline")
    try:
        reply = await coordinator.client.request(
            protocol.device_commands(rec.token), {"method": method, "args": args}, type=protocol.CALL,
            encrypt_to=did, timeout=timeout, qos=1)
    except RequestTimeout as exc:
        log.info("call %s on %s: no reply within %.3gs", method, did, timeout)
        raise OperatorError(f"device {did} did not answer {method!r} within {timeout:g}s",
                            reason="timeout") from exc
    except RemoteError as exc:
        reason = exc.reason if exc.reason in _DEVICE_REASONS else "handler_error"
        text = str(exc).removeprefix(f"{did} answered with an error: {exc.reason}: ")[:_MAX_MESSAGE]
        log.info("call %s on %s answered with an error: %s", method, did, exc.reason)
        raise OperatorError(f"device {did} answered {method!r} with {exc.reason}: {text}",
                            reason=reason) from exc
    except MessagingError as exc:          # the request could not be sent (broker down, ...)
        log.warning("call %s on %s not sent: %s", method, did, exc.reason)
        raise OperatorError(f"call to {did} not sent: {exc.reason}", reason="offline") from exc
    body = reply.body if isinstance(reply.body, dict) else {}
    return body.get("result")


async def device_call(request: OperatorRequest) -> dict[str, Any]:
    """``device.call`` (write): ``{did, method, args, timeout}`` → ``{"result": ...}``."""
    did, method, args, timeout = _params(request.params)
    result = await call_device(request.coordinator, did, method, args, timeout=timeout)
    return {"result": result}


def register_command_ops(coordinator: Coordinator) -> None:
    """Register ``device.call`` on ``coordinator``."""
    coordinator.operations.register("device.call", "write", device_call)


__all__ = ["call_device", "device_call", "register_command_ops", "MAX_ARGS_BYTES", "MAX_TIMEOUT"]
