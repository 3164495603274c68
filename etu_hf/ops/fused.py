r"""Fused chunk passes of the ETU loss and the NLL: the gradient through the output head computed in the forward.

:func:`~etu_hf.ops.chunked.tilted_kl_loss` and :func:`~etu_hf.ops.chunked.chunked_nll` use these when they
chunk (``chunk_size > 0``); ``chunk_size`` ``None``/0 keeps the plain autograd computation (the reference).
The maths of one chunk (value, statistics and :math:`\partial KL/\partial z_s = \pi_\theta - q`, all from
logits, no autograd) is in :mod:`etu_hf.ops.chunk_math`.

As Liger-Kernel's fused linear cross-entropy: for hidden states and an output ``head``, each chunk's logits
are computed with autograd on, the analytic gradient :math:`w_i(\pi_\theta - q)` is pushed through the head
at once (``torch.autograd.grad``) and only the gradients with respect to the hidden states ``[N, H]`` and the
head's trainable tensors (found from the head's autograd graph, so any callable works: ``nn.Linear``, a
PEFT LoRA layer, ``head_fn``) are kept; the backward pass scales them by the incoming gradient. Nothing is
recomputed (the checkpointed path ran the head and the softmaxes twice) and no ``[c, |V|]`` tensor outlives
its chunk. For logits inputs (models that post-process their head's output) the backward recomputes
:math:`w_i(\pi_\theta - q)` chunk by chunk from the saved per-row log-normalisers. DeepSpeed ZeRO-3 heads
(partitioned parameters, gathered only while their module runs) are not handled here: the callers keep the
checkpointed path for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from etu_hf.ops.chunk_math import TiltedRows, Workspace, nll_rows, tilted_kl_rows, wide
from etu_hf.ops.row_sets import RowSets, row_sets
from etu_hf.ops.tilt import ExtraIds, Tilt

Head = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ autograd
class _PrecomputedGrad(torch.autograd.Function):
    """``value`` whose gradients with respect to ``inputs`` were computed in the forward pass (``grads``, a
    list aligned with ``inputs``); the backward pass scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: list, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return (None, None, *grads)


def _leaves(z: torch.Tensor, exclude: torch.Tensor) -> list[torch.Tensor]:
    """The tensors requiring gradient that ``z`` was computed from (the leaves of its autograd graph), but
    ``exclude``: the head's trainable parameters, found from one call."""
    out, seen, stack = [], set(), [z.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and var is not exclude:
            out.append(var)
        stack.extend(n for n, _ in node.next_functions)
    return out


def is_partitioned(tensors: Sequence[torch.Tensor]) -> bool:
    """True for DeepSpeed ZeRO-3 parameters (gathered only while their module runs)."""
    return any(hasattr(t, "ds_id") for t in tensors)


def head_parameters(head: Head) -> list[torch.Tensor] | None:
    """Parameters of ``head`` when it says what they are (an ``nn.Module``, or a callable with a ``module``)."""
    module = head if isinstance(head, nn.Module) else getattr(head, "module", None)
    return list(module.parameters()) if isinstance(module, nn.Module) else None


@dataclass
class FusedPass:
    """The result of :func:`fused_head_pass`: the differentiable sum, and what each chunk returned."""

    loss: torch.Tensor | None
    parts: list


def fused_head_pass(
    student: torch.Tensor,
    head: Head,
    chunk_fn: Callable[[torch.Tensor, slice, bool], tuple[torch.Tensor, torch.Tensor | None, object]],
    step: int,
) -> FusedPass | None:
    r"""Run ``chunk_fn`` over row chunks of hidden states ``student`` ``[N, H]`` with the gradient in the forward.

    ``chunk_fn(logits, rows, want_grad) -> (value_sum, dvalue/dlogits or None, extra)`` sees one chunk's
    logits ``head(student[rows])``. Returns the sum of the values, differentiable with respect to ``student``
    and the head's trainable tensors, and the extras; ``None`` when the head is ZeRO-3 partitioned (the
    caller then takes another path).
    """
    params = head_parameters(head)
    if params is not None and is_partitioned(params):
        return None
    n = student.shape[0]
    # a head that does not say what its parameters are is asked by its first call
    want_grad = torch.is_grad_enabled() and (
        student.requires_grad or params is None or any(p.requires_grad for p in params)
    )
    total, parts = None, []
    leaves: list[torch.Tensor] | None = None
    grad_student = torch.zeros_like(student) if want_grad and student.requires_grad else None
    grad_leaves: list[torch.Tensor | None] = []
    for rows in _slices(n, step):
        hc = student[rows].detach()
        z = None
        if want_grad:
            hc.requires_grad_(grad_student is not None)
            with torch.enable_grad():
                z = head(hc)
            if leaves is None:
                leaves = _leaves(z, hc) if z.grad_fn is not None else []
                if is_partitioned(leaves):
                    return None
                grad_leaves = [None] * len(leaves)
                want_grad = grad_student is not None or bool(leaves)
        if not want_grad:
            if z is None:
                with torch.no_grad():
                    z = head(hc)
            value, _, extra = chunk_fn(z.detach(), rows, False)
        else:
            value, dz, extra = chunk_fn(z.detach(), rows, True)
            inputs = ([hc] if grad_student is not None else []) + leaves
            grads = torch.autograd.grad(z, inputs, dz.to(z.dtype), allow_unused=True)
            if grad_student is not None:
                grad_student[rows] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:
                    grad_leaves[i] = g if grad_leaves[i] is None else grad_leaves[i] + g
            del dz
        del z
        total = value if total is None else total + value
        parts.append(extra)
    if not want_grad or not (grad_student is not None or leaves):
        return FusedPass(total, parts)
    used = [(t, g) for t, g in zip(leaves, grad_leaves, strict=True) if g is not None]
    inputs = ([student] if grad_student is not None else []) + [t for t, _ in used]
    grads = ([grad_student] if grad_student is not None else []) + [g for _, g in used]
    return FusedPass(_PrecomputedGrad.apply(total, grads, *inputs), parts)


class _LogitsTiltedKL(torch.autograd.Function):
    """``sum_i w_i KL_i`` from logits: the forward saves per-row log-normalisers, the backward recomputes
    ``w (softmax(zs) - q)`` chunk by chunk from them (no ``[N, |V|]`` intermediate is kept). ``index``/``valid``:
    the per-row extras of S(x) (a :class:`~etu_hf.ops.row_sets.RowSets`' tensors), or ``None``."""

    @staticmethod
    def forward(ctx, zs, zb, weights, ids, lam, lse_s, lse_q, value, step, index, valid):
        ctx.save_for_backward(zs, zb, weights, ids, lam, lse_s, lse_q, index, valid)
        ctx.step = step
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        zs, zb, w, ids, lam, lse_s, lse_q, index, valid = ctx.saved_tensors
        dtype = wide(zs, zb)
        grad = torch.empty_like(zs)
        for r in _slices(zs.shape[0], ctx.step):
            b = zb[r].to(dtype)
            shift = (lam[r] + lse_q[r]).unsqueeze(-1)
            q = torch.exp(b - lse_q[r].unsqueeze(-1))
            q.index_copy_(-1, ids, torch.exp(b.index_select(-1, ids) - shift))
            if index is not None:
                rs = RowSets(index[r], valid[r])
                rs.put_(q, torch.exp(rs.gather(b) - shift))
            p = torch.exp(zs[r].to(dtype) - lse_s[r].unsqueeze(-1))
            scale = (w[r].to(dtype) * grad_out.to(dtype)).unsqueeze(-1)
            grad[r] = p.sub_(q).mul_(scale).to(zs.dtype)
        return grad, *([None] * 10)


#: Per-row fields of :class:`TiltedRows` that :func:`fused_tilted_kl` concatenates over chunks.
ROW_FIELDS = (
    "kl",
    "lam",
    "clamped",
    "student_mass",
    "target_mass",
    "base_mass",
    "student_target_logps",
    "base_target_logps",
)


def fused_tilted_kl(
    student: torch.Tensor,
    base: torch.Tensor,
    forbidden_ids: torch.Tensor,
    tilt: Tilt,
    weights: torch.Tensor,
    *,
    student_head: Head | None,
    base_head: Head | None,
    step: int,
    targets: torch.Tensor | None = None,
    extra_ids: ExtraIds = None,
) -> tuple | None:
    r"""``(sum_i w_i KL_i, sums [7], lambda_min, lambda_max, student_target_logps, base_target_logps)`` by fused
    chunk passes, the first differentiable in ``student`` (and the student head's trainable tensors).

    ``sums``: the weighted sums of KL, 1, lambda, the three masses and the clamped indicator (the order of
    :class:`~etu_hf.ops.chunked.TiltedKLOutput`); the extremes of lambda over rows with ``w > 0``. ``None``
    where this path does not apply (a differentiable ``targets`` output, student logits with a base head, a
    ZeRO-3 head): the caller then uses the checkpointed chunk runner. Arguments as
    :func:`~etu_hf.ops.chunked.tilted_kl_loss` (``extra_ids``: the per-row extras of S(x), ``[N, k_max]``)."""
    grad_on = torch.is_grad_enabled()
    if (targets is not None and grad_on) or (student_head is None and base_head is not None):
        return None
    per_row = isinstance(tilt, torch.Tensor) and tilt.dim() > 0
    rs = row_sets(forbidden_ids, extra_ids, student)
    ws = Workspace()

    def rows_of(zs: torch.Tensor, r: slice, want_grad: bool) -> TiltedRows:
        with torch.no_grad():
            zb = base_head(base[r]) if base_head is not None else base[r]
            zb = zb.to(zs.device)
        w = weights[r].to(zs.device)
        return tilted_kl_rows(
            zs,
            zb,
            forbidden_ids,
            tilt[r] if per_row else tilt,
            ws,
            weights=w,
            want_grad=want_grad,
            base_owned=base_head is not None,
            targets=targets[r] if targets is not None else None,
            extra_ids=rs[r].to(zs.device) if rs is not None else None,
        )

    def chunk(zs: torch.Tensor, r: slice, want_grad: bool):
        rows = rows_of(zs, r, want_grad)
        value = (rows.kl * weights[r].to(device=rows.kl.device, dtype=rows.kl.dtype)).sum()
        return value, rows.grad, rows

    if student_head is not None:
        run = fused_head_pass(student, student_head, chunk, step)
        if run is None:
            return None
        loss, parts = run.loss, run.parts
    else:
        parts = [rows_of(student[r].detach(), r, False) for r in _slices(student.shape[0], step)]
        loss = None
    rows = {name: _cat([getattr(p, name) for p in parts]) for name in ROW_FIELDS}
    w = weights.to(device=rows["kl"].device, dtype=rows["kl"].dtype)
    if student_head is None:
        value = (rows["kl"] * w).sum()
        if grad_on and student.requires_grad:
            lse_s, lse_q = _cat([p.lse_s for p in parts]), _cat([p.lse_q for p in parts])
            extras = (rs.index, rs.valid) if rs is not None else (None, None)
            args = (student, base, weights, forbidden_ids, rows["lam"], lse_s, lse_q, value, step, *extras)
            loss = _LogitsTiltedKL.apply(*args)
        else:
            loss = value
    cols = [rows["kl"], torch.ones_like(w), *(rows[k] for k in ("lam", "student_mass", "target_mass", "base_mass"))]
    sums = torch.stack([(c.to(w.dtype) * w).sum() for c in [*cols, rows["clamped"]]])
    lam, valid, inf = rows["lam"].to(w.dtype), w > 0, w.new_full((), math.inf)
    extremes = torch.where(valid, lam, inf).min(), torch.where(valid, lam, -inf).max()
    return loss, sums, *extremes, rows["student_target_logps"], rows["base_target_logps"]


def fused_nll(
    student: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, head: Head, step: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(sum_i w_i NLL_i, [nll_sum, weight_sum])`` by fused chunk passes through ``head`` (see
    :func:`fused_head_pass`); ``None`` for a ZeRO-3 head."""
    ws = Workspace()

    def chunk(zs: torch.Tensor, r: slice, want_grad: bool):
        w = weights[r].to(device=zs.device, dtype=torch.float32)
        nll, grad = nll_rows(zs, targets[r].to(zs.device), ws, weights=w, want_grad=want_grad)
        value = (nll * w.to(nll.dtype)).sum()
        return value, grad, torch.stack([value.detach(), w.sum().to(value.dtype)])

    run = fused_head_pass(student, head, chunk, step)
    return None if run is None else (run.loss, torch.stack(run.parts).sum(0))


def _slices(n: int, step: int) -> list[slice]:
    return [slice(start, start + step) for start in range(0, max(n, 1), step)]


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if not parts or parts[0] is None else torch.cat(parts)
