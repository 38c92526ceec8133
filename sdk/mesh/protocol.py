"""The mesh's wire vocabulary: message types and the bodies nodes and routers exchange.

Requests go to ``autoglm/v1/inf/req/{node}`` encrypted to the node's DID (type
``inference.generate``); chunks come back encrypted on the requester's reply topic. Adverts are
signed, retained messages on ``autoglm/v1/inf/ads/{node}`` (type ``inference.advert``). Bodies:

    request  {"model", one of "prompt" | "messages" | "prompt_token_ids", "max_new_tokens",
              "temperature", "top_p", "top_k", "stop", "seed", "held",
              optional "response_format", "tools", "generated_prefix"}
    chunk    {"t": text, "ids": [token ids], "f": finish reason | null, "u": usage | null,
              "p": prompt token ids (first chunk only)}
    error    {"reason", "message"}  (the messaging layer's error reply)

``held`` (resume only) is how many trailing generated tokens of ``prompt_token_ids`` had no text
emitted yet (an incomplete character), so the resuming node emits their text.

``response_format`` (OpenAI's ``json_schema`` / ``json_object``) constrains the output and
``tools`` are shown through the chat template; both are absent from unconstrained requests, so
older nodes read the body unchanged. A resume of a constrained request carries
``generated_prefix``: how many trailing ``prompt_token_ids`` are output the grammar is advanced
over. Both are checked with the engine's bounds (:mod:`sdk.inference.constraints`); a node
that cannot constrain answers ``structured_output_unavailable`` (never unconstrained text).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from sdk.messaging.errors import MessagingError

GENERATE = "inference.generate"
ADVERT = "inference.advert"

_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
_FINISH = frozenset({"stop", "length", "cancelled"})
Finish = Literal["stop", "length", "cancelled"]


class Refusal(MessagingError):
    """Raised by a node's handler: answered to the requester as an error reply with ``reason``."""

    reason = "refused"


def request_body(req: Any, *, model: str, prompt_token_ids: list[int] | None = None, held: int = 0,
                 max_new_tokens: int | None = None, generated: int = 0) -> dict[str, Any]:
    """The body for a ``GenerationRequest`` (or a resume of it from ``prompt_token_ids``, whose
    last ``generated`` ids are output)."""
    body: dict[str, Any] = {"model": model}
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = list(prompt_token_ids)
    elif req.prompt_token_ids is not None:
        body["prompt_token_ids"] = list(req.prompt_token_ids)
    elif req.messages is not None:
        body["messages"] = list(req.messages)
    else:
        body["prompt"] = req.prompt
    for name in _SAMPLING:
        body[name] = getattr(req, name)
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    body["stop"] = list(req.stop)
    if held:
        body["held"] = held
    if getattr(req, "response_format", None) is not None:
        body["response_format"] = req.response_format
        prefix = (req.generated_prefix or 0) + generated if prompt_token_ids is not None else req.generated_prefix
        if prefix:
            body["generated_prefix"] = prefix
    if getattr(req, "tools", None) is not None and "messages" in body:
        body["tools"] = list(req.tools)
    return body


def parse_request(body: Any) -> tuple[str, dict[str, Any], int]:
    """``(model, GenerationRequest fields, held)`` from a request body; ``Refusal`` when malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise Refusal("request body must be an object with a model name", reason="invalid_request")
    fields: dict[str, Any] = {}
    given = [k for k in ("prompt", "messages", "prompt_token_ids") if body.get(k) is not None]
    if len(given) != 1:
        raise Refusal("give exactly one of prompt, messages or prompt_token_ids", reason="invalid_request")
    fields[given[0]] = body[given[0]]
    for name in _SAMPLING:
        if name in body:
            fields[name] = body[name]
    stop = body.get("stop") or []
    if not isinstance(stop, list):
        raise Refusal("stop must be a list", reason="invalid_request")
    fields["stop"] = tuple(stop)
    _constraint_fields(body, fields)
    held = body.get("held", 0)
    if type(held) is not int or held < 0:
        raise Refusal("held must be a non-negative integer", reason="invalid_request")
    if held and (given[0] != "prompt_token_ids" or held >= len(body["prompt_token_ids"])):
        raise Refusal("held needs prompt_token_ids longer than it", reason="invalid_request")
    return body["model"], fields, held


def _constraint_fields(body: dict[str, Any], fields: dict[str, Any]) -> None:
    """Copy ``response_format`` / ``tools`` / ``generated_prefix`` into ``fields``, checked with
    the engine's bounds; ``Refusal`` with the typed reason (``invalid_schema``...) otherwise."""
    from sdk.inference.constraints import check_response_format, check_tools  # plain Python
    from sdk.inference.errors import InvalidRequest

    try:
        if body.get("response_format") is not None:
            check_response_format(body["response_format"])
            fields["response_format"] = body["response_format"]
        if body.get("tools") is not None:
            check_tools(body["tools"])
            fields["tools"] = body["tools"]
    except InvalidRequest as exc:
        raise Refusal(str(exc), reason=exc.reason) from None
    prefix = body.get("generated_prefix", 0)
    if type(prefix) is not int or prefix < 0 or (prefix and "response_format" not in fields):
        raise Refusal("generated_prefix must be a non-negative integer, with response_format",
                      reason="invalid_request")
    if prefix:
        fields["generated_prefix"] = prefix


def chunk_body(chunk: Any, *, prompt_ids: list[int] | None = None, text: str | None = None) -> dict[str, Any]:
    """The body for one ``TokenChunk``."""
    body: dict[str, Any] = {"t": chunk.text if text is None else text, "ids": list(chunk.token_ids)}
    if chunk.finish_reason is not None:
        body["f"] = chunk.finish_reason
    if chunk.usage is not None:
        body["u"] = asdict(chunk.usage)
    if prompt_ids is not None:
        body["p"] = prompt_ids
    return body


@dataclass(frozen=True)
class Chunk:
    """One parsed ``stream.chunk`` body: text, token ids, finish reason, node usage, prompt ids."""

    text: str
    ids: list[int]
    finish: Finish | None = None
    usage: dict[str, Any] | None = None
    prompt_ids: list[int] | None = None


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def parse_chunk(body: Any) -> Chunk | None:
    """The :class:`Chunk` in a chunk body, or None when it is malformed."""
    if not isinstance(body, dict):
        return None
    text, ids = body.get("t"), body.get("ids")
    if not isinstance(text, str) or not _ints(ids):
        return None
    finish = body.get("f")
    if finish is not None and finish not in _FINISH:
        return None
    prompt = body.get("p")
    if prompt is not None and not _ints(prompt):
        return None
    usage = body.get("u")
    return Chunk(text, list(cast(list[int], ids)), cast(Finish | None, finish), usage if isinstance(usage, dict) else None,
                 None if prompt is None else list(prompt))


__all__ = ["GENERATE", "ADVERT", "Refusal", "Chunk", "request_body", "parse_request", "chunk_body", "parse_chunk"]
