r"""The per-chunk functions of the chunked computations, with plain autograd: the naive reference.

Pure functions of logits ``[c, |V|]`` (no transformers import) that :func:`~etu_hf.ops.chunked.run_chunks` applies
to one chunk of positions: where the fused passes of :mod:`etu_hf.ops.chunk_math` do not apply (a differentiable
``targets`` output, a DeepSpeed ZeRO-3 head), and in one piece as the reference the fused passes are tested
against (``chunk_size`` ``None`` or 0). Each takes an optional ``extra_ids`` (the per-row extras of a per-context
forbidden set :math:`S(x)`, :mod:`etu_hf.ops.row_sets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from etu_hf.ops.row_sets import row_sets
from etu_hf.ops.tilt import ExtraIds, Tilt, forbidden_mass, resolve_lambdas, tilted_log_probs

#: Columns of :func:`tilt_statistic_terms` (and of the totals of :func:`~etu_hf.ops.chunked.chunked_tilt_statistics`).
TILT_SUM_FIELDS = ("mass", "kl", "target_mass", "lambda", "positions", "clamped")


def kl_terms(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    r"""Elementwise :math:`p (\log p - \log r)` with the convention :math:`0 \log 0 = 0`.

    Columns where ``p = 0`` contribute exactly 0, also where ``log p`` and ``log r`` are both
    ``-inf`` (``0 * (-inf + inf)`` would be NaN); no gradient flows through them.
    """
    return torch.where(p > 0, p * (log_p - log_r), p.new_zeros(()))


@dataclass
class TiltedKLTerms:
    r"""Per-position results of :func:`tilted_kl_terms` (all ``[c]``).

    ``kl`` is :math:`KL(q_{\lambda}(\cdot|x) \| \pi_\theta(\cdot|x))` (differentiable in the student logits);
    the rest is detached: ``lam``, ``clamped`` (a clamp binds), ``student_mass`` :math:`\pi_\theta(S|x)`,
    ``target_mass`` :math:`q_\lambda(S|x)`, ``base_mass`` :math:`\pi_b(S|x)`; ``log_p`` the student's
    log-probabilities ``[c, V]`` (differentiable) and ``base_logits`` ``[c, V]``, both float32.
    """

    kl: torch.Tensor
    lam: torch.Tensor
    clamped: torch.Tensor
    student_mass: torch.Tensor
    target_mass: torch.Tensor
    base_mass: torch.Tensor
    log_p: torch.Tensor
    base_logits: torch.Tensor


def tilted_kl_terms(
    student_logits: torch.Tensor,
    base_logits: torch.Tensor,
    forbidden_ids: torch.Tensor,
    tilt: Tilt,
    extra_ids: ExtraIds = None,
) -> TiltedKLTerms:
    r"""One chunk of the ETU loss: :math:`KL(q_\lambda \| \pi_\theta)` per position, with
    :math:`\log q_\lambda = \mathrm{log\_softmax}(z_b - \lambda 1_{S(x)})` and lambda from
    :func:`~etu_hf.ops.tilt.resolve_lambdas`. No gradient flows into the base side."""
    with torch.no_grad():
        zb = base_logits.float()
        rs = row_sets(forbidden_ids, extra_ids, zb)
        lam, clamped = resolve_lambdas(tilt, zb, forbidden_ids, extra_ids=rs)
        log_q = tilted_log_probs(zb, forbidden_ids, lam, rs)
        q = log_q.exp()
    log_p = torch.log_softmax(student_logits.float(), dim=-1)
    kl = kl_terms(q, log_q, log_p).sum(-1)
    with torch.no_grad():
        student_mass = forbidden_mass(log_p.detach(), forbidden_ids, rs)
        target_mass = forbidden_mass(log_q, forbidden_ids, rs)
        base_mass = forbidden_mass(zb, forbidden_ids, rs)
    return TiltedKLTerms(kl, lam, clamped, student_mass, target_mass, base_mass, log_p, zb)


def nll_terms(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""One chunk of the next-token negative log-likelihood :math:`-\log \pi_\theta(y_i|x_i)` per position."""
    return F.cross_entropy(student_logits.float(), targets, reduction="none")


def tilt_statistic_terms(
    student_logits: torch.Tensor,
    base_logits: torch.Tensor,
    forbidden_ids: torch.Tensor,
    tilt: Tilt,
    extra_ids: ExtraIds = None,
) -> torch.Tensor:
    r"""One chunk of the measurements of a model against its tilted target: float64 ``[c, 6]`` with the
    columns :data:`TILT_SUM_FIELDS`: :math:`\pi_\theta(S|x)`, :math:`KL(\pi_\theta(\cdot|x) \| q_\lambda(\cdot|x))`
    (note the direction: the model's divergence from its target), :math:`q_\lambda(S|x)`, :math:`\lambda(x)`,
    1 (a position), 1 where a lambda clamp binds."""
    zb = base_logits.float()
    rs = row_sets(forbidden_ids, extra_ids, zb)
    lam, clamped = resolve_lambdas(tilt, zb, forbidden_ids, extra_ids=rs)
    log_q = tilted_log_probs(zb, forbidden_ids, lam, rs)
    log_p = torch.log_softmax(student_logits.float(), -1)
    kl = kl_terms(log_p.exp(), log_p, log_q).sum(-1)
    columns = [
        forbidden_mass(log_p, forbidden_ids, rs),
        kl,
        forbidden_mass(log_q, forbidden_ids, rs),
        lam,
        torch.ones_like(kl),
        clamped,
    ]
    return torch.stack([c.to(torch.float64) for c in columns], -1)
