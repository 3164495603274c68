"""What a run may do to its ``output_dir``.

- :func:`check_output_dir` (:mod:`etu_hf.artifacts.output_dir`, re-exported here): before anything is
  loaded or written, refuse an ``output_dir`` that is a file, that cannot be written to, that is the
  model's own folder, that another run is writing to (its lock, :mod:`etu_hf.artifacts.run_lock`), that
  holds files a run would overwrite which no etu-hf run wrote (your README.md, a model's config.json),
  that still holds a ``_previous_run_*`` folder of a run that was killed, or that holds a previous run
  (unless ``--overwrite_output_dir`` or ``--resume_from_checkpoint``), with a message naming the flag
  and the fix. The ``etu-hf`` command line applies it; ``ETUTrainer.train`` (a drop-in for ``Trainer``,
  which writes over a previous run) checks that the folder is writable and holds nothing of yours, and
  replaces a previous run with a warning.
- :class:`RunFolder`: wraps a run's writes under the folder's lock. A run that fails leaves the folder
  as it found it, except for complete checkpoints (they can be resumed); the previous run's files are
  moved aside into ``_previous_run_<time>/`` first (with ``--overwrite_output_dir``, and on a resume
  all but the checkpoints, so a failed resume cannot leave a rewritten args.json), deleted when the new
  run succeeds and put back when it fails.
- Checkpoints (:mod:`etu_hf.artifacts.checkpoints`, re-exported here): :func:`checkpoint_problem` and
  :func:`resolve_resume_checkpoint`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, ClassVar

from etu_hf.artifacts.checkpoints import (
    _CHECKPOINT,
    TRAINER_STATE_FILE,
    WEIGHTS_FILES,
    checkpoint_problem,
    list_checkpoints,
    resolve_resume_checkpoint,
)
from etu_hf.artifacts.files import ARGS_FILE, FORBIDDEN_SET_FILE
from etu_hf.artifacts.output_dir import (
    PREVIOUS_RUN_PREFIX,
    RUN_ARTIFACTS,
    RUN_MARKERS,
    check_output_dir,
    check_writable,
    foreign_entries,
    leftover_message,
    leftover_previous_runs,
    previous_run_files,
    previous_run_message,
    replaced_entries,
)
from etu_hf.artifacts.run_lock import LOCK_FILE, acquire_lock, release_lock

__all__ = [
    "PREVIOUS_RUN_PREFIX",
    "RUN_ARTIFACTS",
    "RUN_MARKERS",
    "TRAINER_STATE_FILE",
    "WEIGHTS_FILES",
    "RunFolder",
    "check_output_dir",
    "check_writable",
    "checkpoint_problem",
    "foreign_entries",
    "leftover_previous_runs",
    "list_checkpoints",
    "previous_run_files",
    "replaced_entries",
    "resolve_resume_checkpoint",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# During the run
# ---------------------------------------------------------------------------------------------
def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


class RunFolder:
    """Context manager around everything a run writes to ``output_dir``.

    On entry (main process only) it creates the folder if needed, takes its lock (a second run into
    the same folder is refused, :mod:`etu_hf.artifacts.run_lock`), checks again what
    :func:`check_output_dir` checked before the model loaded (another run may have written there
    since) and notes what the folder holds. The previous run's files (:data:`RUN_ARTIFACTS`) are then
    moved into ``_previous_run_<time>/`` inside the folder: with ``overwrite`` all of them, on a
    ``resume`` all but the checkpoints, so the new run never mixes with them. Moving stops at the
    first file that cannot be moved, puts back what was moved and refuses (``ValueError``).

    On success that folder is deleted: the new run has replaced the old one. On failure (any exception,
    Ctrl-C included) the new run's files are removed and the previous run is put back, so the folder is
    as it was found (a folder the run created is removed). The one exception is complete checkpoints,
    which are kept so that ``--resume_from_checkpoint true`` can continue: with them args.json and
    V_S.ids.json of the new run stay, and the previous run stays in ``_previous_run_*`` (after a failed
    resume the previous files are put back instead). A file that cannot be put back is named in the log;
    a killed run leaves ``_previous_run_*`` behind, which :func:`check_output_dir` names next time.

    ``existed`` says whether the folder existed before the run started (default: whether it exists on
    entry); pass it when something (``Trainer.__init__``) may have created it since.

    Nesting is allowed: an inner ``RunFolder`` on the same folder (``ETUTrainer.train`` inside the
    ``etu-hf unlearn`` pipeline) does nothing, the outer one decides.
    """

    _active: ClassVar[set[str]] = set()

    def __init__(
        self,
        output_dir: str,
        overwrite: bool = False,
        resume: bool = False,
        main_process: bool = True,
        existed: bool | None = None,
    ):
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.resume = resume
        self.main_process = main_process
        self.aside: str | None = None
        self._key = os.path.realpath(output_dir)
        self._owner = False
        self._existed = existed
        self._before: set[str] = set()

    def __enter__(self) -> RunFolder:
        if not self.main_process or self._key in RunFolder._active:
            return self
        if self._existed is None:
            self._existed = os.path.isdir(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        try:
            acquire_lock(self.output_dir)
        except BaseException:
            self._remove_if_created()
            raise
        try:
            self._check_again()
            self._before = set(os.listdir(self.output_dir)) - {LOCK_FILE}
            if self.overwrite or self.resume:
                self._move_previous_run_aside()
        except BaseException:
            release_lock(self.output_dir)
            self._remove_if_created()
            raise
        RunFolder._active.add(self._key)
        self._owner = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if not self._owner:
            return False
        RunFolder._active.discard(self._key)
        self._owner = False
        try:
            if exc_type is None:
                if self.aside is not None:
                    try:
                        shutil.rmtree(self.aside)
                        logger.info("the new run replaced the previous one in %s", self.output_dir)
                    except OSError as err:
                        logger.warning(
                            "the run succeeded, but %s could not be deleted (%s): delete it", self.aside, err
                        )
                return False
            try:
                self._roll_back()
            except OSError as err:  # never hide the run's own error behind a clean-up error
                logger.error("could not restore %s after the failed run: %s", self.output_dir, err)
        finally:
            release_lock(self.output_dir)
        if exc_type is not None:
            self._remove_if_created()
        return False

    def _remove_if_created(self) -> None:
        if not self._existed and os.path.isdir(self.output_dir) and not os.listdir(self.output_dir):
            os.rmdir(self.output_dir)

    def _check_again(self) -> None:
        foreign = foreign_entries(self.output_dir)
        if foreign:
            raise ValueError(
                f"output_dir {self.output_dir!r} holds {', '.join(foreign[:5])}, which no etu-hf run wrote and this "
                "run would overwrite; nothing was written. Move them elsewhere, or choose another output_dir."
            )
        if not (self.overwrite or self.resume):
            found = previous_run_files(self.output_dir)
            if found:  # written by another run while this one was loading
                raise ValueError(previous_run_message(self.output_dir, found))
        leftovers = leftover_previous_runs(self.output_dir)
        if leftovers:
            logger.warning(leftover_message(self.output_dir, leftovers, "output_dir"))

    def _move_previous_run_aside(self) -> None:
        names = [n for n in replaced_entries(self.output_dir) if n in self._before]
        if self.resume:  # the checkpoints (and the logs) are what the run continues
            names = [n for n in names if not _CHECKPOINT.match(n) and n != "runs"]
        if not names:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = os.path.join(self.output_dir, f"{PREVIOUS_RUN_PREFIX}{stamp}")
        k = 1
        while os.path.exists(aside):
            aside = os.path.join(self.output_dir, f"{PREVIOUS_RUN_PREFIX}{stamp}-{k}")
            k += 1
        os.mkdir(aside)
        moved: list[str] = []
        try:
            for name in names:
                os.rename(os.path.join(self.output_dir, name), os.path.join(aside, name))
                moved.append(name)
        except OSError as err:
            stuck = _put_back(aside, self.output_dir, moved)
            if not stuck:
                os.rmdir(aside)
            how = "--resume_from_checkpoint" if self.resume else "--overwrite_output_dir"
            state = "nothing was changed" if not stuck else f"{', '.join(stuck)} stayed in {aside}: move them back"
            raise ValueError(
                f"{how}: could not move {name!r} of the previous run in {self.output_dir!r} aside "
                f"({err.strerror}); {state}. Fix that file's permissions (or remove it) and run again."
            ) from err
        self._before = (self._before - set(moved)) | {os.path.basename(aside)}
        self.aside = aside
        logger.info(
            "moved the previous run's files (%d entries) to %s; deleted when this run succeeds, put back if it fails",
            len(moved),
            aside,
        )

    def _roll_back(self) -> None:
        if not os.path.isdir(self.output_dir):
            return
        new = sorted(set(os.listdir(self.output_dir)) - self._before - {LOCK_FILE})
        complete = [
            n for n in new if _CHECKPOINT.match(n) and checkpoint_problem(os.path.join(self.output_dir, n)) is None
        ]
        restore = self.aside is not None and (not complete or self.resume)
        keep = set(complete) | ({ARGS_FILE, FORBIDDEN_SET_FILE} if complete and not restore else set())
        for name in new:
            if name not in keep:
                _remove(os.path.join(self.output_dir, name))
        if complete:
            logger.warning(
                "the run failed after saving %s; kept them in %s: continue with --resume_from_checkpoint true%s",
                ", ".join(complete),
                self.output_dir,
                f". The previous run is in {self.aside}" if self.aside and not restore else "",
            )
        if restore and self.aside is not None:
            stuck = _put_back(self.aside, self.output_dir, sorted(os.listdir(self.aside)))
            if stuck:
                logger.error(
                    "the run failed; %s of the previous run could not be put back and stay in %s: move them into %s",
                    ", ".join(stuck),
                    self.aside,
                    self.output_dir,
                )
            else:
                os.rmdir(self.aside)
                logger.warning("the run failed; the previous run in %s was put back as it was", self.output_dir)


def _put_back(aside: str, output_dir: str, names: list[str]) -> list[str]:
    """Move ``names`` from ``aside`` back into ``output_dir``; returns those that could not be moved."""
    stuck = []
    for name in names:
        target = os.path.join(output_dir, name)
        try:
            if os.path.lexists(target):
                raise FileExistsError(name)
            os.rename(os.path.join(aside, name), target)
        except OSError:
            stuck.append(name)
    return stuck
