"""The registry of unlearning metrics: name -> what it needs (splits, passes, the retain model's result, a
V_S) and how its aggregates are computed from per-example values.

``--metrics a,b`` picks entries of :data:`METRICS` by name (:func:`resolve_metrics`); each entry's
``aggregate`` turns the per-example columns (:mod:`~etu_hf.evaluation.unlearning.scores`) into the flat
aggregates named in its ``outputs``, using the pure statistics of :mod:`~etu_hf.evaluation.unlearning.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from etu_hf.evaluation.unlearning import metrics as M
from etu_hf.ops.bounds import sequence_upper_bound

#: Per-example columns by split: ``{"forget": {"answer_prob": [...], ...}, ...}``.
PerExample = Mapping[str, Mapping[str, Sequence[Any]]]

#: The membership-inference attacks: name -> the per-example score column (higher = more member-like).
MIA_ATTACKS: dict[str, str] = {"loss": "mia_loss", "zlib": "mia_zlib", "mink": "mia_mink", "minkpp": "mia_minkpp"}

#: The attack whose PrivLeak is reported as ``privleak`` (MUSE's and open-unlearning's choice: Min-K%).
PRIVLEAK_ATTACK = "mink"


@dataclass(frozen=True)
class Metric:
    """One metric.

    ``needs`` maps each split to the passes it needs (:data:`~etu_hf.evaluation.unlearning.scores.PASSES`);
    ``reference``: it compares with the retain model's result; ``forbidden_set``: it needs V_S; ``outputs``:
    the aggregate names it writes; ``better``: how to read each output (same order);
    ``aggregate(per_example, reference)`` returns ``{output: value}`` (``reference``: the retain model's
    per-example columns, or None).
    """

    name: str
    description: str
    needs: dict[str, tuple[str, ...]]
    outputs: tuple[str, ...]
    better: tuple[str, ...]
    aggregate: Callable[[PerExample, PerExample | None], dict[str, float | None]] = field(repr=False)
    reference: bool = False
    forbidden_set: bool = False


def _values(per_example: PerExample, split: str, column: str) -> np.ndarray:
    """A numeric column as float64, ``None`` (a non-finite value) as NaN."""
    col = per_example.get(split, {}).get(column)
    if col is None:
        raise KeyError(f"{split}/{column}")
    return np.array([math.nan if v is None else float(v) for v in col], dtype=np.float64)


def _mean(per_example: PerExample, split: str, column: str) -> float:
    v = _values(per_example, split, column)
    return float(v.mean()) if v.size else math.nan


def _prob(pe: PerExample, ref: PerExample | None) -> dict[str, float | None]:
    return {"forget_prob": _mean(pe, "forget", "answer_prob"), "retain_prob": _mean(pe, "retain", "answer_prob")}


def _rouge(pe: PerExample, ref: PerExample | None) -> dict[str, float | None]:
    return {
        "forget_rouge": _mean(pe, "forget", "rouge_l_recall"),
        "retain_rouge": _mean(pe, "retain", "rouge_l_recall"),
    }


def _truth_ratio(pe: PerExample, ref: PerExample | None) -> dict[str, float | None]:
    return {
        "forget_truth_ratio": M.truth_ratio_closer_to_one(_values(pe, "forget", "truth_ratio")),
        "retain_truth_ratio": M.truth_ratio_true_better(_values(pe, "retain", "truth_ratio")),
    }


def _need(ref: PerExample | None, metric: str) -> PerExample:
    if ref is None:
        raise ValueError(f"{metric} compares with the retain model: pass its result as reference")
    return ref


def _forget_quality(pe: PerExample, ref: PerExample | None) -> dict[str, float | None]:
    ref = _need(ref, "forget_quality")
    ours, theirs = _values(pe, "forget", "truth_ratio"), _values(ref, "forget", "truth_ratio")
    return {"forget_quality": M.forget_quality(ours, theirs)}


def _model_utility(pe: PerExample, ref: PerExample | None) -> dict[str, float | None]:
    parts = [
        _mean(pe, "retain", "answer_prob"),
        _mean(pe, "retain", "rouge_l_recall"),
        M.truth_ratio_true_better(_values(pe, "retain", "truth_ratio")),
    ]
    return {"model_utility": M.harmonic_mean(parts)}


def _column_mean(output: str, column: str) -> Callable[[PerExample, PerExample | None], dict[str, float | None]]:
    return lambda pe, ref: {output: _mean(pe, "forget", column)}


def attack_auc(per_example: PerExample, attack: str) -> float:
    """AUC of ``attack`` (a key of :data:`MIA_ATTACKS`): forget rows are the members, holdout rows the non-members."""
    column = MIA_ATTACKS[attack]
    return M.auc(_values(per_example, "forget", column), _values(per_example, "holdout", column))


def _mia(attack: str) -> Callable[[PerExample, PerExample | None], dict[str, float | None]]:
    return lambda pe, ref: {f"mia_{attack}_auc": attack_auc(pe, attack)}


def _privleak(pe: PerExample, ref: PerExample | None) -> dict[str, float | None]:
    ref = _need(ref, "privleak")
    out: dict[str, float | None] = {
        f"privleak_{a}": M.privleak(attack_auc(pe, a), attack_auc(ref, a)) for a in MIA_ATTACKS
    }
    out["privleak"] = out[f"privleak_{PRIVLEAK_ATTACK}"]
    return out


def _vs_mass(pe: PerExample, ref: PerExample | None) -> dict[str, float | None]:
    sums, counts = _values(pe, "forget", "vs_mass_sum"), _values(pe, "forget", "vs_positions")
    bound = sequence_upper_bound(sums, counts)
    return {"forget_vs_mass": bound.mean, "forget_vs_mass_upper": bound.upper}


_ANSWER_FR = {"forget": ("answer",), "retain": ("answer",)}
_MIA_NEEDS = {"forget": ("answer",), "holdout": ("answer",)}

_LIST: list[Metric] = [
    Metric(
        "prob",
        "mean over a split of exp(-mean answer-token NLL) given the question (teacher-forced, answer tokens only)",
        _ANSWER_FR,
        ("forget_prob", "retain_prob"),
        ("lower", "higher"),
        _prob,
    ),
    Metric(
        "rouge",
        "mean ROUGE-L recall (LCS over words / reference words) of the greedy answer against the answer",
        {"forget": ("generation",), "retain": ("generation",)},
        ("forget_rouge", "retain_rouge"),
        ("lower", "higher"),
        _rouge,
    ),
    Metric(
        "truth_ratio",
        "R = geometric-mean normalised probability of the perturbed answers / that of the paraphrase; "
        "forget: mean min(R, 1/R); retain: mean max(0, 1 - R)",
        {"forget": ("truth_ratio",), "retain": ("truth_ratio",)},
        ("forget_truth_ratio", "retain_truth_ratio"),
        ("higher", "higher"),
        _truth_ratio,
    ),
    Metric(
        "forget_quality",
        "KS two-sample p-value between the model's and the retain model's forget truth ratios",
        {"forget": ("truth_ratio",)},
        ("forget_quality",),
        ("higher",),
        _forget_quality,
        reference=True,
    ),
    Metric(
        "model_utility",
        "harmonic mean of retain_prob, retain_rouge and retain_truth_ratio (TOFU's, on the retain split only)",
        {"retain": ("answer", "generation", "truth_ratio")},
        ("model_utility",),
        ("higher",),
        _model_utility,
    ),
    Metric(
        "exact_memorization",
        "mean over forget answers of the share of answer tokens the teacher-forced argmax predicts",
        {"forget": ("answer",)},
        ("forget_exact_memorization",),
        ("lower",),
        _column_mean("forget_exact_memorization", "exact_memorization"),
    ),
    Metric(
        "extraction_strength",
        "mean over forget answers of 1 - k*/|y|, k* the shortest prefix after which argmax completes the answer",
        {"forget": ("answer",)},
        ("forget_extraction_strength",),
        ("lower",),
        _column_mean("forget_extraction_strength", "extraction_strength"),
    ),
    *[
        Metric(
            f"mia_{attack}",
            f"AUC of the {label} score telling forget (members) from holdout (non-members); higher score = member",
            _MIA_NEEDS,
            (f"mia_{attack}_auc",),
            ("near retain",),
            _mia(attack),
        )
        for attack, label in (
            ("loss", "LOSS (-mean NLL)"),
            ("zlib", "zlib (-mean NLL / zlib bytes)"),
            ("mink", "Min-K% (k=40%)"),
            ("minkpp", "Min-K%++ (k=40%)"),
        )
    ],
    Metric(
        "privleak",
        "MUSE PrivLeak per attack: ((1-AUC) - (1-AUC_retain)) / (1-AUC_retain) x 100; privleak = Min-K%'s",
        _MIA_NEEDS,
        ("privleak", *[f"privleak_{a}" for a in MIA_ATTACKS]),
        ("near 0",) * (1 + len(MIA_ATTACKS)),
        _privleak,
        reference=True,
    ),
    Metric(
        "vs_mass",
        "ETU: mean mass on V_S over forget answer tokens, and its sequence-level 95% upper bound",
        {"forget": ("vs_mass",)},
        ("forget_vs_mass", "forget_vs_mass_upper"),
        ("lower", "lower"),
        _vs_mass,
        forbidden_set=True,
    ),
]

#: Every metric by name, in report order.
METRICS: dict[str, Metric] = {m.name: m for m in _LIST}

#: Every aggregate name, in report order.
AGGREGATES: tuple[str, ...] = tuple(o for m in _LIST for o in m.outputs)


def resolve_metrics(names: str | Sequence[str] | None, flag: str = "metrics") -> list[Metric]:
    """The metrics named (a comma-separated string or a list; ``None``, ``""`` or ``"all"``: all of them), in
    report order; ``ValueError`` naming ``flag`` and listing the known names for an unknown one."""
    if names is None or (isinstance(names, str) and names.strip().lower() in ("", "all")):
        return list(_LIST)
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in METRICS]
    if unknown:
        raise ValueError(
            f"{flag}: unknown metric(s) {', '.join(map(repr, unknown))}; known: {', '.join(METRICS)} (or 'all')"
        )
    if not wanted:
        raise ValueError(f"{flag}: no metric named; known: {', '.join(METRICS)} (or 'all')")
    return [m for m in _LIST if m.name in wanted]


def needed_passes(metrics: Sequence[Metric]) -> dict[str, tuple[str, ...]]:
    """For each split some metric needs, the passes over it (in the order of
    :data:`~etu_hf.evaluation.unlearning.scores.PASSES`)."""
    from etu_hf.evaluation.unlearning.scores import PASSES

    want: dict[str, set[str]] = {}
    for m in metrics:
        for split, passes in m.needs.items():
            want.setdefault(split, set()).update(passes)
    return {s: tuple(p for p in PASSES if p in want[s]) for s in ("forget", "retain", "holdout") if s in want}


def better_of(aggregate: str) -> str:
    """How to read an aggregate (the ``better`` of the metric that writes it)."""
    for m in _LIST:
        if aggregate in m.outputs:
            return m.better[m.outputs.index(aggregate)]
    return ""
