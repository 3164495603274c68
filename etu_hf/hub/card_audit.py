"""The audit section of a run's model card: the held-out numbers, the one-line verdict and the table.

The numbers are the report's (``suppression_report.json``, else the ``heldout`` section of
``metrics.json``); nothing is recomputed. For ETU the verdict says "reached" only when the sequence-level
upper bound is at most epsilon and the base model was above it (the report's ``verdict``; "nothing to
suppress" when it is ``"vacuous"``); for a baseline epsilon is only the audit's reference ("met"/"not met").
"""

from __future__ import annotations

import math
from typing import Any

from etu_hf.hub.run_files import RunFiles

#: The method of a run that records none (metrics.json of an ETU run has no ``method`` key).
ETU_METHOD = "etu"


def format_value(value: Any, spec: str = ".4f") -> str:
    """``value`` as the card prints it: numbers with ``spec``, booleans in lower case, ``None`` and
    non-finite numbers as ``n/a``."""
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "n/a"
        return format(value, spec)
    return str(value)


def format_share(value: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal (``n/a`` when not a number)."""
    return (
        format_value(value * 100, ".1f") + "%"
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else "n/a"
    )


def audit_numbers(run: RunFiles) -> dict[str, Any] | None:
    """The held-out audit in the report's key names: from ``suppression_report.json``, else from the
    ``heldout`` section of ``metrics.json``; ``None`` when the run was never audited."""
    if isinstance(run.report, dict) and "updated_p_S" in run.report:
        return dict(run.report)
    held = run.metrics.get("heldout")
    if not isinstance(held, dict) or "updated_p_S" not in held:
        return None
    out = dict(held)
    out.setdefault("share_above_epsilon_base", held.get("share_above_epsilon_before"))
    out.setdefault("share_above_epsilon_updated", held.get("share_above_epsilon_after"))
    out.setdefault("forget_positions", held.get("positions"))
    out.setdefault("forget_sequences", held.get("sequences"))
    return out


def run_method(run: RunFiles) -> str:
    """The run's unlearning method: metrics.json's ``method``, else args.json's, else ``"etu"`` (ETU runs
    record none)."""
    method = run.metrics.get("method") or run.args.get("method") or ETU_METHOD
    return str(method)


def verdict(numbers: dict[str, Any], method: str = ETU_METHOD) -> str:
    """One line: for ETU, "reached" only when the sequence-level upper bound ``updated_p_S_upper`` is at most
    epsilon (``target_achieved_upper``) and the report's ``verdict`` is not ``"vacuous"`` (the base model was
    already at or below epsilon: then "nothing to suppress", for every method); the point estimate alone is
    never enough. For another ``method``
    the same test against the same number, worded as a reference bound that is "met" or "not met": the
    method did not train toward it."""
    eps = format_value(numbers.get("epsilon"), "g")
    upper = numbers.get("updated_p_S_upper")
    mean = numbers.get("updated_p_S")
    where = f"{numbers.get('forget_positions', 'n/a')} positions in {numbers.get('forget_sequences', 'n/a')} "
    where += "held-out sequences"
    if method == ETU_METHOD:
        head, yes, no = f"target pi_theta(S) <= {eps}", "reached", "NOT reached"
    else:
        head = f"reference bound pi_theta(S) <= {eps} (ETU's target; `{method}` does not train toward it)"
        yes, no = "met", "not met"
    if numbers.get("verdict") == "vacuous":
        base, lower = numbers.get("base_p_S"), numbers.get("base_p_S_lower")
        return (
            f"{head}: **nothing to suppress at this epsilon**: the base model's held-out mass {format_value(base)} "
            f"(lower bound {format_value(lower)}) was already at or below epsilon, so the upper bound "
            f"{format_value(upper)} certifies nothing (`--epsilon_ratio` sets epsilon as a share of the base mass); "
            f"{where}"
        )
    if numbers.get("target_achieved_upper") is True:
        return f"{head}: **{yes}** (upper bound {format_value(upper)}); {where}"
    if upper is None:
        return f"{head}: **not established**: the audit has no upper bound; {where}"
    if numbers.get("target_achieved"):
        return (
            f"{head}: **{no}**: the point estimate {format_value(mean)} is below epsilon "
            f"but its upper bound {format_value(upper)} is not; {where}"
        )
    return f"{head}: **{no}** (point estimate {format_value(mean)}); {where}"


def audit_rows(numbers: dict[str, Any], method: str = ETU_METHOD) -> list[tuple[str, str, str, str]]:
    """The audit table: ``(measure, base, unlearned, notes)`` rows, numbers as in the report. For a method
    other than ETU, epsilon is called the reference and delta names ETU's target (it is the KL to the tilted
    target of the run's epsilon, which that method does not fit)."""
    eps = numbers.get("epsilon")
    etu = method == ETU_METHOD
    rows = [
        (
            "held-out forget mass on V_S",
            format_value(numbers.get("base_p_S")),
            format_value(numbers.get("updated_p_S")),
            f"{'target' if etu else 'reference'} <= {format_value(eps, 'g')}",
        ),
        (
            "upper bound (sequence-level, 95%)",
            format_value(numbers.get("base_p_S_upper")),
            format_value(numbers.get("updated_p_S_upper")),
            f"{numbers.get('forget_sequences', 'n/a')} sequences; the verdict's number",
        ),
        (
            "lower bound (sequence-level, 95%)",
            format_value(numbers.get("base_p_S_lower")),
            "",
            "the base model's: at or below epsilon, nothing to suppress",
        ),
        (
            "suppression ratio (unlearned / base)",
            "",
            format_value(numbers.get("suppression_ratio")),
            f"95% upper bound {format_value(numbers.get('suppression_ratio_upper'))} (paired bootstrap over sequences)"
            if numbers.get("suppression_ratio_upper") is not None
            else "",
        ),
        (
            "positions above epsilon",
            format_share(numbers.get("share_above_epsilon_base")),
            format_share(numbers.get("share_above_epsilon_updated")),
            "",
        ),
    ]
    if numbers.get("base_p_S_lower") is None:  # a report written before the lower bound existed
        rows = [r for r in rows if not r[0].startswith("lower bound")]
    if numbers.get("delta") is not None:
        notes = (
            f"Pinsker bound {format_value(numbers['pinsker_bound'])}"
            if numbers.get("pinsker_bound") is not None
            else ""
        )
        if etu:
            rows.append(("delta = KL(model ‖ target)", "", format_value(numbers.get("delta")), notes))
        else:
            notes = "ETU's target at epsilon, not this method's" + (f"; {notes}" if notes else "")
            rows.append(("delta = KL(model ‖ ETU target)", "", format_value(numbers.get("delta")), notes))
    if numbers.get("base_perplexity") is not None or numbers.get("updated_perplexity") is not None:
        rows.append(
            (
                "held-out retain perplexity",
                format_value(numbers.get("base_perplexity"), ".3f"),
                format_value(numbers.get("updated_perplexity"), ".3f"),
                f"ratio {format_value(numbers.get('perplexity_ratio'), '.3f')}",
            )
        )
    return rows
