"""Where the names of the former ``etu_hf.pipeline`` module live now, importable from here as before.

Scripts written against the first layout (``from etu_hf.pipeline import DEMO_MODEL_DIR``,
``etu_hf.pipeline.ModelArguments``) keep working. New code imports them from their homes:
:mod:`etu_hf.commands.arguments` (the ``etu-hf unlearn`` flags), :mod:`etu_hf.commands.pipeline` (the run)
and :mod:`etu_hf.demo` (the demo model). Each is imported on first use.
"""

from __future__ import annotations

from etu_hf._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
