"""Tool calls: the prompt that shows a model its tools, the schema a required call is constrained
to, and reading a call back out of the output (plain Python, no torch).

A model whose chat template renders ``tools`` gets them that way; for one whose template does
not (the bundled SmolLM2), the tools and the call format are added to the system message, in
the ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` convention of Hermes/Qwen templates.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .constraints import canonical

__all__ = ["template_renders_tools", "render_chat", "tools_system_prompt", "tool_call_schema",
           "parse_tool_call", "openai_tool_calls"]

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_MAX_CALL_CHARS = 1 << 20


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique (a duplicate makes the text not a call)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def template_renders_tools(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template uses a ``tools`` variable."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-message text that lists ``tools`` and the call format."""
    listed = "\n".join(json.dumps(dict(t["function"]), ensure_ascii=False) for t in tools)
    return ("You may call one of these functions. To call one, answer only with "
            f'{_OPEN}{{"name": <function name>, "arguments": <arguments object>}}{_CLOSE}\n'
            f"<tools>\n{listed}\n</tools>")


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The prompt text for ``messages`` (and ``tools``) through the tokenizer's chat template."""
    if tools and template_renders_tools(tokenizer):
        return str(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True))
    if tools:
        extra = tools_system_prompt(tools)
        if messages and messages[0].get("role") == "system":
            messages = [{**messages[0], "content": f"{messages[0]['content']}\n\n{extra}"}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": extra}, *messages]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _branch(tool: Mapping[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                             "arguments": dict(fn.get("parameters") or {"type": "object"})},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_schema(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The schema of one call: ``{"name": <a tool's name>, "arguments": <that tool's parameters>}``
    over the union of ``tools`` (only the tool ``name`` when given; ``KeyError`` if absent)."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise KeyError(name)
    if len(chosen) == 1:
        return _branch(chosen[0])
    return {"anyOf": [_branch(t) for t in chosen]}


def parse_tool_call(text: str, tools: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``{"name", "arguments"}`` when ``text`` is one call of a listed tool (bare JSON or inside
    ``<tool_call>`` tags), else None. The arguments must be a JSON object; the schema is not
    checked here (a constrained call matches it by construction)."""
    body = text.strip()
    if body.startswith(_OPEN):
        end = body.find(_CLOSE)
        body = body[len(_OPEN):end if end >= 0 else len(body)].strip()
    if not body.startswith("{"):
        return None
    if len(body) > _MAX_CALL_CHARS:
        return None
    try:
        call = json.loads(body, object_pairs_hook=_unique)
    except (ValueError, RecursionError):  # not a call: the text stays content
        return None
    names = {t["function"]["name"] for t in tools}
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        return None
    return {"name": call["name"], "arguments": call["arguments"]}


def openai_tool_calls(call: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The OpenAI ``tool_calls`` list for one parsed call (arguments as a JSON string)."""
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": call["name"], "arguments": canonical(call["arguments"]).decode("utf-8")}}]
