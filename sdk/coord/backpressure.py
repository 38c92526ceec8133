"""The ``busy`` refusal both sides of admission share: a retry-after hint in the error text.

A coordinator at its bound of in-flight admissions answers ``busy`` with
``"... retry after 0.40 s"``; the device waits a jittered delay around that hint
(uniform in ``[hint/2, 3*hint/2]``) before it tries again, so refused devices do not come
back in lock-step. The hint travels in the error reply's text, so the wire format is unchanged.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

#: the bounds of a retry-after hint (seconds)
MIN_RETRY_AFTER = 0.05
MAX_RETRY_AFTER = 30.0
_HINT = re.compile(r"retry after (\d+(?:\.\d+)?) s")


def busy_message(retry_after: float) -> str:
    """The text of a ``busy`` refusal carrying ``retry_after`` seconds (clamped to the bounds)."""
    hint = min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, retry_after))
    return f"coordinator busy; retry after {hint:.2f} s"


def retry_after(text: str) -> float | None:
    """The hint in a ``busy`` refusal's text (clamped), or None when it carries none."""
    m = _HINT.search(text)
    if m is None:
        return None
    return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, float(m.group(1))))


def busy_delay(text: str, *, fallback: float, rng: Callable[[], float] = random.random) -> float:
    """How long to wait after a ``busy`` refusal: jittered around the hint (or ``fallback``)."""
    hint = retry_after(text)
    base = fallback if hint is None else hint
    return base * (0.5 + rng())


__all__ = ["MIN_RETRY_AFTER", "MAX_RETRY_AFTER", "busy_message", "retry_after", "busy_delay"]
