r"""The forget losses of the unlearning baselines, as pure functions of token positions (no transformers import).

Positions are flattened ``[N, D]`` states of a batch ``[B, T]`` (``N = B (T-1)``, every prediction, unscored
rows zeroed): logits, or hidden states with a ``head`` that maps a chunk of them to logits. ``weights``
``w_i`` are 1 at a scored position and 0 elsewhere; ``targets`` ``y_i`` are the next-token ids. Like the ETU
loss (:mod:`etu_hf.ops.chunked`), they are computed ``chunk_size`` positions at a time by
:func:`~etu_hf.ops.chunked.run_chunks`, so no float32 ``[N, |V|]`` tensor beyond one chunk is alive.

- Gradient ascent (GA; GradDiff's forget term):

  .. math:: L_{GA} = \frac{1}{Z}\sum_i w_i \log\pi_\theta(y_i|x_i) = -\frac{1}{Z}\sum_i w_i\,\mathrm{NLL}_i

- NPO (Zhang et al., 2024) over the scored positions of each row :math:`s` (its "sequence"), with
  :math:`\log\pi(y_s|x_s) = \sum_{i \in s} w_i \log\pi(y_i|x_i)` and :math:`\pi_{ref}` the base model:

  .. math::
      L_{NPO} = \frac{1}{B}\sum_s -\frac{2}{\beta}
                \log\sigma\big(-\beta(\log\pi_\theta(y_s|x_s) - \log\pi_{ref}(y_s|x_s))\big)

- SimNPO (Fan et al., 2024), reference-free, with :math:`|y_s|` the scored positions of row :math:`s`:

  .. math::
      L_{SimNPO} = \frac{1}{B}\sum_s -\frac{2}{\beta}
                   \log\sigma\Big(-\frac{\beta}{|y_s|}\log\pi_\theta(y_s|x_s) - \gamma\Big)

  (:math:`B` counts the rows with at least one scored position; the per-sequence losses are
  :func:`~etu_hf.ops.preference.npo_loss` and :func:`~etu_hf.ops.preference.simnpo_loss`).

- UNDIAL (Dong et al., 2024): self-distillation toward the base distribution with the target token's logit
  lowered by a fixed strength :math:`\gamma`:

  .. math::
      t_i = \mathrm{softmax}\big(z_b(x_i) - \gamma\, e_{y_i}\big), \qquad
      L_{UNDIAL} = \frac{1}{Z}\sum_i w_i\, KL\big(t_i \,\|\, \pi_\theta(\cdot|x_i)\big)

  The KL is the cross-entropy :math:`H(t_i, \pi_\theta)` that the UNDIAL paper and open-unlearning minimise
  less the target's entropy :math:`H(t_i)`, which does not depend on :math:`\theta`: same gradient, and 0
  when the model equals its target.

``Z`` is the normaliser (default: the scored positions, or rows, of the batch; the trainer passes those of
the whole accumulated batch so that gradient accumulation gives the gradient of one large batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from etu_hf.ops.chunked import DEFAULT_CHUNK_SIZE, ChunkResult, Head, kl_terms, run_chunks
from etu_hf.ops.preference import npo_loss, simnpo_loss
from etu_hf.ops.tilt import forbidden_mass


def _float_logits(states: torch.Tensor, head: Head | None, device: torch.device | None = None) -> torch.Tensor:
    """float32 logits of a chunk: ``head(states)``, or the states themselves when they are logits."""
    z = head(states) if head is not None else states
    return z.to(device=device or z.device, dtype=torch.float32)


def _mass_sum(
    log_p: torch.Tensor, w: torch.Tensor, forbidden_ids: torch.Tensor | None, extra_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Detached :math:`\\sum_i w_i \\pi(S(x_i)|x_i)` (0 without ``forbidden_ids``; ``extra_ids`` ``[N, k]`` the
    per-context extras of S(x), see :mod:`etu_hf.ops.row_sets`)."""
    if forbidden_ids is None:
        return w.new_zeros(())
    return (forbidden_mass(log_p.detach(), forbidden_ids.to(log_p.device), extra_ids) * w).sum()


# ------------------------------------------------------------------------------------------ token log-probs
@dataclass
class TargetLogpsOutput:
    r"""Result of :func:`chunked_target_logps`.

    ``logps`` ``[N]``: :math:`\log\pi(y_i|x_i)` at every row (differentiable where the states are; rows with
    ``w_i = 0`` hold the value at their placeholder target, use them with the weights). Detached:
    ``nll_sum`` :math:`= -\sum_i w_i \log\pi(y_i|x_i)`, ``weight_sum`` :math:`= \sum_i w_i`, ``mass_sum``
    :math:`= \sum_i w_i \pi(S|x_i)` (0 without ``forbidden_ids``).
    """

    logps: torch.Tensor
    nll_sum: torch.Tensor
    weight_sum: torch.Tensor
    mass_sum: torch.Tensor


def chunked_target_logps(
    states: torch.Tensor,
    targets: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    forbidden_ids: torch.Tensor | None = None,
    head: Head | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    extra_ids: torch.Tensor | None = None,
) -> TargetLogpsOutput:
    r""":math:`\log\pi(y_i|x_i) = z_{y_i} - \mathrm{logsumexp}(z)` at every row of ``states`` ``[N, D]``
    (logits, or hidden states with ``head``), chunked; also the mass on V_S when ``forbidden_ids`` is given."""
    if weights is None:
        weights = torch.ones(states.shape[0], device=states.device)

    def chunk(s: torch.Tensor, y: torch.Tensor, w: torch.Tensor, e: torch.Tensor | None) -> ChunkResult:
        log_p = torch.log_softmax(_float_logits(s, head), -1)
        lp = log_p.gather(-1, y.to(log_p.device).unsqueeze(-1)).squeeze(-1)
        w = w.to(device=lp.device, dtype=lp.dtype)
        with torch.no_grad():
            sums = torch.stack([-(lp * w).sum(), w.sum(), _mass_sum(log_p, w, forbidden_ids, e)])
        return ChunkResult(sums=sums, rows=(lp,))

    out = run_chunks(chunk, [states, targets, weights, extra_ids], chunk_size)
    return TargetLogpsOutput(out.rows[0], out.sums[0], out.sums[1], out.sums[2])


def gradient_ascent_loss(
    logps: torch.Tensor, weights: torch.Tensor, normalizer: float | torch.Tensor | None = None
) -> torch.Tensor:
    r""":math:`L_{GA} = \frac{1}{Z}\sum_i w_i \log\pi_\theta(y_i|x_i)` (minimising it raises the forget NLL);
    ``Z`` defaults to :math:`\sum_i w_i`."""
    w = weights.to(logps.dtype)
    z = normalizer if normalizer is not None else w.sum().clamp_min(1.0)
    return (logps * w).sum() / z


# ------------------------------------------------------------------------------------------ per sequence
@dataclass
class SequenceLossOutput:
    """Result of :func:`npo_forget_loss` / :func:`simnpo_forget_loss`: ``loss = sum_s v_s l_s / Z``
    (differentiable); detached ``loss_sum = sum_s v_s l_s`` and ``sequences = sum_s v_s``, ``v_s = 1`` for a
    row with at least one scored position."""

    loss: torch.Tensor
    loss_sum: torch.Tensor
    sequences: torch.Tensor


def sequence_sums(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Per-row sums over the scored positions: ``per_position`` ``[N]`` or ``[B, T-1]``, ``mask`` ``[B, T-1]``
    (bool or 0/1) give ``[B]`` with :math:`\sum_{i \in s} w_i x_i`."""
    m = mask.to(device=per_position.device, dtype=per_position.dtype)
    return (per_position.reshape(m.shape) * m).sum(-1)


def _reduce(per_seq: torch.Tensor, lengths: torch.Tensor, normalizer: float | torch.Tensor | None):
    valid = (lengths > 0).to(per_seq.dtype)
    total = (per_seq * valid).sum()
    z = normalizer if normalizer is not None else valid.sum().clamp_min(1.0)
    return SequenceLossOutput(total / z, total.detach(), valid.sum().detach())


def npo_forget_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    normalizer: float | torch.Tensor | None = None,
) -> SequenceLossOutput:
    r"""NPO over the rows of a batch (module docstring): per-position :math:`\log\pi_\theta(y_i|x_i)` and
    :math:`\log\pi_{ref}(y_i|x_i)` (``[N]`` or ``[B, T-1]``) are summed over each row's scored positions."""
    lengths = mask.sum(-1)
    per_seq = npo_loss(sequence_sums(policy_logps, mask), sequence_sums(ref_logps, mask).detach(), beta)
    return _reduce(per_seq, lengths.to(per_seq.device), normalizer)


def simnpo_forget_loss(
    policy_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    gamma: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
) -> SequenceLossOutput:
    r"""SimNPO over the rows of a batch (module docstring), :math:`|y_s|` = the scored positions of row ``s``."""
    lengths = mask.sum(-1).to(policy_logps.device)
    per_seq = simnpo_loss(sequence_sums(policy_logps, mask), lengths, beta, gamma)
    return _reduce(per_seq, lengths, normalizer)


# ------------------------------------------------------------------------------------------ UNDIAL
def undial_log_targets(base_logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    r""":math:`\log t = \mathrm{log\_softmax}(z_b - \gamma e_y)`: the base distribution with the target token's
    logit lowered by ``gamma`` (float32, ``[c, V]``)."""
    z = base_logits.float()
    lowered = z.scatter_add(-1, targets.unsqueeze(-1), z.new_full((z.shape[0], 1), -float(gamma)))
    return torch.log_softmax(lowered, -1)


@dataclass
class UndialOutput:
    r"""Result of :func:`chunked_undial_loss`: ``loss`` :math:`= \sum_i w_i KL(t_i\|\pi_\theta) / Z`
    (differentiable); detached ``kl_sum``, ``weight_sum`` :math:`\sum_i w_i`, ``nll_sum``
    :math:`-\sum_i w_i\log\pi_\theta(y_i|x_i)` and ``mass_sum`` :math:`\sum_i w_i\pi_\theta(S|x_i)`."""

    loss: torch.Tensor
    kl_sum: torch.Tensor
    weight_sum: torch.Tensor
    nll_sum: torch.Tensor
    mass_sum: torch.Tensor


def chunked_undial_loss(
    student: torch.Tensor,
    base: torch.Tensor,
    targets: torch.Tensor,
    gamma: float,
    *,
    weights: torch.Tensor | None = None,
    forbidden_ids: torch.Tensor | None = None,
    student_head: Head | None = None,
    base_head: Head | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    normalizer: float | torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
) -> UndialOutput:
    r"""Chunked UNDIAL loss :math:`\frac{1}{Z}\sum_i w_i KL(t_i \| \pi_\theta(\cdot|x_i))` (module docstring).

    ``student``/``base``: ``[N, D]`` logits, or hidden states with ``student_head``/``base_head``; no
    gradient flows into the base side. ``targets`` ``[N]`` valid token ids (also where ``w_i = 0``).
    """
    if weights is None:
        weights = torch.ones(student.shape[0], device=student.device)

    def chunk(
        s: torch.Tensor, b: torch.Tensor, y: torch.Tensor, w: torch.Tensor, e: torch.Tensor | None
    ) -> ChunkResult:
        log_p = torch.log_softmax(_float_logits(s, student_head), -1)
        y = y.to(log_p.device)
        with torch.no_grad():
            log_t = undial_log_targets(_float_logits(b, base_head, log_p.device), y, gamma)
        kl = kl_terms(log_t.exp(), log_t, log_p).sum(-1)
        w = w.to(device=kl.device, dtype=kl.dtype)
        with torch.no_grad():
            nll = -log_p.detach().gather(-1, y.unsqueeze(-1)).squeeze(-1)
            sums = torch.stack(
                [(kl.detach() * w).sum(), w.sum(), (nll * w).sum(), _mass_sum(log_p, w, forbidden_ids, e)]
            )
        return ChunkResult(loss=(kl * w).sum(), sums=sums)

    out = run_chunks(chunk, [student, base, targets, weights, extra_ids], chunk_size)
    z = normalizer if normalizer is not None else out.sums[1].clamp_min(1.0)
    return UndialOutput(out.loss / z, out.sums[0], out.sums[1], out.sums[2], out.sums[3])
