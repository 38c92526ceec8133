"""Incremental detokenization and stop-string holdback (tokenizer only, plus pure-Python cases)."""

from __future__ import annotations

from typing import Any

import pytest

from sdk.inference.detokenizer import IncrementalDetokenizer, StopMatcher

TEXTS = ["héllo wörld, naïve café", "日本語のテキスト 🙂👍 ok", "  two  spaces\n\ttab", "x"]


@pytest.mark.model
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_concatenates_to_decode(smollm2: Any, text: str) -> None:
    tok = smollm2.tokenizer
    context = tok("Say:")["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, context)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


def test_stop_matcher_cuts_before_match_across_feeds() -> None:
    m = StopMatcher(["END", "\n\n"])
    out = [m.feed("hello E"), m.feed("N"), m.feed("D and more")]
    assert out == [("hello ", False), ("", False), ("", True)]


def test_stop_matcher_releases_false_alarm() -> None:
    m = StopMatcher(["END"])
    assert m.feed("EN") == ("", False)
    assert m.feed("x") == ("ENx", False)
    assert m.feed("E") == ("", False)
    assert m.flush() == "E"


def test_stop_matcher_earliest_match_wins() -> None:
    m = StopMatcher(["b", "abc"])
    assert m.feed("xabcd") == ("x", True)


def test_no_stop_strings_passes_through() -> None:
    assert StopMatcher([]).feed("anything") == ("anything", False)
