"""Run artifacts in ``output_dir``: args.json (secrets redacted), metrics.json, and the guard that
keeps a run from writing over a previous one."""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any

ARGS_FILE = "args.json"
METRICS_FILE = "metrics.json"
REDACTED = "<redacted>"

_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_key|apikey|access_key|auth)$", re.IGNORECASE)
_NOT_SECRET_KEY = re.compile(r"^(pad|bos|eos|unk|sep|cls|mask)_token$")
_SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|(?i:bearer\s+)[A-Za-z0-9._\-]{16,}")
_RUN_MARKERS = (
    "V_S.ids.json",
    METRICS_FILE,
    ARGS_FILE,
    "trainer_state.json",
    "adapter_model.safetensors",
    "model.safetensors",
    "pytorch_model.bin",
    "suppression_report.json",
)


def is_secret_key(key: str) -> bool:
    """True for names like ``hub_token``, ``api_key``, ``password`` (not ``pad_token``/``eos_token``)."""
    return bool(_SECRET_KEY.search(key)) and not _NOT_SECRET_KEY.match(key)


def redact_secrets(value: Any, key: str = "") -> Any:
    """Copy of ``value`` with secrets replaced by ``"<redacted>"``.

    A value is a secret when its key ends in ``token``/``secret``/``password``/``api_key``/... (for
    example ``hub_token``; ``pad_token_id`` or ``max_new_tokens`` are not), or when a string contains
    something shaped like a Hugging Face token (``hf_...``) or a bearer credential.
    """
    if isinstance(value, dict):
        return {k: redact_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v, key) for v in value]
    if key and is_secret_key(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, str):
        return _SECRET_VALUE.sub(REDACTED, value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(path: str, data: dict[str, Any]) -> str:
    """Write ``data`` as indented JSON (secrets redacted, non-JSON values as strings)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(redact_secrets(data)), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def previous_run_files(output_dir: str) -> list[str]:
    """Files and checkpoints in ``output_dir`` that show a previous run was written there."""
    if not os.path.isdir(output_dir):
        return []
    found = [m for m in _RUN_MARKERS if os.path.exists(os.path.join(output_dir, m))]
    found += sorted(os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*")))
    return found


def check_output_dir(output_dir: str, overwrite_output_dir: bool, resume_from_checkpoint: Any = None) -> None:
    """Refuse (``ValueError``) to start a run in a folder holding a previous run, unless asked.

    Transformers' convention (from its example scripts): continue with ``resume_from_checkpoint``,
    write over it with ``overwrite_output_dir``. Nothing is deleted either way.
    """
    if overwrite_output_dir or resume_from_checkpoint:
        return
    found = previous_run_files(output_dir)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"output_dir {output_dir!r} already holds a previous run ({shown}); nothing was written. "
            "Pass --overwrite_output_dir to write over it, --resume_from_checkpoint to continue it, "
            "or choose another --output_dir."
        )


def load_pyplot():
    """matplotlib's pyplot with the non-interactive Agg backend, or ``None`` when matplotlib (the
    ``plot`` extra) is not installed; callers then skip the figure with a warning."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
