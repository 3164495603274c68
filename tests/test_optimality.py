"""The tilt is the I-projection: no feasible q is closer (in KL) to the base distribution."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from etu_hf import closed_form_lambda, tilted_log_probs


def kl(q, p):
    q = np.asarray(q, dtype=np.float64)
    nz = q > 0
    return float(np.sum(q[nz] * (np.log(q[nz]) - np.log(p[nz]))))


def solve_numerically(p, in_s, eps):
    """min KL(q||p) s.t. sum q = 1, q(S) <= eps, q >= 0 with SLSQP (a generic constrained optimiser)."""
    v = len(p)
    x0 = np.full(v, 1.0 / v)
    x0[in_s] = eps / in_s.sum() * 0.5
    x0[~in_s] = (1 - x0[in_s].sum()) / (~in_s).sum()
    cons = [{"type": "eq", "fun": lambda q: q.sum() - 1.0}, {"type": "ineq", "fun": lambda q: eps - q[in_s].sum()}]
    res = minimize(
        lambda q: kl(np.clip(q, 1e-300, None), p),
        x0,
        method="SLSQP",
        bounds=[(0, 1)] * v,
        constraints=cons,
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    return np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()


@pytest.mark.parametrize("seed", range(8))
def test_tilt_beats_constrained_optimiser_and_perturbations(seed):
    rng = np.random.default_rng(seed)
    v = int(rng.integers(6, 16))
    p = rng.dirichlet(np.full(v, 0.7))
    in_s = np.zeros(v, dtype=bool)
    in_s[rng.choice(v, size=int(rng.integers(1, v // 2 + 1)), replace=False)] = True
    eps = float(rng.uniform(0.01, 0.9 * p[in_s].sum())) if p[in_s].sum() > 0.02 else 0.01
    ids = torch.tensor(np.flatnonzero(in_s))

    lam = closed_form_lambda(float(p[in_s].sum()), eps)
    q = tilted_log_probs(torch.tensor(np.log(p)), ids, lam).exp().double().numpy()
    assert q[in_s].sum() <= eps + 1e-6
    best = kl(q, p)

    q_num = solve_numerically(p, in_s, eps)
    assert q_num[in_s].sum() <= eps + 1e-6
    assert best <= kl(q_num, p) + 1e-7
    np.testing.assert_allclose(q_num, q, atol=2e-3)

    # random feasible perturbations: move mass inside S, inside the complement, or out of S
    for _ in range(300):
        d = rng.normal(size=v) * rng.uniform(1e-4, 0.05)
        d[in_s] -= d[in_s].mean()
        d[~in_s] -= d[~in_s].mean()
        if rng.random() < 0.3:  # also lower the mass on S
            t = rng.uniform(0, 0.5) * q[in_s].sum()
            d[in_s] -= t * q[in_s] / q[in_s].sum()
            d[~in_s] += t * q[~in_s] / q[~in_s].sum()
        cand = q + d
        if (cand < 0).any() or cand[in_s].sum() > eps + 1e-12:
            continue
        assert best <= kl(cand, p) + 1e-12
