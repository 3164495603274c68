"""What ``output_dir`` may hold before a run writes to it: which entries are a run's, which are someone
else's, a run moved aside and never restored, and the checks of :func:`check_output_dir` (the
refusals, each naming the flag and the fix, happen before anything is loaded or written).
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from etu_hf.artifacts.checkpoints import TRAINER_STATE_FILE, list_checkpoints
from etu_hf.artifacts.files import ARGS_FILE, FORBIDDEN_SET_FILE, METRICS_FILE
from etu_hf.artifacts.run_lock import check_not_locked

PREVIOUS_RUN_PREFIX = "_previous_run_"  # "_*" is also what push_to_hub leaves out of an upload

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
        kind = "a file" if os.path.isfile(output_dir) else "a FIFO or device, not a file"
        raise ValueError(
            f"{flag} {output_dir!r} is {kind}, not a folder; nothing was written. Give a folder path (it is created "
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


def _etu_readme(path: str) -> bool:
    """Whether the README.md at ``path`` is a model card etu-hf (or the Trainer, tagged etu-hf) wrote."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "etu-hf" in f.read(65536)
    except OSError:
        return False


def foreign_entries(output_dir: str) -> list[str]:
    """Entries of ``output_dir`` that a run would overwrite (or replace) but that no etu-hf run wrote, sorted.

    A folder holds an etu-hf run when it has ``V_S.ids.json`` or ``args.json`` (every run writes them
    first). Without them,
    every entry a run writes (:data:`RUN_ARTIFACTS`: a model's ``config.json``, ``tokenizer.json``,
    weights, a plain Trainer's checkpoints, a README.md) is someone else's; with one, only a README.md
    that does not mention etu-hf (the model cards etu-hf writes do).
    """
    if not os.path.isdir(output_dir):
        return []
    names = os.listdir(output_dir)
    readme = os.path.join(output_dir, "README.md")
    if FORBIDDEN_SET_FILE in names or ARGS_FILE in names:
        return ["README.md"] if os.path.isfile(readme) and not _etu_readme(readme) else []
    return sorted(n for n in names if _matches(n, RUN_ARTIFACTS) and not (n == "README.md" and _etu_readme(readme)))


def leftover_previous_runs(output_dir: str) -> list[str]:
    """The ``_previous_run_*`` folders in ``output_dir``: a previous run moved aside by a run that was
    killed before it could delete or restore it."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        n
        for n in os.listdir(output_dir)
        if n.startswith(PREVIOUS_RUN_PREFIX) and os.path.isdir(os.path.join(output_dir, n))
    )


def leftover_message(output_dir: str, names: list[str], flag: str = "--output_dir") -> str:
    """How to restore (or drop) the moved-aside previous run ``names[-1]`` of ``output_dir``."""
    aside = os.path.join(output_dir, names[-1])
    return (
        f"{flag} {output_dir!r} holds {names[-1]}/, a previous run that an etu-hf run moved aside and was killed "
        f"before it could put back or delete{' (and ' + str(len(names) - 1) + ' older ones)' if len(names) > 1 else ''}"
        f"; nothing was written. To restore it, delete the interrupted run's files there and move its content back "
        f"(mv {aside}/* {output_dir}/ && rmdir {aside}); if you do not need it, delete {aside}. Then run again."
    )


def check_output_dir(
    output_dir: str,
    overwrite_output_dir: bool,
    resume_from_checkpoint: Any = None,
    inputs: dict[str, str | None] | None = None,
) -> None:
    """Refuse (``ValueError``) an ``output_dir`` a run cannot or must not write to; call it before loading.

    In order: the folder must be writable (:func:`check_writable`); it must not be one of ``inputs``
    (``{flag: path}``, e.g. ``{"--model_name_or_path": ...}``: writing there would replace the model the
    run starts from); no live run may hold its lock; it must hold nothing a run would overwrite that
    no etu-hf run wrote (:func:`foreign_entries`), nor a ``_previous_run_*`` folder left by a killed run
    (:func:`leftover_previous_runs`, named with how to restore it). These hold even with
    ``--overwrite_output_dir``. A folder holding a previous run is then refused unless asked, following
    transformers' example scripts: continue with ``resume_from_checkpoint``, replace it with
    ``overwrite_output_dir`` (see :class:`RunFolder` for how it is replaced).
    """
    check_writable(output_dir)
    target = os.path.realpath(output_dir)
    for flag, path in (inputs or {}).items():
        if path and os.path.exists(path) and os.path.realpath(path) == target:
            raise ValueError(
                f"--output_dir {output_dir!r} is the {flag} folder: the run would write over what it reads "
                "(--overwrite_output_dir does not change that); nothing was written. Choose another --output_dir."
            )
    check_not_locked(output_dir)
    foreign = foreign_entries(output_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} entries)" if len(foreign) > 5 else "")
        raise ValueError(
            f"--output_dir {output_dir!r} holds {shown}, which no etu-hf run wrote and a run would overwrite "
            "(even with --overwrite_output_dir); nothing was written. Move them elsewhere, or choose another "
            "--output_dir."
        )
    leftovers = leftover_previous_runs(output_dir)
    if leftovers:
        raise ValueError(leftover_message(output_dir, leftovers))
    if overwrite_output_dir or resume_from_checkpoint:
        return
    found = previous_run_files(output_dir)
    if found:
        raise ValueError(previous_run_message(output_dir, found))


def previous_run_message(output_dir: str, found: list[str]) -> str:
    """The refusal of an ``output_dir`` that holds a previous run (``found``: its files)."""
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    return (
        f"output_dir {output_dir!r} already holds a previous run ({shown}); nothing was written. "
        "Pass --overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, "
        "or choose another --output_dir."
    )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
