r"""COMPARE.json, COMPARE.md and pareto.png of a comparison, and the checks of issue 13's goal.

Goal checks (:func:`goal_checks`), all computed from the runs' aggregates:

- ``etu_on_front``: at least one ETU run (any variant: ``etu``, ``etu-words``, ...) is on the Pareto front of
  (forget_quality, model_utility);
- ``etu_forget_prob_le_0.10_at_utility_ge_0.70``: some ETU run has ``forget_prob <= 0.10`` and
  ``model_utility >= 0.70`` (issue 20's goal on this benchmark);
- ``dominated_by_etu[m]``: for each run of method ``m`` (npo, graddiff), whether some ETU run has
  ``forget_quality >=`` and ``model_utility >=`` its own (weak dominance at equal or better utility);
- ``relearn``: per method, the mean over its runs of the *comeback*
  :math:`\Delta = \text{forget\_prob}_{\text{relearned}} - \text{forget\_prob}_{\text{unlearned}}` and the
  mean forget_prob after the attack; ``etu_less_comeback_than_npo`` compares ETU's mean Δ with NPO's.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etu_hf.compare.pareto import plot_pareto
from etu_hf.compare.seeds import finite_number, seeds_label, seeds_text

#: Columns of the markdown table: (aggregate key, header).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("forget_quality", "forget quality"),
    ("model_utility", "model utility"),
    ("forget_prob", "forget prob"),
    ("forget_rouge", "forget ROUGE-L"),
    ("forget_truth_ratio", "forget truth ratio"),
    ("retain_prob", "retain prob"),
    ("privleak_mink", "privleak (Min-K%)"),
    ("forget_vs_mass", "V_S mass"),
)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def goal_checks(result: dict[str, Any]) -> dict[str, Any]:
    """The goal of issue 13 checked on a COMPARE.json content (see the module docstring)."""
    runs = result["runs"]
    etu = [r for r in runs if r["method"] == "etu" or r["method"].startswith("etu-")]
    out: dict[str, Any] = {"etu_on_front": any(r.get("pareto") for r in etu) if etu else None}
    probs = [(finite_number(r["eval"].get("forget_prob")), finite_number(r["eval"].get("model_utility"))) for r in etu]
    out["etu_forget_prob_le_0.10_at_utility_ge_0.70"] = (
        any(p is not None and u is not None and p <= 0.10 and u >= 0.70 for p, u in probs) if etu else None
    )

    def axes(r: dict[str, Any]) -> tuple[float | None, float | None]:
        return finite_number(r["eval"].get("forget_quality")), finite_number(r["eval"].get("model_utility"))

    dominated: dict[str, list[dict[str, Any]]] = {}
    for method in ("npo", "graddiff"):
        rows = []
        for r in (r for r in runs if r["method"] == method):
            x, y = axes(r)
            by = [
                e["label"]
                for e in etu
                if None not in (x, y, *axes(e)) and axes(e)[0] >= x and axes(e)[1] >= y  # type: ignore[operator]
            ]
            rows.append({"label": r["label"], "dominated_by": by})
        if rows:
            dominated[method] = rows
    out["dominated_by_etu"] = dominated

    relearn: dict[str, dict[str, float | None]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method and r.get("relearned")]
        if not rows:
            continue
        before = [finite_number(r["eval"].get("forget_prob")) for r in rows]
        after = [finite_number(r["relearned"]["eval"].get("forget_prob")) for r in rows]
        deltas = [a - b if a is not None and b is not None else None for a, b in zip(after, before, strict=True)]
        relearn[method] = {"mean_comeback": _mean(deltas), "mean_forget_prob_after": _mean(after)}
    out["relearn"] = relearn
    if "etu" in relearn and "npo" in relearn:
        e, n = relearn["etu"]["mean_comeback"], relearn["npo"]["mean_comeback"]
        out["etu_less_comeback_than_npo"] = None if e is None or n is None else e < n
    return out


def table_cell(v: Any) -> str:
    v = finite_number(v)
    if v is None:
        return "n/a"
    return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.3f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per run (and the target and retain models first), the Pareto front marked with *."""
    relearn = any(r.get("relearned") for r in result["runs"])
    head = ["method", "setting", *[h for _, h in COLUMNS], "front"]
    if relearn:
        head += ["forget prob after relearn", "forget quality after relearn"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, agg in result["references"].items():
        cells = [f"({name} model)", "", *[table_cell(agg.get(k)) for k, _ in COLUMNS], ""]
        lines.append("| " + " | ".join(cells + ([""] * 2 if relearn else [])) + " |")
    for r in result["runs"]:
        cells = [
            r["method"],
            r["label"],
            *[table_cell(r["eval"].get(k)) for k, _ in COLUMNS],
            "*" if r.get("pareto") else "",
        ]
        if relearn:
            ev = (r.get("relearned") or {}).get("eval", {})
            cells += [table_cell(ev.get("forget_prob")), table_cell(ev.get("forget_quality"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def etu_args_text(settings: dict[str, Any]) -> str:
    """``", with <etu_args>"`` when the comparison gave ETU runs extra arguments, else ``""``."""
    return f", with {settings['etu_args']}" if settings.get("etu_args") else ""


def shared_vs_text(result: dict[str, Any]) -> str:
    """What the comparison's own V_S is: the shared PMI set that ``etu-pmi`` trains on (and that the built-in
    benchmark's V_S mass column measures every run on); every other ETU variant builds its own (its run folder's
    ``V_S.ids.json``), so this size is not that run's V_S."""
    return (
        f"shared V_S (PMI pieces, for `etu-pmi`; the other ETU runs build their own, in their run folders): "
        f"{result['vs_size']} tokens"
    )


def settings_text(result: dict[str, Any]) -> str:
    s = result["settings"]
    return (
        f"Benchmark {result['benchmark']['name']}; target {result['models']['target']}, retain model "
        f"{result['models']['retain']}; every run: LoRA r={s['lora_r']} alpha={s['lora_alpha']} on "
        f"{s['lora_target_modules']}, {s['max_steps']} steps of {s['per_device_train_batch_size']} forget questions, "
        f"constant learning rate, retain term {s['retain_loss_type']} x {s['retain_weight']} (not for ga), "
        f"{seeds_label(s)}; ETU without the adaptive controller at epsilon in {{{s['etu_epsilons']}}}, lr "
        f"{s['etu_learning_rate']:g}{etu_args_text(s)}; "
        f"baselines at lr in {{{s['learning_rates']}}}; {shared_vs_text(result)}."
        + (
            f" Relearning attack: {s['relearn_steps']} steps on {s['relearn_fraction']:.0%} of the forget "
            "questions, lr "
            f"{s['relearn_learning_rate']:g}."
            if s["relearn_steps"]
            else ""
        )
    )


def write_outputs(result: dict[str, Any], output_dir: str) -> dict[str, str]:
    """Write COMPARE.json, COMPARE.md and pareto.png; returns their paths."""
    paths = {
        k: os.path.join(output_dir, n)
        for k, n in (("json", "COMPARE.json"), ("md", "COMPARE.md"), ("png", "pareto.png"))
    }
    with open(paths["json"] + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, sort_keys=False, default=str)
    os.replace(paths["json"] + ".tmp", paths["json"])
    rows = [
        {"method": r["method"], "label": r["label"], "pareto": r.get("pareto"), **r["eval"]} for r in result["runs"]
    ]
    refs = [{"label": name, **agg} for name, agg in result["references"].items()]
    plot_pareto(rows, paths["png"], references=refs, title="forget quality vs model utility (front: dashed)")
    text = "# Unlearning comparison\n\n" + settings_text(result) + "\n\n" + markdown_table(result)
    text += seeds_text(result, COLUMNS, table_cell) + "\n\n"
    text += "Goal checks:\n\n```json\n" + json.dumps(result["goals"], indent=2) + "\n```\n"
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(text)
    return paths
