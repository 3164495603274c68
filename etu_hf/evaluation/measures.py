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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from etu_hf.data.blocks import scored_positions
from etu_hf.modeling.head import eval_mode, forward_hidden, head_fn, head_matches_logits, output_head
from etu_hf.ops.bounds import SequenceBound, sequence_upper_bound
from etu_hf.ops.chunked import kl_terms
from etu_hf.ops.tilt import TiltSpec, forbidden_mass, tilted_log_probs


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _scored_states(
    model: nn.Module, head: nn.Module, batch: dict[str, Any], mask: torch.Tensor, use_hidden: bool, base: Any = None
) -> tuple[torch.Tensor, Any]:
    """States at the scored positions ``[n, D]`` and the function that turns them into logits:
    final hidden states with the output head (``use_hidden``), or full logits with ``None``.
    With ``base`` (a BaseDistribution) the states are the base model's."""
    device = mask.device
    if base is not None:
        h, fn = (base.hidden(batch), base.head(device)) if use_hidden else (base.logits(batch), None)
    elif use_hidden:
        h, fn = forward_hidden(model, head, batch, truncate=True)[0], head_fn(head, device)
    else:
        h, fn = forward_hidden(model, head, batch, truncate=False)[1].logits, None
    return h[:, :-1][mask.to(h.device)], fn


def _logits(fn: Any, states: torch.Tensor, device: torch.device) -> torch.Tensor:
    return (fn(states) if fn is not None else states).to(device=device, dtype=torch.float32)


def _chunks(model: nn.Module, batches: Iterable[dict[str, Any]], chunk_size: int):
    """Yield ``(logits [c, V] float32, targets [c], sequence index [c])`` for scored positions."""
    device = _device_of(model)
    head = output_head(model)
    use_hidden: bool | None = None
    seq_offset = 0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            if use_hidden is None:
                use_hidden = head_matches_logits(model, head, batch)
            mask, targets = scored_positions(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
            sel_h, fn = _scored_states(model, head, batch, mask, use_hidden)
            rows = torch.arange(mask.shape[0], device=device).unsqueeze(1).expand_as(mask)
            sel_y = targets[mask]
            sel_seq = rows[mask] + seq_offset
            seq_offset += mask.shape[0]
            for start in range(0, sel_h.shape[0], chunk_size):
                logits = _logits(fn, sel_h[start : start + chunk_size], device)
                yield logits, sel_y[start : start + chunk_size], sel_seq[start : start + chunk_size], seq_offset


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


def evaluate_mass(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    forbidden_ids: torch.Tensor | list[int],
    *,
    chunk_size: int = 1024,
    keep_positions: bool = False,
) -> MassResult:
    """Mean probability mass the model puts on ``forbidden_ids`` at the scored positions of ``batches``."""
    ids = torch.as_tensor(forbidden_ids, dtype=torch.long, device=_device_of(model))
    total = 0.0
    count = 0
    seq_sums: list[np.ndarray] = []
    seq_counts: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    n_seq = 0
    for logits, _, seq, n_seq in _chunks(model, batches, chunk_size):
        m = forbidden_mass(logits, ids).double()
        total += float(m.sum())
        count += m.numel()
        seq_np = seq.cpu().numpy()
        seq_sums.append(np.bincount(seq_np, weights=m.cpu().numpy(), minlength=n_seq))
        seq_counts.append(np.bincount(seq_np, minlength=n_seq))
        if keep_positions:
            kept.append(m.float().cpu().numpy())
    sums = _pad_sum(seq_sums, n_seq)
    counts = _pad_sum(seq_counts, n_seq).astype(np.int64)
    return MassResult(
        mean=total / count if count else math.nan,
        n_positions=count,
        n_sequences=int((counts > 0).sum()),
        sequence_sums=sums[counts > 0],
        sequence_counts=counts[counts > 0],
        positions=np.concatenate(kept) if keep_positions and kept else (np.zeros(0) if keep_positions else None),
    )


def _pad_sum(parts: list[np.ndarray], n: int) -> np.ndarray:
    out = np.zeros(n)
    for p in parts:
        out[: len(p)] += p
    return out


@dataclass
class PerplexityResult:
    """``perplexity = exp(mean_nll)``, ``mean_nll`` the mean next-token NLL over ``n_positions``."""

    perplexity: float
    mean_nll: float
    n_positions: int


def evaluate_perplexity(
    model: nn.Module, batches: Iterable[dict[str, Any]], *, chunk_size: int = 1024
) -> PerplexityResult:
    """Perplexity of the model on ``batches``: the exponential of the mean NLL over scored positions."""
    total = 0.0
    count = 0
    for logits, targets, _, _ in _chunks(model, batches, chunk_size):
        total += float(F.cross_entropy(logits, targets, reduction="sum").double())
        count += targets.numel()
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

    @property
    def mean_mass(self) -> float:
        return self.mass_sum / self.n_positions if self.n_positions else math.nan

    @property
    def delta(self) -> float:
        return self.kl_sum / self.n_positions if self.n_positions else math.nan

    @property
    def mean_target_mass(self) -> float:
        return self.target_mass_sum / self.n_positions if self.n_positions else math.nan

    @property
    def mean_lambda(self) -> float:
        return self.lambda_sum / self.n_positions if self.n_positions else math.nan

    @property
    def clamped_share(self) -> float:
        return self.clamped_sum / self.n_positions if self.n_positions else math.nan

    def upper_bound(self, seed: int = 0) -> SequenceBound:
        """The sequence-level upper bound of :attr:`mean_mass` (:func:`etu_hf.ops.bounds.sequence_upper_bound`)."""
        return sequence_upper_bound(self.sequence_sums, self.sequence_counts, seed=seed)


#: Columns of the totals returned by :func:`tilt_statistic_sums`.
TILT_SUM_FIELDS = ("mass", "kl", "target_mass", "lambda", "positions", "clamped")


@torch.no_grad()
def tilt_statistic_sums(
    model: nn.Module,
    base: Any,
    batches: Iterable[dict[str, Any]],
    forbidden_ids: torch.Tensor,
    tilt: TiltSpec,
    *,
    chunk_size: int = 1024,
    use_hidden: bool = True,
    weights: Iterable[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Totals and per-sequence sums of the model against its tilted target on ``batches``.

    Returns ``(totals, per_sequence)``: ``totals`` is float64 ``[6]`` with the sums of
    :data:`TILT_SUM_FIELDS` (mass on S, KL(pi_theta || q_lam), q_lam(S), lambda, positions, clamped
    positions); ``per_sequence`` is float64 ``[k, 2]``: (summed mass, scored positions) of each
    sequence, in batch order. Both on the model's device.

    ``base`` is a :class:`~etu_hf.modeling.base.BaseDistribution`. ``weights`` (one per batch, default 1)
    lets a process run a batch with weight 0, so that every process runs the same number of forward
    passes (needed by sharded models); such a batch adds nothing and its sequences get count 0.
    Model modes are restored afterwards.
    """
    device = _device_of(model)
    head = output_head(model)
    ids = forbidden_ids.to(device)
    sums = torch.zeros(len(TILT_SUM_FIELDS), dtype=torch.float64, device=device)
    per_seq: list[torch.Tensor] = []
    weights = list(weights) if weights is not None else None
    with eval_mode(model):
        for k, batch in enumerate(batches):
            w = 1.0 if weights is None else float(weights[k])
            batch = {key: v.to(device) for key, v in batch.items()}
            mask, _ = scored_positions(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
            sel_s, s_head = _scored_states(model, head, batch, mask, use_hidden)
            sel_b, b_head = _scored_states(model, head, batch, mask, use_hidden, base=base)
            rows = torch.arange(mask.shape[0], device=device).unsqueeze(1).expand_as(mask)[mask]
            seq = torch.zeros(mask.shape[0], 2, dtype=torch.float64, device=device)
            for start in range(0, sel_s.shape[0], chunk_size):
                zs = _logits(s_head, sel_s[start : start + chunk_size], device)
                zb = _logits(b_head, sel_b[start : start + chunk_size], device)
                lam, clamped = tilt.lambdas(zb, ids, return_clamped=True)
                log_q = tilted_log_probs(zb, ids, lam)
                log_p = torch.log_softmax(zs, -1)
                kl = kl_terms(log_p.exp(), log_p, log_q).sum(-1)
                mass = torch.exp(torch.logsumexp(log_p[:, ids], -1))
                part = torch.stack(
                    [
                        mass.sum(),
                        kl.sum(),
                        torch.exp(torch.logsumexp(log_q[:, ids], -1)).sum(),
                        lam.sum() if isinstance(lam, torch.Tensor) else zs.new_tensor(lam * zs.shape[0]),
                        zs.new_tensor(float(zs.shape[0])),
                        clamped.sum(),
                    ]
                ).double()
                sums += w * part
                r = rows[start : start + chunk_size]
                seq[:, 0].index_add_(0, r, mass.double())
                seq[:, 1].index_add_(0, r, torch.ones_like(mass, dtype=torch.float64))
            per_seq.append(seq * w)
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
