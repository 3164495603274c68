"""Where the names of the former ``etu_hf.pipeline`` module live now, importable from here as before.

Scripts written against the first layout (``from etu_hf.pipeline import DEMO_MODEL_DIR``,
``etu_hf.pipeline.ModelArguments``) keep working. New code imports them from their homes:
:mod:`etu_hf.commands.arguments` (the ``etu-hf unlearn`` flags), :mod:`etu_hf.commands.pipeline` (the run)
and :mod:`etu_hf.demo` (the demo model). Each is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ADAPTER_LEARNING_RATE": "etu_hf.commands.arguments",
    "DataArguments": "etu_hf.commands.arguments",
    "ModelArguments": "etu_hf.commands.arguments",
    "DEMO_MODEL_DIR": "etu_hf.demo",
    "UnlearnResult": "etu_hf.commands.pipeline",
    "prepare_corpora": "etu_hf.commands.pipeline",
    "run_unlearning": "etu_hf.commands.pipeline",
    "trainable_setup": "etu_hf.commands.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
