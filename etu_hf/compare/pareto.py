r"""The Pareto front of forget efficacy against model utility, and its plot.

A point :math:`a` *dominates* :math:`b` when it is at least as good on both axes and strictly better
on one: :math:`x_a \ge x_b,\ y_a \ge y_b,\ (x_a, y_a) \ne (x_b, y_b)` (both axes "higher is better":
forget quality, a KS p-value, and model utility). The front is the set of points no other point
dominates. Points with a missing value on either axis are never on the front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _ok(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` dominates ``b``: ``a >= b`` on both axes and ``a != b`` (higher is better on both)."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """For each point, whether it is on the Pareto front (not dominated by any other valid point)."""
    valid = [_ok(x) and _ok(y) for x, y in points]
    out = []
    for i, p in enumerate(points):
        if not valid[i]:
            out.append(False)
            continue
        out.append(not any(valid[j] and j != i and dominates(points[j], p) for j in range(len(points))))  # type: ignore[arg-type]
    return out


def plot_pareto(
    rows: Sequence[dict[str, Any]],
    path: str,
    *,
    x: str = "forget_quality",
    y: str = "model_utility",
    title: str = "",
    references: Sequence[dict[str, Any]] = (),
) -> str:
    """Scatter ``rows`` (dicts with ``method``, ``label``, ``x``, ``y`` keys and ``pareto``) with one
    colour per method, the front joined by a line, the ``references`` (target and retain models) as
    black markers; the x axis is logarithmic when ``x`` is ``forget_quality`` (p-values span decades).
    Writes a PNG to ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab10")
    for k, method in enumerate(methods):
        pts = [r for r in rows if r["method"] == method and _ok(r.get(x)) and _ok(r.get(y))]
        ax.scatter([r[x] for r in pts], [r[y] for r in pts], color=cmap(k % 10), label=method, s=40, zorder=3)
        for r in pts:
            ax.annotate(str(r.get("label", "")), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((r[x], r[y]) for r in rows if r.get("pareto"))
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, zorder=2, label="Pareto front")
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=140, facecolors="none", edgecolors="k", zorder=4)
    for ref in references:
        if _ok(ref.get(x)) and _ok(ref.get(y)):
            ax.scatter([ref[x]], [ref[y]], marker="*", color="black", s=120, zorder=5)
            ax.annotate(
                str(ref.get("label", "")), (ref[x], ref[y]), fontsize=8, xytext=(4, -10), textcoords="offset points"
            )
    if x == "forget_quality":
        ax.set_xscale("log")
    ax.set_xlabel(
        x.replace("_", " ") + (" (KS p-value vs the retain model; higher = closer)" if x == "forget_quality" else "")
    )
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title or "forget efficacy vs model utility")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
