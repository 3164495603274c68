"""Forbidden sets per position, S(x) = S u E(x) (etu_hf/ops/row_sets.py), through the tilt and the chunked losses.

Every check compares against an independent float64 computation over explicit Python sets (a dense mask built
row by row), or against a generic constrained optimiser.
"""

import io
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from etu_hf.ops.chunked import chunked_forbidden_mass, chunked_tilt_statistics, tilted_kl_loss
from etu_hf.ops.row_sets import RowSets, check_extra_ids, clean_extra_ids
from etu_hf.ops.tilt import (
    TiltSpec,
    base_logit_mass,
    forbidden_mass,
    per_position_lambda,
    resolve_lambdas,
    tilted_log_probs,
)

SHARED = torch.tensor([2, 5, 11])
#: Row 0: no extras; row 1: extras overlapping the shared set and repeated; row 2: only the shared set again; the
#: rest: one to three distinct extras.
EXTRAS = torch.tensor(
    [
        [-1, -1, -1, -1],
        [5, 7, 7, 2],
        [11, 11, -1, -1],
        [0, -1, -1, -1],
        [-1, 19, -1, 3],
        [8, 9, 10, -1],
        [1, -1, 1, -1],
        [4, 6, 12, 13],
        [19, 18, -1, -1],
    ]
)


def sets_of(shared: torch.Tensor, extras: torch.Tensor) -> list[set[int]]:
    """S(x) per row as Python sets (the definition: union, -1 is none)."""
    return [set(shared.tolist()) | {int(e) for e in row if e >= 0} for row in extras.reshape(-1, extras.shape[-1])]


def dense_mask(shared: torch.Tensor, extras: torch.Tensor, v: int) -> torch.Tensor:
    mask = torch.zeros(extras.shape[0], v, dtype=torch.bool)
    for i, s in enumerate(sets_of(shared, extras)):
        mask[i, sorted(s)] = True
    return mask


def naive_target(zb: torch.Tensor, mask: torch.Tensor, eps: float | None = None, lam=None):
    """float64 q_lam from its definition: pi_b e^{-lam 1[y in S(x)]} / Z, lam = max(0, logit p - logit eps)."""
    pb = torch.softmax(zb.double(), -1)
    p = (pb * mask).sum(-1)
    if lam is None:
        lam = (torch.logit(p) - math.log(eps / (1 - eps))).clamp(min=0)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(p.shape)
    unnorm = pb * torch.where(mask, torch.exp(-lam)[:, None], torch.ones((), dtype=torch.float64))
    return unnorm / unnorm.sum(-1, keepdim=True), p, lam


def naive_loss(zs: torch.Tensor, zb: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, eps=None, lam=None):
    q, p, lam = naive_target(zb, mask, eps, lam)
    kl = (torch.where(q > 0, q * (q.log() - torch.log_softmax(zs.double(), -1)), 0.0)).sum(-1)
    w = w.double()
    ps = (torch.softmax(zs.detach().double(), -1) * mask).sum(-1)
    stats = {
        "lambda_sum": (lam * w).sum(),
        "student_mass_sum": (ps * w).sum(),
        "target_mass_sum": ((q * mask).sum(-1) * w).sum(),
        "base_mass_sum": (p * w).sum(),
        "kl_sum": (kl.detach() * w).sum(),
    }
    return (kl * w).sum() / w.sum(), stats


# ------------------------------------------------------------------------------------------ the representation
def test_clean_extra_ids_counts_overlaps_and_repeats_once():
    clean = clean_extra_ids(SHARED, EXTRAS)
    assert clean.shape == EXTRAS.shape
    for row, want in zip(clean.tolist(), sets_of(SHARED, EXTRAS), strict=True):
        ids = [e for e in row if e >= 0]
        assert len(ids) == len(set(ids))  # no repeats
        assert set(ids) | set(SHARED.tolist()) == want and not set(ids) & set(SHARED.tolist())
        assert row == sorted(ids, reverse=True) + [-1] * (len(row) - len(ids))  # extras first, then padding
    assert torch.equal(clean_extra_ids(SHARED, clean), clean)  # idempotent
    assert clean[0].tolist() == [-1] * 4 and clean[2].tolist() == [-1] * 4 and clean[1].tolist() == [7, -1, -1, -1]


def test_row_sets_gather_and_put_touch_exactly_each_rows_extras():
    rs = RowSets.build(SHARED, EXTRAS)
    z = torch.arange(9 * 20, dtype=torch.float64).reshape(9, 20)
    got = rs.gather(z)
    for i, row in enumerate(clean_extra_ids(SHARED, EXTRAS).tolist()):
        want = sorted(z[i, [e for e in row if e >= 0]].tolist(), reverse=True)
        assert sorted([g for g in got[i].tolist() if g > -math.inf], reverse=True) == want
    out = rs.fill_(z.clone(), -1.0)
    changed = out != z
    expect = dense_mask(torch.tensor([], dtype=torch.long), clean_extra_ids(SHARED, EXTRAS), 20)
    assert torch.equal(changed, expect)  # the extras, and nothing else (no shared column, no column 0 by padding)


def test_bad_extra_ids_get_one_clear_line():
    with pytest.raises(ValueError, match=r"extra_ids: values must be token ids in \[0, 20\)"):
        check_extra_ids(torch.tensor([[3, 20]]), 20)
    with pytest.raises(ValueError, match="extra_ids: values must be"):
        check_extra_ids(torch.tensor([[-2, 3]]), 20)
    check_extra_ids(EXTRAS, 20)
    with pytest.raises(ValueError, match=r"extra_ids: expected shape \(9,\) \+ \(k_max,\)"):
        forbidden_mass(torch.zeros(9, 20), SHARED, EXTRAS[:4])
    with pytest.raises(TypeError, match="LongTensor"):
        clean_extra_ids(SHARED, EXTRAS.float())


# ------------------------------------------------------------------------------------------ the closed form
def _kl(q: np.ndarray, p: np.ndarray) -> float:
    nz = q > 0
    return float(np.sum(q[nz] * (np.log(q[nz]) - np.log(p[nz]))))


def _slsqp(p: np.ndarray, in_s: np.ndarray, eps: float) -> np.ndarray:
    """min KL(q||p) s.t. sum q = 1, q(S) <= eps, q >= 0 (SLSQP, a generic constrained optimiser)."""
    v = len(p)
    x0 = np.where(in_s, 0.5 * eps / in_s.sum(), 0.0)
    x0[~in_s] = (1 - x0.sum()) / (~in_s).sum()
    cons = [{"type": "eq", "fun": lambda q: q.sum() - 1.0}, {"type": "ineq", "fun": lambda q: eps - q[in_s].sum()}]
    res = minimize(
        lambda q: _kl(np.clip(q, 1e-300, None), p),
        x0,
        method="SLSQP",
        bounds=[(0, 1)] * v,
        constraints=cons,
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    q = np.clip(res.x, 0, None)
    return q / q.sum()


@pytest.mark.parametrize("seed", range(3))
def test_closed_form_per_row_equals_the_constrained_optimiser(seed):
    """Each row with its own S(x): lambda(x) = max(0, logit p(x) - logit eps) is the I-projection of that row."""
    rng = np.random.default_rng(seed)
    v, eps = 20, 0.06
    zb = torch.tensor(rng.normal(size=(9, v)) * 1.5)
    mask = dense_mask(SHARED, EXTRAS, v)
    lam = per_position_lambda(zb, SHARED, eps, extra_ids=EXTRAS)
    q = tilted_log_probs(zb, SHARED, lam, EXTRAS).exp().numpy()
    p = torch.softmax(zb, -1).numpy()
    for i in range(9):
        in_s = mask[i].numpy()
        q_num = _slsqp(p[i], in_s, eps)
        assert q_num[in_s].sum() <= eps + 1e-6 and q[i][in_s].sum() <= eps + 1e-9
        assert _kl(q[i], p[i]) <= _kl(q_num, p[i]) + 1e-7
        np.testing.assert_allclose(q[i], q_num, atol=2e-3)
    assert len({frozenset(s) for s in sets_of(SHARED, EXTRAS)}) >= 7  # the rows really differ


@pytest.mark.parametrize("floor", [0.5, 1.2])
def test_lambda_floor_is_the_projection_onto_the_tighter_constraint(floor):
    """lambda(x) = max(m, logit p(x) - logit eps) is the I-projection onto q(S|x) <= min(eps, sigma(logit p(x) - m)):
    checked row by row against SLSQP given only that cap, and the floor leaves rows above epsilon as they were."""
    rng = np.random.default_rng(11)
    v, eps = 20, 0.06
    zb = torch.tensor(rng.normal(size=(9, v)) * 1.5)
    mask = dense_mask(SHARED, EXTRAS, v)
    spec = TiltSpec(epsilon=eps, lambda_floor=floor)
    lam = spec.lambdas(zb, SHARED, extra_ids=EXTRAS)
    q = tilted_log_probs(zb, SHARED, lam, EXTRAS).exp().numpy()
    p = torch.softmax(zb, -1).numpy()
    plain = per_position_lambda(zb, SHARED, eps, extra_ids=EXTRAS)
    for i in range(9):
        in_s = mask[i].numpy()
        p_s = p[i][in_s].sum()
        cap = min(eps, 1.0 / (1.0 + math.exp(floor - math.log(p_s / (1 - p_s)))))
        q_num = _slsqp(p[i], in_s, cap)
        assert q[i][in_s].sum() <= cap + 1e-9
        np.testing.assert_allclose(q[i], q_num, atol=2e-3)
        np.testing.assert_allclose(float(lam[i]), max(floor, float(plain[i])), rtol=1e-6)
    assert (plain < floor).any() and (plain > floor).any()  # both sides of the floor occur
    _, clamped = spec.lambdas(zb, SHARED, return_clamped=True, extra_ids=EXTRAS)
    assert not clamped.any()  # a binding floor is the target, not a clamp


def test_tilted_mass_is_min_of_base_mass_and_epsilon_per_row():
    g = torch.Generator().manual_seed(7)
    zb = 2.5 * torch.randn(9, 20, generator=g)
    zb[3, 0] = 30.0  # a row whose only extra carries almost all the mass: p(x) rounds to 1 in float32
    mask = dense_mask(SHARED, EXTRAS, 20)
    p = (torch.softmax(zb.double(), -1) * mask).sum(-1)
    for eps in (0.01, 0.2):
        lam = per_position_lambda(zb, SHARED, eps, extra_ids=EXTRAS)
        mass = forbidden_mass(tilted_log_probs(zb, SHARED, lam, EXTRAS), SHARED, EXTRAS).double()
        torch.testing.assert_close(mass, torch.minimum(p, torch.tensor(eps, dtype=torch.float64)), atol=1e-6, rtol=1e-5)
        assert (lam > 0).any() and (eps < 0.1 or (lam == 0).any())
    assert float(torch.softmax(zb[3], -1)[0]) == 1.0
    torch.testing.assert_close(forbidden_mass(zb, SHARED, EXTRAS).double(), p, atol=1e-6, rtol=1e-5)
    # logit p(x) exact where p rounds to 1 (no clip): lse over S(x) minus lse over its complement
    z64 = zb.double()
    rest = torch.logsumexp(z64.masked_fill(mask, -math.inf), -1)
    torch.testing.assert_close(
        base_logit_mass(zb, SHARED, EXTRAS).double(),
        torch.logsumexp(z64.masked_fill(~mask, -math.inf), -1) - rest,
        atol=1e-5,
        rtol=1e-5,
    )
    assert float(base_logit_mass(zb, SHARED, EXTRAS)[3]) > 20  # not capped by a probability clip


def test_repeats_and_overlaps_give_the_result_of_the_clean_set():
    g = torch.Generator().manual_seed(2)
    zb = torch.randn(9, 20, generator=g)
    clean = clean_extra_ids(SHARED, EXTRAS)
    spec = TiltSpec(epsilon=0.05)
    for a, b in (
        (base_logit_mass(zb, SHARED, EXTRAS), base_logit_mass(zb, SHARED, clean)),
        (resolve_lambdas(spec, zb, SHARED, extra_ids=EXTRAS)[0], resolve_lambdas(spec, zb, SHARED, extra_ids=clean)[0]),
        (tilted_log_probs(zb, SHARED, 1.3, EXTRAS), tilted_log_probs(zb, SHARED, 1.3, clean)),
    ):
        assert torch.equal(a, b)
    # row 2 (extras all in S) and row 0 (none) equal the shared set alone; row 1 forbids 7 once, not twice
    for row in (0, 2):
        assert torch.equal(tilted_log_probs(zb, SHARED, 1.3, EXTRAS)[row], tilted_log_probs(zb[row], SHARED, 1.3))
    once = tilted_log_probs(zb[1], torch.tensor([2, 5, 7, 11]), 1.3)
    torch.testing.assert_close(tilted_log_probs(zb, SHARED, 1.3, EXTRAS)[1], once)


def test_extra_ids_follow_leading_dimensions():
    """Logits [B, T, V] take extras [B, T, k]: the same as the flattened rows."""
    g = torch.Generator().manual_seed(5)
    zb = torch.randn(3, 3, 20, generator=g)
    flat = per_position_lambda(zb.reshape(9, 20), SHARED, 0.05, extra_ids=EXTRAS)
    torch.testing.assert_close(
        per_position_lambda(zb, SHARED, 0.05, extra_ids=EXTRAS.reshape(3, 3, 4)).reshape(9), flat
    )


def test_an_empty_shared_set_with_extras_only():
    g = torch.Generator().manual_seed(8)
    zb = torch.randn(9, 20, generator=g)
    none = torch.tensor([], dtype=torch.long)
    mask = dense_mask(none, EXTRAS, 20)
    p = (torch.softmax(zb.double(), -1) * mask).sum(-1)
    torch.testing.assert_close(forbidden_mass(zb, none, EXTRAS).double(), p, atol=1e-6, rtol=1e-5)
    lam = per_position_lambda(zb, none, 0.05, extra_ids=EXTRAS)
    assert lam[0] == 0  # an empty S(x): nothing to lower
    mass = forbidden_mass(tilted_log_probs(zb, none, lam, EXTRAS), none, EXTRAS).double()
    torch.testing.assert_close(mass, p.clamp(max=0.05), atol=1e-6, rtol=1e-5)


def test_an_empty_set_everywhere_is_the_untilted_kl():
    """No shared id and no extra in the batch (a words-only V_S whose words do not occur there, or the retain term
    of such a run): the tilted KL is KL(base || model), the masses 0, nothing is NaN."""
    g = torch.Generator().manual_seed(9)
    zs, zb = torch.randn(7, 20, generator=g), torch.randn(7, 20, generator=g)
    none = torch.tensor([], dtype=torch.long)
    out = tilted_kl_loss(zs, zb, none, tilt=TiltSpec(epsilon=0.05), chunk_size=3)
    pb = torch.softmax(zb.double(), -1)
    kl = (pb * (pb.log() - torch.log_softmax(zs.double(), -1))).sum(-1).mean()
    torch.testing.assert_close(out.loss.double(), kl, atol=1e-6, rtol=1e-5)
    assert float(out.student_mass_sum) == 0 and float(out.lambda_sum) == 0
    assert torch.isfinite(out.loss) and float(chunked_forbidden_mass(zs, none).abs().sum()) == 0


# ------------------------------------------------------------------------------------------ the losses
class Head:
    """A LoRA-like head as a plain callable: z = h W^T + (h A^T) B^T, W frozen."""

    def __init__(self, h: int, v: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.w = 2.0 * torch.randn(v, h, generator=g)
        self.a = (0.3 * torch.randn(2, h, generator=g)).requires_grad_(True)
        self.b = (0.3 * torch.randn(v, 2, generator=g)).requires_grad_(True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T + (x @ self.a.T) @ self.b.T

    def double(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x @ self.w.double().T + (x @ a.T) @ b.T


def _rows(n_rep: int = 2, h: int = 6, v: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    extras = EXTRAS.repeat(n_rep, 1)
    n = extras.shape[0]
    hs = torch.randn(n, h, generator=g)
    zb = 2.0 * torch.randn(n, v, generator=g)
    zb[:, 7] += 3.0  # rows forbidding 7 have p(x) well above epsilon
    w = (torch.rand(n, generator=g) > 0.2).float()
    return hs, zb, w, extras, dense_mask(SHARED, extras, v)


@pytest.mark.parametrize("chunk_size", [0, 1, 5, 18, 64])
def test_loss_and_gradient_through_a_head_equal_float64_autograd(chunk_size):
    hs, zb, w, extras, mask = _rows()
    head = Head(6, 20, seed=1)
    x = hs.clone().requires_grad_(True)
    spec = TiltSpec(epsilon=0.05)
    out = tilted_kl_loss(x, zb, SHARED, spec, weights=w, student_head=head, chunk_size=chunk_size, extra_ids=extras)
    (2.0 * out.loss).backward()
    x64 = hs.double().requires_grad_(True)
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (head.a, head.b))
    ref, stats = naive_loss(head.double(x64, a64, b64), zb, mask, w, eps=0.05)
    (2.0 * ref).backward()
    torch.testing.assert_close(out.loss.detach().double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for got, want in ((x.grad, x64.grad), (head.a.grad, a64.grad), (head.b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    for name, want in stats.items():
        torch.testing.assert_close(getattr(out, name).double(), want, atol=1e-4, rtol=1e-5, msg=name)
    assert float(out.weight_sum) == float(w.sum())


@pytest.mark.parametrize("chunk_size", [0, 4, 18])
@pytest.mark.parametrize("tilt", ["spec", "float", "tensor"])
def test_loss_and_gradient_from_logits_equal_float64_autograd(chunk_size, tilt):
    """Logits as input (the fused backward recomputes q per chunk with the row extras)."""
    _, zb, w, extras, mask = _rows(seed=3)
    zs = (zb + torch.randn(zb.shape, generator=torch.Generator().manual_seed(4))).requires_grad_(True)
    lam_t = torch.linspace(0.0, 3.0, zb.shape[0])
    given = {"spec": TiltSpec(epsilon=0.05), "float": 1.7, "tensor": lam_t}[tilt]
    out = tilted_kl_loss(zs, zb, SHARED, given, weights=w, chunk_size=chunk_size, extra_ids=extras)
    out.loss.backward()
    zs64 = zs.detach().double().requires_grad_(True)
    lam = {"spec": None, "float": 1.7, "tensor": lam_t.double()}[tilt]
    ref, stats = naive_loss(zs64, zb, mask, w, eps=0.05, lam=lam)
    ref.backward()
    torch.testing.assert_close(out.loss.detach().double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs.grad.double(), zs64.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out.target_mass_sum.double(), stats["target_mass_sum"], atol=1e-4, rtol=1e-5)


def test_statistics_and_masses_with_row_sets_equal_float64():
    _, zb, _, extras, mask = _rows(seed=6)
    zs = zb + torch.randn(zb.shape, generator=torch.Generator().manual_seed(9))
    spec = TiltSpec(epsilon=0.1, lambda_max=2.0)
    q, _, lam = naive_target(zb, mask, 0.1)
    lam = lam.clamp(max=2.0)
    q, _, _ = naive_target(zb, mask, lam=lam)
    log_p = torch.log_softmax(zs.double(), -1)
    kl = (log_p.exp() * (log_p - q.log())).sum(-1)
    mass = (log_p.exp() * mask).sum(-1)
    for chunk_size in (0, 5):
        stats = chunked_tilt_statistics(zs, zb, SHARED, spec, chunk_size=chunk_size, extra_ids=extras)
        torch.testing.assert_close(stats[:, 0], mass, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats[:, 1], kl, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats[:, 2], (q * mask).sum(-1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats[:, 3], lam, atol=1e-5, rtol=1e-5)
        assert stats[:, 5].sum() > 0  # the lambda_max clamp binds somewhere and is counted
        got = chunked_forbidden_mass(zs, SHARED, chunk_size=chunk_size, extra_ids=extras)
        torch.testing.assert_close(got.double(), mass, atol=1e-6, rtol=1e-5)


def test_targets_without_grad_and_extras():
    _, zb, w, extras, mask = _rows(seed=2)
    zs = zb.flip(0)
    y = torch.randint(0, 20, (zb.shape[0],), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tilted_kl_loss(
            zs, zb, SHARED, TiltSpec(epsilon=0.05), weights=w, chunk_size=4, targets=y, extra_ids=extras
        )
    ref, _ = naive_loss(zs, zb, mask, w, eps=0.05)
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-5, rtol=1e-5)
    lb = torch.log_softmax(zb.double(), -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(out.base_target_logps.double(), lb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k_max", [0, 3])
def test_rows_without_any_extra_equal_the_shared_set(k_max):
    """Extras of width 0 (a batch where no word continues) or all padding: the shared set's results."""
    _, zb, w, _, _ = _rows(seed=5)
    zs = (zb.flip(0) + 0.5).requires_grad_(True)
    none = torch.full((zb.shape[0], k_max), -1, dtype=torch.long)
    spec = TiltSpec(epsilon=0.05)
    got = tilted_kl_loss(zs, zb, SHARED, spec, weights=w, chunk_size=4, extra_ids=none)
    got.loss.backward()
    grad, zs.grad = zs.grad, None
    want = tilted_kl_loss(zs, zb, SHARED, spec, weights=w, chunk_size=4)
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(grad, zs.grad)
    torch.testing.assert_close(base_logit_mass(zb, SHARED, none), base_logit_mass(zb, SHARED))


# ------------------------------------------------------------------------------------------ None is unchanged
#: The commit before per-row sets were added: ``extra_ids=None`` must compute exactly what it computed.
BEFORE = "54e1373f7df08292af98c5ef9e506df565cedd6d"

#: Run both with the code of BEFORE (in a subprocess) and with the current code; only the old API is used.
COMPUTE = """
import torch
from etu_hf.ops.chunked import chunked_forbidden_mass, chunked_tilt_statistics, tilted_kl_loss
from etu_hf.ops.tilt import TiltSpec, base_logit_mass, forbidden_mass, per_position_lambda, tilted_log_probs

def compute(d):
    out = {}
    ids, zb, w, spec = d["ids"], d["zb"], d["w"], TiltSpec(epsilon=0.05)
    head = torch.nn.Linear(d["hs"].shape[1], zb.shape[1], bias=False)
    with torch.no_grad():
        head.weight.copy_(d["weight"])
    for cs in (0, 5):
        x = d["hs"].clone().requires_grad_(True)
        r = tilted_kl_loss(x, zb, ids, spec, weights=w, student_head=head, chunk_size=cs)
        r.loss.backward()
        sums = [r.student_mass_sum, r.target_mass_sum, r.lambda_sum]
        out[f"head{cs}"] = [r.loss.detach(), *sums, x.grad, head.weight.grad]
        head.weight.grad = None
        zs = d["zs"].clone().requires_grad_(True)
        r = tilted_kl_loss(zs, zb, ids, 1.3, weights=w, chunk_size=cs)
        r.loss.backward()
        out[f"logits{cs}"] = [r.loss.detach(), r.base_mass_sum, zs.grad]
        out[f"stats{cs}"] = [chunked_tilt_statistics(d["zs"], zb, ids, spec, chunk_size=cs)]
        out[f"mass{cs}"] = [chunked_forbidden_mass(d["zs"], ids, chunk_size=cs)]
    out["tilt"] = [base_logit_mass(zb, ids), per_position_lambda(zb, ids, 0.05), tilted_log_probs(zb, ids, 0.7),
                   forbidden_mass(zb, ids)]
    return out
"""

CHILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
exec(open(sys.argv[1] + "/compute.py").read())
torch.save(compute(torch.load(sys.argv[1] + "/inputs.pt")), sys.argv[1] + "/out.pt")
"""


def test_none_computes_bit_for_bit_what_it_did_before(tmp_path):
    root = Path(__file__).resolve().parents[1]
    has = (
        shutil.which("git")
        and subprocess.run(["git", "-C", root, "cat-file", "-e", f"{BEFORE}^{{commit}}"]).returncode == 0
    )
    if not has:
        pytest.skip("the commit before per-row sets is not in this checkout's history")
    tar = subprocess.run(
        ["git", "-C", root, "archive", BEFORE, "etu_hf/__init__.py", "etu_hf/ops"], capture_output=True, check=True
    )
    tarfile.open(fileobj=io.BytesIO(tar.stdout)).extractall(tmp_path, filter="data")
    g = torch.Generator().manual_seed(11)
    d = {
        "ids": torch.tensor([1, 4, 9, 30, 31]),
        "hs": torch.randn(13, 8, generator=g),
        "weight": torch.randn(40, 8, generator=g),
        "zb": 2.0 * torch.randn(13, 40, generator=g),
        "zs": torch.randn(13, 40, generator=g),
        "w": (torch.rand(13, generator=g) > 0.2).float(),
    }
    torch.save(d, tmp_path / "inputs.pt")
    (tmp_path / "compute.py").write_text(COMPUTE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    child = [sys.executable, "-c", CHILD, str(tmp_path), str(torch.get_num_threads())]
    subprocess.run(child, env=env, check=True, cwd=tmp_path)
    before = torch.load(tmp_path / "out.pt")
    scope: dict = {}
    exec(COMPUTE, scope)
    now = scope["compute"](d)
    assert before.keys() == now.keys()
    for key, tensors in now.items():
        for i, (a, b) in enumerate(zip(before[key], tensors, strict=True)):
            assert torch.equal(a, b), f"{key}[{i}] differs from the code before per-row sets"
