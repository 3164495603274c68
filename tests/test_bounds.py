"""The sequence-level bounds (upper, and the lower one by symmetry): exact parts, degenerate inputs and coverage
under correlated positions; the paired bootstrap bound of the suppression ratio against a naive loop."""

import math

import numpy as np
import pytest
from scipy import stats

from etu_hf.ops.bounds import (
    DEFAULT_ALPHA,
    MIN_SEQUENCES,
    STATED_LEVEL,
    paired_ratio_upper,
    sequence_lower_bound,
    sequence_upper_bound,
    wilson_interval,
    wilson_upper,
)


def _simulate(rng, k, lengths, a, b, concentration):
    """k sequences; sequence j has mean mass mu_j ~ Beta(a, b) and length L_j drawn from ``lengths``;
    its positions' masses are Beta(mu_j * c, (1 - mu_j) * c): correlated within the sequence."""
    lens = rng.choice(lengths, size=k)
    mu = rng.beta(a, b, size=k)
    n = int(lens.sum())
    owner = np.repeat(np.arange(k), lens)
    alpha = np.maximum(mu[owner] * concentration, 1e-9)
    beta = np.maximum((1 - mu[owner]) * concentration, 1e-9)
    masses = rng.beta(alpha, beta, size=n)
    sums = np.bincount(owner, weights=masses, minlength=k)
    return sums, lens.astype(float)


# (sequences, per-sequence Beta(a, b)): from mild to strong heterogeneity; true mean a / (a + b).
REGIMES = [(32, 8, 152), (32, 2, 38), (16, 0.5, 9.5), (32, 0.5, 9.5), (128, 0.3, 5.7), (128, 0.1, 1.9)]


@pytest.mark.parametrize("k,a,b", REGIMES)
def test_coverage_under_correlated_positions_is_at_least_the_stated_level(k, a, b):
    """500 data sets per regime, lengths 16/64/128: the stated 95% coverage holds; the token-level Wilson
    bound (positions taken as independent) covers far less, which is why it never decides anything."""
    rng = np.random.default_rng(1234 + k)
    true = a / (a + b)
    reps = 500
    hits = token_hits = 0
    for r in range(reps):
        sums, counts = _simulate(rng, k, [16, 64, 128], a, b, concentration=5.0)
        bound = sequence_upper_bound(sums, counts, seed=r, samples=1000)
        hits += bound.upper >= true
        token_hits += wilson_upper(sums.sum() / counts.sum(), counts.sum()) >= true
    assert hits / reps >= STATED_LEVEL, f"coverage {hits / reps:.3f}"
    if a <= 0.5:  # strongly heterogeneous sequences: the naive bound is far from honest
        assert token_hits / reps < 0.8, f"token-level coverage {token_hits / reps:.3f}"


def test_parts_match_their_formulas():
    rng = np.random.default_rng(0)
    sums, counts = _simulate(rng, 40, [32, 64], 2, 38, 5.0)
    b = sequence_upper_bound(sums, counts, seed=3)
    k = len(sums)
    ratio = sums.sum() / counts.sum()
    var = k / (k - 1) * ((sums - ratio * counts) ** 2).sum() / counts.sum() ** 2
    n_eff = ratio * (1 - ratio) / var
    t = stats.t.ppf(1 - DEFAULT_ALPHA, k - 1)
    assert b.mean == pytest.approx(ratio)
    assert b.n_effective == pytest.approx(n_eff)
    assert b.cluster_wilson == pytest.approx(wilson_upper(ratio, n_eff, t))
    assert b.upper == max(b.cluster_wilson, b.bootstrap_t) and b.upper > ratio
    assert b.sequences == k and b.positions == int(counts.sum())
    # deterministic for a seed
    assert sequence_upper_bound(sums, counts, seed=3).upper == b.upper


def test_identical_independent_sequences_give_about_the_token_bound():
    """When every sequence has the same mass ratio there is no between-sequence variance: the effective
    n is the number of positions, and the bound is the token-level Wilson bound at that n."""
    counts = np.full(20, 50.0)
    sums = 0.04 * counts
    b = sequence_upper_bound(sums, counts)
    assert b.n_effective == 1000
    assert b.cluster_wilson == pytest.approx(wilson_upper(0.04, 1000, stats.t.ppf(1 - DEFAULT_ALPHA, 19)))


def test_degenerate_inputs():
    assert sequence_upper_bound([], []).upper == 1.0
    few = sequence_upper_bound([0.1] * (MIN_SEQUENCES - 1), [10] * (MIN_SEQUENCES - 1))
    assert few.upper == 1.0 and few.mean == pytest.approx(0.01)
    # sequences without positions are ignored
    b = sequence_upper_bound([1.0] * 10 + [0.0], [20.0] * 10 + [0.0])
    assert b.sequences == 10 and math.isfinite(b.upper)


# ------------------------------------------------------------------------------- the lower bound (by symmetry)
@pytest.mark.parametrize("k,a,b", [(32, 2, 38), (32, 0.5, 9.5)])
def test_lower_bound_covers_from_below(k, a, b):
    """The mirror of the upper bound keeps the stated level from below (300 data sets per regime; the
    skewed regime is the hard side for a lower bound: most sequences near 0, a few high)."""
    rng = np.random.default_rng(99 + k)
    true = a / (a + b)
    reps = 300
    hits = 0
    for r in range(reps):
        sums, counts = _simulate(rng, k, [16, 64, 128], a, b, concentration=5.0)
        lower = sequence_lower_bound(sums, counts, seed=r, samples=1000)
        assert lower <= sums.sum() / counts.sum()
        hits += lower <= true
    assert hits / reps >= STATED_LEVEL, f"coverage {hits / reps:.3f}"


def test_lower_bound_is_the_upper_bound_of_the_complement():
    rng = np.random.default_rng(5)
    sums, counts = _simulate(rng, 24, [32, 64], 2, 38, 5.0)
    mirror = sequence_upper_bound(counts - sums, counts, seed=7)
    assert sequence_lower_bound(sums, counts, seed=7) == pytest.approx(1.0 - mirror.upper)
    # its cluster Wilson part is the Wilson lower bound at the original's effective n (the complement has the
    # same linearised variance and R(1 - R), and Wilson's interval is symmetric under p <-> 1 - p)
    original = sequence_upper_bound(sums, counts, seed=7)
    t = stats.t.ppf(1 - DEFAULT_ALPHA, len(sums) - 1)
    assert mirror.n_effective == pytest.approx(original.n_effective)
    ratio = sums.sum() / counts.sum()
    assert 1 - mirror.cluster_wilson == pytest.approx(wilson_interval(ratio, original.n_effective, t)[0])
    assert sequence_lower_bound([0.1] * (MIN_SEQUENCES - 1), [10] * (MIN_SEQUENCES - 1)) == 0.0


# ------------------------------------------------------------------------------- the suppression ratio's bound
def _naive_paired_ratio_upper(num, den, counts, samples, seed, level):
    """The definition, one resample at a time: the same sequence indices for both models, the ratio of the
    resampled sums, the smallest resampled ratio with at least ``level`` of them at or below it."""
    keep = [j for j in range(len(counts)) if counts[j] > 0]
    num = [num[j] for j in keep]
    den = [den[j] for j in keep]
    k = len(keep)
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, samples, 256):  # the same random stream as the function (blocks of 256 rows)
        block = rng.integers(0, k, size=(min(256, samples - start), k))
        for row in block:
            a = sum(num[j] for j in row)
            b = sum(den[j] for j in row)
            ratios.append(a / b if b > 0 else math.inf)
    ratios.sort()
    return ratios[math.ceil(level * len(ratios)) - 1]


def test_paired_ratio_upper_matches_a_naive_loop():
    rng = np.random.default_rng(3)
    k = 30
    counts = rng.integers(10, 60, size=k).astype(float)
    base = rng.beta(2, 8, size=k) * counts
    updated = base * rng.uniform(0.05, 0.4, size=k)  # paired: the unlearned mass follows the base mass
    counts[4] = 0.0  # a sequence with no scored position is dropped
    base[4] = updated[4] = 0.0
    got = paired_ratio_upper(updated, base, counts, samples=700, seed=11)
    assert got == pytest.approx(_naive_paired_ratio_upper(updated, base, counts, 700, 11, 0.95), rel=1e-12)
    point = updated.sum() / base.sum()
    assert point < got < 1.0
    # the pairing matters: resampling the two models' sequences independently gives a wider bound
    rng2 = np.random.default_rng(11)
    unpaired = []
    keep = counts > 0
    a, b = updated[keep], base[keep]
    for _ in range(700):
        unpaired.append(a[rng2.integers(0, len(a), len(a))].sum() / b[rng2.integers(0, len(b), len(b))].sum())
    assert got < np.quantile(unpaired, 0.95)
    # deterministic for a seed; level 0.5 is about the point ratio
    assert paired_ratio_upper(updated, base, counts, samples=700, seed=11) == got
    assert paired_ratio_upper(updated, base, counts, samples=2000, seed=1, level=0.5) == pytest.approx(point, rel=0.05)


def test_paired_ratio_upper_degenerate_inputs():
    assert math.isnan(paired_ratio_upper([], [], []))
    assert math.isnan(paired_ratio_upper([0.1] * 8, [0.0] * 8, [5] * 8))  # base mass 0: no ratio
    # fewer than MIN_SEQUENCES (8) sequences: no bound (two sequences gave an "upper bound" at the point ratio)
    assert math.isnan(paired_ratio_upper([1.0] * 7, [3.0] * 7, [10] * 7))
    assert paired_ratio_upper([1.0] * 8, [3.0] * 8, [10] * 8) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="paired"):
        paired_ratio_upper([0.1], [0.2, 0.3], [5, 5])
