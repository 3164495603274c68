"""The audit's verdict cannot be vacuous (issue 20): "reached" needs the base model above epsilon; the
suppression ratio and its paired bound are the report's; the card and metrics.json carry the verdict."""

import json
import math

import numpy as np
import pytest
import torch

from etu_hf.evaluation.audit import AuditOptions, audit
from etu_hf.evaluation.measures import MassResult, TiltStatistics
from etu_hf.evaluation.report import AuditReport, build_report, decide_verdict
from etu_hf.forbidden_set import ForbiddenSet
from etu_hf.ops.bounds import paired_ratio_upper, sequence_lower_bound, sequence_upper_bound
from etu_hf.ops.tilt import TiltSpec


def _mass(sums, counts):
    sums, counts = np.asarray(sums, float), np.asarray(counts, np.int64)
    return MassResult(
        mean=float(sums.sum() / counts.sum()),
        n_positions=int(counts.sum()),
        n_sequences=len(counts),
        sequence_sums=sums,
        sequence_counts=counts,
        positions=np.repeat(sums / counts, counts),
    )


def _report(base_means, updated_share, epsilon, seed=0):
    """A report from synthetic per-sequence masses: the unlearned mass is ``updated_share`` of the base's."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(20, 60, size=len(base_means))
    base = np.asarray(base_means) * counts
    updated = base * updated_share * rng.uniform(0.5, 1.5, size=len(counts))
    stats = TiltStatistics(
        mass_sum=float(updated.sum()), kl_sum=0.0, target_mass_sum=0.0, lambda_sum=0.0, n_positions=1
    )
    opts = AuditOptions(bootstrap_samples=500, seed=seed)
    fs = ForbiddenSet(ids=[1, 2, 3])
    report = build_report(
        fs, 100, TiltSpec(epsilon=epsilon), opts, _mass(updated, counts), _mass(base, counts), stats, None, None
    )
    return report, base, updated, counts


def test_decide_verdict():
    assert decide_verdict(0.05, 0.04, 0.30, 0.25) == "reached"
    assert decide_verdict(0.05, 0.04, 0.04, 0.03) == "vacuous"  # the base was already below epsilon
    assert decide_verdict(0.05, 0.04, 0.06, 0.045) == "vacuous"  # above it, but not certainly
    assert decide_verdict(0.05, 0.06, 0.30, 0.25) == "not_reached"
    assert decide_verdict(0.05, 0.06, 0.04, 0.03) == "not_reached"  # never "reached" above the bound
    assert decide_verdict(0.05, math.nan, 0.30, 0.25) == "not_reached"


def test_a_base_model_already_below_epsilon_is_never_reached():
    """Base held-out mass about 0.03 at epsilon 0.05: the bound is met with nothing suppressed."""
    report, *_ = _report(np.full(30, 0.03), 0.5, epsilon=0.05)
    assert report.target_achieved_upper is True and report.verdict == "vacuous"
    line = report.verdict_line()
    assert ": reached" not in line
    assert (
        f"nothing to suppress at this epsilon: the base model's held-out mass {report.base_p_S:.4f} is already" in line
    )
    assert "<= epsilon 0.05" in line and "--epsilon_ratio 0.25" in line and "lower --epsilon" in line
    assert line in report.summary() and line in report.to_markdown()
    data = report.to_dict()
    assert data["verdict"] == "vacuous" and "vacuous" in data["definitions"]["verdict"]


def test_a_base_model_above_epsilon_but_not_certainly_is_vacuous():
    """The base mean is above epsilon, its lower bound is not: still nothing certain to suppress."""
    report, *_ = _report(np.r_[np.full(15, 0.02), np.full(15, 0.09)], 0.2, epsilon=0.05, seed=1)
    assert report.base_p_S > 0.05 >= report.base_p_S_lower
    assert report.verdict == "vacuous"
    assert f"has a lower bound {report.base_p_S_lower:.4f} <= epsilon 0.05" in report.verdict_line()


def test_reached_needs_the_base_lower_bound_above_epsilon():
    report, base, updated, counts = _report(np.full(30, 0.3), 0.05, epsilon=0.05)
    assert report.verdict == "reached" and report.base_p_S_lower > 0.05
    assert report.verdict_line().startswith(
        f"target pi_theta(S) <= 0.05: reached (upper bound {report.updated_p_S_upper:.4f})"
    )
    # the numbers beside it: the lower bound and the ratio's bound, recomputed from their definitions
    assert report.base_p_S_lower == pytest.approx(sequence_lower_bound(base, counts, seed=0))
    assert report.base_p_S_lower == pytest.approx(1 - sequence_upper_bound(counts - base, counts, seed=0).upper)
    assert report.suppression_ratio == pytest.approx(updated.sum() / base.sum())
    assert report.suppression_ratio_upper == pytest.approx(paired_ratio_upper(updated, base, counts, samples=500))
    assert report.suppression_ratio < report.suppression_ratio_upper
    assert "suppression ratio" in report.summary()
    not_reached, *_ = _report(np.full(30, 0.3), 0.5, epsilon=0.05)
    assert not_reached.verdict == "not_reached" and "NOT reached" in not_reached.verdict_line()


def test_a_report_without_the_verdict_reads_as_before(tmp_path):
    """A version-2 report written before the verdict field: the verdict falls back to target_achieved_upper."""
    report, *_ = _report(np.full(30, 0.3), 0.05, epsilon=0.05)
    data = report.to_dict()
    for key in ("verdict", "base_p_S_lower", "suppression_ratio_upper"):
        del data[key]
    (tmp_path / "suppression_report.json").write_text(json.dumps(data))
    old = AuditReport.load(str(tmp_path))
    assert old.verdict is None and old.outcome == "reached" and ": reached" in old.verdict_line()


def test_an_adapter_that_changed_nothing_is_not_certified(model, corpora, tmp_path):
    """The failure the verdict guards against, end to end: an untrained LoRA adapter (the base model itself)
    audited at an epsilon above the base mass passes the bound, and the audit says there was nothing to
    suppress instead of "reached"; suppression_report.json says "vacuous"."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    held = corpora["forget_heldout"].select(range(16))
    report = audit(
        peft_model,
        held,
        [5, 6, 7, 8],
        tilt=0.5,
        output_dir=str(tmp_path),
        num_samples=0,
        bootstrap_samples=200,
        progress=False,
    )
    assert report.updated_p_S == pytest.approx(report.base_p_S)  # LoRA starts as the identity
    assert report.target_achieved_upper and report.verdict == "vacuous"
    assert report.suppression_ratio == pytest.approx(1.0) and report.suppression_ratio_upper >= 1.0 - 1e-9
    assert "nothing to suppress at this epsilon" in report.summary() and ": reached" not in report.summary()
    saved = json.loads((tmp_path / "suppression_report.json").read_text())
    assert saved["verdict"] == "vacuous" and saved["base_p_S_lower"] <= 0.5


def test_the_card_says_nothing_to_suppress(tmp_path):
    from etu_hf.hub.card_audit import audit_rows, verdict

    report, *_ = _report(np.full(30, 0.03), 0.5, epsilon=0.05)
    numbers = report.to_dict()
    line = verdict(numbers)
    assert "**nothing to suppress at this epsilon**" in line and "**reached**" not in line
    assert "`--epsilon_ratio`" in line
    baseline = verdict(numbers, "npo")
    assert "nothing to suppress" in baseline and "**met**" not in baseline
    rows = {r[0]: r for r in audit_rows(numbers)}
    assert rows["lower bound (sequence-level, 95%)"][1] == f"{report.base_p_S_lower:.4f}"
    assert f"{report.suppression_ratio_upper:.4f}" in rows["suppression ratio (unlearned / base)"][3]
    reached, *_ = _report(np.full(30, 0.3), 0.05, epsilon=0.05)
    assert "**reached**" in verdict(reached.to_dict())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_fewer_than_eight_sequences_give_no_bound_and_say_so():
    """Two held-out sequences (the README command on 40 documents): every sequence-level figure is n/a, not a
    bootstrap over three distinct resamples, and the verdict line says how to get a bound."""
    report, *_ = _report(np.array([0.2, 0.15]), 0.3, epsilon=0.05)
    assert report.forget_sequences == 2 and report.updated_p_S_upper == 1.0
    assert math.isnan(report.suppression_ratio_upper) and 0 < report.suppression_ratio < 1
    assert all(math.isnan(x) for x in (*report.base_p_S_bootstrap_95, *report.updated_p_S_bootstrap_95))
    assert "fewer than the 8 a bound needs" in report.verdict_line() and "--eval_fraction" in report.verdict_line()
    assert "95% upper n/a" in report.summary()
    enough, *_ = _report(np.full(8, 0.2), 0.3, epsilon=0.05)
    assert "a bound needs" not in enough.verdict_line() and math.isfinite(enough.suppression_ratio_upper)
