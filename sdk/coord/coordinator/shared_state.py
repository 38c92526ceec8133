"""One read-only object per distinct desired state, shared by every device that has it.

Most of a fleet is given the same config, so the store's in-memory latest state per device is
interned by a digest of its canonical JSON: 10,000 devices on one config hold one state object
(and a reference each), not 10,000 equal dicts. A shared state cannot be changed in place
(:class:`FrozenState` refuses it); :func:`thaw` gives a caller its own copy.
"""

from __future__ import annotations

import copy
import json
import threading
import weakref
from hashlib import blake2b
from typing import Any, NoReturn


class FrozenState(dict[str, Any]):
    """A desired state shared between devices: a ``dict`` that refuses every change in place."""

    __slots__ = ("__weakref__",)

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a shared desired state is read-only (copy it with thaw())")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v, memo) for k, v in self.items()}

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


EMPTY = FrozenState()


def thaw(state: dict[str, Any]) -> dict[str, Any]:
    """A private, mutable copy of ``state`` (nested lists and objects copied too)."""
    return {k: copy.deepcopy(v) if isinstance(v, (dict, list)) else v for k, v in state.items()}


class SharedStates:
    """Interns desired states by a 16-byte BLAKE2b digest of their canonical JSON text.

    Entries live as long as some device holds the state (weak values): a config no device has any
    more is freed. Equal digests mean equal canonical text, hence equal values.
    """

    def __init__(self) -> None:
        self._by_digest: weakref.WeakValueDictionary[bytes, FrozenState] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_digest)

    def intern(self, text: str) -> FrozenState:
        """The shared state whose canonical JSON is ``text`` (parsed once per distinct state)."""
        if text == "{}":
            return EMPTY
        digest = blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        hit = self._by_digest.get(digest)
        if hit is None:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("a desired state must be a JSON object")
            fresh = FrozenState(value)
            with self._lock:
                hit = self._by_digest.setdefault(digest, fresh)
        return hit


__all__ = ["EMPTY", "FrozenState", "SharedStates", "thaw"]
