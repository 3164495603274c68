r"""A comparison's runs summarised over seeds (``etu-hf compare --seeds``).

With several seeds every setting of the grid (a method at one epsilon or learning rate) runs once per seed. For
each setting that ran with more than one seed, :func:`over_seeds` gives, for every metric ``m`` of the runs'
``eval``, over the runs :math:`r_1..r_n` that have a finite value of ``m``:

- ``mean`` :math:`= \frac1n \sum_i m(r_i)`,
- ``min`` and ``max``: the smallest and largest :math:`m(r_i)`,

and ``seeds``, the seeds of the runs in grid order. The range (min to max) is what a reader needs to tell a
difference between settings from the noise of one seed: with 3 seeds it is not a confidence interval.
"""

from __future__ import annotations

import math
from typing import Any


def finite_number(v: Any) -> float | None:
    """``v`` as a float when it is a finite number, else ``None`` (a missing or NaN metric)."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def over_seeds(runs: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """One entry per setting (``method``, ``setting``) with runs at more than one seed, in grid order:
    ``{"method", "setting", "seeds", "mean": {key: ...}, "min": {...}, "max": {...}}`` over each key of
    ``keys`` in the runs' ``eval`` (a key no run has a finite value for is left out of the three dicts)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], r.get("setting") or r["label"]), []).append(r)
    out: list[dict[str, Any]] = []
    for (method, setting), rows in groups.items():
        if len(rows) < 2:
            continue
        entry: dict[str, Any] = {
            "method": method,
            "setting": setting,
            "seeds": [r.get("seed") for r in rows],
            "mean": {},
            "min": {},
            "max": {},
        }
        for key in keys:
            vals = [v for v in (finite_number(r["eval"].get(key)) for r in rows) if v is not None]
            if vals:
                entry["mean"][key] = sum(vals) / len(vals)
                entry["min"][key] = min(vals)
                entry["max"][key] = max(vals)
        out.append(entry)
    return out


def seeds_table(groups: list[dict[str, Any]], columns: tuple[tuple[str, str], ...], cell: Any) -> str:
    """A markdown table of :func:`over_seeds`: one row per setting, each cell ``mean [min, max]`` formatted by
    ``cell``; an empty string when there are no groups."""
    if not groups:
        return ""
    head = ["method", "setting", "seeds", *[h for _, h in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [g["method"], g["setting"], ",".join(str(s) for s in g["seeds"])]
        for key, _ in columns:
            cells.append(
                f"{cell(g['mean'][key])} [{cell(g['min'][key])}, {cell(g['max'][key])}]" if key in g["mean"] else "n/a"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_text(result: dict[str, Any], columns: tuple[tuple[str, str], ...], cell: Any) -> str:
    """The COMPARE.md paragraph of a result's ``over_seeds``: a heading line and :func:`seeds_table`, or ``""``
    when the comparison ran one seed."""
    table = seeds_table(result.get("over_seeds") or [], columns, cell)
    return f"\n\nOver seeds, each setting: mean [min, max] of its runs.\n\n{table}" if table else ""


def seeds_label(settings: dict[str, Any]) -> str:
    """``"seeds 0,1,2"`` (``--seeds``) or ``"seed 0"`` (``--seed``) of a comparison's recorded settings."""
    many = str(settings.get("seeds") or "").replace(" ", "")
    return f"seeds {many}" if many else f"seed {settings['seed']}"
