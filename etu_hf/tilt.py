r"""The exponential tilt: closed-form lambda and the tilted target distribution.

Pure tensor maths, no transformers import. Notation (see ETU_SPEC.md, section 2): ``S`` is the
forbidden token set V_S, ``pi_b`` the base model, ``p(x) = sum_{y in S} pi_b(y|x)`` the base mass on
``S`` at context ``x``. The problem

.. math::  \min_q KL(q \| \pi_b(\cdot|x)) \quad \text{s.t.} \quad q(S) \le \varepsilon

is solved by the tilt :math:`q_\lambda(y|x) = \pi_b(y|x) e^{-\lambda 1[y\in S]} / Z` with
:math:`Z = 1 - p + p e^{-\lambda}`, whose mass on ``S`` is :math:`q_\lambda(S) = p e^{-\lambda}/Z`;
:math:`q_\lambda(S) = \varepsilon` at :math:`\lambda = \mathrm{logit}(p) - \mathrm{logit}(\varepsilon)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Base masses are clipped to [P_CLIP, 1 - P_CLIP] before taking logits.
P_CLIP = 1e-6


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def closed_form_lambda(
    p_s: float | torch.Tensor,
    epsilon: float,
    lambda_max: float | None = None,
    allow_negative: bool = False,
) -> float | torch.Tensor:
    r"""Tilt strength that brings base mass ``p_s`` on S to exactly ``epsilon``.

    .. math::  \lambda = \mathrm{logit}(\mathrm{clip}(p_S)) - \mathrm{logit}(\varepsilon)

    with ``p_s`` clipped to ``[1e-6, 1 - 1e-6]``. Unless ``allow_negative``, ``lambda`` is floored at 0
    (a context already under ``epsilon`` is left alone, giving ``q(S) = min(p, epsilon)``); negative
    values raise the mass on S (amplification). With ``lambda_max`` the result is clamped to
    ``[-lambda_max, lambda_max]``. Works elementwise on tensors (computed in float32 or wider) and
    returns a Python float for a float input.
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if lambda_max is not None and lambda_max <= 0:
        raise ValueError(f"lambda_max must be > 0, got {lambda_max}")
    lower, upper = lambda_bounds(lambda_max, allow_negative)
    if isinstance(p_s, torch.Tensor):
        p = p_s.to(torch.promote_types(p_s.dtype, torch.float32)).clamp(P_CLIP, 1.0 - P_CLIP)
        lam = torch.log(p) - torch.log1p(-p) - _logit(epsilon)
        return clamp(lam, lower if lower > -math.inf else None, upper if upper < math.inf else None)
    p = min(max(float(p_s), P_CLIP), 1.0 - P_CLIP)
    return min(max(_logit(p) - _logit(epsilon), lower), upper)


def lambda_bounds(lambda_max: float | None, allow_negative: bool) -> tuple[float, float]:
    """The range of lambda: ``[-lambda_max, lambda_max]``, floored at 0 unless ``allow_negative``
    (infinite where ``lambda_max`` is ``None``)."""
    upper = math.inf if lambda_max is None else lambda_max
    return (-upper if allow_negative else 0.0), upper


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


def tilt_logits(logits: torch.Tensor, forbidden_ids: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    r"""Return float32 logits ``z - lam * 1_S`` (a copy; the input is not modified).

    ``lam`` is a scalar or a tensor of shape ``logits.shape[:-1]`` (one value per position). The
    subtraction is applied to the S columns by index (``z[..., S] -= lam``), never through a boolean
    mask over the vocabulary, and always in float32 (float64 inputs stay float64) whatever the dtype
    of ``logits``: a bf16 tilt would quantise ``lam``.
    """
    z = logits.to(_wide(logits.dtype), copy=True)
    z[..., forbidden_ids] -= _as_lambda(lam, z)
    return z


def tilted_log_probs(logits: torch.Tensor, forbidden_ids: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    r""":math:`\log q_\lambda = \mathrm{log\_softmax}(z - \lambda 1_S)` in float32.

    ``logits`` are base-model logits ``[..., V]``; ``lam`` is a scalar or one value per position
    (shape ``logits.shape[:-1]``).
    """
    return torch.log_softmax(tilt_logits(logits, forbidden_ids, lam), dim=-1)


def forbidden_mass(logits: torch.Tensor, forbidden_ids: torch.Tensor) -> torch.Tensor:
    r"""Mass on S of ``softmax(logits)``: :math:`\sum_{y\in S} e^{z_y} / \sum_y e^{z_y}`, in float32 (or wider)."""
    z = logits.to(_wide(logits.dtype))
    return torch.exp(torch.logsumexp(z[..., forbidden_ids], dim=-1) - torch.logsumexp(z, dim=-1))


def per_position_lambda(
    base_logits: torch.Tensor,
    forbidden_ids: torch.Tensor,
    epsilon: float,
    lambda_max: float | None = None,
    allow_negative: bool = False,
    offset: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    r"""Exact per-context tilt: :math:`\lambda(x) = \max(0, \mathrm{logit}(p(x)) - \mathrm{logit}(\varepsilon))`.

    It gives :math:`q(S|x) = \min(p(x), \varepsilon)`: the I-projection for every context. With
    ``allow_negative`` the floor at 0 is dropped (``q(S|x) = epsilon`` everywhere). ``offset`` (used
    by the adaptive controller) is added after the floor; the sum is clamped to
    ``[-lambda_max, lambda_max]`` (and floored at 0 unless ``allow_negative``).
    """
    lam = closed_form_lambda(forbidden_mass(base_logits, forbidden_ids), epsilon, None, allow_negative)
    if isinstance(offset, torch.Tensor) or offset != 0.0:
        lam = lam + offset
    lower, upper = lambda_bounds(lambda_max, allow_negative)
    return clamp(lam, lower if lower > -math.inf else None, upper if upper < math.inf else None)


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

    - ``mode="per_position"``: :math:`\lambda(x)` from :func:`per_position_lambda` with ``offset``.
    - ``mode="global"``: one value, ``clamp(global_lambda + offset)`` to
      ``[-lambda_max or 0, lambda_max]`` (the floor is 0 unless ``allow_negative``).
    """

    epsilon: float
    mode: str = "per_position"
    lambda_max: float | None = 12.0
    allow_negative: bool = False
    global_lambda: float | None = None
    offset: float = 0.0

    def global_value(self) -> float:
        """The clamped global lambda (global mode)."""
        if self.global_lambda is None:
            raise ValueError("global mode needs global_lambda (the closed form from the base mass p_S)")
        lower, upper = lambda_bounds(self.lambda_max, self.allow_negative)
        return min(max(self.global_lambda + self.offset, lower), upper)

    def loss_kwargs(self) -> dict:
        """Keyword arguments for :func:`etu_hf.losses.tilted_kl_loss`."""
        if self.mode == "global":
            return {"lam": self.global_value()}
        return {
            "epsilon": self.epsilon,
            "lambda_max": self.lambda_max,
            "allow_negative": self.allow_negative,
            "lambda_offset": self.offset,
        }

    def lambdas(self, base_logits: torch.Tensor, forbidden_ids: torch.Tensor) -> torch.Tensor | float:
        """Lambda at every position of ``base_logits`` (a float in global mode)."""
        if self.mode == "global":
            return self.global_value()
        return per_position_lambda(
            base_logits, forbidden_ids, self.epsilon, self.lambda_max, self.allow_negative, self.offset
        )
