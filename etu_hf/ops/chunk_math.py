r"""The maths of one chunk of rows, from logits, with no autograd: the passes the fused losses make.

With base logits :math:`z_b`, model logits :math:`z_s` (rows ``[c, |V|]``), the forbidden set S and a
per-row lambda (:func:`~etu_hf.ops.tilt.resolve_lambdas`):

.. math::
    \ell_R = \mathrm{lse}(z_{b, V\setminus S}),\quad \ell_S = \mathrm{lse}(z_{b,S}),\quad
    \mathrm{logit}\,p = \ell_S - \ell_R,\quad \ell_q = \mathrm{logaddexp}(\ell_R,\ \ell_S - \lambda),\quad
    q_y = e^{z_{b,y} - \lambda 1_S(y) - \ell_q}

    KL(q \| \pi_\theta) = \sum_y q_y (z_{b,y} - z_{s,y}) - \lambda\, q(S) - \ell_q + \mathrm{lse}(z_s),
    \qquad \frac{\partial KL}{\partial z_s} = \pi_\theta - q

    KL(\pi_\theta \| q) = \sum_y \pi_{\theta,y} (z_{s,y} - z_{b,y}) + \lambda\, \pi_\theta(S) + \ell_q
        - \mathrm{lse}(z_s)

Per-row quantities are closed form: :math:`q(S) = e^{\ell_S - \lambda - \ell_q}`, :math:`\pi_b(S) =
e^{\ell_S - \mathrm{lse}(z_b)}`. :math:`\ell_R` is a pass of its own over :math:`V \setminus S` (S columns set
to :math:`-\infty`), so ``logit p`` is exact where :math:`p` rounds to 1, as in
:func:`~etu_hf.ops.tilt.base_logit_mass`. Where a logit is :math:`-\infty` the probability is 0 and the
product :math:`0 \cdot \infty` is dropped (``nansum``): the convention :math:`0 \log 0 = 0`.

Speed: every ``[c, |V|]`` pass writes into one of two work buffers that all chunks of a call share
(:class:`Workspace`; on CPU a fresh allocation of that size costs more than the arithmetic on it); the
softmax is torch's row-fused kernel and the log-normaliser is read off it at one column
(:func:`softmax_into`), so a softmax with its :math:`\mathrm{lse}` is one pass over the row; the per-row
quantities on S come from the ``K`` columns of S (``index_select``), never from a pass over the vocabulary.

Per-context sets :math:`S(x) = S_{shared} \cup E(x)` (:mod:`etu_hf.ops.row_sets`): every formula above holds with
S replaced by S(x). The ``K`` columns become ``K + k_max`` (the shared ones, then each row's extras by ``gather``,
:math:`-\infty` in the padding, so they add nothing), and the passes that set or read S columns over the vocabulary
also write the extras by ``scatter`` (:meth:`~etu_hf.ops.row_sets.RowSets.put_`). ``extra_ids=None`` runs exactly
the operations of the shared set alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from etu_hf.ops.row_sets import RowSets, row_sets
from etu_hf.ops.tilt import ExtraIds, Tilt, resolve_lambdas

#: Smallest softmax value at which :func:`softmax_into` reads the log-normaliser off a candidate column.
LSE_MIN_PROB = 1e-20


class Workspace:
    """Two ``[rows, |V|]`` work buffers reused by every chunk of one call (row slices for a shorter chunk)."""

    def __init__(self) -> None:
        self._bufs: dict[int, torch.Tensor] = {}

    def get(self, slot: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = like.shape
        buf = self._bufs.get(slot)
        if (
            buf is None
            or buf.shape[0] < rows
            or buf.shape[1] != cols
            or buf.dtype != dtype
            or buf.device != like.device
        ):
            buf = torch.empty(rows, cols, dtype=dtype, device=like.device)
            self._bufs[slot] = buf
        return buf[:rows]


def wide(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or the widest input dtype (float64 inputs stay float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def softmax_into(z: torch.Tensor, out: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    r"""``out = softmax(z)`` (rows) and return :math:`\mathrm{lse}(z)` ``[c]``.

    :math:`\mathrm{lse} = z_j - \log \mathrm{softmax}(z)_j` at one column ``j``: on CPU, the column of
    ``candidates`` (a few column ids) where the softmax is largest, if it is at least :data:`LSE_MIN_PROB`
    (a float32 softmax value has float32's relative precision at any size, so nothing is lost), which saves a
    pass over the row; otherwise, and on accelerators (where that pass costs less than the host synchronisation
    of the check), at the row maximum. Rows with no finite maximum (all :math:`-\infty`) get a zero row and
    :math:`\mathrm{lse} = \max z`.
    """
    if candidates is None or z.device.type != "cpu":
        m, j = z.max(-1, keepdim=True)
        torch._softmax(z, -1, False, out=out)
        return _lse_at(z, out, m, j)
    torch._softmax(z, -1, False, out=out)
    p_j, j = out.index_select(-1, candidates).max(-1, keepdim=True)
    lse = (z.index_select(-1, candidates).gather(-1, j) - p_j.log()).squeeze(-1)
    weak = ~(p_j.squeeze(-1) >= LSE_MIN_PROB)  # also the NaN rows of an all -inf row
    if bool(weak.any()):
        rows = weak.nonzero().squeeze(-1)
        z_rows, out_rows = z.index_select(0, rows), out.index_select(0, rows)
        m, j = z_rows.max(-1, keepdim=True)
        lse[rows] = _lse_at(z_rows, out_rows, m, j)
        out[rows] = out_rows
    return lse


def _lse_at(z: torch.Tensor, out: torch.Tensor, m: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``lse`` from the row maximum ``m`` at column ``j`` and ``out = softmax(z)``; all -inf rows: zeros, ``m``."""
    lse = (m - out.gather(-1, j).log()).squeeze(-1)
    bad = ~torch.isfinite(m.squeeze(-1))
    if z.device.type != "cpu":  # no host synchronisation on an accelerator: one masked pass instead
        out.masked_fill_(bad.unsqueeze(-1), 0.0)
    elif bool(bad.any()):
        out[bad] = 0.0
    return torch.where(bad, m.squeeze(-1), lse)


def spread_columns(n_cols: int, exclude: torch.Tensor, k: int = 256) -> torch.Tensor:
    """About ``k`` evenly spread column ids of ``[0, n_cols)`` not in ``exclude``: candidates for
    :func:`softmax_into`."""
    cols = torch.linspace(0, n_cols - 1, min(k, n_cols), device=exclude.device).long().unique()
    return cols[~torch.isin(cols, exclude)]


def logsumexp(z: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\sum_y e^{z_y}` over the last dimension of a small tensor (``torch.logsumexp`` is slow on CPU
    for many short rows). Over an empty last dimension (an empty S(x)) it is :math:`-\infty`."""
    if z.shape[-1] == 0:
        return z.new_full(z.shape[:-1], -float("inf"))
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (z - m).exp().sum(-1).log() + m.squeeze(-1)


# ------------------------------------------------------------------------------------------ the two sides
@dataclass
class BaseSide:
    r"""The base/target side of a chunk: ``r`` (a work buffer) holds :math:`\mathrm{softmax}(z_{b, V\setminus S})`
    with 0 on S(x), ``zb`` the base logits with :math:`-\infty` on S(x), ``zb_s`` ``[c, K (+ k_max)]`` the S(x)
    columns (:meth:`~etu_hf.ops.row_sets.RowSets.columns`); per row ``lse_s`` :math:`\ell_S`, ``lse_rest``
    :math:`\ell_R`, ``lam``, ``clamped``, ``lse_q``, ``lse_b``."""

    r: torch.Tensor
    zb: torch.Tensor
    zb_s: torch.Tensor
    lse_s: torch.Tensor
    lse_rest: torch.Tensor
    lam: torch.Tensor
    clamped: torch.Tensor
    lse_q: torch.Tensor
    lse_b: torch.Tensor

    @property
    def target_mass(self) -> torch.Tensor:
        r""":math:`q_\lambda(S) = e^{\ell_S - \lambda - \ell_q}`."""
        return torch.exp(self.lse_s - self.lam - self.lse_q)

    @property
    def base_mass(self) -> torch.Tensor:
        r""":math:`\pi_b(S) = e^{\ell_S - \mathrm{lse}(z_b)}`."""
        return torch.exp(self.lse_s - self.lse_b)

    def q_on_s(self) -> torch.Tensor:
        r"""``[c, K]``: :math:`q_y = e^{z_{b,y} - \lambda - \ell_q}` on S."""
        return torch.exp(self.zb_s - (self.lam + self.lse_q).unsqueeze(-1))

    def rest_scale(self) -> torch.Tensor:
        r""":math:`q_y = r_y\, e^{\ell_R - \ell_q}` off S: the factor per row."""
        return torch.exp(self.lse_rest - self.lse_q)


def base_side(
    zb: torch.Tensor, ids: torch.Tensor, tilt: Tilt, ws: Workspace, dtype: torch.dtype, rs: RowSets | None = None
) -> BaseSide:
    """The base side of a chunk; ``zb`` (owned: it is modified in place) already in ``dtype``; ``rs`` the chunk's
    per-row extras (``None``: S(x) = S)."""
    zb_s = zb.index_select(-1, ids) if rs is None else rs.columns(zb, ids)
    lse_s = logsumexp(zb_s)
    zb.index_fill_(-1, ids, -math.inf)
    if rs is not None:
        rs.fill_(zb, -math.inf)
    r = ws.get(0, zb, dtype)
    lse_rest = softmax_into(zb, r, spread_columns(zb.shape[-1], ids))
    lam, clamped = resolve_lambdas(tilt, zb, ids, logit_mass=lse_s - lse_rest)
    lse_q = torch.logaddexp(lse_rest, lse_s - lam)
    return BaseSide(r, zb, zb_s, lse_s, lse_rest, lam, clamped, lse_q, torch.logaddexp(lse_rest, lse_s))


def _own(z: torch.Tensor, dtype: torch.dtype, owned: bool) -> torch.Tensor:
    """``z`` in ``dtype``, copied unless the caller gave it to be modified."""
    return z.to(dtype, copy=not owned)


def s_columns(z: torch.Tensor, ids: torch.Tensor, rs: RowSets | None) -> torch.Tensor:
    r"""``[c, K (+ k_max)]``: the columns of S(x) of ``z`` (the extras :math:`-\infty` in the padding)."""
    return z.index_select(-1, ids) if rs is None else rs.columns(z, ids)


def put_s_columns(z: torch.Tensor, ids: torch.Tensor, rs: RowSets | None, values: torch.Tensor) -> torch.Tensor:
    """In place, ``z`` on S(x) = ``values`` ``[c, K (+ k_max)]`` (as laid out by :func:`s_columns`)."""
    k = ids.shape[0]
    z.index_copy_(-1, ids, values[:, :k])
    if rs is not None:
        rs.put_(z, values[:, k:])
    return z


# ------------------------------------------------------------------------------------------ per chunk
@dataclass
class TiltedRows:
    r"""Per-row results of :func:`tilted_kl_rows` (all ``[c]``, detached): ``kl`` :math:`KL(q_\lambda\|\pi_\theta)`,
    ``lam``, ``clamped``, ``student_mass`` :math:`\pi_\theta(S)`, ``target_mass`` :math:`q_\lambda(S)`,
    ``base_mass`` :math:`\pi_b(S)`, ``lse_s`` :math:`\mathrm{lse}(z_s)`, ``lse_q`` :math:`\ell_q`; ``grad``
    ``[c, |V|]`` :math:`w_i(\pi_\theta - q)` when asked for (a work buffer: valid until the next chunk); with
    ``targets``, :math:`\log\pi_\theta(y_i|x_i)` and :math:`\log\pi_b(y_i|x_i)`."""

    kl: torch.Tensor
    lam: torch.Tensor
    clamped: torch.Tensor
    student_mass: torch.Tensor
    target_mass: torch.Tensor
    base_mass: torch.Tensor
    lse_s: torch.Tensor
    lse_q: torch.Tensor
    grad: torch.Tensor | None = None
    student_target_logps: torch.Tensor | None = None
    base_target_logps: torch.Tensor | None = None


@torch.no_grad()
def tilted_kl_rows(
    zs: torch.Tensor,
    zb: torch.Tensor,
    forbidden_ids: torch.Tensor,
    tilt: Tilt,
    ws: Workspace,
    *,
    weights: torch.Tensor | None = None,
    want_grad: bool = False,
    base_owned: bool = False,
    targets: torch.Tensor | None = None,
    extra_ids: ExtraIds = None,
) -> TiltedRows:
    """One chunk of the ETU loss from logits ``zs``, ``zb`` ``[c, |V|]`` (formulas: the module docstring).

    ``zb`` is modified in place when ``base_owned`` (else copied); ``zs`` is only read. ``tilt`` as in
    :func:`~etu_hf.ops.tilt.resolve_lambdas` (a per-row tensor has shape ``[c]``). With ``want_grad`` the
    result holds ``weights * (softmax(zs) - q)``; with ``targets`` ``[c]`` the targets' log-probabilities.
    ``extra_ids``: the chunk's per-row extras of S(x), ``[c, k_max]`` or a :class:`~etu_hf.ops.row_sets.RowSets`.
    """
    dtype = wide(zs, zb)
    zs, zb = zs.to(dtype), _own(zb, dtype, base_owned)
    ids = forbidden_ids
    rs = row_sets(ids, extra_ids, zs)
    picked = None
    if targets is not None:
        y = targets.unsqueeze(-1)
        picked = (zs.gather(-1, y).squeeze(-1), zb.gather(-1, y).squeeze(-1))
    b = base_side(zb, ids, tilt, ws, dtype, rs)
    zs_s = s_columns(zs, ids, rs)
    q_s, rest_scale = b.q_on_s(), b.rest_scale()
    # sum_y q_y (z_b - z_s)_y: off S from r (z_b = -inf on S there, r = 0: NaN, dropped), then on S
    cross = b.zb.sub_(zs).mul_(b.r).nansum(-1) * rest_scale + (q_s * (b.zb_s - zs_s)).nansum(-1)
    p = ws.get(1, zs, dtype)
    lse_s = softmax_into(zs, p, torch.cat([ids, spread_columns(zs.shape[-1], ids)]))
    student_mass = torch.exp(logsumexp(zs_s) - lse_s)
    target_mass = b.target_mass
    grad = None
    if want_grad:  # w (p - q), written over r: -w q off S, -w q on S, then + w p
        w = weights.to(dtype) if weights is not None else torch.ones_like(lse_s)
        q = b.r.mul_((-w * rest_scale).unsqueeze(-1))
        if rs is None:
            q[:, ids] = -w.unsqueeze(-1) * q_s
        else:
            put_s_columns(q, ids, rs, -w.unsqueeze(-1) * q_s)
        grad = q.addcmul_(p, w.unsqueeze(-1))
    kl = cross - b.lam * target_mass - b.lse_q + lse_s
    out = TiltedRows(kl, b.lam, b.clamped, student_mass, target_mass, b.base_mass, lse_s, b.lse_q, grad)
    if picked is not None:
        out.student_target_logps, out.base_target_logps = picked[0] - lse_s, picked[1] - b.lse_b
    return out


@torch.no_grad()
def tilt_statistic_rows(
    zs: torch.Tensor,
    zb: torch.Tensor,
    forbidden_ids: torch.Tensor,
    tilt: Tilt,
    ws: Workspace,
    base_owned: bool,
    extra_ids: ExtraIds = None,
) -> torch.Tensor:
    r"""One chunk of the measurements of a model against its tilted target: float64 ``[c, 6]`` with the columns
    :data:`~etu_hf.ops.chunked.TILT_SUM_FIELDS`: :math:`\pi_\theta(S)`, :math:`KL(\pi_\theta \| q_\lambda)`,
    :math:`q_\lambda(S)`, :math:`\lambda`, 1, 1 where a lambda clamp binds (as
    :func:`~etu_hf.ops.chunked.tilt_statistic_terms`, in fewer passes). ``extra_ids``: per-row extras of S(x)."""
    dtype = wide(zs, zb)
    zs, zb = zs.to(dtype), _own(zb, dtype, base_owned)
    rs = row_sets(forbidden_ids, extra_ids, zs)
    b = base_side(zb, forbidden_ids, tilt, ws, dtype, rs)
    put_s_columns(b.zb, forbidden_ids, rs, b.zb_s)
    p = ws.get(0, zs, dtype)  # r is not needed any more: its buffer takes softmax(z_s)
    lse_s = softmax_into(zs, p, torch.cat([forbidden_ids, spread_columns(zs.shape[-1], forbidden_ids)]))
    student_mass = torch.exp(logsumexp(s_columns(zs, forbidden_ids, rs)) - lse_s)
    # sum_y p_y (z_s - z_b)_y, where p_y = 0 with z_s = -inf gives NaN, dropped
    cross = -b.zb.sub_(zs).mul_(p).nansum(-1)
    kl = cross + b.lam * student_mass + b.lse_q - lse_s
    columns = [student_mass, kl, b.target_mass, b.lam, torch.ones_like(kl), b.clamped]
    return torch.stack([c.to(torch.float64) for c in columns], -1)


@torch.no_grad()
def forbidden_mass_rows(
    z: torch.Tensor, forbidden_ids: torch.Tensor, ws: Workspace, extra_ids: ExtraIds = None
) -> torch.Tensor:
    r""":math:`\pi(S(x)) = e^{\mathrm{lse}(z_{S(x)}) - \mathrm{lse}(z)}` per row, in float32 (or wider)."""
    z = z.to(wide(z))
    rs = row_sets(forbidden_ids, extra_ids, z)
    lse = softmax_into(z, ws.get(0, z, z.dtype), torch.cat([forbidden_ids, spread_columns(z.shape[-1], forbidden_ids)]))
    return torch.exp(logsumexp(s_columns(z, forbidden_ids, rs)) - lse)


@torch.no_grad()
def nll_rows(
    zs: torch.Tensor, targets: torch.Tensor, ws: Workspace, *, weights: torch.Tensor | None = None, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""One chunk of the NLL: ``(-log softmax(zs)[y] [c], weights * (softmax(zs) - onehot(y)) or None)``."""
    dtype = wide(zs)
    zs = zs.to(dtype)
    picked = zs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = ws.get(1, zs, dtype)
    lse = softmax_into(zs, p, torch.cat([targets.unique(), spread_columns(zs.shape[-1], targets)]))
    if not want_grad:
        return lse - picked, None
    w = weights.to(dtype) if weights is not None else torch.ones_like(lse)
    p.mul_(w.unsqueeze(-1)).scatter_add_(-1, targets.unsqueeze(-1), -w.unsqueeze(-1))
    return lse - picked, p
