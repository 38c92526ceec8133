"""Lazy package exports: a package's names load on first use (PEP 562 ``__getattr__``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the module (absolute,
    or relative to the package) defining it; ``submodules`` are importable as attributes."""
    subs = frozenset(submodules)

    def module_name(name: str) -> str:
        return name if "." in name else f"{package}.{name}"

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(module_name(exports[name])), name)
            namespace[name] = value
            return value
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(namespace.get("__all__", ()))

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
