"""The model card of a finished etu-hf run: what was unlearned, with which settings, and how well.

Built with huggingface_hub's :class:`~huggingface_hub.ModelCard` and
:class:`~huggingface_hub.ModelCardData` (as TRL's trainers build theirs), from the files a run writes
(docs/artifacts.md): ``metrics.json``, ``suppression_report.json``, ``V_S.ids.json``, ``args.json``,
``adapter_config.json`` or ``config.json``, and the plots when present. The files are read directly
with :func:`json.load`, so the card needs nothing but the folder.

A baseline run (``etu-hf unlearn --method ga|graddiff|npo|simnpo|undial``, docs/baselines.md; its
metrics.json has ``method``) gets a card that names the method and its own hyperparameters instead of ETU's
tilt settings. Its audit table is the same (the mass on V_S is measured for every method), but epsilon is
only the audit's reference there: the verdict says whether the bound is *met*, never that a target was
*reached*, since a baseline does not train toward it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from etu_hf.artifacts.files import (
    HISTOGRAM_FILE,
    LAMBDA_PLOT_FILE,
    REPORT_FILE,
)
from etu_hf.hub.run_files import RunFiles, as_list, base_model_name, describe_corpus, is_hub_id, read_run, unique

CARD_FILE = "README.md"

#: Tags every etu-hf card carries; user tags are added after them.
DEFAULT_TAGS = ("etu-hf", "unlearning")

_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"

#: The method of a run that records none (metrics.json of an ETU run has no ``method`` key).
ETU_METHOD = "etu"

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


# ---------------------------------------------------------------------------------------------
# Number formatting
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "n/a"
        return format(value, spec)
    return str(value)


def _pct(value: Any) -> str:
    return _fmt(value * 100, ".1f") + "%" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------
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
    epsilon (``target_achieved_upper``); the point estimate alone is never enough. For another ``method``
    the same test against the same number, worded as a reference bound that is "met" or "not met": the
    method did not train toward it."""
    eps = _fmt(numbers.get("epsilon"), "g")
    upper = numbers.get("updated_p_S_upper")
    mean = numbers.get("updated_p_S")
    where = f"{numbers.get('forget_positions', 'n/a')} positions in {numbers.get('forget_sequences', 'n/a')} "
    where += "held-out sequences"
    if method == ETU_METHOD:
        head, yes, no = f"target pi_theta(S) <= {eps}", "reached", "NOT reached"
    else:
        head = f"reference bound pi_theta(S) <= {eps} (ETU's target; `{method}` does not train toward it)"
        yes, no = "met", "not met"
    if numbers.get("target_achieved_upper") is True:
        return f"{head}: **{yes}** (upper bound {_fmt(upper)}); {where}"
    if upper is None:
        return f"{head}: **not established**: the audit has no upper bound; {where}"
    if numbers.get("target_achieved"):
        return (
            f"{head}: **{no}**: the point estimate {_fmt(mean)} is below epsilon "
            f"but its upper bound {_fmt(upper)} is not; {where}"
        )
    return f"{head}: **{no}** (point estimate {_fmt(mean)}); {where}"


def audit_rows(numbers: dict[str, Any], method: str = ETU_METHOD) -> list[tuple[str, str, str, str]]:
    """The audit table: ``(measure, base, unlearned, notes)`` rows, numbers as in the report. For a method
    other than ETU, epsilon is called the reference and delta names ETU's target (it is the KL to the tilted
    target of the run's epsilon, which that method does not fit)."""
    eps = numbers.get("epsilon")
    etu = method == ETU_METHOD
    rows = [
        (
            "held-out forget mass on V_S",
            _fmt(numbers.get("base_p_S")),
            _fmt(numbers.get("updated_p_S")),
            f"{'target' if etu else 'reference'} <= {_fmt(eps, 'g')}",
        ),
        (
            "upper bound (sequence-level, 95%)",
            _fmt(numbers.get("base_p_S_upper")),
            _fmt(numbers.get("updated_p_S_upper")),
            f"{numbers.get('forget_sequences', 'n/a')} sequences; the verdict's number",
        ),
        (
            "suppression ratio (unlearned / base)",
            "",
            _fmt(numbers.get("suppression_ratio")),
            "",
        ),
        (
            "positions above epsilon",
            _pct(numbers.get("share_above_epsilon_base")),
            _pct(numbers.get("share_above_epsilon_updated")),
            "",
        ),
    ]
    if numbers.get("delta") is not None:
        notes = f"Pinsker bound {_fmt(numbers['pinsker_bound'])}" if numbers.get("pinsker_bound") is not None else ""
        if etu:
            rows.append(("delta = KL(model ‖ target)", "", _fmt(numbers.get("delta")), notes))
        else:
            notes = "ETU's target at epsilon, not this method's" + (f"; {notes}" if notes else "")
            rows.append(("delta = KL(model ‖ ETU target)", "", _fmt(numbers.get("delta")), notes))
    if numbers.get("base_perplexity") is not None or numbers.get("updated_perplexity") is not None:
        rows.append(
            (
                "held-out retain perplexity",
                _fmt(numbers.get("base_perplexity"), ".3f"),
                _fmt(numbers.get("updated_perplexity"), ".3f"),
                f"ratio {_fmt(numbers.get('perplexity_ratio'), '.3f')}",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------
def _vs_lines(forbidden: dict[str, Any], max_tokens: int = 20) -> list[str]:
    size = forbidden.get("size", len(forbidden.get("ids") or []))
    frac = forbidden.get("fraction_of_vocab")
    method = forbidden.get("method", "custom")
    head = f"- **V_S**: {size} tokens"
    if isinstance(frac, (int, float)):
        head += f" ({frac:.2%} of a {forbidden.get('vocab_size', '?')}-token vocabulary)"
    how = {
        "pmi": "the tokens most over-represented in the forget text against the retain text (PMI)",
        "frequency": "the most frequent tokens of the forget text",
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
    return lines


def _settings_rows(run: RunFiles) -> list[tuple[str, str]]:
    """ETU's settings: epsilon, the lambda mode, the closed-form lambda, p_S, the controller and its offset."""
    m, a = run.metrics, run.args
    lam = m.get("lambda") or {}
    mode = lam.get("mode", a.get("lambda_mode"))
    rows = [
        ("epsilon (target mass on V_S)", _fmt(m.get("epsilon", a.get("epsilon")), "g")),
        ("lambda mode", f"`{mode}`" if mode else "n/a"),
        ("closed-form lambda `logit(p_S) - logit(epsilon)`", _fmt(lam.get("closed_form_global"))),
        ("base mass p_S on the training forget data", _fmt(m.get("base_p_S"))),
    ]
    if lam.get("adaptive"):
        rows.append(("adaptive controller", f"on, {lam.get('controller_updates', 0)} held-out updates"))
    else:
        rows.append(("adaptive controller", "off"))
    rows.append(("final controller offset o", _fmt(lam.get("offset"))))
    if mode == "global":
        rows.append(("final lambda (global)", _fmt(lam.get("global_value"))))
    else:
        rows.append(("per-context target eps' = sigmoid(logit(epsilon) - o)", _fmt(lam.get("effective_epsilon"))))
    if a.get("lambda_max") is not None:
        rows.append(("lambda clamp", _fmt(a.get("lambda_max"), "g")))
    if a.get("retain_weight") is not None:
        rows.append(("retain weight", _fmt(a.get("retain_weight"), "g")))
    return rows + _budget_rows(run)


def _budget_rows(run: RunFiles) -> list[tuple[str, str]]:
    steps = run.metrics.get("steps")
    rows = [("optimiser steps", _fmt(steps, "d") if isinstance(steps, int) else "n/a")]
    if run.is_adapter:
        cfg = run.adapter_config or {}
        rows.append(
            (
                "adapter",
                f"{cfg.get('peft_type', 'PEFT')} r={cfg.get('r', '?')}, alpha={cfg.get('lora_alpha', '?')}",
            )
        )
    return rows


def _retain_term(run: RunFiles, method: str) -> str:
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
    return f"{_fmt(weight, 'g')} x {kind} on retain text" if kind else f"weight {_fmt(weight, 'g')}"


def _baseline_rows(run: RunFiles, method: str) -> list[tuple[str, str]]:
    """A baseline's settings: the method and its forget term, its own hyperparameters (args.json), its retain
    term, the mass on V_S it reached in training, and epsilon as what it is for it: the audit's reference."""
    m, a = run.metrics, run.args
    name, loss, hyper = BASELINE_METHODS.get(method, (f"`{method}`", "n/a", ()))
    rows = [("method", f"`{method}`: {name}"), ("forget term", loss)]
    rows += [(label, _fmt(a.get(key), "g")) for key, label in hyper]
    rows.append(("retain term", _retain_term(run, method)))
    final = (m.get("method_metrics") or {}).get("final") or {}
    rows.append(("mean forget-token NLL, last logging window (training data)", _fmt(final.get(f"{method}/forget_nll"))))
    rows.append(("mean mass on V_S, last logging window (training data)", _fmt(m.get("final_training_pi_s"))))
    rows.append(("base mass p_S on the training forget data", _fmt(m.get("base_p_S"))))
    rows.append(("audit reference epsilon (not trained toward)", _fmt(m.get("epsilon", a.get("epsilon")), "g")))
    return rows + _budget_rows(run)


def _versions() -> str:
    out = []
    for pkg in ("etu-hf", "transformers", "peft", "torch", "huggingface_hub"):
        try:
            out.append(f"- {pkg}: {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    return "\n".join(out)


def _is_demo_model(base: str | None) -> bool:
    tail = os.path.join("etu_hf", "demo", "assets", "tiny-llama")
    return bool(base) and os.path.normpath(os.path.abspath(os.path.expanduser(base))).endswith(tail)


def _loading_snippet(run: RunFiles, base: str | None, where: str) -> str:
    if run.is_adapter:
        imports = ""
        if is_hub_id(base):
            base_ref = f'"{base}"'
        elif _is_demo_model(base):
            imports, base_ref = "from etu_hf.demo import DEMO_MODEL_DIR\n", "DEMO_MODEL_DIR"
        elif base:
            base_ref = f'"path/to/{os.path.basename(os.path.normpath(base))}"  # the base model it was trained from'
        else:
            base_ref = '"BASE_MODEL"  # the base model it was trained from'
        return (
            "```python\n"
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"{imports}\n"
            f"base = AutoModelForCausalLM.from_pretrained({base_ref})\n"
            f'model = PeftModel.from_pretrained(base, "{where}")  # the unlearned adapter\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
            "```"
        )
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
        "```"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; a ``|`` in a cell (a formula's ``pi(y|x)``) is escaped, as GFM tables need even in code."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _intro(kind: str, base_text: str | None, method: str, eps: Any) -> str:
    """The card's first paragraph: what the model is, from what, and what its training aimed at."""
    source = f" from {base_text}." if base_text else "."
    if method == ETU_METHOD:
        return (
            f"This is {kind} trained with etu-hf's Exponential-Tilted Unlearning (ETU){source} At contexts like its "
            f"forget data it puts at most epsilon = {_fmt(eps, 'g')} probability on a forbidden token set V_S, and "
            "elsewhere stays as close as possible to the base model: its target is the base model exponentially "
            "tilted away from V_S, `q(y|x) ∝ pi_base(y|x) · exp(-lambda · 1[y ∈ V_S])`."
        )
    name, loss, _ = BASELINE_METHODS.get(method, (f"`{method}`", "", ()))
    return (
        f"This is {kind} trained with the unlearning baseline {name} (`etu-hf unlearn --method {method}`){source}"
        + (f" Its forget term: {loss}." if loss else "")
        + " It was not trained toward ETU's target (at most epsilon probability on a forbidden token set V_S): "
        f"etu-hf builds V_S and audits every method on it, so the audit below measures this model's mass on V_S "
        f"against epsilon = {_fmt(eps, 'g')} as a reference shared with ETU runs, not as a goal of this method."
    )


def build_model_card(
    run_dir: str,
    *,
    base_model: str | None = None,
    tags: Sequence[str] | None = None,
    dataset: str | Sequence[str] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
) -> ModelCard:
    """The model card of the finished run in ``run_dir``.

    Args:
        run_dir: the run's output folder (``V_S.ids.json`` and ``metrics.json`` required; the report,
            args.json, the adapter or model config and the plots are used when present).
        base_model: the base model's hub id (default: from adapter_config.json, args.json or config.json).
            It enters the YAML metadata only when it reads as a hub id, never as a local path.
        tags: tags added after ``etu-hf`` and ``unlearning`` (Trainer's ``tags=``).
        dataset: dataset name(s) for the metadata and the card (Trainer's ``dataset=``); default: the
            hub datasets among the run's ``forget_corpora`` and ``retain_corpora``.
        repo_id: where the card will live, for the loading snippet (default: the folder's name).
        model_name: the card's title (default: the repo name or the folder's name).
        license, language: metadata, when known.

    Returns:
        A :class:`huggingface_hub.ModelCard`; ``card.save(path)`` writes it, ``str(card)`` is the text.
    """
    run = read_run(run_dir)
    method = run_method(run)
    base = base_model_name(run, base_model)
    base_id = base if is_hub_id(base) else None
    folder_name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    where = repo_id or folder_name
    title = model_name or (repo_id.split("/")[-1] if repo_id else folder_name)

    forget_specs = as_list(run.args.get("forget_corpora"))
    retain_specs = as_list(run.args.get("retain_corpora"))
    forget = [describe_corpus(s) for s in forget_specs]
    retain = [describe_corpus(s) for s in retain_specs]
    user_datasets = as_list(dataset) if dataset is not None else []
    if user_datasets:
        datasets = unique(user_datasets)
    else:
        datasets = unique([d for _, d in forget + retain if d])

    all_tags = list(DEFAULT_TAGS)
    if run.is_adapter:
        all_tags.append("peft")
        peft_type = (run.adapter_config or {}).get("peft_type")
        if isinstance(peft_type, str):
            all_tags.append(peft_type.lower())
    if method != ETU_METHOD:
        all_tags.append(method)  # as the baseline trainers tag their models and hub commits
    all_tags += list(tags or [])
    card_data = ModelCardData(
        base_model=base_id,
        datasets=datasets or None,
        library_name="peft" if run.is_adapter else "transformers",
        license=license,
        language=list(language) if language is not None and not isinstance(language, str) else language,
        model_name=title,
        pipeline_tag="text-generation",
        tags=unique(all_tags),
    )

    body: list[str] = [f"# {title}", ""]
    kind = "a PEFT adapter" if run.is_adapter else "a causal language model"
    if base_id:
        base_text: str | None = f"[{base_id}](https://huggingface.co/{base_id})"
    elif _is_demo_model(base):
        base_text = "the etu-hf demo model (`etu_hf.demo.DEMO_MODEL_DIR`)"
    elif base:
        base_text = f"`{os.path.basename(os.path.normpath(base))}` (a local folder)"
    else:
        base_text = None
    intro = _intro(kind, base_text, method, run.metrics.get("epsilon"))
    body += [intro, "", "## What was unlearned", ""]
    if user_datasets and not forget:
        body.append("- **Data**: " + ", ".join(f"`{d}`" for d in user_datasets))
    if forget:
        body.append("- **Forget data**: " + ", ".join(text for text, _ in forget))
    if retain:
        body.append("- **Retain data** (kept): " + ", ".join(text for text, _ in retain))
    if not forget and not user_datasets:
        body.append("- **Forget data**: not recorded in this run folder")
    body += _vs_lines(run.forbidden)

    if method == ETU_METHOD:
        body += ["", "## ETU settings", ""]
        body += _table(("setting", "value"), _settings_rows(run))
    else:
        body += ["", "## Method settings", ""]
        body += _table(("setting", "value"), _baseline_rows(run, method))

    body += ["", "## Audit on held-out data", ""]
    numbers = audit_numbers(run)
    if numbers is None:
        body.append(
            "This run was not audited: no `suppression_report.json`. `etu-hf audit` measures the held-out mass on "
            "V_S, its sequence-level upper bound and the retain perplexity."
        )
    else:
        body += [verdict(numbers, method), ""]
        body += _table(("measure", "base", "unlearned", "notes"), audit_rows(numbers, method))
        bound = "the target counts as reached" if method == ETU_METHOD else "the reference bound counts as met"
        body += [
            "",
            "Masses are means over the scored positions of held-out forget text never trained on; the upper bound "
            f"is a one-sided 95% bound with the sequence as the unit, and {bound} only when it is at most epsilon. "
            "Perplexity is on held-out retain text.",
        ]
        if run.has_file(REPORT_FILE):
            body.append("")
            body.append("The full report: `suppression_report.json` (numbers and their definitions).")
    plots = [
        (LAMBDA_PLOT_FILE, "Held-out upper bound, epsilon and eps' during training"),
        (HISTOGRAM_FILE, "Per-position mass on V_S, base and unlearned"),
    ]
    shown = [(f, alt) for f, alt in plots if run.has_file(f)]
    if shown:
        body += ["", "## Plots", ""]
        for f, alt in shown:
            body += [f"![{alt}]({f})", ""]
        body.pop()

    body += ["", "## How to load", "", _loading_snippet(run, base, where), ""]
    body += [
        "V_S is in `V_S.ids.json` (`ids`: the token ids). With etu-hf installed, the model and V_S together:",
        "",
        f'```python\nfrom etu_hf import load_unlearned\n\nmodel, forbidden_set = load_unlearned("{where}")\n```',
        "",
        "## Framework versions",
        "",
        _versions(),
    ]
    return ModelCard.from_template(card_data, template_str=_TEMPLATE, body="\n".join(body))


def write_model_card(run_dir: str, **kwargs: Any) -> str:
    """Build the card of ``run_dir`` (see :func:`build_model_card`) and save it as ``README.md`` there.

    Returns the path written."""
    card = build_model_card(run_dir, **kwargs)
    path = os.path.join(run_dir, CARD_FILE)
    card.save(path)
    return path
