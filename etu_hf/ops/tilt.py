r"""The exponential tilt: closed-form lambda and the tilted target distribution.

Pure tensor maths, no transformers import. Notation (see docs/method.md): ``S`` is the
forbidden token set V_S, ``pi_b`` the base model, ``p(x) = sum_{y in S} pi_b(y|x)`` the base mass on
``S`` at context ``x``. The problem

.. math::  \min_q KL(q \| \pi_b(\cdot|x)) \quad \text{s.t.} \quad q(S) \le \varepsilon

is solved by the tilt :math:`q_\lambda(y|x) = \pi_b(y|x) e^{-\lambda 1[y\in S]} / Z` with
:math:`Z = 1 - p + p e^{-\lambda}`, whose mass on ``S`` is :math:`q_\lambda(S) = p e^{-\lambda}/Z`;
:math:`q_\lambda(S) = \varepsilon` at :math:`\lambda = \mathrm{logit}(p) - \mathrm{logit}(\varepsilon)`.

Per-context sets: every function taking ``forbidden_ids`` also takes ``extra_ids`` (``[..., k_max]``, ``-1`` =
none; :mod:`etu_hf.ops.row_sets`), the row's own extras, so that the set at context ``x`` is
:math:`S(x) = S \cup E(x)`; everything above holds with S replaced by S(x), row by row
(:math:`p(x) = \pi_b(S(x)|x)`, :math:`\lambda(x) = \max(0, \mathrm{logit}\,p(x) - \mathrm{logit}\,\varepsilon)`).
``extra_ids=None`` (the default) is the one set S, computed exactly as before the argument existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from etu_hf.ops.row_sets import RowSets, row_sets

#: Extra forbidden ids per position (see :mod:`etu_hf.ops.row_sets`): a padded LongTensor ``[..., k_max]``
#: (``-1`` = none) or a built :class:`~etu_hf.ops.row_sets.RowSets`; ``None`` means one set S for every position.
ExtraIds = torch.Tensor | RowSets | None

#: Default clamp of |lambda|. Large enough not to bind in normal use: it binds only where the base
#: model's odds on S exceed the target's by more than e^100 (every binding is counted and logged).
DEFAULT_LAMBDA_MAX = 100.0


def _logit(p: float) -> float:
    """logit(p) = log p - log(1 - p), with -inf at 0 and +inf at 1 (no clip)."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def closed_form_lambda(
    p_s: float | torch.Tensor,
    epsilon: float,
    lambda_max: float | None = None,
    allow_negative: bool = False,
) -> float | torch.Tensor:
    r"""Tilt strength that brings base mass ``p_s`` on S to exactly ``epsilon``.

    .. math::  \lambda = \mathrm{logit}(p_S) - \mathrm{logit}(\varepsilon)

    Unless ``allow_negative``, ``lambda`` is floored at 0 (a context already under ``epsilon`` is left
    alone, giving ``q(S) = min(p, epsilon)``); negative values raise the mass on S (amplification).
    With ``lambda_max`` the result is clamped to ``[-lambda_max, lambda_max]``. No probability clip:
    ``p_s = 1`` gives ``+inf`` before the clamp. Works elementwise on tensors (computed in float32 or
    wider) and returns a Python float for a float input. From logits, prefer :func:`base_logit_mass`,
    which keeps the precision that ``p`` close to 1 loses.
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if lambda_max is not None and not lambda_max > 0:
        raise ValueError(f"lambda_max must be > 0, got {lambda_max}")
    lower, upper = lambda_bounds(lambda_max, allow_negative)
    if isinstance(p_s, torch.Tensor):
        p = p_s.to(torch.promote_types(p_s.dtype, torch.float32))
        lam = torch.logit(p) - _logit(epsilon)
        return clamp(lam, lower if lower > -math.inf else None, upper if upper < math.inf else None)
    return min(max(_logit(float(p_s)) - _logit(epsilon), lower), upper)


def lambda_bounds(lambda_max: float | None, allow_negative: bool, lambda_floor: float = 0.0) -> tuple[float, float]:
    """The range of lambda: ``[lambda_floor, lambda_max]`` (``lambda_floor`` defaults to 0), or
    ``[-lambda_max, lambda_max]`` with ``allow_negative`` (infinite where ``lambda_max`` is ``None``)."""
    upper = math.inf if lambda_max is None else lambda_max
    return (-upper if allow_negative else lambda_floor), upper


def check_lambda_floor(lambda_floor: float, allow_negative: bool) -> None:
    """``ValueError`` unless ``lambda_floor`` is a finite number >= 0, and 0 when ``allow_negative`` (a floor
    above 0 and a negative lambda contradict each other)."""
    if not (math.isfinite(lambda_floor) and lambda_floor >= 0):
        raise ValueError(f"lambda_floor must be a finite number >= 0, got {lambda_floor}")
    if allow_negative and lambda_floor > 0:
        raise ValueError(f"lambda_floor={lambda_floor} > 0 contradicts allow_negative (a negative lambda)")


def clamp(t: torch.Tensor, lower: float | None, upper: float | None) -> torch.Tensor:
    """``t.clamp(lower, upper)`` that accepts both bounds being ``None`` (then ``t`` is returned)."""
    if lower is None and upper is None:
        return t
    return t.clamp(min=lower, max=upper)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input dtype when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def _as_lambda(lam: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    """Return ``lam`` broadcastable against ``like[..., :1]`` (a float stays a float)."""
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=like.device, dtype=like.dtype)
        if lam.dim() > 0:
            lam = lam.unsqueeze(-1)
    return lam


def tilt_logits(
    logits: torch.Tensor, forbidden_ids: torch.Tensor, lam: float | torch.Tensor, extra_ids: ExtraIds = None
) -> torch.Tensor:
    r"""Return float32 logits ``z - lam * 1_{S(x)}`` (a copy; the input is not modified).

    ``lam`` is a scalar or a tensor of shape ``logits.shape[:-1]`` (one value per position). The
    subtraction is applied to the S columns by index (``z[..., S] -= lam``), never through a boolean
    mask over the vocabulary, and always in float32 (float64 inputs stay float64) whatever the dtype
    of ``logits``: a bf16 tilt would quantise ``lam``. With ``extra_ids`` (``[..., k_max]``, see
    :mod:`etu_hf.ops.row_sets`) each row's extras are tilted too, once each.
    """
    z = logits.to(_wide(logits.dtype), copy=True)
    lam_col = _as_lambda(lam, z)
    z[..., forbidden_ids] -= lam_col
    rs = row_sets(forbidden_ids, extra_ids, z)
    if rs is not None:
        rs.put_(z, z.gather(-1, rs.index) - lam_col)
    return z


def tilted_log_probs(
    logits: torch.Tensor, forbidden_ids: torch.Tensor, lam: float | torch.Tensor, extra_ids: ExtraIds = None
) -> torch.Tensor:
    r""":math:`\log q_\lambda = \mathrm{log\_softmax}(z - \lambda 1_{S(x)})` in float32.

    ``logits`` are base-model logits ``[..., V]``; ``lam`` is a scalar or one value per position
    (shape ``logits.shape[:-1]``); ``extra_ids`` the per-row extras of S(x) (``None``: S(x) = S).
    """
    return torch.log_softmax(tilt_logits(logits, forbidden_ids, lam, extra_ids), dim=-1)


def _lse_forbidden(z: torch.Tensor, forbidden_ids: torch.Tensor, rs: RowSets | None) -> torch.Tensor:
    r""":math:`\mathrm{logsumexp}(z_{S(x)})` per row."""
    if rs is None:
        return torch.logsumexp(z[..., forbidden_ids], dim=-1)
    return torch.logsumexp(rs.columns(z, forbidden_ids), dim=-1)


def forbidden_mass(logits: torch.Tensor, forbidden_ids: torch.Tensor, extra_ids: ExtraIds = None) -> torch.Tensor:
    r"""Mass on S(x) of ``softmax(logits)``: :math:`\sum_{y\in S(x)} e^{z_y} / \sum_y e^{z_y}`, in float32 (or
    wider). ``extra_ids``: the per-row extras of S(x) (``None``: S(x) = S)."""
    z = logits.to(_wide(logits.dtype))
    rs = row_sets(forbidden_ids, extra_ids, z)
    return torch.exp(_lse_forbidden(z, forbidden_ids, rs) - torch.logsumexp(z, dim=-1))


def base_logit_mass(logits: torch.Tensor, forbidden_ids: torch.Tensor, extra_ids: ExtraIds = None) -> torch.Tensor:
    r"""Exact :math:`\mathrm{logit}(p(x)) = \mathrm{logsumexp}(z_{S(x)}) - \mathrm{logsumexp}(z_{V \setminus S(x)})`
    in float32.

    Exact where :math:`p(x)` rounds to 1 in floating point (common for word continuations), so the
    tilt that brings such a context to ``epsilon`` is not capped by a probability clip. ``extra_ids``: the
    per-row extras of S(x) (``None``: S(x) = S).
    """
    z = logits.to(_wide(logits.dtype))
    rs = row_sets(forbidden_ids, extra_ids, z)
    lse_s = _lse_forbidden(z, forbidden_ids, rs)
    rest = z.index_fill(-1, forbidden_ids, -math.inf)
    if rs is not None:
        rs.fill_(rest, -math.inf)
    lse_rest = torch.logsumexp(rest, dim=-1)
    return lse_s - lse_rest


def per_position_lambda(
    base_logits: torch.Tensor,
    forbidden_ids: torch.Tensor,
    epsilon: float,
    lambda_max: float | None = None,
    allow_negative: bool = False,
    offset: float | torch.Tensor = 0.0,
    return_clamped: bool = False,
    logit_mass: torch.Tensor | None = None,
    extra_ids: ExtraIds = None,
    lambda_floor: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Exact per-context tilt: :math:`\lambda(x) = \max(m, \mathrm{logit}(p(x)) - \mathrm{logit}(\varepsilon) + o)`.

    With offset ``o = 0`` and ``m = lambda_floor = 0`` (this function's default) it gives
    :math:`q(S|x) = \min(p(x), \varepsilon)`: the I-projection for every context. The offset (moved by the
    adaptive controller) is added *before* the floor, which is the same as the per-context target
    :math:`\varepsilon' = \sigma(\mathrm{logit}(\varepsilon) - o)`: :math:`q(S|x) = \min(p(x), \varepsilon')`.
    With ``allow_negative`` the floor at 0 is dropped (``q(S|x) = epsilon'`` everywhere). The result is
    clamped to ``[-lambda_max, lambda_max]``;
    ``logit(p(x))`` comes from :func:`base_logit_mass` (exact, no probability clip).

    With ``return_clamped`` also returns a bool tensor: where the ``lambda_max`` clamp binds (the
    target then misses ``epsilon'`` at that context). ``logit_mass``: :math:`\mathrm{logit}(p(x))` when the
    caller has it already (the fused loss computes it in its own pass over the logits); ``base_logits``
    then only give the shape. ``extra_ids``: the per-row extras of a per-context set S(x) (see
    :mod:`etu_hf.ops.row_sets`; ``None``: S(x) = S), then :math:`p(x) = \pi_b(S(x)|x)`.

    ``lambda_floor`` :math:`= m \ge 0` (not with ``allow_negative``) floors the tilt at every context:
    :math:`q(S|x) = \min(\varepsilon', \sigma(\mathrm{logit}\,p(x) - m))`, the I-projection of
    :math:`\pi_b(\cdot|x)` onto :math:`\{q: \mathrm{odds}\,q(S|x) \le \min(\mathrm{odds}\,\varepsilon',
    e^{-m}\,\mathrm{odds}\,p(x))\}`: the odds of S(x) fall by at least :math:`e^m` everywhere, and the mass
    stays capped at :math:`\varepsilon'`. A binding floor is not counted as clamped (it is the target).
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    check_lambda_floor(lambda_floor, allow_negative)
    if logit_mass is None:
        logit_mass = base_logit_mass(base_logits, forbidden_ids, extra_ids)
    raw = logit_mass - _logit(epsilon)
    if isinstance(offset, torch.Tensor) or offset != 0.0:
        raw = raw + offset
    lower, upper = lambda_bounds(lambda_max, allow_negative, lambda_floor)
    lam = clamp(raw, lower if lower > -math.inf else None, upper if upper < math.inf else None)
    if not return_clamped:
        return lam
    clamped = raw > upper
    if allow_negative:
        clamped = clamped | (raw < lower)
    return lam, clamped


def tilted_mass(p: float | torch.Tensor, lam: float | torch.Tensor) -> float | torch.Tensor:
    r"""Closed-form mass on S after tilting: :math:`q_\lambda(S) = p e^{-\lambda} / (1 - p + p e^{-\lambda})`.

    Computed as :math:`\sigma(\mathrm{logit}(p) - \lambda)`, which is the same quantity, stably.
    """
    if isinstance(p, torch.Tensor) or isinstance(lam, torch.Tensor):
        p_t = torch.as_tensor(p, dtype=torch.float64)
        return torch.sigmoid(torch.log(p_t) - torch.log1p(-p_t) - torch.as_tensor(lam, dtype=torch.float64))
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return 1.0 / (1.0 + math.exp(lam - _logit(p)))


@dataclass(frozen=True)
class TiltSpec:
    r"""How lambda is chosen at each position: the target of training and of measurements.

    - ``mode="per_position"``: :math:`\lambda(x)` from :func:`per_position_lambda` with ``offset``,
      i.e. the target :math:`q(S|x) = \min(p(x), \varepsilon')` with
      :math:`\varepsilon' = \sigma(\mathrm{logit}(\varepsilon) - o)` (:attr:`effective_epsilon`).
    - ``mode="global"``: one value, ``clamp(global_lambda + offset)`` to
      ``[-lambda_max or 0, lambda_max]`` (the floor is 0 unless ``allow_negative``), where
      ``global_lambda`` is the closed form at the mean base mass p_S.

    ``lambda_floor`` (default 0) raises the floor of either mode: every context is tilted by at least that
    much (:func:`per_position_lambda`).
    """

    epsilon: float
    mode: str = "per_position"
    lambda_max: float | None = DEFAULT_LAMBDA_MAX
    allow_negative: bool = False
    global_lambda: float | None = None
    offset: float = 0.0
    lambda_floor: float = 0.0

    def __post_init__(self) -> None:
        check_lambda_floor(self.lambda_floor, self.allow_negative)

    @property
    def effective_epsilon(self) -> float:
        r"""Per-position mode: the per-context target :math:`\varepsilon' = \sigma(\mathrm{logit}(\varepsilon) - o)`."""
        return 1.0 / (1.0 + math.exp(self.offset - _logit(self.epsilon)))

    def global_value(self) -> float:
        """The clamped global lambda (global mode)."""
        if self.global_lambda is None:
            raise ValueError("global mode needs global_lambda (the closed form from the base mass p_S)")
        lower, upper = lambda_bounds(self.lambda_max, self.allow_negative, self.lambda_floor)
        return min(max(self.global_lambda + self.offset, lower), upper)

    def global_clamped(self) -> bool:
        """Global mode: True when ``global_lambda + offset`` lies outside the clamps (so they bind)."""
        lower, upper = lambda_bounds(self.lambda_max, self.allow_negative)
        raw = (self.global_lambda or 0.0) + self.offset
        return raw > upper or (self.allow_negative and raw < lower)

    def to_dict(self) -> dict[str, Any]:
        """The fields as written into ``suppression_report.json`` (``tilt``), plus ``effective_epsilon``
        (per-position mode; ``None`` in global mode)."""
        return {
            "mode": self.mode,
            "epsilon": self.epsilon,
            "lambda_max": self.lambda_max,
            "allow_negative": self.allow_negative,
            "global_lambda": self.global_lambda,
            "offset": self.offset,
            "lambda_floor": self.lambda_floor,
            "effective_epsilon": self.effective_epsilon if self.mode == "per_position" else None,
        }

    def lambdas(
        self,
        base_logits: torch.Tensor,
        forbidden_ids: torch.Tensor,
        return_clamped: bool = False,
        logit_mass: torch.Tensor | None = None,
        extra_ids: ExtraIds = None,
    ) -> torch.Tensor | float | tuple[torch.Tensor | float, torch.Tensor]:
        r"""Lambda at every position of ``base_logits`` (a float in global mode).

        With ``return_clamped`` also a bool tensor of shape ``base_logits.shape[:-1]``: where a clamp binds.
        ``logit_mass``: a precomputed :math:`\mathrm{logit}(p(x))` (see :func:`per_position_lambda`);
        ``extra_ids``: the per-row extras of S(x) (per-position mode; the global lambda does not read them).
        """
        if self.mode == "global":
            lam = self.global_value()
            if not return_clamped:
                return lam
            return lam, torch.full(base_logits.shape[:-1], self.global_clamped(), device=base_logits.device)
        return per_position_lambda(
            base_logits,
            forbidden_ids,
            self.epsilon,
            self.lambda_max,
            self.allow_negative,
            self.offset,
            return_clamped=return_clamped,
            logit_mass=logit_mass,
            extra_ids=extra_ids,
            lambda_floor=self.lambda_floor,
        )


#: Every way to say which lambda: a :class:`TiltSpec` (lambda chosen from the base logits), a float (one
#: lambda for every position) or a tensor (a 0-dim one for every position, or one value per position).
Tilt = TiltSpec | float | torch.Tensor


def resolve_lambdas(
    tilt: Tilt,
    base_logits: torch.Tensor,
    forbidden_ids: torch.Tensor,
    *,
    logit_mass: torch.Tensor | None = None,
    extra_ids: ExtraIds = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The per-position lambdas of ``tilt`` at ``base_logits`` ``[..., V]`` and where a clamp binds.

    Returns ``(lam, clamped)``, both of shape ``base_logits.shape[:-1]`` on the logits' device: ``lam``
    in float32 (float64 for float64 logits), ``clamped`` a bool tensor. A :class:`TiltSpec` chooses
    lambda (:meth:`TiltSpec.lambdas`, clamps counted); a float or a 0-dim tensor is the same lambda at
    every position; a tensor of shape ``base_logits.shape[:-1]`` gives each position its own. A given
    lambda is used as it is: nothing is clamped, so ``clamped`` is all False. ``logit_mass``: a precomputed
    :math:`\mathrm{logit}(p(x))` of shape ``base_logits.shape[:-1]`` (the contents of ``base_logits`` are then
    not read); ``extra_ids``: the per-row extras of a per-context set S(x) (``None``: S(x) = S).
    """
    shape = base_logits.shape[:-1]
    dtype = _wide(base_logits.dtype)
    if isinstance(tilt, TiltSpec):
        lam, clamped = tilt.lambdas(
            base_logits, forbidden_ids, return_clamped=True, logit_mass=logit_mass, extra_ids=extra_ids
        )
    elif isinstance(tilt, (int, float, torch.Tensor)) and not isinstance(tilt, bool):
        lam, clamped = tilt, torch.zeros(shape, dtype=torch.bool, device=base_logits.device)
    else:
        raise TypeError(f"tilt: expected a TiltSpec, a float or a tensor of lambdas, got {type(tilt).__name__}")
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=base_logits.device, dtype=dtype)
        if lam.dim() > 0 and lam.shape != shape:
            raise ValueError(
                f"tilt: a tensor of lambdas must be 0-dim or of shape {tuple(shape)}, got {tuple(lam.shape)}"
            )
        lam = lam.expand(shape)
    else:
        # An on-device fill: a tensor built from a Python number would be a host-to-device copy each step.
        lam = torch.full(shape, float(lam), dtype=dtype, device=base_logits.device)
    return lam, clamped.to(base_logits.device)
