"""What a run writes and how it is read back.

- :mod:`~etu_hf.artifacts.files`: file names, secret redaction, atomic JSON writes;
- :mod:`~etu_hf.artifacts.run_folder`: the run folder (previous runs, checkpoints, resuming);
- :mod:`~etu_hf.artifacts.record`: a finished run's arguments, metrics, V_S and tilt (:class:`RunRecord`).

The public names of the former single ``etu_hf.artifacts`` module are importable from here as before
(``from etu_hf.artifacts import SecretFreeArguments``), each submodule imported on first use.
"""

from __future__ import annotations

from etu_hf._lazy import lazy_exports

_EXPORTS = {
    "ARGS_FILE": "etu_hf.artifacts.files",
    "METRICS_FILE": "etu_hf.artifacts.files",
    "REDACTED": "etu_hf.artifacts.files",
    "SecretFreeArguments": "etu_hf.artifacts.files",
    "atomic_write": "etu_hf.artifacts.files",
    "is_secret_key": "etu_hf.artifacts.files",
    "redact_secrets": "etu_hf.artifacts.files",
    "safetensors_problem": "etu_hf.artifacts.files",
    "write_json": "etu_hf.artifacts.files",
    "RunRecord": "etu_hf.artifacts.record",
    "RunFolder": "etu_hf.artifacts.run_folder",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
