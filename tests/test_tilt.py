"""Closed-form lambda and the tilted distribution, checked against direct computations."""

import math

import pytest
import torch

from etu_hf import closed_form_lambda, forbidden_mass, per_position_lambda, tilted_log_probs, tilted_mass


def _mass(log_probs, ids):
    return log_probs.exp()[..., ids].sum(-1)


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g, dtype=torch.float64) * 3
    ids = torch.tensor([1, 4, 7, 9, 20, 33])
    return logits, ids


def test_scalar_lambda_hits_epsilon_exactly():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(30, generator=g, dtype=torch.float64) * 2
        ids = torch.randperm(30, generator=g)[:5]
        p = float(forbidden_mass(logits, ids))
        for eps in (0.01, 0.05, 0.3):
            lam = closed_form_lambda(p, eps, allow_negative=True)
            q = tilted_log_probs(logits, ids, lam)
            assert float(_mass(q, ids)) == pytest.approx(eps, abs=1e-6)


def test_per_position_lambda_tensor_hits_epsilon(setup):
    logits, ids = setup
    eps = 0.05
    p = forbidden_mass(logits, ids)
    lam = closed_form_lambda(p, eps, allow_negative=True)  # elementwise on a tensor
    assert lam.shape == p.shape
    q_mass = _mass(tilted_log_probs(logits, ids, lam), ids)
    torch.testing.assert_close(q_mass, torch.full_like(q_mass, eps), atol=1e-6, rtol=0)


def test_per_position_mode_gives_min_of_p_and_epsilon(setup):
    logits, ids = setup
    eps = 0.05
    p = forbidden_mass(logits, ids).double()
    assert (p < eps).any() and (p > eps).any()  # both cases are exercised
    lam = per_position_lambda(logits, ids, eps)
    q_mass = _mass(tilted_log_probs(logits, ids, lam), ids).double()
    torch.testing.assert_close(q_mass, torch.minimum(p, torch.tensor(eps, dtype=torch.float64)), atol=1e-6, rtol=0)
    # without the floor (amplification allowed) every position lands on epsilon
    lam_neg = per_position_lambda(logits, ids, eps, allow_negative=True)
    q_neg = _mass(tilted_log_probs(logits, ids, lam_neg), ids).double()
    torch.testing.assert_close(q_neg, torch.full_like(q_neg, eps), atol=1e-6, rtol=0)


def test_global_mode_equals_seed_formula():
    def seed(p_s, eps, lam_max):  # the original tool: logit(p_S) - logit(eps), clipped, floored at 0
        p_s = min(max(p_s, 1e-6), 1 - 1e-6)
        lam = math.log(p_s / (1 - p_s)) - math.log(eps / (1 - eps))
        return max(0.0, min(lam, lam_max))

    for p_s in (1e-9, 0.01, 0.05, 0.2, 0.5, 0.9, 0.999999999):
        for eps in (0.01, 0.05, 0.1):
            assert closed_form_lambda(p_s, eps, 12.0) == pytest.approx(seed(p_s, eps, 12.0), abs=1e-12)
    assert closed_form_lambda(0.9999999, 0.001, 5.0) == 5.0  # clamped at lambda_max
    assert closed_form_lambda(1.0, 0.05) == float("inf")  # no probability clip: only lambda_max bounds it
    assert closed_form_lambda(0.01, 0.2, 12.0) == 0.0  # floored without allow_negative
    assert closed_form_lambda(0.01, 0.2, 12.0, allow_negative=True) < 0


def test_tilted_mass_closed_form_matches_tilt(setup):
    logits, ids = setup
    p = forbidden_mass(logits, ids)
    for lam in (-2.0, 0.0, 0.7, 5.0):
        direct = _mass(tilted_log_probs(logits, ids, lam), ids)
        z = 1 - p + p * math.exp(-lam)
        torch.testing.assert_close(tilted_mass(p, lam), (p * math.exp(-lam) / z).double(), atol=1e-9, rtol=0)
        torch.testing.assert_close(direct.double(), (p * math.exp(-lam) / z).double(), atol=1e-6, rtol=0)


def test_tilt_is_float32_and_leaves_input_untouched():
    logits = (torch.randn(4, 7, 40) * 4).to(torch.bfloat16)
    before = logits.clone()
    ids = torch.tensor([0, 3, 5])
    lam = torch.rand(4, 7) * 3
    out = tilted_log_probs(logits, ids, lam)
    assert out.dtype == torch.float32
    assert torch.equal(logits, before)
    ref = torch.log_softmax(logits.float() - 0.0, -1)
    shift = torch.zeros(40)
    shift[ids] = 1.0
    ref = torch.log_softmax(logits.float() - lam.unsqueeze(-1) * shift, -1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_extremes_and_bad_epsilon():
    assert closed_form_lambda(0.0, 0.05) == 0.0  # floored
    assert closed_form_lambda(1.0, 0.05, lambda_max=100.0) == 100.0  # only the clamp bounds it
    with pytest.raises(ValueError, match="epsilon"):
        closed_form_lambda(0.5, 1.0)
    with pytest.raises(ValueError, match="lambda_max"):
        closed_form_lambda(0.5, 0.1, lambda_max=0)
