"""The sequence-level upper bound: exact parts, degenerate inputs, and coverage under correlated positions."""

import math

import numpy as np
import pytest
from scipy import stats

from etu_hf.ops.bounds import DEFAULT_ALPHA, MIN_SEQUENCES, STATED_LEVEL, sequence_upper_bound, wilson_upper


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
