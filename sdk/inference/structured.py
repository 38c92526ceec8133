"""Constrained decoding with llguidance: a :class:`~sdk.inference.constraints.Constraint` compiled
once (a bounded cache keyed by the canonical schema's hash) and copied into one
:class:`Matcher` per sequence, whose token bitmask the scheduler applies to that row's logits.

Compiled grammars are JSON without optional whitespace (``{"a":1}``): a small model cannot pad
its output with endless spaces. Grammar work is bounded by llguidance's parser limits (lexer
fuel and Earley items per step, grammar size), so a hostile schema costs a bounded amount of
CPU at compile time and per token. ``llguidance`` is imported on first use (the ``inference``
extra); without it :class:`StructuredOutputUnavailable` is raised, never unconstrained output.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .constraints import Constraint, InvalidSchema, StructuredOutputUnavailable, UnsupportedSchema

log = logging.getLogger(__name__)

__all__ = ["GrammarCompiler", "Matcher", "MaskFiller", "available"]

#: Compiled grammars kept per engine (least recently used dropped first).
CACHE_SIZE = 64
#: llguidance parser limits (its defaults are 2-5x these): a schema needing more is ``unsupported_schema``.
_LIMITS: dict[str, Any] = {"max_grammar_size": 200_000, "initial_lexer_fuel": 500_000,
                           "step_lexer_fuel": 200_000, "step_max_items": 50_000, "max_lexer_states": 100_000}
_UNSUPPORTED = ("Unimplemented", "Unknown format", "limit", "fuel", "too many", "too large")
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def available() -> bool:
    """True when the grammar library imports."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def _strict(schema: Any) -> Any:
    """OpenAI ``strict`` semantics: objects without ``additionalProperties`` get ``false``."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


class Matcher:
    """One sequence's grammar state: fill its bitmask row, accept sampled tokens, say when done."""

    __slots__ = ("_m",)

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    @property
    def raw(self) -> Any:
        """The llguidance matcher (for the batch mask filler)."""
        return self._m

    def accept(self, token: int) -> bool:
        """Advance over ``token``; False when the grammar refuses it."""
        return bool(self._m.consume_token(token))

    def accept_all(self, tokens: Sequence[int]) -> bool:
        """Advance over ``tokens`` (a resumed generation's output so far)."""
        return all(self.accept(t) for t in tokens)

    @property
    def finished(self) -> bool:
        """The output is complete: the grammar allows nothing more."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str | None:
        """The matcher's error, if it entered the error state."""
        return str(self._m.get_error()) if self._m.is_error() else None


class GrammarCompiler:
    """Compiles constraints for one tokenizer; safe to call from any thread."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_ids: Sequence[int], cache_size: int = CACHE_SIZE) -> None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError as exc:
            raise StructuredOutputUnavailable(
                "structured output needs the grammar library: pip install 'open-autoglm[inference]'") from exc
        self._llg = llguidance
        started = time.process_time()
        eos = sorted(eos_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos or None)
        self.vocab_size = vocab_size
        self.limits = llguidance.LLParserLimits(verbose_errors=False, **_LIMITS)
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        self.hits = 0
        log.info("grammar tokenizer ready (%d tokens) in %.2f CPU s", vocab_size, time.process_time() - started)

    def _compile(self, constraint: Constraint, strict: bool) -> Any:
        llg = self._llg
        schema = _strict(constraint.schema) if strict else constraint.schema
        started = time.process_time()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidSchema(f"response_format: {exc}", field="response_format") from None
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if matcher.is_error():
            message = str(matcher.get_error()).splitlines()[0][:300]
            cls = UnsupportedSchema if any(s in message for s in _UNSUPPORTED) else InvalidSchema
            log.info("schema %s refused (%s): %s", constraint.key[:12], cls.reason, message)
            raise cls(f"response_format: {message}", field="response_format")
        self.compiles += 1
        log.debug("compiled schema %s in %.1f CPU ms", constraint.key[:12], (time.process_time() - started) * 1e3)
        return matcher

    def matcher(self, constraint: Constraint, *, strict: bool = False) -> Matcher:
        """A fresh matcher for one sequence (compiling ``constraint`` unless cached)."""
        key = f"{constraint.key}:{int(strict)}"
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                self.hits += 1
        if template is None:
            template = self._compile(constraint, strict)
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return Matcher(template.deep_copy())

    def cached(self, constraint: Constraint, *, strict: bool = False) -> bool:
        """True when ``constraint`` is compiled already (no compile work to do)."""
        with self._lock:
            return f"{constraint.key}:{int(strict)}" in self._cache

    def filler(self) -> MaskFiller:
        """A mask filler over this compiler's vocabulary."""
        return MaskFiller(self._llg, self.vocab_size)


class MaskFiller:
    """Fills the bitmask rows of a batch's matchers, off the worker thread so it overlaps the
    model's forward pass (llguidance computes masks in native threads, without the GIL)."""

    def __init__(self, llg: Any, vocab_size: int) -> None:
        self._executor = llg.LLExecutor(num_threads=max(2, min(8, (os.cpu_count() or 2) // 2)))
        self.words = (vocab_size + 31) // 32
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoglm-grammar")

    def fill(self, matchers: Sequence[Matcher]) -> torch.Tensor:
        """The bitmask [len(matchers), words] (int32, one bit per allowed token)."""
        mask = torch.empty((len(matchers), self.words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m.raw, i) for i, m in enumerate(matchers)],
                                               mask.data_ptr(), self.words * 4, len(matchers))
        return mask

    def start(self, matchers: Sequence[Matcher]) -> Future[torch.Tensor]:
        """Begin :meth:`fill` in the background; ``.result()`` gives the bitmask."""
        return self._pool.submit(self.fill, list(matchers))

    def close(self) -> None:
        """Stop the background thread."""
        self._pool.shutdown(wait=False)

