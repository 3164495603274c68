"""Preference refinement inside ETU training (``preference_weight > 0``).

Each forget example is split into a prompt ``x`` (its first ``pref_prompt_tokens`` attended tokens)
and a completion ``y`` (the rest). NPO and SimNPO use the log-probabilities of ``y`` that the ETU
loss already computed in the same forward passes (model and base), so they cost no extra forward.
DPO also needs a chosen completion after the same prompt, which takes one more short forward of the
model and of the base model.
"""

from __future__ import annotations

from typing import Any

import torch

from etu_hf.ops.preference import sequence_logps


def chosen_logps(model: Any, base: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities of the chosen completions: model (differentiable) and base (no grad)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    policy = sequence_logps(model(**inputs).logits, batch["input_ids"], batch["completion_mask"])
    with torch.no_grad():
        ref = sequence_logps(
            base.logits(inputs),
            batch["input_ids"].to(base_device(base)),
            batch["completion_mask"].to(base_device(base)),
        )
    return policy, ref.to(policy.device)


def base_device(base: Any) -> Any:
    return next(base.model.parameters()).device
