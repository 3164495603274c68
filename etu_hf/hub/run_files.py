"""A finished run folder as the Hub side sees it: its JSON files, its base model and the names of its data."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id

from etu_hf.artifacts.files import (
    ARGS_FILE,
    FORBIDDEN_SET_FILE,
    METRICS_FILE,
    REPORT_FILE,
)
from etu_hf.data.corpus import CORPUS_ALIASES, looks_local

ADAPTER_CONFIG_FILE = "adapter_config.json"

MODEL_CONFIG_FILE = "config.json"


class NotARunError(ValueError):
    """The folder is not a finished etu-hf run (no ``V_S.ids.json`` or no ``metrics.json``)."""


@dataclass
class RunFiles:
    """The JSON files of one run folder, read as they are (``None`` or empty when absent)."""

    run_dir: str
    metrics: dict[str, Any]
    forbidden: dict[str, Any]
    report: dict[str, Any] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] | None = None
    model_config: dict[str, Any] | None = None

    @property
    def is_adapter(self) -> bool:
        """Whether the run saved a PEFT adapter (else a full model, or no model yet)."""
        return self.adapter_config is not None

    @property
    def has_model(self) -> bool:
        """Whether the folder holds a saved adapter or full model."""
        return self.adapter_config is not None or self.model_config is not None

    def has_file(self, name: str) -> bool:
        """Whether ``name`` is a file in the run folder."""
        return os.path.isfile(os.path.join(self.run_dir, name))


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_optional(run_dir: str, name: str) -> Any:
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return None
    try:
        return _read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or remove the file") from err


def read_run(run_dir: str) -> RunFiles:
    """Read the JSON files of the run folder ``run_dir``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder.
        NotARunError: it lacks ``V_S.ids.json`` or ``metrics.json``, so it is not a finished etu-hf run.
        ValueError: one of the files is not valid JSON.
    """
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir!r} is not a folder: give the output_dir of a finished etu-hf run")
    missing = [name for name in (FORBIDDEN_SET_FILE, METRICS_FILE) if not os.path.isfile(os.path.join(run_dir, name))]
    if missing:
        raise NotARunError(
            f"{run_dir} is not a finished etu-hf run: it has no {' and no '.join(missing)} (an etu-hf run writes "
            "both at the end of training, see docs/artifacts.md)"
        )
    forbidden = _read_optional(run_dir, FORBIDDEN_SET_FILE)
    if isinstance(forbidden, list):  # a flat list of ids is accepted as V_S
        forbidden = {"ids": forbidden, "size": len(forbidden), "method": "list"}
    metrics = _read_optional(run_dir, METRICS_FILE)
    if not isinstance(metrics, dict) or not isinstance(forbidden, dict):
        raise NotARunError(f"{run_dir}: {METRICS_FILE} or {FORBIDDEN_SET_FILE} is not an etu-hf file")
    return RunFiles(
        run_dir=run_dir,
        metrics=metrics,
        forbidden=forbidden,
        report=_read_optional(run_dir, REPORT_FILE),
        args=_read_optional(run_dir, ARGS_FILE) or {},
        adapter_config=_read_optional(run_dir, ADAPTER_CONFIG_FILE),
        model_config=_read_optional(run_dir, MODEL_CONFIG_FILE),
    )


# ---------------------------------------------------------------------------------------------
# Names: base model and data
# ---------------------------------------------------------------------------------------------
def is_hub_id(name: Any) -> bool:
    """Whether ``name`` reads as a hub repo id (``"gpt2"``, ``"org/name"``), not a local path."""
    if not isinstance(name, str) or not name or name.startswith((".", "/", "~")) or os.path.isabs(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_model_name(run: RunFiles, base_model: str | None = None) -> str | None:
    """The base model: ``base_model`` if given, else the adapter's ``base_model_name_or_path``, the run's
    ``model_name_or_path`` (args.json) or the full model's ``_name_or_path``."""
    candidates = [
        base_model,
        (run.adapter_config or {}).get("base_model_name_or_path"),
        run.args.get("model_name_or_path"),
        (run.model_config or {}).get("_name_or_path"),
    ]
    return next((c for c in candidates if isinstance(c, str) and c), None)


def as_list(value: Any) -> list[str]:
    """A comma-separated string or a sequence as a list of non-empty strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value if v]


def describe_corpus(spec: str) -> tuple[str, str | None]:
    """``(text for the card, hub dataset id or None)`` for one corpus spec of ``etu-hf unlearn``.

    Local files are named by their base name only, so the card does not publish local paths.
    """
    if spec in CORPUS_ALIASES:
        repo = CORPUS_ALIASES[spec][0]
        return f"`{spec}` ({repo})", repo
    if looks_local(spec) or os.path.exists(os.path.expanduser(spec)):
        return f"`{os.path.basename(os.path.normpath(spec))}` (a local file)", None
    repo = spec.split(":")[0]
    return f"`{spec}`", repo if is_hub_id(repo) else None


def unique(items: Sequence[str]) -> list[str]:
    """The non-empty items in first-seen order, without repeats."""
    return list(dict.fromkeys(i for i in items if i))
