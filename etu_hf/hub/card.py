"""The model card of a finished etu-hf run: what was unlearned, with which settings, and how well.

Built with huggingface_hub's :class:`~huggingface_hub.ModelCard` and
:class:`~huggingface_hub.ModelCardData` (as TRL's trainers build theirs), from the files a run writes
(docs/artifacts.md): ``metrics.json``, ``suppression_report.json``, ``V_S.ids.json``, ``args.json``,
``adapter_config.json`` or ``config.json``, and the plots when present. The files are read directly
with :func:`json.load`, so the card needs nothing but the folder.

The sections come from two modules beside this one: :mod:`etu_hf.hub.card_settings` (V_S and the
method's settings) and :mod:`etu_hf.hub.card_audit` (the audit's numbers, verdict and table); this module
assembles the card (metadata, introduction, plots, loading snippet) and writes it.

A baseline run (``etu-hf unlearn --method ga|graddiff|npo|simnpo|undial``, docs/baselines.md; its
metrics.json has ``method``) gets a card that names the method and its own hyperparameters instead of ETU's
tilt settings. Its audit table is the same (the mass on V_S is measured for every method), but epsilon is
only the audit's reference there: the verdict says whether the bound is *met*, never that a target was
*reached*, since a baseline does not train toward it.
"""

from __future__ import annotations

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
from etu_hf.hub.card_audit import ETU_METHOD, audit_numbers, audit_rows, format_value, run_method, verdict
from etu_hf.hub.card_settings import BASELINE_METHODS, baseline_settings_rows, etu_settings_rows, forbidden_set_lines
from etu_hf.hub.run_files import RunFiles, as_list, base_model_name, describe_corpus, is_hub_id, read_run, unique

CARD_FILE = "README.md"

#: Tags every etu-hf card carries; user tags are added after them.
DEFAULT_TAGS = ("etu-hf", "unlearning")

_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


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
            f"forget data it puts at most epsilon = {format_value(eps, 'g')} probability on a forbidden token set "
            "V_S, and elsewhere stays as close as possible to the base model: its target is the base model "
            "exponentially tilted away from V_S, `q(y|x) ∝ pi_base(y|x) · exp(-lambda · 1[y ∈ V_S])`."
        )
    name, loss, _ = BASELINE_METHODS.get(method, (f"`{method}`", "", ()))
    return (
        f"This is {kind} trained with the unlearning baseline {name} (`etu-hf unlearn --method {method}`){source}"
        + (f" Its forget term: {loss}." if loss else "")
        + " It was not trained toward ETU's target (at most epsilon probability on a forbidden token set V_S): "
        f"etu-hf builds V_S and audits every method on it, so the audit below measures this model's mass on V_S "
        f"against epsilon = {format_value(eps, 'g')} as a reference shared with ETU runs, not as a goal of this method."
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
    body += forbidden_set_lines(run.forbidden)

    if method == ETU_METHOD:
        body += ["", "## ETU settings", ""]
        body += _table(("setting", "value"), etu_settings_rows(run))
    else:
        body += ["", "## Method settings", ""]
        body += _table(("setting", "value"), baseline_settings_rows(run, method))

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
            f"is a one-sided 95% bound with the sequence as the unit, and {bound} only when it is at most epsilon "
            "and the base model's lower bound is above epsilon (otherwise there was nothing to suppress). "
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
