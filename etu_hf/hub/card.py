"""The model card of a finished etu-hf run: what was unlearned, with which settings, and how well.

Built with huggingface_hub's :class:`~huggingface_hub.ModelCard` and
:class:`~huggingface_hub.ModelCardData` (as TRL's trainers build theirs), from the files a run writes
(docs/artifacts.md): ``metrics.json``, ``suppression_report.json``, ``V_S.ids.json``, ``args.json``,
``adapter_config.json`` or ``config.json``, and the plots when present. The files are read directly
with :func:`json.load`, so the card needs nothing but the folder.
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


def verdict(numbers: dict[str, Any]) -> str:
    """One line: "reached" only when the sequence-level upper bound ``updated_p_S_upper`` is at most
    epsilon (``target_achieved_upper``); the point estimate alone is never enough."""
    eps = _fmt(numbers.get("epsilon"), "g")
    upper = numbers.get("updated_p_S_upper")
    mean = numbers.get("updated_p_S")
    where = f"{numbers.get('forget_positions', 'n/a')} positions in {numbers.get('forget_sequences', 'n/a')} "
    where += "held-out sequences"
    if numbers.get("target_achieved_upper") is True:
        return f"target pi_theta(S) <= {eps}: **reached** (upper bound {_fmt(upper)}); {where}"
    if upper is None:
        return f"target pi_theta(S) <= {eps}: **not established**: the audit has no upper bound; {where}"
    if numbers.get("target_achieved"):
        return (
            f"target pi_theta(S) <= {eps}: **NOT reached**: the point estimate {_fmt(mean)} is below epsilon "
            f"but its upper bound {_fmt(upper)} is not; {where}"
        )
    return f"target pi_theta(S) <= {eps}: **NOT reached** (point estimate {_fmt(mean)}); {where}"


def audit_rows(numbers: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The audit table: ``(measure, base, unlearned, notes)`` rows, numbers as in the report."""
    eps = numbers.get("epsilon")
    rows = [
        (
            "held-out forget mass on V_S",
            _fmt(numbers.get("base_p_S")),
            _fmt(numbers.get("updated_p_S")),
            f"target <= {_fmt(eps, 'g')}",
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
        rows.append(("delta = KL(model ‖ target)", "", _fmt(numbers.get("delta")), notes))
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
    rows.append(("optimiser steps", _fmt(m.get("steps"), "d") if isinstance(m.get("steps"), int) else "n/a"))
    if run.is_adapter:
        cfg = run.adapter_config or {}
        rows.append(
            (
                "adapter",
                f"{cfg.get('peft_type', 'PEFT')} r={cfg.get('r', '?')}, alpha={cfg.get('lora_alpha', '?')}",
            )
        )
    return rows


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
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


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
    intro = f"This is {kind} trained with etu-hf's Exponential-Tilted Unlearning"
    intro += f" (ETU) from {base_text}." if base_text else " (ETU)."
    eps = run.metrics.get("epsilon")
    intro += (
        f" At contexts like its forget data it puts at most epsilon = {_fmt(eps, 'g')} probability on a forbidden "
        "token set V_S, and elsewhere stays as close as possible to the base model: its target is the base model "
        "exponentially tilted away from V_S, `q(y|x) ∝ pi_base(y|x) · exp(-lambda · 1[y ∈ V_S])`."
    )
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

    body += ["", "## ETU settings", ""]
    body += _table(("setting", "value"), _settings_rows(run))

    body += ["", "## Audit on held-out data", ""]
    numbers = audit_numbers(run)
    if numbers is None:
        body.append(
            "This run was not audited: no `suppression_report.json`. `etu-hf audit` measures the held-out mass on "
            "V_S, its sequence-level upper bound and the retain perplexity."
        )
    else:
        body += [verdict(numbers), ""]
        body += _table(("measure", "base", "unlearned", "notes"), audit_rows(numbers))
        body += [
            "",
            "Masses are means over the scored positions of held-out forget text never trained on; the upper bound "
            "is a one-sided 95% bound with the sequence as the unit, and the target counts as reached only when "
            "it is at most epsilon. Perplexity is on held-out retain text.",
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
