"""Greedy continuations of held-out forget prompts by the base and the unlearned model: an illustration
for the report (tiny models repeat themselves), never a measurement."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from etu_hf.modeling.base import BaseDistribution
from etu_hf.modeling.head import eval_mode


@torch.no_grad()
def greedy_samples(
    model: nn.Module,
    base: BaseDistribution,
    dataset: Any,
    tokenizer: Any,
    num: int = 3,
    prompt_tokens: int = 16,
    max_new_tokens: int = 24,
) -> list[dict[str, str]]:
    """Greedy continuations of the first ``prompt_tokens`` tokens of ``num`` held-out forget sequences,
    by the base and the unlearned model. An illustration: tiny models repeat themselves."""
    if tokenizer is None or num <= 0:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(min(num, len(dataset))):
        item = dataset[i]
        ids = [
            t
            for t, a in zip(item["input_ids"], item.get("attention_mask") or [1] * len(item["input_ids"]), strict=True)
            if a
        ][:prompt_tokens]
        if len(ids) < 2:
            continue
        prompt = torch.tensor([ids], device=device)
        kwargs = dict(
            attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        texts = {}
        with base.as_model() as bm, eval_mode(bm):
            texts["base"] = bm.generate(prompt.to(next(bm.parameters()).device), **kwargs)[0, len(ids) :]
        with eval_mode(model):
            texts["updated"] = model.generate(input_ids=prompt, **kwargs)[0, len(ids) :]
        out.append(
            {
                "prompt": tokenizer.decode(ids),
                **{k: tokenizer.decode(v, skip_special_tokens=True) for k, v in texts.items()},
            }
        )
    return out
