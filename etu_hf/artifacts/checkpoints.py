"""Checkpoints of a run: which ones are complete, and which one ``--resume_from_checkpoint`` takes.

:func:`checkpoint_problem` and :func:`resolve_resume_checkpoint`: a checkpoint interrupted while being
saved (a 0-byte ``trainer_state.json`` after Ctrl-C, a truncated weights file) is detected and named;
``--resume_from_checkpoint true`` takes the last complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence

from etu_hf.artifacts.files import safetensors_problem

logger = logging.getLogger(__name__)


TRAINER_STATE_FILE = "trainer_state.json"

#: Weights files, one of which a checkpoint must hold (or a DeepSpeed ``global_step*`` folder).
WEIGHTS_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

_TRUE = {"true", "last", "yes"}


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``[(step, name), ...]`` of the ``checkpoint-<step>`` folders in ``folder``, by step."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _CHECKPOINT.match(name)
        if m and os.path.isdir(os.path.join(folder, name)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def checkpoint_problem(folder: str, required: Sequence[str] = (TRAINER_STATE_FILE,)) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from, naming the file, or ``None`` when complete.

    Complete means: every file in ``required`` exists; no file is empty; every ``.json`` file parses;
    every ``.safetensors`` file is as long as its header says; and it holds weights (one of
    :data:`WEIGHTS_FILES`, or a DeepSpeed ``global_step*`` folder). A save interrupted by Ctrl-C or a
    full disk fails one of these.
    """
    if not os.path.isdir(folder):
        return f"{folder!r} is not a folder"
    names = sorted(os.listdir(folder))
    for name in required:
        if name not in names:
            return f"{name} is missing"
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if os.path.getsize(path) == 0:
            return f"{name} is empty (0 bytes)"
        if name.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                return f"{name} is not valid JSON ({err})"
        elif name.endswith(".safetensors"):
            problem = safetensors_problem(path)
            if problem:
                return problem
    has_deepspeed = any(n.startswith("global_step") and os.path.isdir(os.path.join(folder, n)) for n in names)
    if not has_deepspeed and not any(n in names for n in WEIGHTS_FILES):
        return f"it holds no weights ({' or '.join(WEIGHTS_FILES[:3])}, ...)"
    return None


def resolve_resume_checkpoint(
    value: str | bool | None, output_dir: str, required: Sequence[str] = (TRAINER_STATE_FILE,)
) -> str | None:
    """The checkpoint folder to resume from, or ``None`` to start afresh.

    ``value`` is ``--resume_from_checkpoint``: ``True`` (or the strings ``"true"``/``"last"``) takes the
    last complete checkpoint in ``output_dir``, skipping incomplete ones with a warning that names the
    file; a path must be a complete checkpoint, or a run folder whose last complete checkpoint is taken.
    Raises ``ValueError`` naming the flag, the checkpoint and the file otherwise.
    """
    if value is None or value is False or value == "":
        return None
    flag = "--resume_from_checkpoint"
    if isinstance(value, str) and not os.path.exists(value) and value.strip().lower() in _TRUE:
        value = True
    if value is True:
        return _last_complete_checkpoint(output_dir, required, flag)
    path = os.fspath(value)
    if not os.path.isdir(path):
        raise ValueError(
            f"{flag} {path!r} does not exist or is not a folder. Give a checkpoint-<step> folder, or 'true' for "
            "the last complete checkpoint in --output_dir."
        )
    if not os.path.exists(os.path.join(path, TRAINER_STATE_FILE)) and list_checkpoints(path):
        return _last_complete_checkpoint(path, required, flag)
    problem = checkpoint_problem(path, required)
    if problem:
        complete = _complete_checkpoints(os.path.dirname(os.path.abspath(path)), required)
        hint = (
            f"Resume from the last complete one, {complete[-1]} ({flag} true picks it), or delete the broken one."
            if complete
            else "No complete checkpoint is left next to it: start again without it."
        )
        raise ValueError(
            f"{flag}: checkpoint {path!r} is incomplete: {problem} (the save was probably interrupted). {hint}"
        )
    return path


def _complete_checkpoints(folder: str, required: Sequence[str]) -> list[str]:
    return [
        os.path.join(folder, name)
        for _, name in list_checkpoints(folder)
        if checkpoint_problem(os.path.join(folder, name), required) is None
    ]


def _last_complete_checkpoint(folder: str, required: Sequence[str], flag: str) -> str:
    found = list_checkpoints(folder)
    for _, name in reversed(found):
        path = os.path.join(folder, name)
        problem = checkpoint_problem(path, required)
        if problem is None:
            return path
        logger.warning("%s: skipping the incomplete checkpoint %s: %s", flag, path, problem)
    if found:
        problems = "; ".join(
            f"{name}: {checkpoint_problem(os.path.join(folder, name), required)}" for _, name in found[-3:]
        )
        raise ValueError(
            f"{flag}: no complete checkpoint in {folder!r} ({problems}). Start again without {flag} (add "
            "--overwrite_output_dir)."
        )
    raise ValueError(
        f"{flag}: {folder!r} holds no checkpoint-<step> folder to resume from. Train with --save_strategy steps "
        f"(or epoch), or start again without {flag}."
    )
