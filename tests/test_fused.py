"""The fused chunk passes (etu_hf/ops/fused.py, chunk_math.py) against naive float64 autograd."""

import math

import pytest
import torch

from etu_hf.ops.chunk_math import Workspace, softmax_into, tilt_statistic_rows
from etu_hf.ops.chunked import chunked_nll, chunked_tilt_statistics, tilted_kl_loss
from etu_hf.ops.tilt import TiltSpec, per_position_lambda


class HandLoRA:
    """A LoRA head as a plain callable (not a module): z = h W^T + s (h A^T) B^T, W frozen."""

    def __init__(self, h: int, v: int, r: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(v, h, generator=g)
        self.a = (0.3 * torch.randn(r, h, generator=g)).requires_grad_(True)
        self.b = (0.3 * torch.randn(v, r, generator=g)).requires_grad_(True)
        self.s = 2.0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.w.T + self.s * (hidden @ self.a.T) @ self.b.T

    def double(self, hidden: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return hidden @ self.w.double().T + self.s * (hidden @ a.T) @ b.T


def naive_kl(zs, zb, ids, lam, weights):
    """sum_i w_i KL(q_i || softmax(zs_i)) / sum_i w_i in float64, q from its definition."""
    pb = torch.softmax(zb.double(), -1)
    tilt = torch.ones_like(pb)
    tilt[:, ids] = torch.exp(-lam.double()).unsqueeze(-1)
    q = pb * tilt / (pb * tilt).sum(-1, keepdim=True)
    kl = (q * (q.log() - torch.log_softmax(zs.double(), -1))).sum(-1)
    return (kl * weights.double()).sum() / weights.double().sum()


def _inputs(n=19, h=6, v=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    hs, hb = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    zb = 2.0 * torch.randn(n, v, generator=g)
    weights = (torch.rand(n, generator=g) > 0.25).float()
    return hs, hb, zb, weights, torch.tensor([1, 4, 9, 16, 25, 36])


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 19, 64])
def test_gradient_through_a_callable_lora_head_equals_naive(chunk_size):
    """The head's trainable tensors are found from its autograd graph (a callable, not a module)."""
    hs, _, zb, w, ids = _inputs()
    head = HandLoRA(6, 50)
    lam = per_position_lambda(zb, ids, 0.05)
    x = hs.clone().requires_grad_(True)
    out = tilted_kl_loss(x, zb, ids, TiltSpec(epsilon=0.05), weights=w, student_head=head, chunk_size=chunk_size)
    (3.0 * out.loss).backward()  # the backward pass scales the gradients computed in the forward
    x64 = hs.double().requires_grad_(True)
    a64, b64 = head.a.detach().double().requires_grad_(True), head.b.detach().double().requires_grad_(True)
    ref = 3.0 * naive_kl(head.double(x64, a64, b64), zb, ids, lam, w)
    ref.backward()
    torch.testing.assert_close(3.0 * out.loss.detach().double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for got, want in ((x.grad, x64.grad), (head.a.grad, a64.grad), (head.b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_only_the_head_trains():
    """States without gradient (e.g. only the output head is trained): the head still gets its gradient."""
    hs, _, zb, w, ids = _inputs()
    head = HandLoRA(6, 50)
    out = tilted_kl_loss(hs, zb, ids, 0.7, weights=w, student_head=head, chunk_size=5)
    out.loss.backward()
    b64 = head.b.detach().double().requires_grad_(True)
    naive_kl(head.double(hs.double(), head.a.detach().double(), b64), zb, ids, torch.tensor(0.7), w).backward()
    torch.testing.assert_close(head.b.grad.double(), b64.grad, atol=1e-5, rtol=1e-4)


def test_mass_near_one_keeps_the_exact_lambda():
    """p = 1 - 5e-10 rounds to 1 in float32: lambda still comes from the exact logit, as without fusing."""
    ids = torch.tensor([0, 1])
    rest = math.log(1e-9 / 8)
    zb = torch.tensor([[0.0, 0.0] + [rest] * 8, [0.3, -1.0] + [0.1 * k for k in range(8)]])
    zs = torch.zeros(2, 10, requires_grad=True)
    spec = TiltSpec(epsilon=0.05)
    out = tilted_kl_loss(zs, zb, ids, spec, chunk_size=1)
    lam = per_position_lambda(zb.double(), ids, 0.05)
    torch.testing.assert_close(out.lambda_sum.double(), lam.sum(), atol=1e-4, rtol=1e-6)
    assert float(out.target_mass_sum) == pytest.approx(0.05 + min(float(torch.softmax(zb[1], -1)[:2].sum()), 0.05))
    out.loss.backward()
    ref_zs = zs.detach().double().requires_grad_(True)
    naive_kl(ref_zs, zb, ids, lam, torch.ones(2)).backward()
    torch.testing.assert_close(zs.grad.double(), ref_zs.grad, atol=1e-6, rtol=1e-5)


def test_minus_inf_base_logits_with_a_head():
    """A base logit of -inf (a masked token) gives q = 0 there: no NaN in the value or the gradient."""
    hs, _, zb, w, ids = _inputs(n=8, v=20, seed=3)
    ids = torch.tensor([2, 5])
    zb[:, 7] = -math.inf
    zb[3, 11] = -math.inf
    head = HandLoRA(6, 20, seed=3)
    x = hs.clone().requires_grad_(True)
    out = tilted_kl_loss(x, zb, ids, 1.1, weights=w, student_head=head, chunk_size=3)
    out.loss.backward()
    x64 = hs.double().requires_grad_(True)
    zs64 = head.double(x64, head.a.detach().double(), head.b.detach().double())
    keep = torch.isfinite(zb)
    pb = torch.where(keep, torch.softmax(zb.double(), -1), torch.zeros((), dtype=torch.float64))
    tilt = torch.ones_like(pb)
    tilt[:, ids] = math.exp(-1.1)
    q = pb * tilt / (pb * tilt).sum(-1, keepdim=True)
    terms = torch.where(q > 0, q * (q.clamp_min(1e-300).log() - torch.log_softmax(zs64, -1)), torch.zeros(()).double())
    ref = (terms.sum(-1) * w.double()).sum() / w.double().sum()
    ref.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.loss.detach().double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)


def test_logits_input_float64_and_targets_without_grad():
    _, _, zb, w, ids = _inputs(n=9)
    zs = torch.randn(9, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 50, (9,), generator=torch.Generator().manual_seed(6))
    lam = per_position_lambda(zb.double(), ids, 0.05)
    with torch.no_grad():
        out = tilted_kl_loss(zs, zb.double(), ids, TiltSpec(epsilon=0.05), weights=w, chunk_size=4, targets=y)
    torch.testing.assert_close(out.loss, naive_kl(zs, zb, ids, lam, w), atol=1e-10, rtol=1e-10)
    lp = torch.log_softmax(zs, -1).gather(-1, y[:, None]).squeeze(-1)
    lb = torch.log_softmax(zb.double(), -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(out.student_target_logps, lp, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.base_target_logps, lb, atol=1e-10, rtol=1e-10)


def test_targets_with_grad_keep_their_gradient():
    """The per-row log-probabilities of the targets are differentiable (the preference terms use them)."""
    hs, _, zb, w, ids = _inputs(n=10)
    head = torch.nn.Linear(6, 50, bias=False)
    y = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(2))
    out = tilted_kl_loss(hs, zb, ids, 0.5, weights=w, student_head=head, chunk_size=4, targets=y)
    out.student_target_logps.sum().backward()
    ref_w = head.weight.detach().clone().requires_grad_(True)
    torch.log_softmax(hs @ ref_w.T, -1).gather(-1, y[:, None]).sum().backward()
    torch.testing.assert_close(head.weight.grad, ref_w.grad, atol=1e-5, rtol=1e-5)


def test_nll_through_a_lora_head():
    hs, _, _, w, _ = _inputs(n=13)
    head = HandLoRA(6, 50, seed=4)
    y = torch.randint(0, 50, (13,), generator=torch.Generator().manual_seed(8))
    x = hs.clone().requires_grad_(True)
    chunked_nll(x, y, weights=w, student_head=head, chunk_size=4).loss.backward()
    x64 = hs.double().requires_grad_(True)
    b64 = head.b.detach().double().requires_grad_(True)
    nll = torch.nn.functional.cross_entropy(head.double(x64, head.a.detach().double(), b64), y, reduction="none")
    ((nll * w.double()).sum() / w.double().sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.b.grad.double(), b64.grad, atol=1e-6, rtol=1e-5)


def test_a_partitioned_head_takes_the_checkpointed_path():
    """DeepSpeed ZeRO-3 parameters (``ds_id``) are not differentiated in the forward; the result is the same."""
    hs, hb, _, w, ids = _inputs(n=11)
    head = torch.nn.Linear(6, 50, bias=False)
    x = hs.clone().requires_grad_(True)
    fused = tilted_kl_loss(x, hb, ids, 0.9, weights=w, student_head=head, base_head=head, chunk_size=4)
    fused.loss.backward()
    grad = head.weight.grad.clone()
    head.weight.grad = None
    head.weight.ds_id = 7
    x2 = hs.clone().requires_grad_(True)
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    legacy = tilted_kl_loss(x2, hb, ids, 0.9, weights=w, student_head=head, base_head=head, chunk_size=4)
    legacy.loss.backward()
    assert len(calls) > 2 * 3  # recomputed in the backward pass: the checkpointed path
    torch.testing.assert_close(legacy.loss, fused.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(head.weight.grad, grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-6, rtol=1e-5)


def test_softmax_into_and_statistics_rows():
    z = torch.tensor([[1.0, 2.0, -math.inf], [-math.inf, -math.inf, -math.inf], [50.0, -40.0, 0.0]])
    out = torch.empty_like(z)
    lse = softmax_into(z, out)
    torch.testing.assert_close(lse, torch.logsumexp(z.double(), -1).float())
    torch.testing.assert_close(out[[0, 2]], torch.softmax(z[[0, 2]], -1))
    assert out[1].tolist() == [0.0, 0.0, 0.0]
    # the log-normaliser read off candidate columns, and the rows whose candidates are all ~0 (or -inf)
    z = torch.tensor([[0.5, -3.0, 2.0, 1.0], [80.0, -40.0, -45.0, 0.0], [-math.inf] * 4, [1.0, 1.0, 1.0, 1.0]])
    out = torch.empty_like(z)
    lse = softmax_into(z, out, candidates=torch.tensor([1, 2]))
    torch.testing.assert_close(lse[[0, 1, 3]], torch.logsumexp(z.double(), -1)[[0, 1, 3]].float())
    assert lse[2] == -math.inf and out[2].tolist() == [0.0] * 4
    torch.testing.assert_close(out[[0, 1, 3]], torch.softmax(z[[0, 1, 3]], -1))
    # the reverse KL rows and the masses, against chunked_tilt_statistics' unfused path
    g = torch.Generator().manual_seed(4)
    zs, zb = torch.randn(7, 30, generator=g), 3 * torch.randn(7, 30, generator=g)
    ids = torch.tensor([3, 8, 21])
    spec = TiltSpec(epsilon=0.1, lambda_max=3.0)
    fused = tilt_statistic_rows(zs, zb, ids, spec, Workspace(), base_owned=False)
    torch.testing.assert_close(fused, chunked_tilt_statistics(zs, zb, ids, spec, chunk_size=0), atol=2e-6, rtol=1e-5)
