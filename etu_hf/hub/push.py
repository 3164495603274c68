"""Publish a finished etu-hf run to the Hugging Face Hub, with its model card.

:func:`push_run` checks everything it can before the first request (the repo id, the folder, that it
is an etu-hf run with a saved model, offline mode, a token), then creates the repo if needed and
uploads, in one commit, the adapter or full model, the tokenizer, V_S and the run's artifacts,
together with the card built by :func:`etu_hf.hub.card.build_model_card` as ``README.md``. The card
is uploaded from memory: the run folder is not modified (a generic ``README.md`` that Trainer may have
written there is not uploaded) and the weights are not copied.

The token comes from ``token=``, else ``HF_TOKEN`` or the ``huggingface_hub`` login. It is only sent
in the requests' ``Authorization`` header: never written, never logged, and every small file is
checked not to contain it before anything is uploaded.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Sequence

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from etu_hf.hub.card import CARD_FILE, build_model_card
from etu_hf.hub.run_files import NotARunError, read_run

logger = logging.getLogger(__name__)

#: Top-level files of a run folder that are published (fnmatch patterns). Checkpoints, the folders a
#: rerun moved aside (``_previous_run_*``), logs and any other subfolder are never uploaded.
PUSH_PATTERNS: tuple[str, ...] = (
    # the adapter or the full model
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
    # the tokenizer
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    # etu-hf's artifacts
    "V_S.ids.json",
    "suppression_report.json",
    "suppression_report.md",
    "suppression_histogram.png",
    "metrics.json",
    "args.json",
    "lambda_history.json",
    "lambda_history.png",
    "training_args.bin",
)

#: Files at least this large, or weights, are not scanned for the token (weights hold no text).
_SCAN_LIMIT_BYTES = 64 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".model")


class PushError(ValueError):
    """A push that was refused before anything was uploaded; the message says why and what to do."""


def files_to_push(run_dir: str, patterns: Sequence[str] = PUSH_PATTERNS) -> list[str]:
    """The top-level files of ``run_dir`` that :func:`push_run` uploads (sorted names, README.md excluded:
    the card replaces it)."""
    names = []
    for entry in sorted(os.scandir(run_dir), key=lambda e: e.name):
        if entry.is_file() and entry.name != CARD_FILE and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            names.append(entry.name)
    return names


def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    if any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_no_token_in(run_dir: str, names: Sequence[str], card_text: str, token: str) -> None:
    secret = token.encode()
    if token in card_text:
        raise PushError("the model card would contain the hub token; nothing was pushed")
    for name in names:
        path = os.path.join(run_dir, name)
        if name.endswith(_WEIGHT_SUFFIXES) or os.path.getsize(path) > _SCAN_LIMIT_BYTES:
            continue
        with open(path, "rb") as f:
            if secret in f.read():
                raise PushError(
                    f"{path} contains the hub token; nothing was pushed. Remove the token from the file "
                    "(etu-hf writes <redacted> in its place) and push again."
                )


def check_repo_id(repo_id: str) -> None:
    """Raise :class:`PushError` unless ``repo_id`` is a valid hub repo id (``"USER/NAME"`` or ``"NAME"``)."""
    if not isinstance(repo_id, str) or not repo_id:
        raise PushError("repo_id is required ('USER/NAME'); nothing was pushed")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"invalid repo id {repo_id!r}: {err} Use 'USER/NAME'; nothing was pushed") from err


def check_hub_access(run_dir: str, token: str | None = None) -> str:
    """The checks that need no run folder: online (no ``HF_HUB_OFFLINE``) and a token; returns the token.

    ``run_dir`` is only named in the messages (where the local files are, or will be). ``etu-hf unlearn
    --push_to_hub`` runs these (with :func:`check_repo_id`) before training, so a run that cannot be
    pushed fails in seconds, not after training."""
    if _offline():
        raise PushError(
            "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so the hub cannot be reached: nothing was pushed. "
            f"The run's files are in {os.path.abspath(run_dir)}; unset HF_HUB_OFFLINE and push again."
        )
    resolved = token or get_token()
    if not resolved:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN, log in with `hf auth login`, or pass --hub_token (token=); "
            f"nothing was pushed. The run's files are in {os.path.abspath(run_dir)}."
        )
    return resolved


def check_push(run_dir: str, repo_id: str, *, token: str | None = None) -> str:
    """Every check :func:`push_run` makes before its first request; returns the token to use.

    Raises:
        PushError: the repo id is invalid, the folder is missing or not a finished etu-hf run with a saved
            model, offline mode is on, or no token is available. Nothing has been sent anywhere.
    """
    check_repo_id(repo_id)
    if not os.path.exists(run_dir):
        raise PushError(f"{run_dir!r} does not exist: give the output_dir of a finished etu-hf run; nothing was pushed")
    try:
        run = read_run(run_dir)
    except (FileNotFoundError, NotARunError, ValueError) as err:
        raise PushError(f"{err}; nothing was pushed") from err
    if not run.has_model:
        raise PushError(
            f"{run_dir} holds no saved model (no adapter_config.json or config.json): save the model first "
            "(trainer.save_model()); nothing was pushed"
        )
    return check_hub_access(run_dir, token)


def push_run(
    run_dir: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    base_model: str | None = None,
    tags: Sequence[str] | None = None,
    dataset: str | Sequence[str] | None = None,
) -> str:
    """Publish the finished run in ``run_dir`` to the hub repo ``repo_id`` with its model card.

    Args:
        run_dir: the run's output folder.
        repo_id: ``"USER/NAME"`` (created if missing; an existing repo gets a new commit).
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from the default branch if missing).
        commit_message: default ``"etu-hf: unlearned model, V_S and audit"``.
        token: a hub token; default ``HF_TOKEN`` or the ``huggingface_hub`` login.
        base_model, tags, dataset: passed to :func:`~etu_hf.hub.card.build_model_card`.

    Returns:
        The URL of the commit.

    Raises:
        PushError: before any request, see :func:`check_push`.
    """
    resolved_token = check_push(run_dir, repo_id, token=token)
    names = files_to_push(run_dir)
    card = build_model_card(run_dir, base_model=base_model, tags=tags, dataset=dataset, repo_id=repo_id)
    card_text = str(card)
    _check_no_token_in(run_dir, names, card_text, resolved_token)

    api = HfApi(token=resolved_token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    target = repo_url.repo_id or repo_id
    if revision:
        api.create_branch(target, branch=revision, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=os.path.join(run_dir, n)) for n in names]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_text.encode("utf-8")))
    logger.info("pushing %d files of %s to %s", len(operations), run_dir, target)
    info = api.create_commit(
        target,
        operations=operations,
        commit_message=commit_message or "etu-hf: unlearned model, V_S and audit",
        revision=revision,
        repo_type="model",
    )
    logger.info("pushed %s: %s", target, info.commit_url)
    return info.commit_url
