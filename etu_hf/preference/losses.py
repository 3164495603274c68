r"""Preference losses for unlearning, as small functions of per-sequence log-probabilities.

Sequence log-probabilities are sums over completion tokens, :math:`\log\pi(y|x) = \sum_t \log\pi(y_t|x,y_{<t})`;
:func:`sequence_logps` computes them with TRL's ``selective_log_softmax``. Every loss returns one value per
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


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probabilities over completion tokens, per sequence.

    ``logits`` are ``[B, T, V]`` for ``input_ids`` ``[B, T]``; token ``t`` counts when
    ``completion_mask[:, t] == 1`` (its prediction comes from position ``t - 1``).
    """
    from trl.trainer.utils import selective_log_softmax

    per_token = selective_log_softmax(logits[:, :-1].float(), input_ids[:, 1:])
    return (per_token * completion_mask[:, 1:].to(per_token.dtype)).sum(-1)
