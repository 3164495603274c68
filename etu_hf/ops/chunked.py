r"""Chunked losses over token positions: the tilted KL (ETU) and the retain NLL.

Pure functions of tensors (no transformers import), in the manner of Liger-Kernel's chunked losses.
Inputs are flattened positions ``[N, D]``: either logits (``D = |V|``) or hidden states with a
``head`` callable that maps a chunk of hidden states to logits (the model's ``lm_head``). Positions
are processed ``chunk_size`` at a time; when there is more than one chunk and gradients are needed,
each chunk runs under :func:`torch.utils.checkpoint.checkpoint`, so no float32 ``[N, |V|]`` tensor
beyond one chunk is alive in the forward or the backward pass. Value and gradient equal those of the
unchunked computation (tested against it).

Positions carry weights ``w`` (1 for a scored position, 0 for padding or ``-100``); rows with
``w = 0`` should have finite inputs (the trainer zeroes them) so that no NaN reaches the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from etu_hf.ops.tilt import TiltSpec, forbidden_mass, per_position_lambda, tilted_log_probs

Head = Callable[[torch.Tensor], torch.Tensor]


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


def _run_chunks(fn: Callable, tensors: list[torch.Tensor | None], n: int, chunk_size: int | None):
    """Apply ``fn`` to row chunks of ``tensors`` and reduce its outputs ``(loss, sums, mins, maxs, *per_row)``:
    losses and sums add, mins/maxs combine, per-row outputs are concatenated."""
    step = n if not chunk_size or chunk_size >= n else chunk_size
    use_ckpt = torch.is_grad_enabled() and step < n
    loss = sums = mins = maxs = None
    rows: list[list[torch.Tensor]] = []
    for start in range(0, max(n, 1), max(step, 1)):
        args = [t[start : start + step] if t is not None else None for t in tensors]
        out = checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args)
        c_loss, c_sums, c_mins, c_maxs, *c_rows = out
        if loss is None:
            loss, sums, mins, maxs = c_loss, c_sums, c_mins, c_maxs
            rows = [[r] for r in c_rows]
        else:
            loss = loss + c_loss
            sums = sums + c_sums
            mins = torch.minimum(mins, c_mins) if mins is not None else None
            maxs = torch.maximum(maxs, c_maxs) if maxs is not None else None
            for acc, r in zip(rows, c_rows, strict=True):
                acc.append(r)
    return loss, sums, mins, maxs, *[torch.cat(r) if r[0] is not None else None for r in rows]


def kl_terms(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    r"""Elementwise :math:`p (\log p - \log r)` with the convention :math:`0 \log 0 = 0`.

    Columns where ``p = 0`` contribute exactly 0, also where ``log p`` and ``log r`` are both
    ``-inf`` (``0 * (-inf + inf)`` would be NaN); no gradient flows through them.
    """
    return torch.where(p > 0, p * (log_p - log_r), p.new_zeros(()))


def tilted_kl_loss(
    student: torch.Tensor,
    base: torch.Tensor,
    forbidden_ids: torch.Tensor,
    *,
    lam: float | torch.Tensor | None = None,
    epsilon: float | None = None,
    lambda_max: float | None = None,
    allow_negative: bool = False,
    lambda_offset: float | torch.Tensor = 0.0,
    tilt: TiltSpec | None = None,
    weights: torch.Tensor | None = None,
    student_head: Head | None = None,
    base_head: Head | None = None,
    chunk_size: int | None = 1024,
    normalizer: float | torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
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
        lam: the tilt: a scalar (global mode) or ``[N]`` (one per position). When ``None``, ``tilt``
            (a :class:`~etu_hf.ops.tilt.TiltSpec`) chooses it from the base logits; without ``tilt``, the
            exact per-position tilt :func:`~etu_hf.ops.tilt.per_position_lambda` is computed with
            ``epsilon``, ``lambda_max``, ``allow_negative`` and ``lambda_offset``.
        weights: ``[N]`` position weights (default all 1).
        chunk_size: positions per chunk (``None`` or 0: one chunk).
        normalizer: ``Z`` (default ``sum_i w_i``, i.e. the mean over scored positions). The trainer
            passes the number of scored positions of the whole accumulated batch so that gradient
            accumulation gives the gradient of one large batch.
        targets: optional ``[N]`` next-token ids; the output then also holds their log-probabilities
            under the model (differentiable) and under the base model, from the same forward passes
            (used by the preference terms, which so need no extra forward).
    """
    if lam is None and epsilon is None and tilt is None:
        raise ValueError(
            "give lam (global or per-position tilt), tilt (a TiltSpec) or epsilon (exact per-position tilt)"
        )
    n = student.shape[0]
    if weights is None:
        weights = torch.ones(n, device=student.device, dtype=torch.float32)
    per_pos = isinstance(lam, torch.Tensor) and lam.dim() > 0

    def chunk(s: torch.Tensor, b: torch.Tensor, w: torch.Tensor, lam_c: torch.Tensor | None, y: torch.Tensor | None):
        with torch.no_grad():
            zb = (base_head(b) if base_head is not None else b).to(device=s.device, dtype=torch.float32)
            clamped = None
            if lam_c is None and lam is not None:
                lam_c = lam
            elif lam_c is None and tilt is not None:
                lam_c, clamped = tilt.lambdas(zb, forbidden_ids, return_clamped=True)
            elif lam_c is None:
                lam_c, clamped = per_position_lambda(
                    zb, forbidden_ids, epsilon, lambda_max, allow_negative, lambda_offset, return_clamped=True
                )
            log_q = tilted_log_probs(zb, forbidden_ids, lam_c)
            q = log_q.exp()
        zs = (student_head(s) if student_head is not None else s).float()
        log_p = torch.log_softmax(zs, dim=-1)
        kl = kl_terms(q, log_q, log_p).sum(-1)
        w = w.to(kl.dtype)
        with torch.no_grad():
            # On-device fills only: a tensor built from a Python number would be a host-to-device copy,
            # which synchronises with the GPU on every step.
            if isinstance(lam_c, torch.Tensor):
                lam_vec = lam_c.to(torch.float32).expand_as(kl)
            else:
                lam_vec = kl.detach().new_full(kl.shape, float(lam_c))
            valid = w > 0
            inf = kl.detach().new_full((), float("inf"))
            sums = torch.stack(
                [
                    (kl.detach() * w).sum(),
                    w.sum(),
                    (lam_vec * w).sum(),
                    (torch.exp(torch.logsumexp(log_p.detach()[:, forbidden_ids], -1)) * w).sum(),
                    (torch.exp(torch.logsumexp(log_q[:, forbidden_ids], -1)) * w).sum(),
                    (forbidden_mass(zb, forbidden_ids) * w).sum(),
                    (clamped.to(w.dtype) * w).sum() if clamped is not None else w.new_zeros(()),
                ]
            )
            mins = torch.where(valid, lam_vec, inf).min().reshape(1)
            maxs = torch.where(valid, lam_vec, -inf).max().reshape(1)
        if y is None:
            return (kl * w).sum(), sums, mins, maxs, None, None
        lp_s = log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            lp_b = torch.log_softmax(zb, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return (kl * w).sum(), sums, mins, maxs, lp_s, lp_b

    loss, sums, mins, maxs, lp_s, lp_b = _run_chunks(
        chunk, [student, base, weights, lam if per_pos else None, targets], n, chunk_size
    )
    if normalizer is None:
        normalizer = sums[1].clamp_min(1.0)
    return TiltedKLOutput(
        loss=loss / normalizer,
        kl_sum=sums[0],
        weight_sum=sums[1],
        lambda_sum=sums[2],
        lambda_min=mins[0],
        lambda_max=maxs[0],
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
    chunk_size: int | None = 1024,
    normalizer: float | torch.Tensor | None = None,
) -> NLLOutput:
    r"""Chunked next-token negative log-likelihood :math:`\frac{1}{Z}\sum_i w_i (-\log \pi_\theta(y_i|x_i))`.

    ``student`` is ``[N, D]`` logits or hidden states (with ``student_head``), ``targets`` ``[N]``
    token ids (valid indices even where ``w_i = 0``).
    """
    n = student.shape[0]
    if weights is None:
        weights = torch.ones(n, device=student.device, dtype=torch.float32)

    def chunk(s: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        zs = (student_head(s) if student_head is not None else s).float()
        nll = F.cross_entropy(zs, y, reduction="none")
        w = w.to(nll.dtype)
        sums = torch.stack([(nll.detach() * w).sum(), w.sum()])
        return (nll * w).sum(), sums, None, None

    loss, sums, _, _ = _run_chunks(chunk, [student, targets, weights], n, chunk_size)
    if normalizer is None:
        normalizer = sums[1].clamp_min(1.0)
    return NLLOutput(loss=loss / normalizer, nll_sum=sums[0], weight_sum=sums[1])
