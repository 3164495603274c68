r"""Chunked computations over token positions: one chunk runner and the chunked losses and measurements.

In the manner of Liger-Kernel's ``chunked_loss``: :func:`run_chunks` owns the chunking (and, when
gradients are needed, the checkpointing); the maths of one chunk lives in pure functions of logits
(no transformers import), in :mod:`etu_hf.ops.chunk_terms` (plain autograd, re-exported here) and
:mod:`etu_hf.ops.chunk_math` (the fused passes):

- :func:`tilted_kl_terms`: the ETU loss term :math:`KL(q_\lambda \| \pi_\theta)` and its statistics;
- :func:`nll_terms`: the next-token negative log-likelihood;
- :func:`tilt_statistic_terms`: a model against its tilted target (mass on S,
  :math:`KL(\pi_\theta \| q_\lambda)`, :math:`q_\lambda(S)`, lambda, clamped), for measurements;
- :func:`~etu_hf.ops.tilt.forbidden_mass`: the mass on S.

Inputs are flattened positions ``[N, D]``: either logits (``D = |V|``) or hidden states with a ``head``
callable that maps a chunk of hidden states to logits (the model's ``lm_head``). Positions are processed
``chunk_size`` at a time (default :data:`DEFAULT_CHUNK_SIZE`):

- ``chunk_size`` > 0: :func:`tilted_kl_loss`, :func:`chunked_nll`, :func:`chunked_tilt_statistics` and
  :func:`chunked_forbidden_mass` make the fused passes of :mod:`etu_hf.ops.fused` /
  :mod:`etu_hf.ops.chunk_math`: one pass per chunk, the gradient through the head computed in the forward
  (nothing is recomputed), no float32 ``[N, |V|]`` tensor beyond one chunk alive. Where those do not apply
  (a differentiable ``targets`` output, a DeepSpeed ZeRO-3 head), each chunk runs the per-chunk functions
  above under :func:`torch.utils.checkpoint.checkpoint` instead.
- ``chunk_size`` ``None`` or 0: the per-chunk functions once over all rows with plain autograd (the naive
  computation, the reference of the tests and of benchmarks/loss_memory.py).

Value and gradient are the same either way (tested against float64 references).

Positions carry weights ``w`` (1 for a scored position, 0 for padding or ``-100``); rows with ``w = 0``
should have finite inputs (the trainer zeroes them) so that no NaN reaches the gradient. Formulas: see
docs/method.md, "The loss".

Forbidden sets per position: every function here takes an optional ``extra_ids`` ``[N, k_max]`` (``-1`` = none),
the row-specific extras of :math:`S(x_i) = S \cup E(x_i)` (:mod:`etu_hf.ops.row_sets`); the formulas hold with S
replaced by S(x). ``None`` (the default) is the one shared set S, computed exactly as without the argument.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from etu_hf.ops.chunk_math import Workspace, forbidden_mass_rows, tilt_statistic_rows
from etu_hf.ops.chunk_terms import (
    TILT_SUM_FIELDS,
    TiltedKLTerms,
    kl_terms,
    nll_terms,
    tilt_statistic_terms,
    tilted_kl_terms,
)
from etu_hf.ops.fused import fused_nll, fused_tilted_kl
from etu_hf.ops.row_sets import RowSets, row_sets
from etu_hf.ops.tilt import Tilt, forbidden_mass

Head = Callable[[torch.Tensor], torch.Tensor]

# The public names, including the per-chunk functions of chunk_terms (still importable from here).
__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "TILT_SUM_FIELDS",
    "ChunkResult",
    "Head",
    "NLLOutput",
    "TiltedKLOutput",
    "TiltedKLTerms",
    "chunk_rows",
    "chunked_forbidden_mass",
    "chunked_nll",
    "chunked_tilt_statistics",
    "kl_terms",
    "nll_terms",
    "run_chunks",
    "tilt_statistic_terms",
    "tilted_kl_loss",
    "tilted_kl_terms",
]

#: Positions per chunk when the caller says nothing. ``None`` or 0 means one chunk (unchunked).
DEFAULT_CHUNK_SIZE = 1024


# ------------------------------------------------------------------------------------------ the runner
@dataclass
class ChunkResult:
    """What a per-chunk function returns to :func:`run_chunks`.

    ``loss``: a differentiable sum over the chunk's rows (or ``None``); ``sums``: detached sums ``[k]``;
    ``mins``/``maxs``: detached ``[m]`` extremes (or ``None``); ``rows``: per-row outputs ``[c, ...]``
    (or ``None`` entries), concatenated over chunks.
    """

    loss: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    mins: torch.Tensor | None = None
    maxs: torch.Tensor | None = None
    rows: tuple[torch.Tensor | None, ...] = ()

    def _fields(self) -> tuple:
        return (self.loss, self.sums, self.mins, self.maxs, *self.rows)


def chunk_rows(n: int, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size``, or all ``n`` rows when ``chunk_size`` is ``None``, 0 or at least ``n``."""
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"chunk_size: must be >= 0 or None (0 and None: one chunk), got {chunk_size}")
    return n if not chunk_size or chunk_size >= n else chunk_size


def _combine(acc: list, part: tuple) -> list:
    """Add losses and sums, take minimum/maximum of the extremes, collect per-row outputs."""
    loss, sums, mins, maxs, *rows = part
    if not acc:
        return [loss, sums, mins, maxs, *[[r] for r in rows]]
    acc[0] = acc[0] + loss if loss is not None else None
    acc[1] = acc[1] + sums if sums is not None else None
    acc[2] = torch.minimum(acc[2], mins) if mins is not None else None
    acc[3] = torch.maximum(acc[3], maxs) if maxs is not None else None
    for collected, r in zip(acc[4:], rows, strict=True):
        collected.append(r)
    return acc


def run_chunks(
    fn: Callable[..., ChunkResult], tensors: Sequence[torch.Tensor | None], chunk_size: int | None
) -> ChunkResult:
    """Apply ``fn`` to row chunks of ``tensors`` (all ``[N, ...]``; ``None`` entries pass through) and reduce.

    Losses and sums add, mins/maxs combine, per-row outputs are concatenated. With more than one chunk
    and gradients enabled, each chunk is checkpointed: its ``[c, |V|]`` intermediates are recomputed in
    the backward pass instead of being kept.
    """
    n = next(t.shape[0] for t in tensors if t is not None)
    step = max(chunk_rows(n, chunk_size), 1)
    use_ckpt = torch.is_grad_enabled() and step < n

    def call(*args: torch.Tensor | None) -> tuple:
        return fn(*args)._fields()

    acc: list = []
    for start in range(0, max(n, 1), step):
        args = [t[start : start + step] if t is not None else None for t in tensors]
        acc = _combine(acc, checkpoint(call, *args, use_reentrant=False) if use_ckpt else call(*args))
    rows = tuple(torch.cat(r) if r[0] is not None else None for r in acc[4:])
    return ChunkResult(acc[0], acc[1], acc[2], acc[3], rows)


def _logits(states: torch.Tensor, head: Head | None, device: torch.device | None = None) -> torch.Tensor:
    """float32 logits of a chunk: ``head(states)`` or the states themselves (already logits)."""
    z = head(states) if head is not None else states
    return z.to(device=device or z.device, dtype=torch.float32)


def _ones(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(n, device=like.device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ chunked
@dataclass
class TiltedKLOutput:
    """Result of :func:`tilted_kl_loss`. Everything but ``loss`` is detached.

    All sums are weighted by the position weights ``w_i``:

    - ``loss = sum_i w_i KL_i / normalizer`` (differentiable),
    - ``kl_sum = sum_i w_i KL(q_lam(.|x_i) || pi_theta(.|x_i))``, ``weight_sum = sum_i w_i``,
    - ``lambda_sum = sum_i w_i lam_i``, ``lambda_min``/``lambda_max`` over positions with ``w_i > 0``,
    - ``student_mass_sum = sum_i w_i pi_theta(S|x_i)`` (the model's mass on V_S),
    - ``target_mass_sum = sum_i w_i q_lam(S|x_i)``, ``base_mass_sum = sum_i w_i pi_b(S|x_i)``,
    - ``clamped_sum = sum_i w_i 1[a lambda clamp binds at x_i]`` (the target then misses epsilon there).
    """

    loss: torch.Tensor
    kl_sum: torch.Tensor
    weight_sum: torch.Tensor
    lambda_sum: torch.Tensor
    lambda_min: torch.Tensor
    lambda_max: torch.Tensor
    student_mass_sum: torch.Tensor
    target_mass_sum: torch.Tensor
    base_mass_sum: torch.Tensor
    clamped_sum: torch.Tensor
    #: With ``targets``: per-position ``log pi_theta(y_i|x_i)`` (differentiable) and ``log pi_b(y_i|x_i)``.
    student_target_logps: torch.Tensor | None = None
    base_target_logps: torch.Tensor | None = None


def tilted_kl_loss(
    student: torch.Tensor,
    base: torch.Tensor,
    forbidden_ids: torch.Tensor,
    tilt: Tilt,
    *,
    weights: torch.Tensor | None = None,
    student_head: Head | None = None,
    base_head: Head | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    normalizer: float | torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
) -> TiltedKLOutput:
    r"""Chunked ETU loss :math:`\frac{1}{Z}\sum_i w_i\, KL(q_{\lambda_i}(\cdot|x_i) \,\|\, \pi_\theta(\cdot|x_i))`.

    .. math::
        KL(q \| \pi_\theta) = \sum_y q(y) (\log q(y) - \log \pi_\theta(y)), \qquad
        \log q_\lambda = \mathrm{log\_softmax}(z_b - \lambda 1_S)

    Args:
        student: ``[N, D]`` student logits, or hidden states when ``student_head`` is given.
        base: ``[N, D']`` base logits, or hidden states when ``base_head`` is given. No gradient
            flows into the base side.
        forbidden_ids: ``[K]`` long tensor of V_S token ids (on the logits' device).
        tilt: which lambda: a :class:`~etu_hf.ops.tilt.TiltSpec` (chosen from the base logits, e.g. the exact
            per-position tilt at epsilon), a float (one lambda everywhere; 0 gives ``KL(pi_b || pi_theta)``)
            or a tensor (0-dim, or ``[N]``: one lambda per position). See
            :func:`~etu_hf.ops.tilt.resolve_lambdas`.
        weights: ``[N]`` position weights (default all 1).
        chunk_size: positions per chunk (> 0: the fused passes; ``None`` or 0: plain autograd in one piece).
        normalizer: ``Z`` (default ``sum_i w_i``, i.e. the mean over scored positions). The trainer
            passes the number of scored positions of the whole accumulated batch so that gradient
            accumulation gives the gradient of one large batch.
        targets: optional ``[N]`` next-token ids; the output then also holds their log-probabilities
            under the model (differentiable) and under the base model, from the same forward passes
            (used by the preference terms, which so need no extra forward).
        extra_ids: optional ``[N, k_max]`` long tensor: row ``i``'s forbidden ids beyond ``forbidden_ids``
            (``-1`` = none), so that :math:`S(x_i) = S \cup E(x_i)` (:mod:`etu_hf.ops.row_sets`; an id already in
            S, or repeated, counts once). ``None``: the same S at every position.
    """
    if isinstance(tilt, torch.Tensor) and tilt.dim() > 0 and tilt.shape[0] != student.shape[0]:
        raise ValueError(f"tilt: one lambda per position needs shape [{student.shape[0]}], got {tuple(tilt.shape)}")
    if weights is None:
        weights = _ones(student.shape[0], student)
    per_pos = isinstance(tilt, torch.Tensor) and tilt.dim() > 0
    rs = row_sets(forbidden_ids, extra_ids, student)
    fused = None
    if chunk_size:
        step = max(chunk_rows(student.shape[0], chunk_size), 1)
        heads = {"student_head": student_head, "base_head": base_head}
        fused = fused_tilted_kl(
            student, base, forbidden_ids, tilt, weights, **heads, step=step, targets=targets, extra_ids=rs
        )

    def chunk(s, b, w, lam_c, y, index, valid) -> ChunkResult:
        with torch.no_grad():
            zb = _logits(b, base_head, s.device)
        extras = RowSets(index, valid) if index is not None else None
        t = tilted_kl_terms(_logits(s, student_head), zb, forbidden_ids, lam_c if per_pos else tilt, extras)
        w = w.to(t.kl.dtype)
        with torch.no_grad():
            stats = [t.kl.detach(), torch.ones_like(w), t.lam, t.student_mass, t.target_mass, t.base_mass, t.clamped]
            sums = torch.stack([(c.to(w.dtype) * w).sum() for c in stats])
            inf = w.new_full((), float("inf"))
            valid = w > 0
            mins = torch.where(valid, t.lam.to(w.dtype), inf).min().reshape(1)
            maxs = torch.where(valid, t.lam.to(w.dtype), -inf).max().reshape(1)
        if y is None:
            return ChunkResult((t.kl * w).sum(), sums, mins, maxs, (None, None))
        lp_s = t.log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            lp_b = torch.log_softmax(t.base_logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return ChunkResult((t.kl * w).sum(), sums, mins, maxs, (lp_s, lp_b))

    if fused is None:
        extras = [rs.index, rs.valid] if rs is not None else [None, None]
        out = run_chunks(chunk, [student, base, weights, tilt if per_pos else None, targets, *extras], chunk_size)
        fused = (out.loss, out.sums, out.mins[0], out.maxs[0], *out.rows)
    loss, sums, lambda_min, lambda_max, lp_s, lp_b = fused
    if normalizer is None:
        normalizer = sums[1].clamp_min(1.0)
    return TiltedKLOutput(
        loss=loss / normalizer,
        kl_sum=sums[0],
        weight_sum=sums[1],
        lambda_sum=sums[2],
        lambda_min=lambda_min,
        lambda_max=lambda_max,
        student_mass_sum=sums[3],
        target_mass_sum=sums[4],
        base_mass_sum=sums[5],
        clamped_sum=sums[6],
        student_target_logps=lp_s,
        base_target_logps=lp_b,
    )


@dataclass
class NLLOutput:
    """Result of :func:`chunked_nll`: ``loss = sum_i w_i NLL_i / normalizer``; ``nll_sum``, ``weight_sum`` detached."""

    loss: torch.Tensor
    nll_sum: torch.Tensor
    weight_sum: torch.Tensor


def chunked_nll(
    student: torch.Tensor,
    targets: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    student_head: Head | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    normalizer: float | torch.Tensor | None = None,
) -> NLLOutput:
    r"""Chunked next-token negative log-likelihood :math:`\frac{1}{Z}\sum_i w_i (-\log \pi_\theta(y_i|x_i))`.

    ``student`` is ``[N, D]`` logits or hidden states (with ``student_head``), ``targets`` ``[N]``
    token ids (valid indices even where ``w_i = 0``).
    """
    if weights is None:
        weights = _ones(student.shape[0], student)
    if chunk_size and student_head is not None:
        fused = fused_nll(student, targets, weights, student_head, max(chunk_rows(student.shape[0], chunk_size), 1))
        if fused is not None:
            loss, sums = fused
            normalizer = sums[1].clamp_min(1.0) if normalizer is None else normalizer
            return NLLOutput(loss=loss / normalizer, nll_sum=sums[0], weight_sum=sums[1])

    def chunk(s: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> ChunkResult:
        nll = nll_terms(_logits(s, student_head), y.to(s.device))
        w = w.to(device=nll.device, dtype=nll.dtype)
        sums = torch.stack([(nll.detach() * w).sum(), w.sum()])
        return ChunkResult(loss=(nll * w).sum(), sums=sums)

    out = run_chunks(chunk, [student, targets, weights], chunk_size)
    if normalizer is None:
        normalizer = out.sums[1].clamp_min(1.0)
    return NLLOutput(loss=out.loss / normalizer, nll_sum=out.sums[0], weight_sum=out.sums[1])


@torch.no_grad()
def chunked_forbidden_mass(
    states: torch.Tensor,
    forbidden_ids: torch.Tensor,
    *,
    head: Head | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    extra_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":math:`\pi(S(x_i)|x_i)` at every row of ``states`` ``[N, D]`` (logits, or hidden states with ``head``):
    ``[N]``. ``extra_ids``: optional ``[N, k_max]`` per-row extras of S(x) (as in :func:`tilted_kl_loss`)."""

    ws = Workspace()
    rs = row_sets(forbidden_ids, extra_ids, states)

    def chunk(s: torch.Tensor, index: torch.Tensor | None, valid: torch.Tensor | None) -> ChunkResult:
        z = _logits(s, head, forbidden_ids.device)
        extras = RowSets(index, valid).to(z.device) if index is not None else None
        if chunk_size:
            return ChunkResult(rows=(forbidden_mass_rows(z, forbidden_ids, ws, extras),))
        return ChunkResult(rows=(forbidden_mass(z, forbidden_ids, extras),))

    extras = [rs.index, rs.valid] if rs is not None else [None, None]
    return run_chunks(chunk, [states, *extras], chunk_size).rows[0]


@torch.no_grad()
def chunked_tilt_statistics(
    student: torch.Tensor,
    base: torch.Tensor,
    forbidden_ids: torch.Tensor,
    tilt: Tilt,
    *,
    student_head: Head | None = None,
    base_head: Head | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    extra_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`tilt_statistic_terms` at every row: float64 ``[N, 6]`` (columns :data:`TILT_SUM_FIELDS`),
    on the student's device. ``student``/``base``/``extra_ids`` as in :func:`tilted_kl_loss`; a per-position
    ``tilt`` tensor has shape ``[N]``."""
    per_pos = isinstance(tilt, torch.Tensor) and tilt.dim() > 0

    ws = Workspace()
    rs = row_sets(forbidden_ids, extra_ids, student)

    def chunk(s, b, lam_c, index, valid) -> ChunkResult:
        zs = _logits(s, student_head)
        zb = _logits(b, base_head, zs.device)
        lam = lam_c if per_pos else tilt
        extras = RowSets(index, valid).to(zs.device) if index is not None else None
        if chunk_size:  # the fused passes (zb is this chunk's own copy unless the base states are logits)
            owned = base_head is not None
            return ChunkResult(rows=(tilt_statistic_rows(zs, zb, forbidden_ids, lam, ws, owned, extras),))
        return ChunkResult(rows=(tilt_statistic_terms(zs, zb, forbidden_ids, lam, extras),))

    extras = [rs.index, rs.valid] if rs is not None else [None, None]
    return run_chunks(chunk, [student, base, tilt if per_pos else None, *extras], chunk_size).rows[0]
