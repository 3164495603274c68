"""Chunked losses against a naive float64 implementation: values and gradients."""

import math

import pytest
import torch

from etu_hf import chunked_nll, tilted_kl_loss
from etu_hf.ops.chunked import (
    DEFAULT_CHUNK_SIZE,
    TILT_SUM_FIELDS,
    ChunkResult,
    chunk_rows,
    chunked_forbidden_mass,
    chunked_tilt_statistics,
    run_chunks,
)
from etu_hf.ops.preference import sequence_logps, token_logps
from etu_hf.ops.tilt import TiltSpec, base_logit_mass, per_position_lambda, resolve_lambdas, tilted_log_probs


def naive_tilted_kl(zs, zb, ids, lam=None, eps=None, weights=None):
    """Independent reference: float64, no slicing tricks, explicit normalisation of the tilt."""
    zs, zb = zs.double(), zb.double()
    pb = torch.softmax(zb, -1)
    in_s = torch.zeros(zb.shape[-1], dtype=torch.bool)
    in_s[ids] = True
    if lam is None:
        p = pb[:, in_s].sum(-1)
        lam = (torch.log(p / (1 - p)) - torch.log(torch.tensor(eps / (1 - eps), dtype=torch.float64))).clamp(min=0)
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, 1) if torch.is_tensor(lam) else torch.tensor(lam)
    unnorm = pb * torch.where(in_s, torch.exp(-lam * torch.ones_like(pb)), torch.ones_like(pb))
    q = unnorm / unnorm.sum(-1, keepdim=True)
    kl = (q * (torch.log(q) - torch.log_softmax(zs, -1))).sum(-1)
    w = torch.ones(zs.shape[0], dtype=torch.float64) if weights is None else weights.double()
    return (kl * w).sum() / w.sum()


def _data(n=23, h=12, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g)
    hb = hs + 0.3 * torch.randn(n, h, generator=g)
    head_s = torch.nn.Linear(h, v, bias=False)
    head_b = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        head_s.weight.copy_(torch.randn(v, h, generator=g))
        head_b.weight.copy_(head_s.weight + 0.1 * torch.randn(v, h, generator=g))
    ids = torch.tensor([2, 5, 11, 17, 30])
    return hs, hb, head_s, head_b, ids


@pytest.mark.parametrize("mode", ["per_position", "global", "lam_tensor"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 23, 64])
def test_chunked_equals_naive_value_and_gradient(mode, chunk_size):
    hs, hb, head_s, head_b, ids = _data()
    n = hs.shape[0]
    weights = (torch.rand(n, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    kwargs = {
        "per_position": {"epsilon": 0.05},
        "global": {"lam": 1.7},
        "lam_tensor": {"lam": torch.rand(n, generator=torch.Generator().manual_seed(4)) * 4},
    }[mode]
    tilt = TiltSpec(epsilon=0.05) if mode == "per_position" else kwargs["lam"]

    x = hs.clone().requires_grad_(True)
    out = tilted_kl_loss(
        x, hb, ids, tilt, weights=weights, student_head=head_s, base_head=head_b, chunk_size=chunk_size
    )
    out.loss.backward()
    grad_x, grad_w = x.grad.clone(), head_s.weight.grad.clone()

    head_s.weight.grad = None
    x2 = hs.clone().double().requires_grad_(True)
    with torch.no_grad():
        zb = head_b(hb).double()
    ref = naive_tilted_kl(
        x2 @ head_s.weight.double().T, zb, ids, lam=kwargs.get("lam"), eps=kwargs.get("epsilon"), weights=weights
    )
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_x.double(), x2.grad, atol=1e-5, rtol=1e-4)
    # the head's weight gradient too (the naive graph went through a float64 copy of it)
    w64 = head_s.weight.detach().double().requires_grad_(True)
    naive_tilted_kl(
        hs.double() @ w64.T, zb, ids, lam=kwargs.get("lam"), eps=kwargs.get("epsilon"), weights=weights
    ).backward()
    torch.testing.assert_close(grad_w.double(), w64.grad, atol=1e-5, rtol=1e-4)


def test_chunked_statistics_match_unchunked():
    hs, hb, head_s, head_b, ids = _data(n=50)
    tilt = TiltSpec(epsilon=0.05)
    a = tilted_kl_loss(hs, hb, ids, tilt, student_head=head_s, base_head=head_b, chunk_size=None)
    b = tilted_kl_loss(hs, hb, ids, tilt, student_head=head_s, base_head=head_b, chunk_size=7)
    for name in (
        "kl_sum",
        "weight_sum",
        "lambda_sum",
        "lambda_min",
        "lambda_max",
        "student_mass_sum",
        "target_mass_sum",
        "base_mass_sum",
    ):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    # per-position target mass is min(p, eps) on average
    p = torch.softmax(head_b(hb).detach(), -1)[:, ids].sum(-1)
    assert float(a.target_mass_sum / 50) == pytest.approx(float(torch.minimum(p, torch.tensor(0.05)).mean()), abs=1e-6)


def test_logits_input_and_zero_weight_rows_do_not_count():
    hs, hb, head_s, head_b, ids = _data(n=10)
    zs, zb = head_s(hs), head_b(hb)
    w = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0, 1, 1], dtype=torch.float32)
    full = tilted_kl_loss(zs, zb, ids, 2.0, weights=w, chunk_size=4).loss
    kept = w.bool()
    sub = tilted_kl_loss(zs[kept], zb[kept], ids, tilt=2.0).loss
    torch.testing.assert_close(full, sub, atol=1e-6, rtol=1e-6)


def test_normalizer_and_lambda_zero_is_kl_to_base():
    hs, hb, head_s, head_b, ids = _data(n=9)
    zs, zb = head_s(hs).double(), head_b(hb).double()
    out = tilted_kl_loss(zs, zb, ids, 0.0, normalizer=100.0)
    pb = torch.softmax(zb, -1)
    ref = (pb * (torch.log(pb) - torch.log_softmax(zs, -1))).sum() / 100.0
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 2, 5])
def test_chunked_nll_matches_cross_entropy(chunk_size):
    hs, _, head_s, _, _ = _data(n=11)
    y = torch.randint(0, 40, (11,), generator=torch.Generator().manual_seed(1))
    w = torch.ones(11)
    w[[0, 4]] = 0
    x = hs.clone().requires_grad_(True)
    out = chunked_nll(x, y, weights=w, student_head=head_s, chunk_size=chunk_size)
    out.loss.backward()
    x2 = hs.clone().requires_grad_(True)
    keep = w.bool()
    ref = torch.nn.functional.cross_entropy(head_s(x2)[keep], y[keep])
    ref.backward()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-5)


def test_chunking_bounds_live_memory():
    """With chunks, the autograd graph holds no [N, V] tensor: saved activations stay O(chunk x V)."""
    n, h, v = 512, 8, 4096
    hs = torch.randn(n, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False)
    ids = torch.arange(0, 50)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tilted_kl_loss(hs, hs.detach(), ids, 1.0, student_head=head, base_head=head, chunk_size=64)
    assert max(saved) <= 64 * v  # nothing of size n * v is kept for backward
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tilted_kl_loss(hs, hs.detach(), ids, 1.0, student_head=head, base_head=head, chunk_size=None)
    assert max(saved) >= n * v  # the unchunked path does keep them (the control)


def test_contexts_with_mass_near_one_reach_epsilon_exactly():
    """No probability clip: p = 1 - 5e-10 (it rounds to 1 in float32) still gets q(S) = epsilon."""
    eps = 0.05
    ids = torch.tensor([0, 1])
    # base mass on S = 2 / (2 + 1e-9) = 1 - 5e-10: logit(p) = log(2) - log(1e-9) ~ 21.42
    rest = torch.log(torch.tensor(1e-9 / 8, dtype=torch.float64))
    zb = torch.cat([torch.zeros(1, 2, dtype=torch.float64), rest.expand(1, 8)], -1).float()
    assert float(torch.softmax(zb, -1)[0, :2].sum()) == 1.0  # the float32 probability is useless here
    lam = per_position_lambda(zb, ids, eps)
    q_s = torch.exp(torch.logsumexp(tilted_log_probs(zb, ids, lam)[:, ids], -1))
    assert float(q_s) == pytest.approx(eps, rel=1e-4)
    assert float(base_logit_mass(zb, ids)) == pytest.approx(math.log(2.0) - math.log(1e-9), rel=1e-5)


def test_clamped_positions_are_counted():
    eps = 0.05
    ids = torch.tensor([0, 1])
    zb = torch.tensor([[0.0, 0.0, -30.0, -30.0], [0.0, 0.0, 0.0, 0.0]])  # logit(p) ~ 30.7 and 0
    zs = torch.zeros(2, 4)
    tight = TiltSpec(epsilon=eps, lambda_max=10.0)
    out = tilted_kl_loss(zs, zb, ids, tilt=tight)
    assert float(out.clamped_sum) == 1.0 and float(out.weight_sum) == 2.0
    assert float(tilted_kl_loss(zs, zb, ids, tilt=TiltSpec(epsilon=eps)).clamped_sum) == 0.0  # default: no bind
    lam, clamped = per_position_lambda(zb, ids, eps, lambda_max=10.0, return_clamped=True)
    assert clamped.tolist() == [True, False] and float(lam[0]) == 10.0


def test_kl_with_shared_minus_inf_columns_is_finite_and_exact():
    """Columns where base and model both have -inf logits contribute 0, not NaN (0 * (-inf + inf))."""
    ninf = float("-inf")
    zb = torch.tensor([[1.0, 0.5, ninf, -0.3, ninf], [0.2, ninf, 0.1, 0.0, 2.0]])
    zs = torch.tensor([[0.3, 0.1, ninf, 0.2, ninf], [0.0, ninf, 0.4, -0.1, 1.0]], requires_grad=True)
    ids = torch.tensor([0, 3])
    out = tilted_kl_loss(zs, zb, ids, 1.3, chunk_size=1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(zs.grad).all()
    # Reference over the finite columns only.
    ref = []
    for row in range(2):
        keep = torch.isfinite(zb[row])
        s_ids = torch.tensor([int(keep[:i].sum()) for i in ids.tolist() if keep[i]])
        log_q = tilted_log_probs(zb[row][keep].double().unsqueeze(0), s_ids, 1.3)[0]
        log_p = torch.log_softmax(zs[row][keep].detach().double(), -1)
        ref.append(float((log_q.exp() * (log_q - log_p)).sum()))
    assert float(out.loss) == pytest.approx(sum(ref) / 2, rel=1e-5)


# ------------------------------------------------------------------------------------- one way to say lambda
def test_resolve_lambdas_accepts_a_tiltspec_a_float_and_a_tensor():
    _, _, _, _, ids = _data()
    zb = torch.randn(6, 40, generator=torch.Generator().manual_seed(5)) * 3
    # a TiltSpec: the exact per-position tilt, from the definition lambda = max(0, logit p - logit eps)
    p = torch.softmax(zb.double(), -1)[:, ids].sum(-1)
    expected = (torch.log(p / (1 - p)) - math.log(0.05 / 0.95)).clamp(min=0)
    lam, clamped = resolve_lambdas(TiltSpec(epsilon=0.05), zb, ids)
    torch.testing.assert_close(lam.double(), expected, atol=1e-5, rtol=1e-5)
    assert lam.shape == (6,) and not clamped.any()
    # a float and a 0-dim tensor: the same lambda everywhere; a [N] tensor: its own values
    assert resolve_lambdas(1.5, zb, ids)[0].tolist() == [1.5] * 6
    assert resolve_lambdas(torch.tensor(0.25), zb, ids)[0].tolist() == [0.25] * 6
    per = torch.arange(6, dtype=torch.float32)
    assert resolve_lambdas(per, zb, ids)[0].tolist() == per.tolist()
    # global mode: one value, its clamp counted at every position
    lam, clamped = resolve_lambdas(TiltSpec(epsilon=0.05, mode="global", global_lambda=7.0, lambda_max=5.0), zb, ids)
    assert lam.tolist() == [5.0] * 6 and clamped.all()
    with pytest.raises(ValueError, match="shape"):
        resolve_lambdas(torch.zeros(5), zb, ids)
    with pytest.raises(TypeError, match="TiltSpec"):
        resolve_lambdas(None, zb, ids)


def test_the_three_ways_give_the_same_loss():
    hs, hb, head_s, head_b, ids = _data(n=12)
    zs, zb = head_s(hs).detach(), head_b(hb).detach()
    spec = TiltSpec(epsilon=0.05)
    lam = per_position_lambda(zb, ids, 0.05, lambda_max=spec.lambda_max)
    by_spec = tilted_kl_loss(zs, zb, ids, spec, chunk_size=5)
    by_tensor = tilted_kl_loss(zs, zb, ids, lam, chunk_size=5)
    torch.testing.assert_close(by_spec.loss, by_tensor.loss)
    torch.testing.assert_close(by_spec.lambda_sum, lam.sum())
    g = TiltSpec(epsilon=0.05, mode="global", global_lambda=2.25)
    torch.testing.assert_close(tilted_kl_loss(zs, zb, ids, g).loss, tilted_kl_loss(zs, zb, ids, 2.25).loss)
    with pytest.raises(ValueError, match="one lambda per position"):
        tilted_kl_loss(zs, zb, ids, torch.zeros(3))


# ------------------------------------------------------------------------------------- the chunk runner
def test_chunk_size_zero_and_none_mean_unchunked():
    assert chunk_rows(50, 0) == chunk_rows(50, None) == 50
    assert chunk_rows(50, DEFAULT_CHUNK_SIZE) == 50 and chunk_rows(5000, DEFAULT_CHUNK_SIZE) == DEFAULT_CHUNK_SIZE
    assert chunk_rows(50, 7) == 7
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_rows(50, -1)
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return ChunkResult(loss=x.sum(), sums=x.sum().reshape(1))

    x = torch.ones(10, 3)
    assert float(run_chunks(fn, [x], 0).loss) == 30.0 and calls == [10]
    calls.clear()
    assert float(run_chunks(fn, [x], 4).sums[0]) == 30.0 and calls == [4, 4, 2]


def test_tilt_statistic_terms_against_naive_float64():
    """Mass on S, KL(pi_theta || q_lam), q_lam(S), lambda, positions, clamped, by the definitions."""
    hs, hb, head_s, head_b, ids = _data(n=17)
    zs, zb = head_s(hs).detach(), head_b(hb).detach()
    spec = TiltSpec(epsilon=0.05, lambda_max=2.0)  # binds at some positions
    rows = chunked_tilt_statistics(hs, hb, ids, spec, student_head=head_s, base_head=head_b, chunk_size=4)
    assert rows.shape == (17, len(TILT_SUM_FIELDS)) and rows.dtype == torch.float64
    p = torch.softmax(zs.double(), -1)
    pb = torch.softmax(zb.double(), -1)
    in_s = torch.zeros(40, dtype=torch.bool)
    in_s[ids] = True
    raw = torch.log(pb[:, in_s].sum(-1) / pb[:, ~in_s].sum(-1)) - math.log(0.05 / 0.95)
    lam = raw.clamp(0.0, 2.0)
    q = pb * torch.where(in_s, torch.exp(-lam)[:, None], torch.ones(1, dtype=torch.float64))
    q = q / q.sum(-1, keepdim=True)
    kl = (p * (p.log() - q.log())).sum(-1)
    expected = torch.stack(
        [p[:, in_s].sum(-1), kl, q[:, in_s].sum(-1), lam, torch.ones(17, dtype=torch.float64), (raw > 2.0).double()],
        -1,
    )
    assert 0 < float(expected[:, 5].sum()) < 17  # the clamp binds somewhere, not everywhere
    torch.testing.assert_close(rows, expected, atol=2e-5, rtol=1e-4)
    # the rows do not depend on the chunking
    torch.testing.assert_close(
        rows,
        chunked_tilt_statistics(hs, hb, ids, spec, student_head=head_s, base_head=head_b, chunk_size=0),
        atol=1e-6,
        rtol=1e-5,
    )
    mass = chunked_forbidden_mass(hs, ids, head=head_s, chunk_size=3)
    torch.testing.assert_close(mass.double(), p[:, in_s].sum(-1), atol=1e-6, rtol=1e-5)


def test_token_logps_is_log_softmax_then_gather():
    """ops/preference computes what TRL's selective_log_softmax computes, with torch alone."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 7, 50, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    out = token_logps(logits, ids)
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    z = logits.double()
    naive = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.log(torch.exp(z).sum(-1))
    torch.testing.assert_close(out.double(), naive, atol=1e-5, rtol=1e-5)
    # a sequence's log-probability: token t (here t = 4, 5, 6) is predicted by the logits at t - 1
    mask = torch.zeros(3, 7)
    mask[:, 4:] = 1
    shifted = torch.log_softmax(z[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(sequence_logps(logits, ids, mask).double(), shifted[:, 3:].sum(-1), atol=1e-4, rtol=1e-5)
