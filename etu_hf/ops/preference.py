r"""Preference losses for unlearning, as small functions of per-sequence log-probabilities.

Sequence log-probabilities are sums over completion tokens, :math:`\log\pi(y|x) = \sum_t \log\pi(y_t|x,y_{<t})`;
:func:`sequence_logps` computes them as a log-softmax and a gather (what TRL's ``selective_log_softmax``
computes), in float32. Every loss returns one value per
sequence (the caller reduces, so that gradient accumulation can weight sequences exactly).

- NPO (Zhang et al., 2024, "Negative Preference Optimization"), with :math:`y` a forget completion:

  .. math:: \ell_{NPO} = -\frac{2}{\beta}\log\sigma\big(-\beta(\log\pi_\theta(y|x) - \log\pi_{ref}(y|x))\big)

- SimNPO (Fan et al., 2024), reference-free and length-normalised, with margin :math:`\gamma`:

  .. math:: \ell_{SimNPO} = -\frac{2}{\beta}\log\sigma\Big(-\frac{\beta}{|y|}\log\pi_\theta(y|x) - \gamma\Big)

- DPO (Rafailov et al., 2023), the sigmoid loss as TRL defines it, with :math:`y_w` chosen (a retain
  text, a refusal or an alternate answer) and :math:`y_l` rejected (the forget completion):

  .. math::
      \ell_{DPO} = -\log\sigma\big(\beta[(\log\pi_\theta(y_w|x)-\log\pi_{ref}(y_w|x))
                                        - (\log\pi_\theta(y_l|x)-\log\pi_{ref}(y_l|x))]\big)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def npo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sequence NPO loss (see the module docstring)."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (policy_logps - ref_logps))


def simnpo_loss(policy_logps: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """Per-sequence SimNPO loss; ``lengths`` are the completion token counts ``|y|``."""
    return -(2.0 / beta) * F.logsigmoid(-(beta / lengths.clamp_min(1).to(policy_logps.dtype)) * policy_logps - gamma)


def dpo_sigmoid_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair sigmoid DPO loss (TRL's ``loss_type="sigmoid"``)."""
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * delta)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \pi(y|x) = z_y - \mathrm{logsumexp}(z)`: ``log_softmax`` then ``gather`` at ``targets``.

    ``logits`` ``[B, T, V]`` (any float dtype), ``targets`` ``[B, T]``; the result is float32 ``[B, T]``.
    One row at a time, so that a low-precision input has one float32 ``[T, V]`` copy alive at once.
    """
    rows = [
        torch.log_softmax(row.float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
        for row, t in zip(logits, targets, strict=True)
    ]
    return torch.stack(rows) if rows else logits.new_zeros(targets.shape, dtype=torch.float32)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probabilities over completion tokens, per sequence.

    ``logits`` are ``[B, T, V]`` for ``input_ids`` ``[B, T]``; token ``t`` counts when
    ``completion_mask[:, t] == 1`` (its prediction comes from position ``t - 1``).
    """
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:])
    return (per_token * completion_mask[:, 1:].to(per_token.dtype)).sum(-1)


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
