"""Publishing and reloading unlearned models: the model card, ``push_run`` and ``load_unlearned``.

- :func:`build_model_card` / :func:`write_model_card`: the card of a finished run (what was unlearned,
  the ETU settings, the held-out audit and its verdict, plots, a loading snippet).
- :func:`push_run`: publish a finished run folder to the hub with that card; every check runs first.
- :func:`load_unlearned`: a run folder or a pushed repo back as ``(model, ForbiddenSet)``.
"""

from __future__ import annotations

from etu_hf.hub.card import build_model_card, write_model_card
from etu_hf.hub.load import load_unlearned, resolve_run_folder
from etu_hf.hub.push import (
    PUSH_PATTERNS,
    PushError,
    check_hub_access,
    check_push,
    check_repo_id,
    files_to_push,
    push_run,
)
from etu_hf.hub.run_files import NotARunError, read_run

__all__ = [
    "PUSH_PATTERNS",
    "NotARunError",
    "PushError",
    "build_model_card",
    "check_hub_access",
    "check_push",
    "check_repo_id",
    "files_to_push",
    "load_unlearned",
    "push_run",
    "read_run",
    "resolve_run_folder",
    "write_model_card",
]
