r"""Statistical bounds used by the controller and the audit (pure maths: numpy, no torch).

The quantity bounded is the mean mass on V_S over held-out forget text,
:math:`R = \sum_j s_j / \sum_j c_j`, where sequence ``j`` has ``c_j`` scored positions and summed
mass ``s_j = \sum_{i \in j} \pi(S|x_i)``. Positions of one sequence are strongly correlated, so the
*sequence* is the unit of every honest bound here.

- :func:`sequence_upper_bound` (what the controller and the audit's verdict use): the larger of

  1. a cluster-robust Wilson bound: the Wilson score bound at :math:`R` with the effective number
     of independent positions :math:`n_{eff} = \min(R(1-R)/\hat V, \sum_j c_j)`, where
     :math:`\hat V = \frac{k}{k-1} \sum_j (s_j - R c_j)^2 / (\sum_j c_j)^2` is the linearised
     (ratio-estimator) variance over the ``k`` sequences, with the Student quantile
     :math:`t_{k-1}` in place of ``z``;
  2. a studentised bootstrap (bootstrap-t) bound over sequences:
     :math:`R - q_{\alpha}(T^*) \sqrt{\hat V}` with :math:`T^* = (R^* - R)/\sqrt{\hat V^*}` over
     resamples of whole sequences (it follows the skew of the per-sequence masses, which a normal
     bound misses).

  Both are computed at the one-sided nominal level ``1 - alpha`` = 98.75%; the *stated* level is
  95%. The margin is deliberate: normal-theory and bootstrap bounds undercover when few sequences
  have skewed masses. Coverage measured by simulation (tests/test_bounds.py; 500-1500 data sets per
  regime; per-sequence mean masses ~ Beta(a, b), sequence lengths 16/64/128, positions correlated
  within a sequence): 0.963-0.998 from 16 to 128 sequences, for Beta(8, 152) (mild) down to
  Beta(0.1, 1.9) (half the sequences near 0, a few near 0.5) at 128 sequences; the hardest case
  measured, 32 sequences with Beta(0.1, 1.9), gave 0.956-0.967 over 6,000 data sets. Computed at 97.5% instead it would
  fall to 0.94-0.95 in the hardest of these regimes. Fewer than :data:`MIN_SEQUENCES` sequences
  give the uninformative bound 1.0.

- :func:`sequence_lower_bound`: the same bound on the other side, by symmetry: a position's mass on the
  complement of V_S is :math:`1 - \pi(S|x)`, so sequence ``j`` sums :math:`c_j - s_j` there and
  :math:`\mathrm{lower}(R) = 1 - \mathrm{upper}(1 - R)` with :func:`sequence_upper_bound` of
  ``(c - s, c)`` (the Wilson bound is symmetric in :math:`p \leftrightarrow 1-p`; the bootstrap-t part
  becomes :math:`R - q_{1-\alpha}(T^*)\sqrt{\hat V}`, the lower studentised bound). The audit uses it to
  tell when the base model is already at or below epsilon (nothing to suppress).

- :func:`paired_ratio_upper`: an upper bound of the suppression ratio :math:`\rho = R_u / R_b` of two
  masses measured on the same sequences (unlearned over base), by a paired percentile bootstrap over
  sequences (module docstring of the function).

- :func:`wilson_upper`: the token-level Wilson score bound (ETU's original figure), which treats
  positions as independent trials. Reported, labelled as such, but never used for a verdict:
  it undercovers badly (62-74% for a nominal 97.5%) when positions are correlated.

  .. math::
      \mathrm{upper}(p, n) = \frac{p + \frac{z^2}{2n} + z\sqrt{\frac{p(1-p)}{n} + \frac{z^2}{4n^2}}}{1 + \frac{z^2}{n}},
      \qquad z = 1.959964.

- :func:`pinsker_slack`: for every context :math:`|\pi_\theta(S) - q_\lambda(S)| \le TV \le
  \sqrt{KL(\pi_\theta \| q_\lambda)/2}`; averaging and Jensen give
  :math:`\overline{\pi_\theta(S)} \le \overline{q_\lambda(S)} + \sqrt{\delta/2}` with
  :math:`\delta` the mean per-token KL. It says how well the model fits its target (reported, never
  a reason to accept mass above epsilon).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Two-sided 95% normal quantile (one-sided 97.5%).
Z_95 = 1.959964

#: One-sided alpha at which the sequence-level bound is computed (nominal level 98.75%), chosen so that
#: the stated level, 95%, holds in simulation even with few, very skewed sequences (module docstring).
DEFAULT_ALPHA = 0.0125

#: The coverage the sequence-level bound is stated (and tested) to have.
STATED_LEVEL = 0.95

#: Below this many sequences the sequence-level bound is 1.0 (nothing can be certified).
MIN_SEQUENCES = 8

#: Bootstrap resamples of the bootstrap-t bound.
BOOTSTRAP_SAMPLES = 2000


def wilson_interval(p: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval ``(lower, upper)`` for a proportion ``p`` over ``n`` trials (``(0, 1)`` if ``n <= 0``)."""
    if not n > 0:
        return 0.0, 1.0
    if math.isinf(n):
        p = min(max(float(p), 0.0), 1.0)
        return p, p
    p = min(max(float(p), 0.0), 1.0)
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n)), min(1.0, (centre + spread) / (1 + z2 / n))


def wilson_upper(p: float, n: float, z: float = Z_95) -> float:
    """Wilson score upper bound (1.0 when ``n <= 0``); see the module docstring for the formula."""
    return wilson_interval(p, n, z)[1]


def pinsker_slack(delta: float) -> float:
    r""":math:`\sqrt{\max(\delta, 0)/2}`: the Pinsker bound on the mean gap between model and target mass."""
    return math.sqrt(max(float(delta), 0.0) / 2.0)


def _ratio_and_variance(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Ratio :math:`R = \sum s / \sum c` and its linearised variance over the last axis (the sequences)."""
    k = sums.shape[-1]
    total = counts.sum(-1)
    ratio = sums.sum(-1) / total
    resid = sums - ratio[..., None] * counts
    var = k / (k - 1) * (resid * resid).sum(-1) / (total * total)
    return ratio, var


def _student_quantile(level: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(level, df))


@dataclass(frozen=True)
class SequenceBound:
    """A sequence-level upper bound and its parts (see :func:`sequence_upper_bound`).

    ``upper = max(cluster_wilson, bootstrap_t)``; ``n_effective`` is the cluster-robust effective number
    of independent positions; ``level`` the nominal one-sided level.
    """

    mean: float
    upper: float
    cluster_wilson: float
    bootstrap_t: float
    n_effective: float
    sequences: int
    positions: int
    level: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


def sequence_upper_bound(
    sums: Any,
    counts: Any,
    *,
    alpha: float = DEFAULT_ALPHA,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> SequenceBound:
    r"""Upper confidence bound of :math:`R = \sum_j s_j / \sum_j c_j` with the sequence as the unit.

    ``sums[j]`` is the summed mass of sequence ``j`` over its ``counts[j]`` scored positions (each
    position's mass in [0, 1]); sequences with no scored position are ignored. See the module
    docstring for the definition and its measured coverage. Deterministic for a given ``seed``.
    """
    s = np.asarray(sums, dtype=np.float64).reshape(-1)
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    keep = c > 0
    s, c = s[keep], c[keep]
    k = len(s)
    n = int(c.sum())
    level = 1.0 - alpha
    if k == 0:
        return SequenceBound(math.nan, 1.0, 1.0, 1.0, 0.0, 0, 0, level)
    mean = float(s.sum() / c.sum())
    if k < MIN_SEQUENCES:
        return SequenceBound(mean, 1.0, 1.0, 1.0, 0.0, k, n, level)
    ratio, var = _ratio_and_variance(s, c)
    ratio, var = float(ratio), float(var)
    t = _student_quantile(level, k - 1)
    n_eff = min(ratio * (1.0 - ratio) / var, float(n)) if var > 0 else float(n)
    cluster = wilson_upper(ratio, n_eff, t)

    rng = np.random.default_rng(seed)
    stats_t = []
    for start in range(0, samples, 256):  # bounded memory: 256 resamples at a time
        idx = rng.integers(0, k, size=(min(256, samples - start), k))
        r_b, v_b = _ratio_and_variance(s[idx], c[idx])
        with np.errstate(divide="ignore", invalid="ignore"):
            # A resample with no spread: +-inf by the side it falls on (never a silent 0).
            stats_t.append(np.where(v_b > 0, (r_b - ratio) / np.sqrt(v_b), np.where(r_b >= ratio, np.inf, -np.inf)))
    with np.errstate(invalid="ignore"):  # infinite resamples sort to the ends; the quantile may be one
        q = float(np.quantile(np.concatenate(stats_t), alpha))
    boot = min(1.0, ratio - q * math.sqrt(var)) if math.isfinite(q) else 1.0
    return SequenceBound(mean, max(cluster, boot), cluster, boot, n_eff, k, n, level)


def bootstrap_ratio_interval(
    sums: Any, counts: Any, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    r"""Percentile bootstrap interval of :math:`\sum_j s_j / \sum_j c_j` resampling *units* ``j``.

    Used over sequences (``s_j`` the summed mass and ``c_j`` the scored positions of sequence ``j``).
    Reported for reference; the verdict uses :func:`sequence_upper_bound`, whose studentised form
    covers better when the per-sequence masses are skewed.
    """
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


def sequence_lower_bound(
    sums: Any,
    counts: Any,
    *,
    alpha: float = DEFAULT_ALPHA,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> float:
    r"""Lower confidence bound of :math:`R = \sum_j s_j / \sum_j c_j`, the mirror of :func:`sequence_upper_bound`.

    :math:`1 - U(c - s, c)`: the sequence-level upper bound of the mass on the complement of V_S,
    subtracted from 1 (the same method, level and seed, applied to :math:`1 - R`; see the module
    docstring). 0.0 with fewer than :data:`MIN_SEQUENCES` sequences (nothing can be said). Each
    position's mass must lie in [0, 1], so that :math:`0 \le s_j \le c_j`.
    """
    s = np.asarray(sums, dtype=np.float64).reshape(-1)
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    complement = sequence_upper_bound(c - s, c, alpha=alpha, samples=samples, seed=seed)
    return max(0.0, 1.0 - complement.upper)


def paired_ratio_upper(
    numerator_sums: Any,
    denominator_sums: Any,
    counts: Any,
    *,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> float:
    r"""One-sided upper bound of the ratio of two means measured on the same sequences (paired bootstrap).

    Sequence ``j`` has ``counts[j]`` scored positions and summed masses ``a_j`` (``numerator_sums``, e.g. the
    unlearned model's) and ``b_j`` (``denominator_sums``, the base model's) over the *same* positions. The
    ratio of the two means is

    .. math::
        \rho = \frac{\sum_j a_j / \sum_j c_j}{\sum_j b_j / \sum_j c_j} = \frac{\sum_j a_j}{\sum_j b_j}.

    Each of ``samples`` resamples draws ``k`` sequence indices with replacement (the same indices for both
    models, which keeps the pairing: a sequence on the topic is high for both) and computes
    :math:`\rho^*_b = \sum_{j \in b} a_j / \sum_{j \in b} b_j` (:math:`+\infty` when the resampled base sum is
    0). The bound is the empirical ``level`` quantile of the :math:`\rho^*_b` (``numpy.quantile`` with
    ``method="inverted_cdf"``: the smallest :math:`\rho^*_b` with at least ``level`` of them at or below it).
    Sequences with no scored position are dropped; ``nan`` (no bound) with fewer than :data:`MIN_SEQUENCES`
    sequences, where resampling so few says nothing (two sequences give three distinct resamples, and the
    "bound" would sit on the point ratio), or when :math:`\sum_j b_j = 0` (no ratio). Deterministic for a
    given ``seed``.
    """
    a = np.asarray(numerator_sums, dtype=np.float64).reshape(-1)
    b = np.asarray(denominator_sums, dtype=np.float64).reshape(-1)
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if not len(a) == len(b) == len(c):
        raise ValueError(f"paired_ratio_upper: {len(a)}, {len(b)} and {len(c)} sequences: the masses must be paired")
    keep = c > 0
    a, b = a[keep], b[keep]
    k = len(a)
    if k < MIN_SEQUENCES or samples < 1 or not b.sum() > 0:
        return math.nan
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, samples, 256):  # bounded memory: 256 resamples at a time
        idx = rng.integers(0, k, size=(min(256, samples - start), k))
        num, den = a[idx].sum(1), b[idx].sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.where(den > 0, num / den, np.inf))
    return float(np.quantile(np.concatenate(ratios), level, method="inverted_cdf"))
