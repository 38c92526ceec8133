"""Waiting on a positive signal instead of sleeping before an assertion."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Wait (polling every 10 ms) until ``condition()`` holds; the seconds it took.

    Raises ``AssertionError`` naming ``what`` after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        if loop.time() - start > timeout:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.01)
    return loop.time() - start


__all__ = ["until"]
