"""The model card of a run folder (etu_hf.hub.card): YAML metadata, what was unlearned, the ETU
settings, the audit table with the report's own numbers and an honest verdict, plots, loading snippet.

The run folders here are written by hand in the documented schemas (docs/artifacts.md), so every
case (adapter or full model, reached or not, plots or none, hub or local data) is cheap to build.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from helpers import audit_table
from huggingface_hub import ModelCard

from etu_hf.hub import NotARunError, build_model_card, write_model_card

REPORT = {
    "format": "etu-hf/suppression-report",
    "version": 2,
    "epsilon": 0.05,
    "V_S_size": 69,
    "V_S_fraction": 0.03369140625,
    "vocab_size": 2048,
    "forget_sequences": 16,
    "forget_positions": 988,
    "base_p_S": 0.5161383810688532,
    "updated_p_S": 0.03887078767495055,
    "base_p_S_upper": 0.5555004361232688,
    "updated_p_S_upper": 0.04693968163336574,
    "suppression_ratio": 0.07531,
    "delta": 0.3093410445611004,
    "pinsker_bound": 0.44328173397775567,
    "share_above_epsilon_base": 0.5779352226720648,
    "share_above_epsilon_updated": 0.34615384615384615,
    "retain_sequences": 14,
    "retain_positions": 881,
    "base_perplexity": 3.7727669461669198,
    "updated_perplexity": 3.8471024127854228,
    "perplexity_ratio": 1.019703169498457,
    "target_achieved": True,
    "target_achieved_upper": True,
}

METRICS = {
    "format": "etu-hf/metrics",
    "version": 1,
    "training_success": True,
    "epsilon": 0.05,
    "base_p_S": 0.524848286402075,
    "lambda": {
        "mode": "per_position",
        "closed_form_global": 3.0439140716275075,
        "offset": 0.9396969462244673,
        "adaptive": True,
        "controller_updates": 2,
        "effective_epsilon": 0.020151170553849778,
        "global_value": None,
    },
    "V_S_size": 69,
    "V_S_fraction": 0.03369140625,
    "vocab_size": 2048,
    "steps": 12,
}

FORBIDDEN = {
    "format": "etu-hf/forbidden-set",
    "version": 1,
    "size": 3,
    "fraction_of_vocab": 3 / 2048,
    "ids": [7, 11, 42],
    "tokens": ["Ġvexium", "Ġkorathine", "Ġof"],
    "scores": [3.5, 4.5, 1.2],
    "vocab_size": 2048,
    "method": "pmi",
    "parameters": {"pmi_top_k": 2000, "pmi_min_count": 20, "background": "retain"},
    "span_added": [],
}

ARGS = {
    "epsilon": 0.05,
    "lambda_mode": "per_position",
    "lambda_max": 12.0,
    "retain_weight": 1.0,
    "hub_token": "<redacted>",
    "model_name_or_path": "org/base-model",
    "forget_corpora": ["cyber-forget-corpus"],
    "retain_corpora": ["/home/someone/private/notes/retain.txt", "Salesforce/wikitext:wikitext-2-raw-v1"],
}


def write_run(
    path: Path,
    *,
    adapter: bool = True,
    report: dict | None = REPORT,
    metrics: dict = METRICS,
    args: dict | None = ARGS,
    plots: bool = True,
) -> Path:
    """A run folder in the documented schemas, with an adapter (or full model) config and optional plots."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "V_S.ids.json").write_text(json.dumps(FORBIDDEN))
    (path / "metrics.json").write_text(json.dumps(metrics))
    if report is not None:
        (path / "suppression_report.json").write_text(json.dumps(report))
    if args is not None:
        (path / "args.json").write_text(json.dumps(args))
    if adapter:
        config = {"base_model_name_or_path": "org/base-model", "peft_type": "LORA", "r": 8, "lora_alpha": 16}
        (path / "adapter_config.json").write_text(json.dumps(config))
    else:
        (path / "config.json").write_text(json.dumps({"_name_or_path": "org/base-model", "model_type": "llama"}))
    if plots:
        (path / "lambda_history.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        (path / "suppression_histogram.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return path


def close(cell: str, value: float, decimals: int) -> bool:
    return math.isclose(float(cell.rstrip("%")), round(value, decimals), abs_tol=10 ** (-decimals) / 2)


def test_metadata_of_an_adapter_run(tmp_path):
    run = write_run(tmp_path / "run")
    card = build_model_card(str(run), tags=["wmdp", "etu-hf"], repo_id="etu-user/cyber-unlearned")
    data = ModelCard(str(card)).data  # what the hub parses from the README's YAML header
    assert data.base_model == "org/base-model"
    assert data.library_name == "peft"
    assert data.pipeline_tag == "text-generation"
    assert data.tags[:2] == ["etu-hf", "unlearning"]
    assert "wmdp" in data.tags and "peft" in data.tags and data.tags.count("etu-hf") == 1
    assert data.datasets == ["cais/wmdp-corpora", "Salesforce/wikitext"]
    assert data.model_name == "cyber-unlearned"


def test_the_audit_table_carries_the_reports_numbers(tmp_path):
    run = write_run(tmp_path / "run")
    text = str(build_model_card(str(run)))
    rows = audit_table(text)
    mass = rows["held-out forget mass on V_S"]
    assert close(mass[0], REPORT["base_p_S"], 4) and close(mass[1], REPORT["updated_p_S"], 4)
    upper = rows["upper bound (sequence-level, 95%)"]
    assert close(upper[0], REPORT["base_p_S_upper"], 4) and close(upper[1], REPORT["updated_p_S_upper"], 4)
    assert close(rows["suppression ratio (unlearned / base)"][1], REPORT["suppression_ratio"], 4)
    above = rows["positions above epsilon"]
    assert close(above[0], 100 * REPORT["share_above_epsilon_base"], 1)
    assert close(above[1], 100 * REPORT["share_above_epsilon_updated"], 1)
    ppl = rows["held-out retain perplexity"]
    assert close(ppl[0], REPORT["base_perplexity"], 3) and close(ppl[1], REPORT["updated_perplexity"], 3)
    assert close(ppl[2].split()[-1], REPORT["perplexity_ratio"], 3)
    assert close(rows["delta = KL(model ‖ target)"][1], REPORT["delta"], 4)
    assert "**reached** (upper bound 0.0469)" in text
    assert "988 positions in 16 held-out sequences" in text


@pytest.mark.parametrize(
    "point, upper, expected",
    [
        (True, False, "**NOT reached**: the point estimate 0.0389 is below epsilon but its upper bound 0.0469 is not"),
        (False, False, "**NOT reached** (point estimate 0.0389)"),
    ],
)
def test_the_verdict_is_reached_only_on_the_upper_bound(tmp_path, point, upper, expected):
    run = write_run(tmp_path / "run", report={**REPORT, "target_achieved": point, "target_achieved_upper": upper})
    text = str(build_model_card(str(run)))
    assert expected in text
    assert "**reached**" not in text


def test_settings_and_forbidden_set(tmp_path):
    run = write_run(tmp_path / "run")
    text = str(build_model_card(str(run)))
    settings = text.split("## ETU settings", 1)[1].split("\n## ", 1)[0]
    assert "| epsilon (target mass on V_S) | 0.05 |" in settings
    assert "| lambda mode | `per_position` |" in settings
    assert "| final controller offset o | 0.9397 |" in settings
    assert "| per-context target eps' = sigmoid(logit(epsilon) - o) | 0.0202 |" in settings
    assert "| adaptive controller | on, 2 held-out updates |" in settings
    assert "**V_S**: 3 tokens" in text and "built by `pmi`" in text and "`pmi_top_k=2000`" in text
    assert "highest-scoring tokens: `Ġkorathine`, `Ġvexium`, `Ġof`" in text  # ordered by score
    assert "`cyber-forget-corpus` (cais/wmdp-corpora)" in text
    assert "`retain.txt` (a local file)" in text
    assert "/home/someone" not in text  # local paths are not published


def test_global_mode_shows_the_final_lambda(tmp_path):
    lam = {**METRICS["lambda"], "mode": "global", "global_value": 3.5, "effective_epsilon": None}
    metrics = {**METRICS, "lambda": lam}
    run = write_run(tmp_path / "run", metrics=metrics)
    text = str(build_model_card(str(run)))
    assert "| final lambda (global) | 3.5000 |" in text
    assert "eps'" not in text.split("## ETU settings", 1)[1].split("\n## ", 1)[0]


def test_plots_and_loading_snippet_of_an_adapter(tmp_path):
    run = write_run(tmp_path / "run")
    text = str(build_model_card(str(run), repo_id="etu-user/cyber-unlearned"))
    assert "](lambda_history.png)" in text and "](suppression_histogram.png)" in text
    assert 'base = AutoModelForCausalLM.from_pretrained("org/base-model")' in text
    assert 'PeftModel.from_pretrained(base, "etu-user/cyber-unlearned")' in text
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    compile(snippet, "snippet", "exec")  # valid Python
    assert "from etu_hf import load_unlearned\n" in text
    assert 'model, forbidden_set = load_unlearned("etu-user/cyber-unlearned")' in text


def test_load_unlearned_is_a_top_level_export():
    import etu_hf
    from etu_hf.hub import load_unlearned

    assert "load_unlearned" in etu_hf.__all__ and etu_hf.load_unlearned is load_unlearned


def test_full_model_without_plots_or_audit(tmp_path):
    run = write_run(tmp_path / "run", adapter=False, report=None, plots=False, args=None)
    card = build_model_card(str(run), dataset="org/forget-data")
    text = str(card)
    data = ModelCard(text).data
    assert data.library_name == "transformers" and data.datasets == ["org/forget-data"]
    assert "peft" not in data.tags
    assert "PeftModel" not in text and "AutoModelForCausalLM.from_pretrained(" in text
    assert ".png)" not in text and "## Plots" not in text
    assert "This run was not audited" in text and "reached" not in text


def test_audit_from_metrics_heldout_when_the_report_is_missing(tmp_path):
    heldout = {
        "epsilon": 0.05,
        "base_p_S": 0.5,
        "updated_p_S": 0.04,
        "updated_p_S_upper": 0.06,
        "suppression_ratio": 0.08,
        "share_above_epsilon_before": 0.5,
        "share_above_epsilon_after": 0.3,
        "positions": 100,
        "sequences": 10,
        "base_perplexity": 4.0,
        "updated_perplexity": 4.1,
        "perplexity_ratio": 1.025,
        "target_achieved": True,
        "target_achieved_upper": False,
    }
    run = write_run(tmp_path / "run", report=None, metrics={**METRICS, "heldout": heldout})
    text = str(build_model_card(str(run)))
    assert audit_table(text)["upper bound (sequence-level, 95%)"][1] == "0.0600"
    assert "**NOT reached**" in text and "100 positions in 10 held-out sequences" in text


def test_local_base_model_stays_out_of_the_metadata(tmp_path):
    run = write_run(tmp_path / "run", args={**ARGS, "model_name_or_path": None})
    config = {"base_model_name_or_path": "/home/someone/models/my-llama", "peft_type": "LORA"}
    (run / "adapter_config.json").write_text(json.dumps(config))
    text = str(build_model_card(str(run)))
    assert ModelCard(text).data.base_model is None
    assert "`my-llama` (a local folder)" in text and "/home/someone" not in text
    assert build_model_card(str(run), base_model="org/my-llama").data.base_model == "org/my-llama"


def test_write_model_card_saves_readme(tmp_path):
    run = write_run(tmp_path / "run")
    path = write_model_card(str(run), tags=["x"])
    assert Path(path) == run / "README.md"
    assert ModelCard.load(path).data.tags[-1] == "x"


def test_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_model_card(str(tmp_path / "missing"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text("{}")
    with pytest.raises(NotARunError, match=r"no V_S\.ids\.json"):
        build_model_card(str(tmp_path / "other"))


# ------------------------------------------------------------------------------------------ baseline runs
def baseline_metrics(method: str) -> dict:
    """metrics.json of a baseline run as `etu-hf unlearn --method <method>` writes it (docs/artifacts.md): ETU's
    schema with the controller off and no tilt statistics, plus `method` and `method_metrics`."""
    final = {f"{method}/loss": 0.777, f"{method}/forget_nll": 1.7315, f"{method}/pi_s": 0.2687}
    lam = {**METRICS["lambda"], "offset": 0.0, "adaptive": False, "controller_updates": 0, "effective_epsilon": 0.05}
    return {
        **METRICS,
        "lambda": lam,
        "final_training_pi_s": 0.2687,
        "final_training_q_s": None,
        "final_training_kl": None,
        "method": method,
        "method_metrics": {"final": final, "mean": final},
    }


BASELINE_ARGS = {
    **ARGS,
    "adaptive_lambda": False,
    "retain_loss_type": "kl",
    "npo_beta": 0.2,
    "simnpo_gamma": 0.5,
    "undial_gamma": 3.0,
}


def settings_table(text: str, heading: str) -> dict[str, str]:
    """``{setting: value}`` of the settings table under ``heading``; every row must have exactly two cells
    (a ``|`` inside a cell must be escaped, or the table breaks on the Hub)."""
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| setting") and "---" not in line:
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            assert len(cells) == 2, line
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.parametrize(
    "method, own",
    [
        ("npo", {"beta (`npo_beta`)": "0.2"}),
        ("simnpo", {"beta (`npo_beta`)": "0.2", "margin gamma (`simnpo_gamma`)": "0.5"}),
        ("undial", {"strength gamma (`undial_gamma`)": "3"}),
        ("graddiff", {}),
        ("ga", {}),
    ],
)
def test_a_baseline_card_names_its_method_and_claims_no_tilt(tmp_path, method, own):
    run = write_run(tmp_path / "run", metrics=baseline_metrics(method), args={**BASELINE_ARGS, "method": method})
    text = str(build_model_card(str(run)))
    assert method in ModelCard(text).data.tags
    intro = text.split("\n# run\n", 1)[1].split("\n## ", 1)[0]
    assert f"`etu-hf unlearn --method {method}`" in intro and "not trained toward ETU's target" in intro
    assert "Exponential-Tilted" not in intro and "exp(-lambda" not in intro
    assert "## ETU settings" not in text
    settings = settings_table(text, "Method settings")
    assert settings["method"].startswith(f"`{method}`: ")
    for label, value in own.items():
        assert settings[label] == value
    hyper = [k for k in settings if "npo_beta" in k or "gamma" in k]
    assert sorted(hyper) == sorted(own)  # only the method's own hyperparameters
    if method == "ga":
        assert settings["retain term"].startswith("none")
    else:
        assert settings["retain term"] == "1 x `kl`: KL(pi_base ‖ pi_theta) on retain text"
    assert settings["audit reference epsilon (not trained toward)"] == "0.05"
    assert settings["mean forget-token NLL, last logging window (training data)"] == "1.7315"
    assert settings["mean mass on V_S, last logging window (training data)"] == "0.2687"
    assert not [k for k in settings if "lambda" in k or "eps'" in k or "controller" in k or "offset" in k]
    # the audit: the same numbers, epsilon as a reference that is met or not, never a target reached
    rows = audit_table(text)
    assert close(rows["upper bound (sequence-level, 95%)"][1], REPORT["updated_p_S_upper"], 4)
    assert rows["held-out forget mass on V_S"][2] == "reference <= 0.05"
    assert "ETU's target" in rows["delta = KL(model ‖ ETU target)"][2]
    head = f"reference bound pi_theta(S) <= 0.05 (ETU's target; `{method}` does not train toward it)"
    assert f"{head}: **met** (upper bound 0.0469); 988 positions in 16 held-out sequences" in text
    assert "reached" not in text and "target pi_theta(S)" not in text


def test_a_baseline_verdict_not_met(tmp_path):
    report = {**REPORT, "target_achieved": True, "target_achieved_upper": False}
    run = write_run(tmp_path / "run", report=report, metrics=baseline_metrics("npo"), args=BASELINE_ARGS)
    text = str(build_model_card(str(run)))  # the method from metrics.json alone (args.json without it)
    assert "`npo` does not train toward it): **not met**: the point estimate 0.0389 is below epsilon" in text
    assert "**met**" not in text and "reached" not in text


def test_the_etu_card_keeps_its_target_and_names_no_method(tmp_path):
    run = write_run(tmp_path / "run", args={**ARGS, "method": "etu"})
    text = str(build_model_card(str(run)))
    assert "## Method settings" not in text and "## ETU settings" in text
    assert "target pi_theta(S) <= 0.05: **reached**" in text and "reference bound" not in text


def test_the_cards_methods_are_the_trainers():
    """The card describes every baseline etu-hf trains, with hyperparameters that are real arguments."""
    from dataclasses import fields

    from etu_hf.hub.card_settings import BASELINE_METHODS, NO_RETAIN_TERM
    from etu_hf.training.baselines import UNLEARNING_METHODS, BaselineTrainingArguments

    assert set(BASELINE_METHODS) == set(UNLEARNING_METHODS) - {"etu"}
    names = {f.name for f in fields(BaselineTrainingArguments)}
    assert all(key in names for _, _, hyper in BASELINE_METHODS.values() for key, _ in hyper)
    assert NO_RETAIN_TERM == {m for m, cls in UNLEARNING_METHODS.items() if not cls.has_retain_term}
