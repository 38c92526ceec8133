"""``GenerationRequest.validate()``: the one place a generation request is checked (no model needed)."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest

from sdk.inference import GenerationRequest, InvalidRequest
from sdk.inference.types import (
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
)

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "hi"},
        {"messages": USER},
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "x", "name": "a"}]},
        {"prompt_token_ids": [1, 2, 3]},
        {"prompt_token_ids": (0,)},
        {"prompt": "hi", "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "top_p": 1, "top_k": 0},
        {"prompt": "hi", "temperature": 2.0, "top_p": 0.01, "top_k": 50, "seed": -5},
        {"prompt": "hi", "seed": (1 << 64) - 1, "stop": ["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS},
        {"prompt": "hi", "stop": ("\n",), "request_id": "r" * MAX_NAME_CHARS, "model": "SmolLM2"},
        {"prompt": "x" * MAX_PROMPT_CHARS},
        {"prompt_token_ids": [5] * MAX_PROMPT_TOKENS},
    ],
)
def test_valid_requests_pass_and_return_themselves(fields: dict[str, Any]) -> None:
    req = GenerationRequest(**fields)
    assert req.validate() is req


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        # exactly one input
        ({}, None),
        ({"prompt": "a", "messages": USER}, "messages"),
        ({"prompt": "a", "prompt_token_ids": [1]}, "prompt_token_ids"),
        # prompt
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": b"bytes"}, "prompt"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        # messages
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": [{"role": "", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": ["part"]}]}, "messages"),
        ({"messages": [{"role": "user", "content": None}]}, "messages"),
        ({"messages": ["user: hi"]}, "messages"),
        ({"messages": [{1: "x", "role": "user", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "r" * (MAX_NAME_CHARS + 1), "content": "x"}]}, "messages"),
        ({"messages": USER * (MAX_MESSAGES + 1)}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * (MAX_PROMPT_CHARS // 2 + 1)}] * 2}, "messages"),
        # token ids
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt_token_ids": [-1]}, "prompt_token_ids"),
        ({"prompt_token_ids": [1.0]}, "prompt_token_ids"),
        ({"prompt_token_ids": [True]}, "prompt_token_ids"),
        ({"prompt_token_ids": ["1"]}, "prompt_token_ids"),
        ({"prompt_token_ids": "123"}, "prompt_token_ids"),
        ({"prompt_token_ids": [1] * (MAX_PROMPT_TOKENS + 1)}, "prompt_token_ids"),
        # max_new_tokens
        ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": -3}, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": 1.5}, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": True}, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": "8"}, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens"),
        # temperature
        ({"prompt": "a", "temperature": -1.0}, "temperature"),
        ({"prompt": "a", "temperature": NAN}, "temperature"),
        ({"prompt": "a", "temperature": INF}, "temperature"),
        ({"prompt": "a", "temperature": 1e9}, "temperature"),
        ({"prompt": "a", "temperature": "1"}, "temperature"),
        ({"prompt": "a", "temperature": True}, "temperature"),
        # top_p
        ({"prompt": "a", "top_p": 0.0}, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "top_p": NAN}, "top_p"),
        ({"prompt": "a", "top_p": None}, "top_p"),
        # top_k
        ({"prompt": "a", "top_k": -1}, "top_k"),
        ({"prompt": "a", "top_k": 2.0}, "top_k"),
        ({"prompt": "a", "top_k": 10**9}, "top_k"),
        # stop
        ({"prompt": "a", "stop": "x"}, "stop"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": "a", "stop": [5]}, "stop"),
        ({"prompt": "a", "stop": ["x" * (MAX_STOP_CHARS + 1)]}, "stop"),
        ({"prompt": "a", "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"prompt": "a", "stop": None}, "stop"),
        # seed
        ({"prompt": "a", "seed": 1 << 64}, "seed"),
        ({"prompt": "a", "seed": -(1 << 63) - 1}, "seed"),
        ({"prompt": "a", "seed": 1.0}, "seed"),
        ({"prompt": "a", "seed": False}, "seed"),
        # names
        ({"prompt": "a", "request_id": ""}, "request_id"),
        ({"prompt": "a", "request_id": 7}, "request_id"),
        ({"prompt": "a", "request_id": "r" * (MAX_NAME_CHARS + 1)}, "request_id"),
        ({"prompt": "a", "model": ""}, "model"),
        ({"prompt": "a", "model": ["m"]}, "model"),
    ],
)
def test_invalid_requests_raise_invalid_request_naming_the_field(
    fields: dict[str, Any], field: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    req = GenerationRequest(**fields)
    with caplog.at_level(logging.INFO, logger="sdk.inference.types"), pytest.raises(InvalidRequest) as err:
        req.validate()
    assert err.value.reason == "invalid_request"
    assert err.value.field == field
    assert any("invalid generation request" in r.getMessage() for r in caplog.records)


def test_validation_is_bounded_before_scanning() -> None:
    # an oversized token list is refused on its length, not after checking every id
    huge = [0] * (MAX_PROMPT_TOKENS + 1)
    huge[-1] = "not an int"  # type: ignore[call-overload]
    with pytest.raises(InvalidRequest, match="over"):
        GenerationRequest(prompt_token_ids=huge).validate()
