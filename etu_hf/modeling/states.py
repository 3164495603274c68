"""The one producer of scored states: what the losses and the measurements feed to the chunk runner.

A forward pass of the model (or of the base distribution) gives, at the scored positions of a batch
(:func:`etu_hf.data.blocks.scored_positions`), either the final hidden states together with the output
head that maps them to logits, or, for a model that post-processes its head's output (see
:func:`~etu_hf.modeling.head.probe_hidden_states`), the full logits with no head.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from etu_hf.modeling.base import BaseDistribution
from etu_hf.modeling.head import forward_hidden, head_fn, output_head


class ScoredStates(NamedTuple):
    """``states`` ``[n, D]``; ``head``: ``h -> logits`` on the mask's device, or ``None`` when ``states``
    are logits already; ``outputs``: the model's outputs (``None`` for a base distribution)."""

    states: torch.Tensor
    head: Any
    outputs: Any


def scored_states(
    source: nn.Module | BaseDistribution,
    batch: dict[str, Any],
    mask: torch.Tensor,
    use_hidden: bool,
    *,
    all_positions: bool = False,
    keep_logits: bool = False,
) -> ScoredStates:
    """States of ``source`` at the predictions of ``batch`` selected by ``mask`` ``[B, T-1]``.

    ``source`` is a model (its forward runs as it is: with gradients if they are on, in its current
    mode) or a :class:`~etu_hf.modeling.base.BaseDistribution` (no-grad, eval-mode forward).
    ``use_hidden``: hidden states plus the output head (no ``[B, T, |V|]`` tensor is built), else full
    logits. ``all_positions=False`` keeps the scored rows only (``[n, D]``, ``n = mask.sum()``);
    ``all_positions=True`` keeps every prediction (``[B*(T-1), D]``, fixed shape) with unscored rows
    zeroed, so that they stay finite and the mask serves as weights. ``keep_logits`` (a model only)
    also computes the model's logits, returned in ``outputs``.
    """
    device = mask.device
    outputs = None
    if isinstance(source, BaseDistribution):
        h, fn = (source.hidden(batch), source.head(device)) if use_hidden else (source.logits(batch), None)
    else:
        head = output_head(source)
        h, outputs = forward_hidden(source, head, batch, truncate=use_hidden and not keep_logits)
        h, fn = (h, head_fn(head, device)) if use_hidden else (outputs.logits, None)
    mask = mask.to(h.device)
    if not all_positions:
        return ScoredStates(h[:, :-1][mask], fn, outputs)
    flat = h[:, :-1].reshape(-1, h.shape[-1])
    return ScoredStates(torch.where(mask.reshape(-1, 1), flat, flat.new_zeros(())), fn, outputs)
