"""The suppression report: its versioned JSON schema (:data:`DEFINITIONS` says what each number means;
docs/method.md, "The audit and its verdict"), the printed table and Markdown, and :func:`build_report`,
which turns the audit's measurements into bounds and a verdict.

The verdict (:attr:`AuditReport.verdict`) is one of :data:`VERDICTS`:

- ``"reached"``: the unlearned model's sequence-level upper bound is at most epsilon
  (``target_achieved_upper``) and the base model was above epsilon: its sequence-level lower bound
  ``base_p_S_lower`` exceeds epsilon, so the run suppressed something the base model did put there;
- ``"vacuous"``: the upper bound is at most epsilon, but so is the base model's held-out mass or its lower
  bound: there was nothing to suppress at this epsilon and "reached" would certify nothing (the line
  suggests ``--epsilon_ratio``, epsilon as a share of the base mass);
- ``"not_reached"``: the upper bound is above epsilon.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from etu_hf.artifacts.files import MARKDOWN_FILE, REPORT_FILE, write_json
from etu_hf.ops.bounds import (
    MIN_SEQUENCES,
    bootstrap_ratio_interval,
    paired_ratio_upper,
    pinsker_slack,
    sequence_lower_bound,
    sequence_upper_bound,
    wilson_upper,
)

if TYPE_CHECKING:
    from etu_hf.evaluation.measures import MassResult, PerplexityResult, TiltStatistics
    from etu_hf.forbidden_set import ForbiddenSet
    from etu_hf.ops.tilt import TiltSpec

REPORT_FORMAT = "etu-hf/suppression-report"

REPORT_VERSION = 2

#: The machine-readable verdicts (module docstring); ``suppression_report.json``'s ``verdict``.
VERDICTS = ("reached", "vacuous", "not_reached")

#: The ratio the vacuous verdict suggests (``--epsilon_ratio``: epsilon = this share of the base mass).
SUGGESTED_EPSILON_RATIO = 0.25


#: What every number of the report means; written into the JSON next to the numbers.
DEFINITIONS = {
    "positions": "scored positions: next-token predictions whose target is attended and not -100; padding never counts",
    "base_p_S / updated_p_S": "mean over held-out forget positions of the probability mass on V_S, base and unlearned",
    "*_p_S_upper": "sequence-level upper confidence bound of the mean mass (nominal one-sided 98.75%, "
    "stated 95%): the larger of a cluster-robust Wilson bound (effective n from the between-sequence variance, "
    "Student quantile) and a studentised bootstrap over sequences; valid when positions within a sequence are "
    "correlated (simulated coverage >= 95%, see docs/method.md); 1.0 with fewer than 8 sequences. The verdict",
    "upper_bound": "the parts of updated_p_S_upper: cluster_wilson, bootstrap_t, n_effective, sequences, level",
    "*_token_wilson_upper": "TOKEN-LEVEL Wilson score bound (z=1.959964) treating the mean mass as a proportion "
    "over n = min(positions, wilson_max_n) independent positions; positions within a sequence are correlated, so "
    "this undercovers: reported for comparison only, never used for a verdict",
    "*_bootstrap_95": "95% percentile bootstrap interval of the mean mass, resampling whole sequences "
    "(accounts for the within-sequence correlation); none with fewer than 8 sequences",
    "base_p_S_lower": "sequence-level LOWER confidence bound of base_p_S: 1 - the upper bound (same method, "
    "nominal one-sided 98.75%, stated 95%) of the mean mass on the complement of V_S; 0.0 with fewer than 8 "
    "sequences. At or below epsilon it makes the verdict 'vacuous'",
    "suppression_ratio": "updated_p_S / base_p_S: the share of the base model's held-out mass on V_S left after "
    "unlearning (both measured on the same positions)",
    "suppression_ratio_upper": "one-sided 95% upper bound of suppression_ratio: paired percentile bootstrap over "
    "held-out sequences (bootstrap_samples resamples, seeded): each resample draws sequences with replacement, "
    "the same for both models, and takes sum(updated mass) / sum(base mass) over them; the bound is the empirical "
    "95% quantile of those ratios; none with fewer than 8 sequences",
    "delta": "mean over held-out forget positions of KL(pi_theta(.|x) || q_lambda(.|x)), per token, "
    "with the run's tilt",
    "mean_target_mass": "mean over the same positions of q_lambda(S|x), the target's mass on V_S",
    "pinsker_bound": "epsilon + sqrt(delta / 2): bound on updated_p_S when the target meets epsilon (mean_target_mass "
    "<= epsilon, always so in per_position mode)",
    "pinsker_bound_from_target": "mean_target_mass + sqrt(delta / 2): bound on updated_p_S in every mode "
    "(Pinsker + Jensen)",
    "share_above_epsilon_*": "share of held-out forget positions whose mass on V_S exceeds epsilon",
    "*_perplexity": "exp(mean next-token NLL) over held-out retain positions; perplexity_ratio = updated / base",
    "target_achieved": "updated_p_S <= epsilon (point estimate)",
    "target_achieved_upper": "updated_p_S_upper <= epsilon (the guarantee: sequence-level upper bound)",
    "verdict": "'reached': target_achieved_upper and base_p_S_lower > epsilon (the base model was above epsilon, "
    "the unlearned one is certified below it); 'vacuous': target_achieved_upper but base_p_S or base_p_S_lower <= "
    "epsilon (nothing to suppress at this epsilon: the bound certifies nothing; use --epsilon_ratio or a lower "
    "--epsilon); 'not_reached': updated_p_S_upper > epsilon",
    "clamped_share": "share of held-out forget positions where a lambda clamp binds (the target misses epsilon)",
    "samples": "greedy continuations of a few held-out forget prompts, base and unlearned: an illustration only",
}


def _num(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


@dataclass
class AuditReport:
    """Everything :func:`etu_hf.audit` measured. ``to_dict()`` gives the ``suppression_report.json`` content;
    :data:`DEFINITIONS` says what each number means."""

    epsilon: float
    V_S_size: int
    V_S_fraction: float
    vocab_size: int
    forget_sequences: int
    forget_positions: int
    base_p_S: float
    updated_p_S: float
    base_p_S_upper: float
    updated_p_S_upper: float
    upper_bound: dict[str, Any]
    base_p_S_token_wilson_upper: float
    updated_p_S_token_wilson_upper: float
    token_wilson_n: int
    wilson_max_n: int
    base_p_S_bootstrap_95: tuple[float, float]
    updated_p_S_bootstrap_95: tuple[float, float]
    bootstrap_samples: int
    suppression_ratio: float
    delta: float
    mean_target_mass: float
    pinsker_bound: float
    pinsker_bound_from_target: float
    share_above_epsilon_base: float
    share_above_epsilon_updated: float
    retain_sequences: int | None
    retain_positions: int | None
    base_perplexity: float | None
    updated_perplexity: float | None
    perplexity_ratio: float | None
    target_achieved: bool
    target_achieved_upper: bool
    clamped_share: float
    tilt: dict[str, Any]
    seconds: float
    #: Added to version 2 (a report written before them reads them as None; :attr:`outcome` then falls back).
    base_p_S_lower: float | None = None
    suppression_ratio_upper: float | None = None
    verdict: str | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    activations: dict[str, Any] | None = None
    sources: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: _num(v) for k, v in asdict(self).items()}
        for key in ("base_p_S_bootstrap_95", "updated_p_S_bootstrap_95"):
            d[key] = [_num(x) for x in d[key]]
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, **d, "definitions": DEFINITIONS}

    @classmethod
    def load(cls, path: str) -> AuditReport:
        """Read a ``suppression_report.json`` (or the folder holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_FILE)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"{path} is not an etu-hf suppression report")
        if data.get("version", 1) < REPORT_VERSION:
            raise ValueError(
                f"{path} is a version {data.get('version', 1)} report (its verdict used a token-level bound); "
                "run `etu-hf audit` again to get a current one"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    # ------------------------------------------------------------------ human-readable forms
    def table_rows(self) -> list[tuple[str, str, str, str]]:
        def f(x: Any, spec: str = ".4f") -> str:
            return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

        def ci(pair: Any) -> str:
            return f"[{f(pair[0])}, {f(pair[1])}]"

        return [
            ("held-out forget mass on V_S", f(self.base_p_S), f(self.updated_p_S), f"<= {self.epsilon}"),
            (
                "  upper bound (sequences)",
                f(self.base_p_S_upper),
                f(self.updated_p_S_upper),
                f"{self.forget_sequences} sequences; the verdict",
            ),
            (
                "  token-level Wilson upper",
                f(self.base_p_S_token_wilson_upper),
                f(self.updated_p_S_token_wilson_upper),
                "positions as independent: undercovers",
            ),
            ("  lower bound (sequences)", f(self.base_p_S_lower), "", "base above epsilon? (else vacuous)"),
            ("  bootstrap 95% (sequences)", ci(self.base_p_S_bootstrap_95), ci(self.updated_p_S_bootstrap_95), ""),
            (
                "  positions above epsilon",
                f(self.share_above_epsilon_base, ".1%"),
                f(self.share_above_epsilon_updated, ".1%"),
                "",
            ),
            (
                "suppression ratio",
                "",
                f(self.suppression_ratio),
                f"unlearned/base; 95% upper {f(self.suppression_ratio_upper)}",
            ),
            ("delta = KL(model || target)", "", f(self.delta), f"Pinsker bound {f(self.pinsker_bound)}"),
            (
                "held-out retain perplexity",
                f(self.base_perplexity, ".3f"),
                f(self.updated_perplexity, ".3f"),
                f"ratio {f(self.perplexity_ratio, '.3f')}",
            ),
        ]

    def summary(self) -> str:
        """The plain-text table printed at the end of a run."""
        rows = self.table_rows()
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        w[1], w[2] = max(w[1], 10), max(w[2], 10)
        lines = [f"{'':{w[0]}}  {'base':>{w[1]}}  {'unlearned':>{w[2]}}  target/notes", "-" * (sum(w) + 8)]
        lines += [f"{a:{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows]
        lines.append(self.verdict_line())
        return "\n".join(lines)

    @property
    def outcome(self) -> str:
        """:attr:`verdict`, or for a report written before it existed ``"reached"``/``"not_reached"`` from
        ``target_achieved_upper`` alone (such a report cannot tell a vacuous "reached")."""
        if self.verdict is not None:
            return self.verdict
        return "reached" if self.target_achieved_upper else "not_reached"

    def verdict_line(self) -> str:
        """One line: "reached" only when the sequence-level upper bound is at most epsilon and the base
        model's lower bound is above it; "nothing to suppress" when the base model was already at or below
        epsilon (``verdict == "vacuous"``, module docstring)."""
        eps = self.epsilon
        head = f"target pi_theta(S) <= {eps}"
        if self.outcome == "vacuous":
            base, lower = self.base_p_S, self.base_p_S_lower
            where = "is already" if base <= eps else f"has a lower bound {lower:.4f}"
            ratio = SUGGESTED_EPSILON_RATIO
            head = (
                f"{head}: nothing to suppress at this epsilon: the base model's held-out mass {base:.4f} {where} <= "
                f"epsilon {eps}, so the unlearned upper bound {self.updated_p_S_upper:.4f} certifies nothing. Set "
                f"--epsilon_ratio {ratio} (epsilon = {ratio} x the base mass, here about {ratio * base:.4f}) or a "
                "lower --epsilon"
            )
        elif self.outcome == "reached":
            head = f"{head}: reached (upper bound {self.updated_p_S_upper:.4f})"
        elif self.target_achieved:
            head = (
                f"{head}: NOT reached: the point estimate {self.updated_p_S:.4f} is "
                f"below epsilon but its upper bound {self.updated_p_S_upper:.4f} is not"
            )
        else:
            head = f"{head}: NOT reached (point estimate {self.updated_p_S:.4f})"
        tail = f"; {self.forget_positions} positions in {self.forget_sequences} held-out sequences"
        if self.forget_sequences < MIN_SEQUENCES:
            tail += (
                f" (fewer than the {MIN_SEQUENCES} a bound needs: hold out more forget documents, --eval_fraction, or "
                "audit more held-out forget text)"
            )
        return head + tail

    def to_markdown(self) -> str:
        lines = [
            "# ETU suppression report",
            "",
            f"- epsilon: **{self.epsilon}**; V_S: {self.V_S_size} tokens "
            f"({self.V_S_fraction:.2%} of {self.vocab_size})",
            f"- held-out forget data: {self.forget_sequences} sequences, {self.forget_positions} scored positions",
            f"- tilt: {self.tilt}",
            f"- {self.verdict_line()}",
            "",
            "| measure | base | unlearned | target / notes |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {a.strip()} | {b} | {c} | {d} |" for a, b, c, d in self.table_rows()]
        lines += ["", "## What the numbers mean", ""]
        lines += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
        if self.samples:
            lines += ["", "## Sample continuations (illustration only, greedy decoding)", ""]
            for s in self.samples:
                lines += [f"- prompt: `{s['prompt']}`", f"  - base: `{s['base']}`", f"  - unlearned: `{s['updated']}`"]
        if self.activations:
            lines += [
                "",
                "## Activations (per layer)",
                "",
                "| data | layer | base norm | unlearned norm | cosine |",
                "| --- | --- | --- | --- | --- |",
            ]
            for split, rows in self.activations.items():
                lines += [
                    f"| {split} | {r['layer']} | {r['base_norm']:.3f} | {r['updated_norm']:.3f} | {r['cosine']:.4f} |"
                    for r in rows
                ]
        if self.files:
            lines += ["", "Files: " + ", ".join(f"`{v}`" for v in self.files.values())]
        return "\n".join(lines) + "\n"

    def save(self, output_dir: str) -> dict[str, str]:
        """Write ``suppression_report.json`` and ``suppression_report.md``; returns the paths."""
        os.makedirs(output_dir, exist_ok=True)
        self.files.setdefault("json", REPORT_FILE)
        self.files.setdefault("markdown", MARKDOWN_FILE)
        paths = {"json": write_json(os.path.join(output_dir, REPORT_FILE), self.to_dict())}
        md = os.path.join(output_dir, MARKDOWN_FILE)
        with open(md, "w", encoding="utf-8") as f:
            f.write(self.to_markdown())
        paths["markdown"] = md
        return paths


def decide_verdict(epsilon: float, updated_upper: float, base_mean: float, base_lower: float) -> str:
    """``"not_reached"`` when ``updated_upper > epsilon``; else ``"vacuous"`` when the base model's held-out mass
    or its lower bound is at most epsilon (nothing to suppress), else ``"reached"``."""
    if not updated_upper <= epsilon:
        return "not_reached"
    return "vacuous" if base_mean <= epsilon or base_lower <= epsilon else "reached"


def build_report(
    fs: ForbiddenSet,
    vocab: int,
    tilt: TiltSpec,
    opts: Any,
    updated: MassResult,
    base: MassResult,
    stats: TiltStatistics,
    ppl_updated: PerplexityResult | None,
    ppl_base: PerplexityResult | None,
) -> AuditReport:
    """The report of the audit's measurements: bounds and verdict (what each number means: :data:`DEFINITIONS`).

    ``opts`` is the audit's :class:`~etu_hf.evaluation.audit.AuditOptions` (``wilson_max_n``,
    ``bootstrap_samples``, ``seed``); the caller fills in retain sequences, samples, activations and sources."""
    eps = tilt.epsilon
    n_wilson = min(updated.n_positions, opts.wilson_max_n)
    bounds = {
        name: sequence_upper_bound(m.sequence_sums, m.sequence_counts, seed=opts.seed)
        for name, m in (("base", base), ("updated", updated))
    }
    if not np.array_equal(base.sequence_counts, updated.sequence_counts):
        raise ValueError("build_report: the base and unlearned masses were not measured on the same positions")
    base_lower = sequence_lower_bound(base.sequence_sums, base.sequence_counts, seed=opts.seed)
    ratio_upper = paired_ratio_upper(
        updated.sequence_sums,
        base.sequence_sums,
        base.sequence_counts,
        samples=opts.bootstrap_samples,
        seed=opts.seed,
    )
    slack = pinsker_slack(stats.delta)
    per_model = {}
    for name, m in (("base", base), ("updated", updated)):
        per_model[f"{name}_p_S"] = m.mean
        per_model[f"{name}_p_S_upper"] = bounds[name].upper
        per_model[f"{name}_p_S_token_wilson_upper"] = wilson_upper(m.mean, n_wilson)
        # below MIN_SEQUENCES resampling says nothing (2 sequences: 3 distinct resamples), as for the bounds
        per_model[f"{name}_p_S_bootstrap_95"] = (
            bootstrap_ratio_interval(m.sequence_sums, m.sequence_counts, opts.bootstrap_samples, opts.seed)
            if bounds[name].sequences >= MIN_SEQUENCES
            else (math.nan, math.nan)
        )
        per_model[f"share_above_epsilon_{name}"] = m.share_above(eps)
    perplexity = {
        "retain_positions": ppl_updated.n_positions if ppl_updated else None,
        "base_perplexity": ppl_base.perplexity if ppl_base else None,
        "updated_perplexity": ppl_updated.perplexity if ppl_updated else None,
        "perplexity_ratio": ppl_updated.perplexity / ppl_base.perplexity if ppl_base else None,
    }
    return AuditReport(
        epsilon=eps,
        V_S_size=len(fs),
        V_S_fraction=len(fs) / vocab,
        vocab_size=vocab,
        forget_sequences=updated.n_sequences,
        forget_positions=updated.n_positions,
        upper_bound=bounds["updated"].to_dict(),
        token_wilson_n=n_wilson,
        wilson_max_n=opts.wilson_max_n,
        bootstrap_samples=opts.bootstrap_samples,
        suppression_ratio=updated.mean / base.mean if base.mean > 0 else math.nan,
        delta=stats.delta,
        mean_target_mass=stats.mean_target_mass,
        pinsker_bound=eps + slack,
        pinsker_bound_from_target=stats.mean_target_mass + slack,
        retain_sequences=None,
        target_achieved=bool(updated.mean <= eps),
        target_achieved_upper=bool(bounds["updated"].upper <= eps),
        base_p_S_lower=base_lower,
        suppression_ratio_upper=ratio_upper,
        verdict=decide_verdict(eps, bounds["updated"].upper, base.mean, base_lower),
        clamped_share=stats.clamped_share,
        tilt=tilt.to_dict(),
        seconds=0.0,
        **per_model,
        **perplexity,
    )
