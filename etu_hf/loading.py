"""Loading a causal language model with errors that name the flag, the file and the fix.

Before any weight is read, ``config.json`` and the safetensors headers (a few KB) are checked: the
architecture must be a causal LM (a masked LM such as BertForMaskedLM would "train" and even reach
its target, meaninglessly), the block length must fit ``max_position_embeddings``, no weights file may
be truncated or corrupted, and the embedding matrix must have ``vocab_size`` rows. A load that still
fails is explained the same way.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from etu_hf.artifacts import safetensors_problem

#: Parameter names of input/output embeddings across architectures (rows = vocabulary size).
_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "embed_out.weight",
    "lm_head.weight",
)
_POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def load_config(path: str, flag: str, trust_remote_code: bool = False) -> Any:
    """``AutoConfig.from_pretrained(path)``; a missing or unreadable config is a ``ValueError`` naming ``flag``."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{flag} {path!r}: cannot read its config.json: {first}") from err


def check_causal_config(config: Any, path: str, flag: str) -> None:
    """``TypeError`` naming ``flag`` unless ``config`` describes a decoder-only causal LM.

    Two cases are refused from the config alone: ``architectures`` lists no causal-LM class (for
    example ``BertForMaskedLM`` or ``BertModel``), and an encoder family (one with a masked-LM head in
    transformers, such as BERT or RoBERTa) not configured as a decoder, whose causal-LM class would
    attend to future tokens.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = list(getattr(config, "architectures", None) or [])
    fix = "ETU needs next-token predictions: give an AutoModelForCausalLM checkpoint (LlamaForCausalLM, ...)."
    if archs and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise TypeError(
            f"{flag} {path!r} is a {', '.join(archs)} checkpoint, not a causal language model; nothing was "
            f"loaded. {fix}"
        )
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise TypeError(
            f"{flag} {path!r} is a {model_type} model, a bidirectional encoder (is_decoder is false), not a causal "
            f"language model; nothing was loaded. {fix}"
        )


def max_positions(config: Any) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` and its aliases), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _POSITION_LIMITS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_sequence_length(config: Any, length: int, flag: str, path: str) -> None:
    """``ValueError`` naming ``flag`` when ``length`` tokens exceed the model's position limit."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise ValueError(
            f"{flag} {length} is above the {limit} positions the model {path!r} supports (max_position_embeddings); "
            f"use {flag} {limit} or less."
        )


def _safetensors_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def check_weight_files(folder: str, flag: str) -> None:
    """``ValueError`` naming ``flag`` and the file when a ``.safetensors`` file in a local ``folder`` is
    truncated or corrupted (checked from its header; no tensor is read)."""
    if not os.path.isdir(folder):
        return
    for path in _safetensors_files(folder):
        problem = safetensors_problem(path)
        if problem:
            raise ValueError(
                f"{flag} {folder!r}: {problem}. The download or copy was probably interrupted: fetch or copy the "
                "model again."
            )


def vocab_mismatch(folder: str, config: Any) -> str | None:
    """How the embedding rows in a local ``folder``'s safetensors files disagree with ``config.vocab_size``."""
    from safetensors import safe_open

    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if not os.path.isdir(folder) or not isinstance(vocab, int):
        return None
    for path in _safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name.endswith(_EMBEDDING_SUFFIXES):
                    rows = f.get_slice(name).get_shape()[0]
                    if rows != vocab:
                        return (
                            f"config.json says vocab_size={vocab} but {name} in {os.path.basename(path)} has {rows} "
                            f"rows; set vocab_size to {rows} in config.json (or use the config the weights came with)"
                        )
    return None


def load_causal_lm(
    path: str, flag: str, max_length: int | None = None, length_flag: str = "--block_size", **kwargs: Any
):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` after the checks of this module.

    ``max_length``, when given, is checked against the model's position limit under ``length_flag``.
    Raises ``TypeError`` (not a causal LM) or ``ValueError`` (anything else) naming ``flag``.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(path, flag, kwargs.get("trust_remote_code", False))
    check_causal_config(config, path, flag)
    if max_length is not None:
        check_sequence_length(config, max_length, length_flag, path)
    check_weight_files(path, flag)
    mismatch = vocab_mismatch(path, config)
    if mismatch:
        raise ValueError(f"{flag} {path!r}: the weights do not match config.json: {mismatch}.")
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise TypeError(
                f"{flag} {path!r} is not a causal language model (AutoModelForCausalLM cannot load it)."
            ) from err
        raise
    except RuntimeError as err:
        if "mismatched" in str(err) or "size mismatch" in str(err):
            raise ValueError(
                f"{flag} {path!r}: the weights do not match config.json (see the load report above); check that "
                "config.json belongs to these weights."
            ) from err
        raise
