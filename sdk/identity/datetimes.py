"""Low level: XML Schema dateTime parsing/formatting and the ``now`` / skew arguments."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from sdk.identity.errors import MalformedError

#: Longest dateTime text accepted (``2023-01-01T00:00:00.123456+00:00`` is 32 characters).
MAX_DATETIME_CHARS = 64


def parse_datetime(text: object) -> datetime:
    """Parse an XML Schema dateTime (``2023-01-01T00:00:00Z``) to an aware UTC datetime.

    ``MalformedError`` for anything else, including non-strings and over-long text.
    """
    if not isinstance(text, str) or "T" not in text or len(text) > MAX_DATETIME_CHARS:
        raise MalformedError(f"not a dateTime: {text!r}"[:120])
    return _parse_datetime(text)


@functools.lru_cache(maxsize=4096)
def _parse_datetime(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)  # XSD: no offset means UTC for our purposes
        return dt.astimezone(UTC)
    except (ValueError, OverflowError):
        raise MalformedError(f"not a dateTime: {text!r}") from None


def format_datetime(dt: datetime | None = None) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` in UTC (seconds precision), now if ``dt`` is None."""
    dt = dt or datetime.now(UTC)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_timestamp(ts: int | float) -> datetime:
    """An aware UTC datetime; ``ValueError``/``OverflowError``/``OSError``/``TypeError`` on junk."""
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise TypeError(f"a timestamp is a number, not {type(ts).__name__}")
    return datetime.fromtimestamp(ts, UTC)


def as_now(now: datetime | float | int | None) -> datetime:
    """Normalize an injectable clock value (aware datetime or epoch seconds; None = now)."""
    if now is None:
        return datetime.now(UTC)
    if isinstance(now, datetime):
        return now if now.tzinfo else now.replace(tzinfo=UTC)
    if isinstance(now, (int, float)) and not isinstance(now, bool):
        return from_timestamp(now)
    raise TypeError("now must be a datetime, epoch seconds or None")


def as_skew(skew: timedelta | float | int) -> timedelta:
    if isinstance(skew, timedelta):
        return skew
    if isinstance(skew, (int, float)) and not isinstance(skew, bool) and skew >= 0:
        return timedelta(seconds=skew)
    raise TypeError("skew must be a non-negative timedelta or number of seconds")


__all__ = ["parse_datetime", "format_datetime", "from_timestamp", "as_now", "as_skew"]
