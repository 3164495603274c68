"""The settings sections of a run's model card: what was unlearned (V_S) and with which method settings.

ETU runs list the tilt (epsilon, lambda mode, closed-form lambda, p_S, the controller's offset and eps');
baseline runs (docs/baselines.md) their forget term, own hyperparameters and retain term, with epsilon
only as the audit's reference.
"""

from __future__ import annotations

import math
from typing import Any

from etu_hf.hub.card_audit import format_value
from etu_hf.hub.run_files import RunFiles

#: The baselines of ``etu-hf unlearn --method`` (docs/baselines.md; etu_hf.training.baselines, which this layer
#: does not import): name, forget term, and the args.json fields of its own hyperparameters with their labels.
BASELINE_METHODS: dict[str, tuple[str, str, tuple[tuple[str, str], ...]]] = {
    "ga": ("Gradient Ascent (GA)", "mean over forget tokens of `log pi_theta(y|x)`, minimised (the NLL raised)", ()),
    "graddiff": ("Gradient Difference (GradDiff)", "gradient ascent on the forget tokens, plus a retain term", ()),
    "npo": (
        "NPO (Zhang et al., 2024)",
        "mean over forget sequences of `-(2/beta) log sigmoid(-beta (log pi_theta(y|x) - log pi_base(y|x)))`",
        (("npo_beta", "beta (`npo_beta`)"),),
    ),
    "simnpo": (
        "SimNPO (Fan et al., 2024)",
        "mean over forget sequences of `-(2/beta) log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma)`",
        (("npo_beta", "beta (`npo_beta`)"), ("simnpo_gamma", "margin gamma (`simnpo_gamma`)")),
    ),
    "undial": (
        "UNDIAL (Dong et al., 2024)",
        "mean over forget tokens of `KL(t ‖ pi_theta)`, `t = softmax(z_base - gamma e_y)`: the base distribution "
        "with the logit of the token seen lowered by gamma",
        (("undial_gamma", "strength gamma (`undial_gamma`)"),),
    ),
}

#: Methods whose loss has no retain term (the retain data then only sets V_S's PMI background).
NO_RETAIN_TERM = frozenset({"ga"})


def forbidden_set_lines(forbidden: dict[str, Any], max_tokens: int = 20) -> list[str]:
    size = forbidden.get("size", len(forbidden.get("ids") or []))
    frac = forbidden.get("fraction_of_vocab")
    method = forbidden.get("method", "custom")
    head = f"- **V_S**: {size} tokens"
    if isinstance(frac, (int, float)):
        head += f" ({frac:.2%} of a {forbidden.get('vocab_size', '?')}-token vocabulary)"
    how = {
        "pmi": "the tokens most over-represented in the forget text against the retain text (PMI)",
        "frequency": "the most frequent tokens of the forget text",
        "words": "forbidden words (scored forget vs retain by G2 and a log ratio, or given by the user), forbidden "
        "per context: their shared first pieces everywhere, their other pieces only inside the word",
        "list": "a given list of ids",
        "custom": "given by the user",
    }.get(method, method)
    head += f", built by `{method}`: {how}"
    lines = [head]
    params = forbidden.get("parameters") or {}
    if params:
        shown = ", ".join(f"`{k}={v}`" for k, v in params.items() if not isinstance(v, (dict, list)))
        lines.append(f"  - parameters: {shown}")
    if forbidden.get("span_added"):
        lines.append(f"  - span masking added {len(forbidden['span_added'])} tokens")
    tokens, scores = forbidden.get("tokens"), forbidden.get("scores")
    if tokens:
        order = list(range(len(tokens)))
        if scores and len(scores) == len(tokens):
            order.sort(key=lambda i: -(scores[i] if isinstance(scores[i], (int, float)) else -math.inf))
        shown = [tokens[i] for i in order[:max_tokens] if tokens[i] is not None]
        label = "highest-scoring" if scores else "first"
        lines.append(f"  - {label} tokens: " + ", ".join(f"`{t}`" for t in shown))
    words = forbidden.get("words") or []
    if words:
        shown = [
            f"`{w['word']}` ({' + '.join(w['pieces'][-1]) if w.get('pieces') else '?'})" for w in words[:max_tokens]
        ]
        more = f" and {len(words) - max_tokens} more" if len(words) > max_tokens else ""
        lines.append(f"  - {len(words)} forbidden words (word: pieces of its spaced form): " + ", ".join(shown) + more)
    cont = forbidden.get("continuations")
    if cont:
        lines.append(
            "  - forbidden continuations: on forget text, S(x) also holds the text's own next token unless it is one "
            + (
                f"of the tokenizer's first {len(cont.get('common_ids') or [])} ids (no retain data)"
                if cont.get("common_source") == "tokenizer"
                else f"of the {cont.get('skip_top_k')} most frequent retain tokens"
            )
            + (" making a word alone" if cont.get("per_word") and "common_ids" in cont else "")
            + ", a special token or a piece without a letter"
            + ("; only the first such piece of each word (the word is capped there)" if cont.get("per_word") else "")
        )
    coverage = params.get("coverage")
    if isinstance(coverage, (int, float)):
        lines.append(f"  - S(x) holds the next token at {coverage:.1%} of the forget positions")
    return lines


def etu_settings_rows(run: RunFiles) -> list[tuple[str, str]]:
    """ETU's settings: epsilon, the lambda mode, the closed-form lambda, p_S, the controller and its offset."""
    m, a = run.metrics, run.args
    lam = m.get("lambda") or {}
    mode = lam.get("mode", a.get("lambda_mode"))
    epsilon = format_value(m.get("epsilon", a.get("epsilon")), "g")
    ratio = m.get("epsilon_ratio", a.get("epsilon_ratio"))
    if ratio is not None:  # epsilon set as a share of the base mass (--epsilon_ratio)
        epsilon += f" = {format_value(ratio, 'g')} x p_S {format_value(m.get('epsilon_base_p_S'))} (`--epsilon_ratio`)"
    rows = [
        ("epsilon (target mass on V_S)", epsilon),
        ("lambda mode", f"`{mode}`" if mode else "n/a"),
        ("closed-form lambda `logit(p_S) - logit(epsilon)`", format_value(lam.get("closed_form_global"))),
        ("base mass p_S on the training forget data", format_value(m.get("base_p_S"))),
    ]
    if lam.get("adaptive"):
        rows.append(("adaptive controller", f"on, {lam.get('controller_updates', 0)} held-out updates"))
    else:
        rows.append(("adaptive controller", "off"))
    rows.append(("final controller offset o", format_value(lam.get("offset"))))
    if mode == "global":
        rows.append(("final lambda (global)", format_value(lam.get("global_value"))))
    else:
        rows.append(
            ("per-context target eps' = sigmoid(logit(epsilon) - o)", format_value(lam.get("effective_epsilon")))
        )
    if a.get("lambda_floor"):
        rows.append(("lambda floor (`--lambda_floor`): odds of S(x) divided by at least", f"e^{a['lambda_floor']:g}"))
    if a.get("lambda_max") is not None:
        rows.append(("lambda clamp", format_value(a.get("lambda_max"), "g")))
    if a.get("retain_weight") is not None:
        rows.append(("retain weight", format_value(a.get("retain_weight"), "g")))
    return rows + budget_rows(run)


def budget_rows(run: RunFiles) -> list[tuple[str, str]]:
    steps = run.metrics.get("steps")
    rows = [("optimiser steps", format_value(steps, "d") if isinstance(steps, int) else "n/a")]
    if run.is_adapter:
        cfg = run.adapter_config or {}
        rows.append(
            (
                "adapter",
                f"{cfg.get('peft_type', 'PEFT')} r={cfg.get('r', '?')}, alpha={cfg.get('lora_alpha', '?')}",
            )
        )
    return rows


def retain_term(run: RunFiles, method: str) -> str:
    """The retain term of a baseline in words: ``retain_weight`` times ``KL(pi_base || pi_theta)`` (``kl``) or the
    retain NLL (``nll``) on paired retain text; none for GA, with weight 0, or without retain data."""
    a = run.args
    if method in NO_RETAIN_TERM:
        return f"none (`{method}` has none; the retain data only sets V_S's PMI background)"
    weight = a.get("retain_weight")
    if weight == 0:
        return "off (`retain_weight` 0)"
    if "retain_corpora" in a and not a.get("retain_corpora"):
        return "none (no retain data)"
    kind = {"kl": "`kl`: KL(pi_base ‖ pi_theta)", "nll": "`nll`: the NLL"}.get(a.get("retain_loss_type"), "")
    if weight is None:
        return f"{kind} on retain text" if kind else "n/a"
    return f"{format_value(weight, 'g')} x {kind} on retain text" if kind else f"weight {format_value(weight, 'g')}"


def baseline_settings_rows(run: RunFiles, method: str) -> list[tuple[str, str]]:
    """A baseline's settings: the method and its forget term, its own hyperparameters (args.json), its retain
    term, the mass on V_S it reached in training, and epsilon as what it is for it: the audit's reference."""
    m, a = run.metrics, run.args
    name, loss, hyper = BASELINE_METHODS.get(method, (f"`{method}`", "n/a", ()))
    rows = [("method", f"`{method}`: {name}"), ("forget term", loss)]
    rows += [(label, format_value(a.get(key), "g")) for key, label in hyper]
    rows.append(("retain term", retain_term(run, method)))
    final = (m.get("method_metrics") or {}).get("final") or {}
    rows.append(
        ("mean forget-token NLL, last logging window (training data)", format_value(final.get(f"{method}/forget_nll")))
    )
    rows.append(("mean mass on V_S, last logging window (training data)", format_value(m.get("final_training_pi_s"))))
    rows.append(("base mass p_S on the training forget data", format_value(m.get("base_p_S"))))
    rows.append(("audit reference epsilon (not trained toward)", format_value(m.get("epsilon", a.get("epsilon")), "g")))
    return rows + budget_rows(run)
