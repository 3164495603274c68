r"""Merging an unlearned adapter into its base model, safely for tied embeddings.

etu-hf adapts the output head (``lm_head`` in the LoRA targets): with the head frozen, LoRA cannot move
the logits by the context-dependent :math:`-\lambda(x) 1_S` the tilted target asks for (the head's column
space has rank = hidden size; measured in docs/method.md). Many small models (SmolLM2, Qwen2.5-0.5B,
Gemma) tie the head to the input embedding (``tie_word_embeddings=True``): one tensor :math:`E` serves
both. A LoRA on the head is additive, :math:`\text{logits} = E h + B A h`, so while the adapter is
separate the input embedding stays :math:`E` and only the output projection changes: that is what
training does, and what PEFT's warning about ``ensure_weight_tying`` is about.

Merging is where it bites: ``merge_and_unload`` writes :math:`E + BA` into the head's weight, which *is*
the embedding, so the input embeddings would change too and the merged model would differ from the
adapter it came from. :func:`merge_adapter` therefore unties first (the head gets its own copy of
:math:`E`, ``config.tie_word_embeddings = False``), then merges: the merged model's logits equal the
adapted model's, and its input embeddings are the base's. The saved folder then holds both matrices
(for SmolLM2-135M, 28M more parameters).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def head_is_tied(model: nn.Module) -> bool:
    """Whether the output head shares its weight tensor with the input embedding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, emb = base.get_output_embeddings(), base.get_input_embeddings()
    head_w = getattr(head, "base_layer", head).weight if head is not None else None
    return head_w is not None and emb is not None and head_w is emb.weight


def untie_head(model: nn.Module) -> bool:
    """Give the (possibly LoRA-wrapped) output head its own copy of the embedding matrix and set
    ``config.tie_word_embeddings = False``; returns whether anything was tied."""
    if not head_is_tied(model):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    layer = getattr(head, "base_layer", head)
    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
    base.config.tie_word_embeddings = False
    text_config = getattr(base.config, "get_text_config", None)
    if callable(text_config):
        text_config().tie_word_embeddings = False
    return True


@torch.no_grad()
def merge_adapter(model: Any) -> nn.Module:
    """The PEFT model ``model`` with its adapter merged into the weights (``merge_and_unload``), after
    :func:`untie_head` when the head is tied to the embedding (see the module docstring). ``ValueError``
    when ``model`` is not a PEFT model, or is quantized (bitsandbytes weights cannot take a merge exactly:
    load the base in float and the adapter on it, then merge)."""
    if not hasattr(model, "merge_and_unload"):
        raise ValueError("merge_adapter: the model has no adapter to merge (not a PEFT model)")
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None or getattr(
        model, "is_loaded_in_4bit", False
    ):
        raise ValueError(
            "merge_adapter: the base is quantized (QLoRA); merging into 4-bit weights is not exact. Load the base "
            "model in float32/bfloat16, load the adapter on it, then merge."
        )
    if untie_head(model):
        logger.info(
            "the output head was tied to the input embeddings: untied before merging (the merged head "
            "carries the adapter's change, the input embeddings stay the base's)"
        )
    return model.merge_and_unload()
