r"""Measurements on held-out text: mass on V_S and perplexity, over scored positions only.

- :func:`evaluate_mass`: :math:`\bar m = \frac{1}{n}\sum_i \pi(S|x_i)`, the mean over the ``n``
  scored positions of the model's probability mass on the forbidden set, with per-sequence sums
  (for bootstrap intervals) and, on request, every position's mass.
- :func:`evaluate_perplexity`: :math:`\exp(\frac{1}{n}\sum_i -\log \pi(y_i|x_i))`.

Both run in eval mode without gradients (the model's train/eval mode is restored afterwards), feed the
output head chunk by chunk (no ``[B, T, |V|]`` tensor) and accept any iterable of collated batches,
e.g. :func:`etu_hf.data.iter_batches`. For the base distribution of a PEFT model, wrap the call in
:func:`adapters_disabled`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from etu_hf.data.blocks import scored_positions
from etu_hf.modeling.head import eval_mode, probe_hidden_states
from etu_hf.modeling.states import scored_states
from etu_hf.ops.bounds import SequenceBound, sequence_upper_bound
from etu_hf.ops.chunked import (
    DEFAULT_CHUNK_SIZE,
    TILT_SUM_FIELDS,
    chunked_forbidden_mass,
    chunked_nll,
    chunked_tilt_statistics,
)
from etu_hf.ops.tilt import Tilt

#: Per-context sets: ``(input_ids [B, T], targets [B, T-1], mask [B, T-1]) -> [B, T-1, k] | None``, the extras of
#: S(x) at every prediction position (e.g. :meth:`etu_hf.ForbiddenSet.extra_ids`); ``None``: S(x) = the ids.
ExtraIdsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def scored_extra_ids(
    extra_ids: ExtraIdsFn | None, batch: dict[str, Any], mask: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor | None:
    """The extras of S(x) at the scored positions of ``batch`` only (``[n, k]``, in row-major order as the scored
    states), or ``None``."""
    if extra_ids is None:
        return None
    extra = extra_ids(batch["input_ids"], targets, mask)
    return None if extra is None else extra[mask.to(extra.device)]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _per_sequence(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]``: the sum of ``values`` (one per scored position, in row-major order) in each row of ``mask``."""
    full = torch.zeros(mask.shape, dtype=torch.float64, device=values.device)
    full[mask.to(values.device)] = values.double()
    return full.sum(1)


def _scored_batches(model: nn.Module, batches: Iterable[dict[str, Any]], use_hidden: bool | None = None):
    """Yield ``(batch, mask, targets, use_hidden)`` for each batch, moved to the model's device, with the
    model in eval mode (its modes are restored afterwards). ``use_hidden=None``: the head probe decides
    on the first batch."""
    device = _device_of(model)
    with eval_mode(model):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            if use_hidden is None:
                use_hidden = probe_hidden_states(model, batch)
            mask, targets = scored_positions(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
            yield batch, mask, targets, use_hidden


@dataclass
class MassResult:
    """Mass on V_S over scored positions.

    ``mean`` is :math:`\\frac{1}{n}\\sum_i \\pi(S|x_i)` over the ``n_positions`` scored positions;
    ``sequence_sums[j]``/``sequence_counts[j]`` are the sum and the number of scored positions of
    sequence ``j``; ``positions`` holds every position's mass when requested.
    """

    mean: float
    n_positions: int
    n_sequences: int
    sequence_sums: np.ndarray = field(repr=False)
    sequence_counts: np.ndarray = field(repr=False)
    positions: np.ndarray | None = field(default=None, repr=False)

    def share_above(self, threshold: float) -> float | None:
        """Share of positions whose mass exceeds ``threshold`` (needs ``positions``)."""
        if self.positions is None or len(self.positions) == 0:
            return None
        return float((self.positions > threshold).mean())


@torch.no_grad()
def evaluate_mass(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    forbidden_ids: torch.Tensor | list[int],
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    keep_positions: bool = False,
    extra_ids: ExtraIdsFn | None = None,
) -> MassResult:
    """Mean probability mass the model puts on ``forbidden_ids`` at the scored positions of ``batches``
    (``chunk_size`` positions at a time through the output head; ``None`` or 0: all at once). ``extra_ids``:
    the per-context extras of S(x) (:data:`ExtraIdsFn`); then the mass at each position is that on S(x)."""
    ids = torch.as_tensor(forbidden_ids, dtype=torch.long, device=_device_of(model))
    seq_sums: list[torch.Tensor] = []
    seq_counts: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    for batch, mask, targets, use_hidden in _scored_batches(model, batches):
        st = scored_states(model, batch, mask, use_hidden)
        extra = scored_extra_ids(extra_ids, batch, mask, targets)
        m = chunked_forbidden_mass(st.states, ids, head=st.head, chunk_size=chunk_size, extra_ids=extra)
        seq_sums.append(_per_sequence(mask, m).cpu())
        seq_counts.append(mask.sum(1).cpu())
        if keep_positions:
            kept.append(m.float().cpu())
    sums = torch.cat(seq_sums).numpy() if seq_sums else np.zeros(0)
    counts = torch.cat(seq_counts).numpy().astype(np.int64) if seq_counts else np.zeros(0, dtype=np.int64)
    count = int(counts.sum())
    return MassResult(
        mean=float(sums.sum()) / count if count else math.nan,
        n_positions=count,
        n_sequences=int((counts > 0).sum()),
        sequence_sums=sums[counts > 0],
        sequence_counts=counts[counts > 0],
        positions=torch.cat(kept).numpy() if kept else (np.zeros(0) if keep_positions else None),
    )


@dataclass
class PerplexityResult:
    """``perplexity = exp(mean_nll)``, ``mean_nll`` the mean next-token NLL over ``n_positions``."""

    perplexity: float
    mean_nll: float
    n_positions: int


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, batches: Iterable[dict[str, Any]], *, chunk_size: int | None = DEFAULT_CHUNK_SIZE
) -> PerplexityResult:
    """Perplexity of the model on ``batches``: the exponential of the mean NLL over scored positions."""
    total = 0.0
    count = 0
    for batch, mask, targets, use_hidden in _scored_batches(model, batches):
        st = scored_states(model, batch, mask, use_hidden)
        out = chunked_nll(st.states, targets[mask], student_head=st.head, chunk_size=chunk_size)
        total += float(out.nll_sum)
        count += int(mask.sum())
    mean = total / count if count else math.nan
    return PerplexityResult(perplexity=math.exp(mean) if count else math.nan, mean_nll=mean, n_positions=count)


@dataclass
class TiltStatistics:
    r"""Sums over scored positions of a model against its tilted target (reduced over processes).

    ``mean_mass`` is :math:`\frac1n\sum_i \pi_\theta(S|x_i)`; ``delta`` is the mean *per-token*
    :math:`KL(\pi_\theta(\cdot|x_i) \| q_\lambda(\cdot|x_i))` (per position, not per sequence);
    ``mean_target_mass`` is :math:`\frac1n\sum_i q_\lambda(S|x_i)`; ``mean_lambda`` the mean tilt;
    ``clamped_share`` the share of positions where a lambda clamp binds. ``sequence_sums`` and
    ``sequence_counts`` hold each sequence's summed mass and scored positions, for the
    sequence-level bound :meth:`upper_bound`.
    """

    mass_sum: float
    kl_sum: float
    target_mass_sum: float
    lambda_sum: float
    n_positions: int
    clamped_sum: float = 0.0
    sequence_sums: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    sequence_counts: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def _per_position(self, total: float) -> float:
        return total / self.n_positions if self.n_positions else math.nan

    mean_mass = property(lambda self: self._per_position(self.mass_sum))
    delta = property(lambda self: self._per_position(self.kl_sum))
    mean_target_mass = property(lambda self: self._per_position(self.target_mass_sum))
    mean_lambda = property(lambda self: self._per_position(self.lambda_sum))
    clamped_share = property(lambda self: self._per_position(self.clamped_sum))

    def upper_bound(self, seed: int = 0) -> SequenceBound:
        """The sequence-level upper bound of :attr:`mean_mass` (:func:`etu_hf.ops.bounds.sequence_upper_bound`)."""
        return sequence_upper_bound(self.sequence_sums, self.sequence_counts, seed=seed)


@torch.no_grad()
def tilt_statistic_sums(
    model: nn.Module,
    base: Any,
    batches: Iterable[dict[str, Any]],
    forbidden_ids: torch.Tensor,
    tilt: Tilt,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    use_hidden: bool = True,
    weights: Iterable[float] | None = None,
    extra_ids: ExtraIdsFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Totals and per-sequence sums of the model against its tilted target on ``batches``.

    Returns ``(totals, per_sequence)``: ``totals`` is float64 ``[6]`` with the sums of
    :data:`~etu_hf.ops.chunked.TILT_SUM_FIELDS` (mass on S, KL(pi_theta || q_lam), q_lam(S), lambda,
    positions, clamped positions; :func:`~etu_hf.ops.chunked.tilt_statistic_terms`); ``per_sequence`` is
    float64 ``[k, 2]``: (summed mass, scored positions) of each sequence, in batch order. Both on the
    model's device.

    ``base`` is a :class:`~etu_hf.modeling.base.BaseDistribution`; ``tilt`` a
    :class:`~etu_hf.ops.tilt.TiltSpec` or a float lambda (see :func:`~etu_hf.ops.tilt.resolve_lambdas`).
    ``weights`` (one per batch, default 1) lets a process run a batch with weight 0, so that every process
    runs the same number of forward passes (needed by sharded models); such a batch adds nothing and its
    sequences get count 0. ``extra_ids``: the per-context extras of S(x) (:data:`ExtraIdsFn`). Model modes are
    restored afterwards.
    """
    device = _device_of(model)
    ids = forbidden_ids.to(device)
    sums = torch.zeros(len(TILT_SUM_FIELDS), dtype=torch.float64, device=device)
    per_seq: list[torch.Tensor] = []
    weights = list(weights) if weights is not None else None
    for k, (batch, mask, targets, _) in enumerate(_scored_batches(model, batches, use_hidden)):
        w = 1.0 if weights is None else float(weights[k])
        s = scored_states(model, batch, mask, use_hidden)
        b = scored_states(base, batch, mask, use_hidden)
        terms = chunked_tilt_statistics(
            s.states,
            b.states,
            ids,
            tilt,
            student_head=s.head,
            base_head=b.head,
            chunk_size=chunk_size,
            extra_ids=scored_extra_ids(extra_ids, batch, mask, targets),
        )
        sums += w * terms.sum(0)
        per_seq.append(w * torch.stack([_per_sequence(mask, terms[:, 0]), mask.sum(1).double()], -1))
    per_sequence = torch.cat(per_seq) if per_seq else torch.zeros(0, 2, dtype=torch.float64, device=device)
    return sums, per_sequence


def tilt_statistics(sums: torch.Tensor, per_sequence: torch.Tensor | None = None) -> TiltStatistics:
    """:class:`TiltStatistics` from the (reduced) totals and (gathered) per-sequence sums of
    :func:`tilt_statistic_sums`; sequences with no scored position are dropped."""
    mass, kl, q, lam, n, clamped = sums.tolist()
    seq = per_sequence.double().cpu().numpy() if per_sequence is not None else np.zeros((0, 2))
    seq = seq[seq[:, 1] > 0]
    return TiltStatistics(
        mass_sum=mass,
        kl_sum=kl,
        target_mass_sum=q,
        lambda_sum=lam,
        n_positions=round(n),
        clamped_sum=clamped,
        sequence_sums=seq[:, 0],
        sequence_counts=seq[:, 1],
    )
