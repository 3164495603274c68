"""Lazy re-exports: a package names what it offers and where each name lives; a module is imported on first use.

``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())`` at the end of a package's ``__init__``
(PEP 562) makes ``from package import name`` import ``_EXPORTS[name]`` only then, and caches the value.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the module defining it."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
