"""One markdown table of several :class:`~etu_hf.evaluation.unlearning.evaluate.UnlearningEval` results side by
side (one column per model), with how to read each row and why a value is missing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from etu_hf.evaluation.unlearning.registry import AGGREGATES, better_of


def format_value(name: str, value: float | None) -> str:
    """PrivLeak in percent with a sign, tiny values (p-values) in scientific notation, the rest to 4 decimals;
    ``"n/a"`` for ``None``."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if name.startswith("privleak"):
        return f"{value:+.2f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}"


def format_table(evals: Mapping[str, Any]) -> str:
    """Markdown: a row per aggregate (in report order, those any result has), a column per result
    (``{column name: UnlearningEval}``), and the notes of the missing values below."""
    if not evals:
        return ""
    names = list(evals)
    present = {k for e in evals.values() for k in e.aggregates}
    rows = [k for k in AGGREGATES if k in present] + sorted(present - set(AGGREGATES))
    lines = [
        "| metric | better | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for key in rows:
        cells = [format_value(key, evals[n].aggregates.get(key)) for n in names]
        lines.append(f"| {key} | {better_of(key)} | " + " | ".join(cells) + " |")
    notes: dict[tuple[str, str], list[str]] = {}
    for n in names:
        for key in rows:
            why = evals[n].notes.get(key)
            if evals[n].aggregates.get(key) is None and why:
                notes.setdefault((n, why), []).append(key)
    if notes:
        lines.append("")
        lines.extend(f"- {n}: n/a {', '.join(keys)}: {why}" for (n, why), keys in notes.items())
    return "\n".join(lines)
