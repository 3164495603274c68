r"""The three terms of the ETU loss of one micro-batch (docs/method.md, "The loss"); the trainer adds them.

- :func:`forget_term`: :math:`\frac{1}{N_f}\sum_i KL(q_{\lambda_i}(\cdot|x_i) \| \pi_\theta(\cdot|x_i))` over
  the scored forget positions, :math:`q_\lambda \propto \pi_b e^{-\lambda 1_S}` (the tilt of ``TiltState``);
- :func:`retain_term`: :math:`\frac{1}{N_r}\sum_j KL(\pi_b(\cdot|x_j) \| \pi_\theta(\cdot|x_j))` (``"kl"``,
  the untilted target) or the next-token NLL (``"nll"``) over the scored retain positions;
- :func:`preference_term`: NPO, SimNPO or DPO on the forget completions (etu_hf.ops.preference), over
  the forget sequences with a completion.

:math:`N_f, N_r` and the sequence count are those of the whole accumulated batch over all processes
(:class:`~etu_hf.training.statistics.ScoredCounts`); ``chunk_size`` is ``loss_chunk_size`` unchanged
(0 or ``None``: one chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from etu_hf.data.blocks import scored_positions
from etu_hf.data.pairing import PREF_CHOSEN_COLUMN, chosen_batch
from etu_hf.modeling.head import head_fn
from etu_hf.modeling.states import scored_states
from etu_hf.ops.chunked import TiltedKLOutput, chunked_nll, tilted_kl_loss
from etu_hf.ops.preference import completion_mask, preference_losses, prompts_of
from etu_hf.training.config import ETUTrainingArguments
from etu_hf.training.preference import chosen_logps
from etu_hf.training.tilt_state import TiltState


@dataclass
class LossContext:
    """What every term needs besides the batch: the model's head, the base distribution, the target,
    the chunk size and the autocast context of the trained model (the base forward runs under it too,
    so both sides have the same precision)."""

    model: nn.Module
    head: nn.Module
    base: Any
    tilt: TiltState
    chunk_size: int | None
    autocast: Any

    @property
    def use_hidden(self) -> bool:
        return bool(self.tilt.use_hidden)


def count_scored(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Scored positions of a batch (see :func:`etu_hf.data.blocks.scored_positions`) as a float tensor."""
    mask, _ = scored_positions(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
    return mask.sum().to(device=device, dtype=torch.float32)


def student_positions(ctx: LossContext, batch: dict[str, Any], keep_logits: bool = False):
    """The model's states at every prediction position, unscored rows zeroed (so the mask serves as
    weights): ``(states [B*(T-1), D], outputs, mask, targets)``."""
    mask, targets = scored_positions(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
    st = scored_states(ctx.model, batch, mask, ctx.use_hidden, all_positions=True, keep_logits=keep_logits)
    return st.states, st.outputs, mask, targets


def base_positions(ctx: LossContext, batch: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
    """The base distribution's states at the same positions (no gradient), in the precision of the
    model's own forward: accelerate wraps only the trained model in autocast."""
    with ctx.autocast():
        return scored_states(ctx.base, batch, mask, ctx.use_hidden, all_positions=True).states


def _heads(ctx: LossContext, device: torch.device) -> dict[str, Any]:
    if not ctx.use_hidden:
        return {"student_head": None, "base_head": None}
    return {"student_head": head_fn(ctx.head, device), "base_head": ctx.base.head(device)}


def forget_term(
    ctx: LossContext,
    forget: dict[str, Any],
    normalizer: torch.Tensor | None,
    keep_logits: bool = False,
    with_targets: bool = False,
) -> tuple[TiltedKLOutput, Any, torch.Tensor]:
    """The tilted KL of the forget half: ``(output, model outputs, scored-position mask)``. With
    ``with_targets`` the output also holds the targets' log-probabilities (for :func:`preference_term`)."""
    student, outputs, mask, targets = student_positions(ctx, forget, keep_logits)
    device = forget["input_ids"].device
    kl = tilted_kl_loss(
        student,
        base_positions(ctx, forget, mask),
        ctx.tilt.forbidden_ids(device),
        tilt=ctx.tilt.tilt_spec(),
        weights=mask.reshape(-1).float(),
        chunk_size=ctx.chunk_size,
        normalizer=normalizer,
        targets=targets.reshape(-1) if with_targets else None,
        extra_ids=ctx.tilt.position_extra_ids(forget["input_ids"], targets, mask),
        **_heads(ctx, device),
    )
    return kl, outputs, mask


def retain_term(
    ctx: LossContext, retain: dict[str, Any], loss_type: str, normalizer: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, detached sum, weight)`` of the retain half: KL(base || model) (``tilt=0``) or the NLL."""
    device = retain["input_ids"].device
    student, _, mask, targets = student_positions(ctx, retain)
    weights = mask.reshape(-1).float()
    heads = _heads(ctx, device)
    if loss_type == "kl":
        out = tilted_kl_loss(
            student,
            base_positions(ctx, retain, mask),
            ctx.tilt.forbidden_ids(device),
            tilt=0.0,
            weights=weights,
            chunk_size=ctx.chunk_size,
            normalizer=normalizer,
            **heads,
        )
        return out.loss, out.kl_sum, out.weight_sum
    out = chunked_nll(
        student,
        targets.reshape(-1),
        weights=weights,
        student_head=heads["student_head"],
        chunk_size=ctx.chunk_size,
        normalizer=normalizer,
    )
    return out.loss, out.nll_sum, out.weight_sum


def preference_term(
    ctx: LossContext,
    args: ETUTrainingArguments,
    forget: dict[str, Any],
    retain: dict[str, Any] | None,
    mask: torch.Tensor,
    kl: TiltedKLOutput,
    normalizer: torch.Tensor | None,
    refusals: list[list[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NPO / SimNPO / DPO on the forget completions: ``(loss, detached sum of per-sequence losses,
    number of sequences)``. The completion is what follows the first ``pref_prompt_tokens`` attended
    tokens; its log-probabilities come from the forget term's forward passes. DPO's chosen completion
    (:func:`chosen_ids`) takes one more forward of the model and of the base."""
    b = mask.shape[0]
    comp = completion_mask(mask, forget.get("attention_mask"), args.pref_prompt_tokens)
    w = comp.to(kl.student_target_logps.dtype)
    policy = (kl.student_target_logps.view(b, -1) * w).sum(1)
    ref = (kl.base_target_logps.view(b, -1) * w).sum(1)
    lengths = comp.sum(1)
    valid = (lengths > 0).to(policy.dtype)
    chosen = None
    if args.pref_format == "dpo":
        prompts = prompts_of(forget["input_ids"], forget.get("attention_mask"), args.pref_prompt_tokens)
        completions = chosen_ids(args, forget, retain, lengths.tolist(), refusals)
        batch = chosen_batch(prompts, completions, pad_id, forget["input_ids"].device)
        with ctx.autocast():
            chosen = chosen_logps(ctx.model, ctx.base, batch)
    per_seq = preference_losses(args.pref_format, args.pref_beta, args.pref_margin, policy, ref, lengths, chosen)
    total = (per_seq * valid).sum()
    z = normalizer if normalizer is not None else valid.sum().clamp_min(1.0)
    return total / z, total.detach(), valid.sum().detach()


def chosen_ids(
    args: ETUTrainingArguments,
    forget: dict[str, Any],
    retain: dict[str, Any] | None,
    lengths: list[int],
    refusals: list[list[int]],
) -> list[list[int]]:
    """DPO's chosen completion for each forget row, from ``pref_chosen``: the row's ``pref_chosen_ids``
    (``"data"``), the start of the paired retain row, as long as the forget completion (``"retain"``),
    or the refusals in turn (``"refusal"``)."""
    if args.pref_chosen == "data":
        return [list(ids) for ids in forget[PREF_CHOSEN_COLUMN]]
    if args.pref_chosen == "retain":
        rows = prompts_of(retain["input_ids"], retain.get("attention_mask"), max([*lengths, 1]))
        return [row[: max(n, 1)] for row, n in zip(rows, lengths, strict=True)]
    return [refusals[i % len(refusals)] for i in range(len(lengths))]


def refusal_ids(args: ETUTrainingArguments, tokenizer: Any, pairs_retain: bool, forget: Any) -> list[list[int]]:
    """Fail early on preference settings without a source of chosen completions; the tokenized refusals
    (empty unless DPO with ``pref_chosen="refusal"``)."""
    if args.preference_weight <= 0 or args.pref_format != "dpo":
        return []
    if args.pref_chosen == "retain" and not pairs_retain:
        raise ValueError(
            "pref_format='dpo' with pref_chosen='retain' needs retain data paired with the forget data: pass "
            "retain_dataset= (and retain_weight > 0), or use --pref_chosen refusal (or data)."
        )
    if args.pref_chosen == "data":
        names = getattr(forget, "column_names", None) or list(forget[0])
        if PREF_CHOSEN_COLUMN not in names:
            raise ValueError(
                f"pref_chosen='data' needs a '{PREF_CHOSEN_COLUMN}' column (token ids of an alternate answer) in "
                "the forget data; add it, or use --pref_chosen refusal or retain."
            )
        return []
    if not callable(tokenizer):
        raise ValueError("pref_chosen='refusal' needs processing_class (a tokenizer) to tokenize pref_refusals")
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in args.pref_refusals if r.strip()]
    return [x for x in ids if x]
