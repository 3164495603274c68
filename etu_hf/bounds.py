r"""Statistical bounds used by the controller and the audit (pure maths, no torch needed).

- Wilson score upper bound of a proportion (ETU_SPEC.md, section 6):

  .. math::
      \mathrm{upper}(p, n) = \frac{p + \frac{z^2}{2n} + z\sqrt{\frac{p(1-p)}{n} + \frac{z^2}{4n^2}}}{1 + \frac{z^2}{n}},
      \qquad z = 1.959964 \ (95\%).

  The mass on V_S is a mean of per-position probabilities, not of 0/1 outcomes; treating it as a
  proportion over ``n`` positions follows the original tool. Positions of one sequence are
  correlated, so ``n`` is capped (``wilson_max_n``) and the audit also reports a bootstrap interval
  over sequences.

- Pinsker margin (section 5): for every context, :math:`|\pi_\theta(S) - q_\lambda(S)| \le TV \le
  \sqrt{KL(\pi_\theta \| q_\lambda)/2}`; averaging and Jensen give
  :math:`\overline{\pi_\theta(S)} \le \overline{q_\lambda(S)} + \sqrt{\delta/2}` with
  :math:`\delta` the mean per-token KL, so the mass may exceed ``epsilon`` by at most
  :math:`\sqrt{\delta/2}` when the target meets ``epsilon``.
"""

from __future__ import annotations

import math
from typing import Any

#: Two-sided 95% normal quantile.
Z_95 = 1.959964


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval ``(lower, upper)`` for a proportion ``p`` over ``n`` trials (``(0, 1)`` if ``n == 0``)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(float(p), 0.0), 1.0)
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n)), min(1.0, (centre + spread) / (1 + z2 / n))


def wilson_upper(p: float, n: int, z: float = Z_95) -> float:
    """Wilson score upper bound (1.0 when ``n == 0``); see the module docstring for the formula."""
    return wilson_interval(p, n, z)[1]


def pinsker_slack(delta: float, cap: float | None = None) -> float:
    r""":math:`\sqrt{\max(\delta, 0)/2}`, optionally capped at ``cap``."""
    slack = math.sqrt(max(float(delta), 0.0) / 2.0)
    return slack if cap is None else min(slack, cap)


def pinsker_margin(epsilon: float, delta: float, cap: float | None = None) -> float:
    r"""The Pinsker bound on the mean mass: :math:`\varepsilon + \sqrt{\delta/2}` (slack capped at ``cap``)."""
    return epsilon + pinsker_slack(delta, cap)


def bootstrap_ratio_interval(
    sums: Any, counts: Any, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    r"""Percentile bootstrap interval of :math:`\sum_j s_j / \sum_j c_j` resampling *units* ``j``.

    Used over sequences (``s_j`` the summed mass and ``c_j`` the scored positions of sequence ``j``),
    which respects the correlation of positions within a sequence that the Wilson bound ignores.
    """
    import numpy as np

    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    k = len(sums)
    if k == 0 or samples < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, samples, 256):  # bounded memory: 256 resamples at a time
        idx = rng.integers(0, k, size=(min(256, samples - start), k))
        means.append(sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1.0))
    lo, hi = np.quantile(np.concatenate(means), [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
