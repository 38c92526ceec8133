"""``tools`` / ``tool_choice`` / ``response_format`` of a chat request: what the model is shown,
what its output is constrained to, and how the reply is read back as OpenAI ``tool_calls``.

    tool_choice "none"       tools are not shown; plain text
    tool_choice "auto"       tools shown (chat template); unconstrained text; a reply that is one
      (the default)          call of a listed tool (bare JSON or in <tool_call> tags) becomes tool_calls
    tool_choice "required"   tools shown; output constrained to {"name": <one of the tools>,
                             "arguments": <that tool's parameters schema>}
    {"type": "function", "function": {"name": N}}   the same, for tool N only
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdk.inference.tools import openai_tool_calls, parse_tool_call, tool_call_schema

__all__ = ["ToolPlan", "plan_tools", "ToolCallHold"]

_TAG = "<tool_call>"


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request asks: ``render`` (tools shown), ``response_format`` (constraint),
    ``parse`` (tools whose calls the reply is read for), ``forced`` (the reply must be a call)."""

    render: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    parse: list[dict[str, Any]] | None = None
    forced: bool = False

    def tool_calls(self, text: str) -> list[dict[str, Any]] | None:
        """The OpenAI ``tool_calls`` in ``text`` (None: it is plain content)."""
        if not self.parse:
            return None
        call = parse_tool_call(text, self.parse)
        return None if call is None else openai_tool_calls(call)


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any,
               response_format: dict[str, Any] | None) -> ToolPlan:
    """The :class:`ToolPlan` for a request; ``ValueError(param, message)`` when they conflict.

    ``tools`` must already be checked (:func:`sdk.inference.constraints.check_tools`).
    """
    text = response_format is None or response_format.get("type", "text") == "text"
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice", "tool_choice needs tools")
        return ToolPlan(response_format=None if text else response_format)
    if tool_choice in (None, "auto"):
        return ToolPlan(render=tools, response_format=None if text else response_format,
                        parse=tools if text else None)
    if tool_choice == "none":
        return ToolPlan(response_format=None if text else response_format)
    name: str | None = None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError("tool_choice", 'tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}')
    elif tool_choice != "required":
        raise ValueError("tool_choice", f"unknown tool_choice {tool_choice!r}")
    if not text:
        raise ValueError("response_format", "response_format cannot be combined with a required tool call")
    try:
        schema = tool_call_schema(tools, name)
    except KeyError:
        raise ValueError("tool_choice", f"tool_choice names {name!r}, which is not in tools") from None
    constraint = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema, "strict": True}}
    return ToolPlan(render=tools, response_format=constraint, parse=tools, forced=True)


class ToolCallHold:
    """Streaming under "auto": text that may be the start of a tool call is held back until it
    is clearly content (then released) or the stream ends (then read as a call)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held = ""
        self.releasing = not plan.parse

    def push(self, text: str) -> str:
        """The text to stream now ("" while held)."""
        if self.releasing:
            return text
        self.held += text
        head = self.held.lstrip()
        if self.plan.forced or not head or head.startswith(("{", _TAG)) or _TAG.startswith(head):
            return ""
        self.releasing = True
        out, self.held = self.held, ""
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]] | None]:
        """``(content still held, tool_calls)`` at the end of the stream."""
        held, self.held = self.held, ""
        calls = self.plan.tool_calls(held) if held else None
        return ("" if calls else held), calls
