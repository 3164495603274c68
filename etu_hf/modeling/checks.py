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

from torch import nn

from etu_hf.artifacts.files import safetensors_problem
from etu_hf.modeling.head import causal_lm_of, output_vocab_size


def check_causal_lm(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` is a decoder-only causal LM with an output head."""
    from transformers import GenerationMixin
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    m = causal_lm_of(model)
    name = type(m).__name__
    config = getattr(m, "config", None)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    known = name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if getattr(config, "is_encoder_decoder", False) or head is None or not (known or isinstance(m, GenerationMixin)):
        raise TypeError(
            f"ETU needs a causal language model with an output head (next-token logits); got {name}. "
            "Load the model with transformers.AutoModelForCausalLM.from_pretrained(...)."
        )


def check_tokenizer_matches(model: nn.Module, tokenizer: Any) -> None:
    """Raise ``ValueError`` if the tokenizer can produce ids the model has no embedding for."""
    if tokenizer is None or not hasattr(tokenizer, "__len__"):
        return
    problem = tokenizer_mismatch(len(tokenizer), output_vocab_size(model))
    if problem:
        raise ValueError(problem)


def tokenizer_mismatch(tokens: int, rows: int, flag: str = "the tokenizer") -> str | None:
    """Why a tokenizer of ``tokens`` tokens cannot be the one of a model with ``rows`` output rows, or None.

    More tokens than rows: ids without an embedding. Fewer than half the rows: another model's
    tokenizer (models pad their vocabulary by a few hundred rows at most), whose ids index unrelated
    embeddings; the run would train and audit nonsense.
    """
    if tokens > rows:
        return (
            f"{flag} has {tokens} tokens but the model's output layer has {rows} rows: the tokenizer does not match "
            "the model. Load both from the same checkpoint (or call model.resize_token_embeddings(len(tokenizer)) "
            "if you added tokens on purpose)."
        )
    if tokens < rows // 2:
        return (
            f"{flag} has {tokens} tokens but the model's output layer has {rows} rows: it is not the model's "
            "tokenizer, and its ids would index unrelated embeddings. Load both from the same checkpoint."
        )
    return None


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
