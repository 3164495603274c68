"""Load an unlearned model and its V_S from a run folder or a hub repo pushed by etu-hf.

An adapter is applied to its base model with plain PEFT (the base comes from ``adapter_config.json``'s
``base_model_name_or_path`` or ``base_model=``); a full model loads with
``AutoModelForCausalLM.from_pretrained``. V_S comes from ``V_S.ids.json`` beside the weights.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from huggingface_hub.utils import HFValidationError, validate_repo_id

from etu_hf.artifacts.files import FORBIDDEN_SET_FILE
from etu_hf.hub.push import PUSH_PATTERNS
from etu_hf.hub.run_files import ADAPTER_CONFIG_FILE, MODEL_CONFIG_FILE

if TYPE_CHECKING:
    from torch import nn

    from etu_hf.forbidden_set import ForbiddenSet


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.path.isabs(value) or value.count("/") > 1 or "\\" in value


def resolve_run_folder(repo_or_dir: str, *, revision: str | None = None, token: str | None = None) -> str:
    """A local folder as it is; a hub repo id downloaded with ``snapshot_download`` (only the files
    :func:`~etu_hf.hub.push.push_run` publishes, plus README.md). Returns the folder."""
    if os.path.isdir(os.path.expanduser(repo_or_dir)):
        return os.path.expanduser(repo_or_dir)
    if _looks_like_path(repo_or_dir):
        raise FileNotFoundError(f"{repo_or_dir!r} is not a folder (and not a hub repo id 'USER/NAME')")
    try:
        validate_repo_id(repo_or_dir)
    except HFValidationError as err:
        raise ValueError(f"{repo_or_dir!r} is neither a local folder nor a valid hub repo id: {err}") from err
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_or_dir, revision=revision, token=token, allow_patterns=[*PUSH_PATTERNS, "README.md"], repo_type="model"
    )


def load_unlearned(
    repo_or_dir: str,
    *,
    base_model: str | None = None,
    revision: str | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[nn.Module, ForbiddenSet]:
    """The unlearned model and its forbidden set V_S, from a run folder or a hub repo.

    Args:
        repo_or_dir: a finished run's output folder, or a hub repo id pushed by
            :func:`~etu_hf.hub.push.push_run` (downloaded with ``snapshot_download``).
        base_model: for adapters, the base model to apply the adapter to (default: the adapter's
            ``base_model_name_or_path``).
        revision: the revision of the unlearned repo (not of the base model).
        **from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``,
            ``device_map``, ``token``, ...); ``token`` is also used for the download.

    Returns:
        ``(model, forbidden_set)``: a ``PeftModel`` with the adapter applied (or the full model), in eval
        mode, and the :class:`~etu_hf.ForbiddenSet` from ``V_S.ids.json``.

    Raises:
        FileNotFoundError: the folder has no ``V_S.ids.json`` or no adapter/model config.
        ValueError: an adapter without a known base model, or V_S outside the model's vocabulary.
    """
    from transformers import AutoModelForCausalLM

    from etu_hf.forbidden_set import ForbiddenSet

    folder = resolve_run_folder(repo_or_dir, revision=revision, token=from_pretrained_kwargs.get("token"))
    if not os.path.isfile(os.path.join(folder, FORBIDDEN_SET_FILE)):
        raise FileNotFoundError(
            f"{repo_or_dir}: no {FORBIDDEN_SET_FILE}, so this is not an etu-hf unlearned model (V_S is unknown)"
        )
    forbidden = ForbiddenSet.load(os.path.join(folder, FORBIDDEN_SET_FILE))
    adapter_config = os.path.join(folder, ADAPTER_CONFIG_FILE)
    if os.path.isfile(adapter_config):
        from peft import PeftModel

        with open(adapter_config, encoding="utf-8") as f:
            base_name = base_model or json.load(f).get("base_model_name_or_path")
        if not base_name:
            raise ValueError(
                f"{repo_or_dir}: adapter_config.json names no base model; pass base_model= (the model it was "
                "trained from)"
            )
        base = AutoModelForCausalLM.from_pretrained(base_name, **from_pretrained_kwargs)
        model = PeftModel.from_pretrained(base, folder, is_trainable=False)
    elif os.path.isfile(os.path.join(folder, MODEL_CONFIG_FILE)):
        model = AutoModelForCausalLM.from_pretrained(folder, **from_pretrained_kwargs)
    else:
        raise FileNotFoundError(
            f"{repo_or_dir}: no adapter_config.json or config.json: the run saved no model (trainer.save_model())"
        )
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    forbidden.check_vocab(vocab, f"{repo_or_dir}/{FORBIDDEN_SET_FILE}")
    model.eval()
    return model, forbidden
