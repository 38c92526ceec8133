"""Per-token text: incremental detokenization and stop-string holdback.

The texts returned by successive ``push`` calls plus ``flush`` concatenate to the decoded output;
a token that ends inside a multi-byte character yields "" until the character is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "StopMatcher"]

_CONTEXT_TOKENS = 6  # prompt tail decoded with the output so leading spaces/merges come out right


class IncrementalDetokenizer:
    """Turns one token at a time into text (the prefix/read offset scheme of vLLM and TGI)."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text: str | None = None  # decode of ids[prefix:read], kept while it is unchanged

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return any text still held back (e.g. an incomplete character at the end)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        prefix_text = self._prefix_text
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith("\ufffd")):
            self._move()
            return full_text[len(prefix_text) :]
        if final:
            self._move()
        return ""

    def _move(self) -> None:
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None


class StopMatcher:
    """Holds back text that could begin a stop string; reports a match and cuts the text before it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped)."""
        if not self._stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        """Release held text at the end of the output (no stop string completed)."""
        out, self._pending = self._pending, ""
        return out
