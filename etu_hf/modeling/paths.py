"""Where a model or tokenizer comes from, checked before transformers is asked to load it.

transformers answers a bad ``--model_name_or_path`` with chained tracebacks ("Repo id must be in the
form ...", "need sentencepiece or tiktoken") that name neither the flag nor the problem.
:func:`check_model_path` names both first: a path that does not exist, a file or FIFO instead of a
folder, a folder without ``config.json``, with an invalid one or without weights, a tokenizer folder
without tokenizer files, and a hub id while offline that is not in the local cache. Whatever still
fails to load is wrapped by :func:`load_failure` into one line naming the flag.
"""

from __future__ import annotations

import glob
import json
import os
import re

#: Files one of which a model folder holds (the weights transformers can load).
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "tf_model.h5", "*.gguf")

#: Files one of which a tokenizer folder holds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def offline() -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in names)


def _kind(path: str) -> str:
    return "a FIFO (named pipe)" if os.path.exists(path) and not os.path.isfile(path) else "a file"


def check_model_path(
    path: str | None, flag: str, weights: bool = True, tokenizer: bool = False, config: bool | None = None
) -> None:
    """``ValueError`` naming ``flag``, the problem and the fix when ``path`` cannot be a model (or, with
    ``tokenizer``, a tokenizer) that transformers loads; ``None`` (the embedded demo model) passes.

    A local folder must hold ``config.json`` that parses when ``config`` (default: when ``weights``), weights
    (:data:`WEIGHT_PATTERNS`) when ``weights``, and tokenizer files (:data:`TOKENIZER_FILES`) when
    ``tokenizer``. Anything else must look like a hub id (``org/name``) and, offline, be in the cache.
    """
    if path is None:
        return
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if tokenizer and not names & set(TOKENIZER_FILES):
            raise ValueError(
                f"{flag} {path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); nothing was loaded. "
                "Give the folder the model was saved to with its tokenizer, or --tokenizer_name_or_path."
            )
        if not (weights if config is None else config):
            return
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(
                f"{flag} {path!r} holds no config.json: it is not a model folder; nothing was loaded. Give the folder "
                "that model.save_pretrained() wrote (config.json and the weights)."
            )
        try:
            with open(config_file, encoding="utf-8") as f:
                json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{flag} {path!r}: its config.json is not valid JSON ({err}); nothing was loaded. Restore the file "
                "(copy or download the model again)."
            ) from err
        if weights and not any(glob.glob(os.path.join(path, p)) for p in WEIGHT_PATTERNS):
            raise ValueError(
                f"{flag} {path!r} holds config.json but no weights (model.safetensors, pytorch_model.bin, ...); "
                "nothing was loaded. Copy or download the weights into it."
            )
        return
    if os.path.exists(path):
        raise ValueError(
            f"{flag} {path!r} is {_kind(path)}, not a model folder; nothing was loaded. Give the folder that holds "
            "config.json and the weights (or a hub id such as org/name)."
        )
    local = path.startswith(("/", ".", "~")) or path.endswith(("/", os.sep)) or not _REPO_ID.match(path)
    if local:
        raise ValueError(
            f"{flag} {path!r} does not exist (and is not a hub id such as org/name); nothing was loaded. Check the "
            "path."
        )
    if offline() and not _cached(path):
        raise ValueError(
            f"{flag} {path!r} is not a local folder and not in the hub cache, and HF_HUB_OFFLINE (or "
            "TRANSFORMERS_OFFLINE) is set; nothing was loaded. Download it first (`hf download "
            f"{path}`) or give a local folder."
        )


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "tokenizer_config.json"):
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return True
    return False


def load_failure(path: str, flag: str, what: str, err: BaseException) -> ValueError:
    """A ``ValueError`` naming ``flag`` for a ``what`` (``"tokenizer"``, ``"config.json"``) that
    transformers could not load from ``path``, with the first line of its reason."""
    reason = str(err).strip().splitlines()
    first = (reason[0] if reason else type(err).__name__).rstrip(".")
    hint = (
        "Check the name, your connection and login (gated models need `hf auth login`), or give a local folder."
        if not os.path.exists(path)
        else "Give a folder saved with save_pretrained()."
    )
    return ValueError(f"{flag} {path!r}: cannot load its {what}: {first}. {hint}")
