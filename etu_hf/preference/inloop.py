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

from etu_hf.preference.losses import dpo_sigmoid_loss, npo_loss, sequence_logps, simnpo_loss

#: Optional forget-data column with the token ids of an alternate (chosen) answer, for DPO.
PREF_CHOSEN_COLUMN = "pref_chosen_ids"


def completion_mask(scored: torch.Tensor, attention_mask: torch.Tensor | None, prompt_tokens: int) -> torch.Tensor:
    """``[B, T-1]``: scored predictions whose target is a completion token (index >= ``prompt_tokens``
    among the attended tokens of its row, so left padding is handled)."""
    if attention_mask is None:
        index = torch.arange(scored.shape[1] + 1, device=scored.device).expand(scored.shape[0], -1)
    else:
        index = attention_mask.long().cumsum(1) - 1
    return scored & (index[:, 1:] >= prompt_tokens)


def prompts_of(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prompt_tokens: int) -> list[list[int]]:
    """The first ``prompt_tokens`` attended tokens of each row (read back to the host)."""
    rows = []
    for i, row in enumerate(input_ids.tolist()):
        mask = attention_mask[i].tolist() if attention_mask is not None else [1] * len(row)
        rows.append([t for t, m in zip(row, mask, strict=True) if m][:prompt_tokens])
    return rows


def chosen_batch(prompts: list[list[int]], chosen: list[list[int]], pad_id: int, device: Any) -> dict[str, Any]:
    """``prompt + chosen`` sequences right-padded with TRL's ``pad``, with their completion mask."""
    from trl.trainer.utils import pad

    ids = [torch.tensor(p + c) for p, c in zip(prompts, chosen, strict=True)]
    masks = [torch.tensor([0] * len(p) + [1] * len(c)) for p, c in zip(prompts, chosen, strict=True)]
    return {
        "input_ids": pad(ids, padding_value=pad_id).to(device),
        "attention_mask": pad([torch.ones_like(m) for m in masks], padding_value=0).to(device),
        "completion_mask": pad(masks, padding_value=0).to(device),
    }


def preference_losses(
    fmt: str,
    beta: float,
    margin: float,
    policy_rejected: torch.Tensor,
    ref_rejected: torch.Tensor,
    lengths: torch.Tensor,
    chosen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-sequence loss of ``fmt`` given completion log-probabilities (``chosen`` = policy, ref for DPO)."""
    if fmt == "npo":
        return npo_loss(policy_rejected, ref_rejected, beta)
    if fmt == "simnpo":
        return simnpo_loss(policy_rejected, lengths, beta, margin)
    policy_chosen, ref_chosen = chosen
    return dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


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
