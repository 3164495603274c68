"""What a run may do to its ``output_dir``.

- :func:`check_output_dir`: before anything is loaded or written, refuse an ``output_dir`` that is a
  file, that cannot be written to, or that holds a previous run (unless ``--overwrite_output_dir`` or
  ``--resume_from_checkpoint``), with a message naming the flag and the fix. The ``etu-hf`` command
  line applies it; ``ETUTrainer.train`` (a drop-in for ``Trainer``, which writes over a previous run)
  only checks that the folder is writable and replaces a previous run with a warning.
- :class:`RunFolder`: wraps a run's writes. A run that fails leaves the folder as it found it, except
  for complete checkpoints (they can be resumed); with ``--overwrite_output_dir`` the previous run is
  moved aside into ``_previous_run_<time>/`` first, deleted when the new run succeeds and put back
  when it fails.
- :func:`checkpoint_problem` and :func:`resolve_resume_checkpoint`: a checkpoint interrupted while
  being saved (a 0-byte ``trainer_state.json`` after Ctrl-C, a truncated weights file) is detected and
  named; ``--resume_from_checkpoint true`` takes the last complete one.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from etu_hf.artifacts.files import ARGS_FILE, FORBIDDEN_SET_FILE, METRICS_FILE, safetensors_problem

logger = logging.getLogger(__name__)


TRAINER_STATE_FILE = "trainer_state.json"

#: Files whose presence shows that a run was written to a folder.
RUN_MARKERS = (
    FORBIDDEN_SET_FILE,
    METRICS_FILE,
    ARGS_FILE,
    TRAINER_STATE_FILE,
    "adapter_model.safetensors",
    "model.safetensors",
    "pytorch_model.bin",
    "suppression_report.json",
)

#: Everything a run (training, saving, audit, model card) writes into ``output_dir``: what
#: ``--overwrite_output_dir`` moves aside. Other files (your data, for instance) are left in place.
RUN_ARTIFACTS = (
    *RUN_MARKERS,
    "checkpoint-*",
    "training_args.bin",
    "adapter_model.bin",
    "adapter_config.json",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "lambda_history.*",
    "suppression_*",
    "activation_stats.png",
    "README.md",
    "*_results.json",
    "runs",
)

#: Weights files, one of which a checkpoint must hold (or a DeepSpeed ``global_step*`` folder).
WEIGHTS_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

PREVIOUS_RUN_PREFIX = "_previous_run_"  # "_*" is also what push_to_hub leaves out of an upload

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

_TRUE = {"true", "last", "yes"}


# ---------------------------------------------------------------------------------------------
# Before the run
# ---------------------------------------------------------------------------------------------
def previous_run_files(output_dir: str) -> list[str]:
    """Files and checkpoints in ``output_dir`` that show a previous run was written there."""
    if not os.path.isdir(output_dir):
        return []
    found = [m for m in RUN_MARKERS if os.path.exists(os.path.join(output_dir, m))]
    found += [name for _, name in list_checkpoints(output_dir)]
    return found


def replaced_entries(output_dir: str) -> list[str]:
    """The entries of ``output_dir`` that a replacing run moves aside (:data:`RUN_ARTIFACTS`; your other
    files stay), sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        n for n in os.listdir(output_dir) if _matches(n, RUN_ARTIFACTS) and not n.startswith(PREVIOUS_RUN_PREFIX)
    )


def check_writable(output_dir: str, flag: str = "--output_dir") -> None:
    """Raise ``ValueError`` naming ``flag`` when ``output_dir`` is a file or cannot be written to.

    Tried for real (a temporary file is created and removed in the folder, or in its nearest existing
    parent when the folder does not exist yet): permission bits do not tell the truth for root or on
    read-only mounts.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(
            f"{flag} {output_dir!r} is a file, not a folder; nothing was written. Give a folder path (it is created "
            "if missing)."
        )
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"{flag} {output_dir!r} cannot be created: {existing!r} is a file, not a folder; nothing was written."
        )
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".etu-hf-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == os.path.abspath(output_dir) else f" (its parent {existing!r} would hold it)"
        raise ValueError(
            f"{flag} {output_dir!r} is not writable{where}: {err.strerror}; nothing was loaded or written. Choose a "
            "writable folder, or fix its permissions or mount."
        ) from err


def check_output_dir(output_dir: str, overwrite_output_dir: bool, resume_from_checkpoint: Any = None) -> None:
    """Refuse (``ValueError``) an ``output_dir`` a run cannot or must not write to; call it before loading.

    The folder must be writable (:func:`check_writable`). A folder holding a previous run is refused
    unless asked, following transformers' example scripts: continue with ``resume_from_checkpoint``,
    replace it with ``overwrite_output_dir`` (see :class:`RunFolder` for how it is replaced).
    """
    check_writable(output_dir)
    if overwrite_output_dir or resume_from_checkpoint:
        return
    found = previous_run_files(output_dir)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"output_dir {output_dir!r} already holds a previous run ({shown}); nothing was written. "
            "Pass --overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, "
            "or choose another --output_dir."
        )


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# During the run
# ---------------------------------------------------------------------------------------------
def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


class RunFolder:
    """Context manager around everything a run writes to ``output_dir``.

    On entry (main process only) it notes what the folder holds; with ``overwrite`` (and no resume)
    the previous run's files (:data:`RUN_ARTIFACTS`) are moved into ``_previous_run_<time>/`` inside
    the folder, so the new run never mixes with them. On success that folder is deleted: the new run
    has replaced the old one. On failure (any exception, Ctrl-C included) the new run's files are
    removed and the previous run is put back, so the folder is as it was found; the one exception is
    complete checkpoints, which are kept together with args.json and V_S.ids.json so that
    ``--resume_from_checkpoint true`` can continue (the previous run then stays in ``_previous_run_*``
    and the log says where).

    Nesting is allowed: an inner ``RunFolder`` on the same folder (``ETUTrainer.train`` inside the
    ``etu-hf unlearn`` pipeline) does nothing, the outer one decides.
    """

    _active: ClassVar[set[str]] = set()

    def __init__(self, output_dir: str, overwrite: bool = False, resume: bool = False, main_process: bool = True):
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.resume = resume
        self.main_process = main_process
        self.aside: str | None = None
        self._key = os.path.realpath(output_dir)
        self._owner = False
        self._existed = False
        self._before: set[str] = set()

    def __enter__(self) -> RunFolder:
        if not self.main_process or self._key in RunFolder._active:
            return self
        RunFolder._active.add(self._key)
        self._owner = True
        self._existed = os.path.isdir(self.output_dir)
        self._before = set(os.listdir(self.output_dir)) if self._existed else set()
        if self.overwrite and not self.resume and previous_run_files(self.output_dir):
            self._move_previous_run_aside()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if not self._owner:
            return False
        RunFolder._active.discard(self._key)
        self._owner = False
        if exc_type is None:
            if self.aside is not None:
                shutil.rmtree(self.aside)
                logger.info("the new run replaced the previous one in %s", self.output_dir)
            return False
        try:
            self._roll_back()
        except OSError as err:  # never hide the run's own error behind a clean-up error
            logger.error("could not restore %s after the failed run: %s", self.output_dir, err)
        return False

    def _move_previous_run_aside(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = os.path.join(self.output_dir, f"{PREVIOUS_RUN_PREFIX}{stamp}")
        k = 1
        while os.path.exists(aside):
            aside = os.path.join(self.output_dir, f"{PREVIOUS_RUN_PREFIX}{stamp}-{k}")
            k += 1
        os.mkdir(aside)
        moved = [n for n in replaced_entries(self.output_dir) if n in self._before]
        for name in moved:
            os.rename(os.path.join(self.output_dir, name), os.path.join(aside, name))
        self._before = (self._before - set(moved)) | {os.path.basename(aside)}
        self.aside = aside
        logger.info(
            "--overwrite_output_dir: moved the previous run (%d entries) to %s; it is deleted when this run succeeds",
            len(moved),
            aside,
        )

    def _roll_back(self) -> None:
        if not os.path.isdir(self.output_dir):
            return
        new = sorted(set(os.listdir(self.output_dir)) - self._before)
        complete = [
            n for n in new if _CHECKPOINT.match(n) and checkpoint_problem(os.path.join(self.output_dir, n)) is None
        ]
        keep = set(complete) | ({ARGS_FILE, FORBIDDEN_SET_FILE} if complete else set())
        for name in new:
            if name not in keep:
                _remove(os.path.join(self.output_dir, name))
        if complete:
            logger.warning(
                "the run failed after saving %s; kept them (with args.json and V_S.ids.json) in %s: continue with "
                "--resume_from_checkpoint true%s",
                ", ".join(complete),
                self.output_dir,
                f". The previous run is in {self.aside}" if self.aside else "",
            )
            return
        if self.aside is not None:
            for name in os.listdir(self.aside):
                os.rename(os.path.join(self.aside, name), os.path.join(self.output_dir, name))
            os.rmdir(self.aside)
            logger.warning("the run failed; the previous run in %s was put back as it was", self.output_dir)
        elif not self._existed and not os.listdir(self.output_dir):
            os.rmdir(self.output_dir)
