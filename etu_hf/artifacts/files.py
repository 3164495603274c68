"""The content of run artifacts: JSON files written atomically with secrets redacted, arguments that
pickle without secrets, and an integrity check of safetensors files.

Where they go, and what a run may do to its ``output_dir``, is :mod:`etu_hf.artifacts.run_folder`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable
from typing import IO, Any

# The files of a run folder (their schemas: docs/artifacts.md). Names live here only.
ARGS_FILE = "args.json"
METRICS_FILE = "metrics.json"
FORBIDDEN_SET_FILE = "V_S.ids.json"
REPORT_FILE = "suppression_report.json"
MARKDOWN_FILE = "suppression_report.md"
HISTOGRAM_FILE = "suppression_histogram.png"
ACTIVATIONS_FILE = "activation_stats.png"
LAMBDA_HISTORY_FILE = "lambda_history.json"
LAMBDA_PLOT_FILE = "lambda_history.png"
#: In every checkpoint: the controller's state (offset, history), so a resume continues its trajectory.
CONTROLLER_STATE_FILE = "etu_controller.json"
#: In every checkpoint, written before transformers' own files (so a complete trainer_state.json implies
#: a complete one): what metrics.json needs to cover the whole run after a resume.
RUN_STATE_FILE = "etu_trainer_state.json"

REDACTED = "<redacted>"

_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_key|apikey|access_key|auth)$", re.IGNORECASE)

_NOT_SECRET_KEY = re.compile(r"^(pad|bos|eos|unk|sep|cls|mask)_token$")

_SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|(?i:bearer\s+)[A-Za-z0-9._\-]{16,}")

# Files created by mkstemp are 0600; an artifact gets the permissions a plain open() would give it.
_UMASK = os.umask(0)

os.umask(_UMASK)


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


class SecretFreeArguments:
    """Mixin for ``TrainingArguments`` subclasses: pickled copies carry no secrets.

    The Trainer saves its arguments with ``torch.save`` (``training_args.bin``, in every checkpoint and in
    what ``push_to_hub`` uploads), and plain ``TrainingArguments`` would carry ``hub_token`` into that
    file. Pickled state sets every field named like a secret (:func:`is_secret_key`) to ``None``;
    in-memory copies (``copy.copy``/``copy.deepcopy``) keep them, so ``push_to_hub`` still authenticates.
    Every config class of etu-hf (``ETUTrainingArguments``, ``NPOConfig``, the DPO config of
    ``etu-hf refine``) derives from it: this is the one place that decides what is left out.
    """

    def __getstate__(self) -> dict[str, Any]:
        return {k: (None if is_secret_key(k) and v else v) for k, v in self.__dict__.items()}

    def __copy__(self) -> Any:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


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


def atomic_write(path: str, write: Callable[[IO[str]], None]) -> str:
    """Write a text file so that ``path`` is never seen half-written: ``write(f)`` fills a temporary
    file in the same folder, which is flushed to disk and then renamed over ``path`` (``os.replace``).
    An interrupted write leaves the previous content (or no file), never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str, data: dict[str, Any]) -> str:
    """Write ``data`` as indented JSON (secrets redacted, non-JSON values as strings), atomically."""
    text = json.dumps(_jsonable(redact_secrets(data)), indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda f: f.write(text))


def safetensors_problem(path: str) -> str | None:
    """What is wrong with a ``.safetensors`` file, or ``None`` when its header is readable and the file
    is as long as the header says. Reads only the header (no tensors): cheap on multi-GB files."""
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if size < 8:
        return f"{name} is truncated ({size} bytes; a safetensors file starts with an 8-byte header length)"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"{name} is truncated or not safetensors (its header claims {header_len} bytes; the file has {size})"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{name} is corrupted (its header is not valid JSON)"
    if not isinstance(header, dict):
        return f"{name} is corrupted (its header is not a JSON object)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"{name} is truncated ({size} of {expected} bytes)"
    return None
