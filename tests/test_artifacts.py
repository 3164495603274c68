"""The artifacts' contract (docs/artifacts.md) against real runs.

One short `etu-hf unlearn` run and one `etu-hf audit` of its adapter on held-out files written here.
Every key that docs/artifacts.md lists for metrics.json and suppression_report.json must be in the
files, and the numbers it marks *recomputed* are recomputed here with plain transformers + PEFT +
torch (float64 softmax over full logits), without etu-hf's maths: masses on V_S, shares above
epsilon, the tilted target and delta, perplexities, the token-level Wilson bound, the closed-form
lambda and eps'. A one-step `etu-hf unlearn --method npo` run checks the baseline keys (NPO's loss at the
base model is (2/beta) log 2 per sequence), and (slow) a tiny `etu-hf compare` the keys of COMPARE.json
and EVAL.json, with the Pareto front and the comebacks recomputed by hand.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from etu_hf.demo import DEMO_MODEL_DIR

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "artifacts.md")
BLOCK = 64
EPS = 0.05
STEPS = 6  # two controller updates, at steps 3 and 6


def documented_keys(section: str) -> list[str]:
    """The keys in the first column of the table under the ``## `<section>` ...`` heading (or the heading that
    starts with ``## <section>`` when ``section`` is not a file name)."""
    text = open(DOC, encoding="utf-8").read()
    heading = f"## `{section}`" if "." in section and " " not in section else f"## {section}"
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    keys = []
    for line in text[start : end if end > 0 else None].splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            keys += re.findall(r"`([^`]+)`", first)
    assert keys, f"no key table for {section} in docs/artifacts.md"
    return keys


def lookup(data: dict, dotted: str):
    """``data`` at the dotted key; ``runs[].method`` looks in every element of the list ``runs`` (and returns
    the first one's value)."""
    parts = dotted.split(".")
    for k, part in enumerate(parts):
        if part.endswith("[]"):
            items = lookup(data, part[:-2])
            assert isinstance(items, list) and items, f"{dotted}: {part[:-2]!r} is not a non-empty list"
            rest = ".".join(parts[k + 1 :])
            values = [lookup(item, rest) for item in items]  # every element has the key
            return values[0]
        assert isinstance(data, dict) and part in data, f"{dotted}: missing {part!r}"
        data = data[part]
    return data


def run_cli(*argv: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "etu_hf", *argv], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from etu_hf.demo.corpus import forget_documents, retain_documents

    root = tmp_path_factory.mktemp("artifacts")
    files = {
        "forget": forget_documents(160, seed=21),
        "retain": retain_documents(160, seed=21),
        "heldout_forget": forget_documents(24, seed=777),
        "heldout_retain": retain_documents(24, seed=777),
    }
    for name, docs in files.items():
        (root / f"{name}.txt").write_text("\n\n".join(docs), encoding="utf-8")
    out, audit_dir = root / "run", root / "audit"
    run_cli(
        "unlearn",
        "--forget_corpora", str(root / "forget.txt"),
        "--retain_corpora", str(root / "retain.txt"),
        "--output_dir", str(out),
        "--use_lora", "--max_steps", str(STEPS), "--block_size", str(BLOCK), "--lambda_update_freq", str(STEPS // 2),
        "--epsilon", str(EPS), "--disable_tqdm", "true", "--audit_max_sequences", "0",
        "--batch_size", "4", "--p_s_sample_size", "16",
    )  # fmt: skip
    run_cli(
        "audit",
        "--adapter", str(out),
        "--forget_corpora", str(root / "heldout_forget.txt"),
        "--retain_corpora", str(root / "heldout_retain.txt"),
        "--output_dir", str(audit_dir), "--block_size", str(BLOCK), "--max_sequences", "0",
    )  # fmt: skip
    return root, out, audit_dir


def _json(path) -> dict:
    return json.loads(open(path, encoding="utf-8").read())


def test_every_documented_key_is_written(run):
    _, out, audit_dir = run
    metrics = _json(out / "metrics.json")
    for key in documented_keys("metrics.json"):
        lookup(metrics, key)
    for folder in (out, audit_dir):
        report = _json(folder / "suppression_report.json")
        for key in documented_keys("suppression_report.json"):
            lookup(report, key)
    assert metrics["format"] == "etu-hf/metrics" and report["format"] == "etu-hf/suppression-report"


def _blocks(tokenizer, path) -> list[list[int]]:
    """Documents (paragraphs) joined with EOS and cut into BLOCK-token blocks, the last one shorter (its
    padding is not a position)."""
    docs = [d.strip() for d in open(path, encoding="utf-8").read().split("\n\n") if d.strip()]
    stream = [
        t for doc in docs for t in [*tokenizer(doc, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ]
    return [stream[i : i + BLOCK] for i in range(0, len(stream), BLOCK)]


def _membership(vs: dict, blocks: list[list[int]], vocab: int) -> torch.Tensor:
    """``[positions, vocab]`` bool: S(x) at every prediction of ``blocks``, rebuilt from V_S.ids.json's documented
    fields alone: ``ids`` everywhere; the next piece of any word form whose first k pieces are the last k tokens;
    the text's next token unless it is in ``continuations.skip_ids`` or it is in ``common_ids`` and makes a word
    alone (without ``per_word``: in ``common_ids`` at all); with ``per_word`` only the first such token of each
    word, a token continuing the word when it is in ``joining_ids`` and the one before is not in ``closed_ids``."""
    forms = [tuple(f) for w in vs.get("words") or [] for f in w["forms"]]
    cont = vs.get("continuations") or {}
    skip = set(cont["skip_ids"]) if cont else None
    common = set(cont.get("common_ids") or [])
    per_word = bool(cont.get("per_word"))
    joining, closed = set(cont.get("joining_ids") or []), set(cont.get("closed_ids") or [])
    rows = []
    for block in blocks:
        capped = False
        for t in range(len(block) - 1):
            starts = block[t + 1] not in joining or block[t] in closed
            ends = t + 2 >= len(block) or block[t + 2] not in joining or block[t + 1] in closed
            if t == 0 or starts:
                capped = False  # a new word starts at the predicted token (or none of it was predicted before)
            row = torch.zeros(vocab, dtype=torch.bool)
            row[vs["ids"]] = True
            for f in forms:
                for k in range(1, len(f)):
                    if t + 1 >= k and tuple(block[t + 1 - k : t + 1]) == f[:k]:
                        row[f[k]] = True
            everyday = block[t + 1] in common and (not per_word or (starts and ends))
            if skip is not None and block[t + 1] not in skip and not everyday and not (per_word and capped):
                row[block[t + 1]] = True
                capped = True
            rows.append(row)
    return torch.stack(rows)


@torch.no_grad()
def _position_stats(model, blocks: list[list[int]], in_s: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per scored position: full float64 log-probs, NLL of the target and, given the membership ``in_s``
    (:func:`_membership`), the mass on S(x)."""
    logps, nll = [], []
    for block in blocks:
        x = torch.tensor([block])
        logits = model(input_ids=x).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1)
        logps.append(lp)
        nll.append(-lp.gather(-1, x[0, 1:, None]).squeeze(-1))
    lp = torch.cat(logps)
    out = {"logp": lp, "nll": torch.cat(nll)}
    if in_s is not None:
        out["mass"] = (lp.exp() * in_s).sum(-1)
    return out


def _wilson_upper(p: float, n: int, z: float = 1.959963984540054) -> float:
    center = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (center + half) / (1 + z * z / n)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def test_audit_numbers_recomputed_without_etu_hf(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, out, audit_dir = run
    report = _json(audit_dir / "suppression_report.json")
    metrics = _json(out / "metrics.json")
    vs = _json(out / "V_S.ids.json")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    unlearned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR), str(out)).eval()
    vocab = base.config.vocab_size

    assert report["V_S_size"] == len(vs["ids"]) == metrics["V_S_size"]
    assert report["V_S_fraction"] == pytest.approx(len(vs["ids"]) / vocab)
    assert metrics["V_S_fraction"] == pytest.approx(len(vs["ids"]) / vocab)

    forget = _blocks(tokenizer, root / "heldout_forget.txt")
    in_s = _membership(vs, forget, vocab)
    b, u = _position_stats(base, forget, in_s), _position_stats(unlearned, forget, in_s)
    assert report["forget_sequences"] == len(forget)
    assert report["forget_positions"] == sum(len(x) - 1 for x in forget) == len(b["mass"])
    tol = dict(rel=1e-4, abs=1e-6)
    assert report["base_p_S"] == pytest.approx(float(b["mass"].mean()), **tol)
    assert report["updated_p_S"] == pytest.approx(float(u["mass"].mean()), **tol)
    assert report["suppression_ratio"] == pytest.approx(float(u["mass"].mean() / b["mass"].mean()), **tol)
    assert report["share_above_epsilon_base"] == pytest.approx(float((b["mass"] > EPS).double().mean()), abs=2e-3)
    assert report["share_above_epsilon_updated"] == pytest.approx(float((u["mass"] > EPS).double().mean()), abs=2e-3)
    n = report["token_wilson_n"]
    assert n == min(report["forget_positions"], report["wilson_max_n"])
    assert report["updated_p_S_token_wilson_upper"] == pytest.approx(_wilson_upper(report["updated_p_S"], n), rel=1e-6)
    assert report["base_p_S_token_wilson_upper"] == pytest.approx(_wilson_upper(report["base_p_S"], n), rel=1e-6)
    assert report["updated_p_S"] <= report["updated_p_S_upper"]
    assert report["target_achieved_upper"] == (report["updated_p_S_upper"] <= EPS)

    # The tilted target of the run, rebuilt from the documented rule: per context, the base distribution
    # with the mass on V_S scaled to t(x) = min(p_b(S|x), eps') and the rest scaled to 1 - t(x).
    tilt = report["tilt"]
    assert tilt["mode"] == "per_position" and tilt["offset"] == pytest.approx(metrics["lambda"]["offset"])
    eps_prime = _sigmoid(_logit(EPS) - tilt["offset"])
    assert tilt["effective_epsilon"] == pytest.approx(eps_prime, rel=1e-9)
    assert metrics["lambda"]["effective_epsilon"] == pytest.approx(eps_prime, rel=1e-9)
    target = torch.clamp(b["mass"], max=eps_prime)
    log_q = b["logp"] + torch.where(
        in_s, torch.log(target / b["mass"])[:, None], torch.log((1 - target) / (1 - b["mass"]))[:, None]
    )
    p = u["logp"].exp()
    delta = (p * (u["logp"] - log_q)).sum(-1).mean()
    assert report["mean_target_mass"] == pytest.approx(float(target.mean()), **tol)
    assert report["delta"] == pytest.approx(float(delta), rel=1e-3, abs=1e-6)
    assert report["pinsker_bound"] == pytest.approx(EPS + math.sqrt(report["delta"] / 2))
    assert report["pinsker_bound_from_target"] == pytest.approx(
        report["mean_target_mass"] + math.sqrt(report["delta"] / 2)
    )

    retain = _blocks(tokenizer, root / "heldout_retain.txt")
    rb, ru = _position_stats(base, retain), _position_stats(unlearned, retain)
    assert report["retain_positions"] == len(rb["nll"])
    assert report["base_perplexity"] == pytest.approx(math.exp(float(rb["nll"].mean())), rel=1e-4)
    assert report["updated_perplexity"] == pytest.approx(math.exp(float(ru["nll"].mean())), rel=1e-4)
    assert report["perplexity_ratio"] == pytest.approx(report["updated_perplexity"] / report["base_perplexity"])


def test_metrics_agree_with_the_run_and_its_report(run):
    _, out, _ = run
    metrics = _json(out / "metrics.json")
    report = _json(out / "suppression_report.json")
    args = _json(out / "args.json")
    assert metrics["epsilon"] == EPS and metrics["steps"] == STEPS and metrics["training_success"] is True
    lam = metrics["lambda"]
    assert lam["closed_form_global"] == pytest.approx(max(0.0, _logit(metrics["base_p_S"]) - _logit(EPS)), rel=1e-6)
    assert lam["adaptive"] is True and lam["controller_updates"] == 2
    history = _json(out / "lambda_history.json")
    assert len(history["records"]) == 2 and lam["last_update"] == history["records"][-1]
    assert lam["offset"] == pytest.approx(history["records"][-1]["offset"])
    assert lam["min"] <= lam["mean"] <= lam["max"]
    assert 0.0 <= metrics["training_clamped_share"] <= 1.0
    assert 0 < metrics["base_p_S"] < 1 and metrics["base_p_S_positions"] > 0
    held = metrics["heldout"]
    pairs = {
        "base_p_S": "base_p_S",
        "updated_p_S": "updated_p_S",
        "updated_p_S_upper": "updated_p_S_upper",
        "updated_p_S_token_wilson_upper": "updated_p_S_token_wilson_upper",
        "suppression_ratio": "suppression_ratio",
        "share_above_epsilon_before": "share_above_epsilon_base",
        "share_above_epsilon_after": "share_above_epsilon_updated",
        "positions": "forget_positions",
        "sequences": "forget_sequences",
        "delta": "delta",
        "base_perplexity": "base_perplexity",
        "updated_perplexity": "updated_perplexity",
        "perplexity_ratio": "perplexity_ratio",
        "target_achieved": "target_achieved",
        "target_achieved_upper": "target_achieved_upper",
        "verdict": "verdict",
        "base_p_S_lower": "base_p_S_lower",
        "suppression_ratio_upper": "suppression_ratio_upper",
        "epsilon": "epsilon",
    }
    for mkey, rkey in pairs.items():
        assert held[mkey] == report[rkey], mkey
    data = metrics["data"]
    assert data["forget_heldout_blocks"] == report["forget_sequences"]
    assert data["retain_heldout_blocks"] == report["retain_sequences"]
    assert data["block_size"] == BLOCK == args["block_size"]
    assert data["controller_heldout_blocks"] == args["heldout_batches"] * args["per_device_train_batch_size"]


# ------------------------------------------------------------------------------------------ a baseline run
NPO_BETA = 0.2


@pytest.fixture(scope="module")
def npo_run(run):
    """One optimiser step of `etu-hf unlearn --method npo` on the same corpora (in this process)."""
    from etu_hf.commands.cli import main

    torch.set_num_threads(1)
    root = run[0]
    out = root / "npo"
    argv = [
        "unlearn", "--method", "npo", "--npo_beta", str(NPO_BETA),
        "--forget_corpora", str(root / "forget.txt"), "--retain_corpora", str(root / "retain.txt"),
        "--output_dir", str(out), "--use_lora", "--lora_r", "4", "--max_steps", "1", "--batch_size", "4",
        "--block_size", str(BLOCK), "--log_every", "1", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", "--p_s_sample_size", "8", "--audit_max_sequences", "8",
        "--dataloader_pin_memory", "false",
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_a_baseline_run_writes_the_documented_keys(run, npo_run):
    metrics, args = _json(npo_run / "metrics.json"), _json(npo_run / "args.json")
    for key in documented_keys("metrics.json"):  # ETU's schema, every key
        lookup(metrics, key)
    keys = documented_keys("Baseline runs")
    assert "method" in keys and "method_metrics.final.<m>/loss" in keys
    for key in keys:
        lookup(metrics, key.replace("<m>", "npo"))
    assert metrics["method"] == "npo" and args["method"] == "npo" and args["npo_beta"] == NPO_BETA
    assert {"npo_beta", "simnpo_gamma", "undial_gamma"} <= set(args)
    etu_metrics, etu_args = _json(run[1] / "metrics.json"), _json(run[1] / "args.json")
    assert "method" not in etu_metrics and "method_metrics" not in etu_metrics and etu_args["method"] == "etu"

    final, mean = metrics["method_metrics"]["final"], metrics["method_metrics"]["mean"]
    # one step from the base model (LoRA starts at zero): every sequence's NPO loss is (2/beta) log 2
    assert final["npo/loss"] == pytest.approx(2 / NPO_BETA * math.log(2), rel=1e-5)
    assert final["npo/forget_sequences"] == 4  # the batch's rows, each with scored positions
    assert 0 < final["npo/forget_positions"] <= 4 * (BLOCK - 1)
    assert final == mean  # one step: the last window is the whole run
    assert metrics["final_training_pi_s"] == final["npo/pi_s"] and metrics["mean_training_pi_s"] == mean["npo/pi_s"]
    assert metrics["training_forget_positions"] == mean["npo/forget_positions"]
    nulls = ("final_training_q_s", "final_training_kl", "training_clamped_share")
    assert all(metrics[k] is None for k in nulls)
    assert all(metrics["lambda"][k] is None for k in ("mean", "min", "max", "final_mean"))
    assert metrics["lambda"]["adaptive"] is False and metrics["data"]["controller_heldout_blocks"] == 0


def test_a_baseline_runs_model_card_names_its_method(npo_run):
    from etu_hf.hub import build_model_card

    text = str(build_model_card(str(npo_run)))
    assert "## Method settings" in text and "## ETU settings" not in text
    assert f"| beta (`npo_beta`) | {NPO_BETA:g} |" in text and "`npo` does not train toward it" in text


# ------------------------------------------------------------------------------------------ a comparison
@pytest.mark.slow
def test_compare_json_and_eval_json_keys(tmp_path):
    """A tiny `etu-hf compare` (the built-in benchmark's models on 8/16/8 of its rows, ETU and NPO, one step, one
    relearning step): every documented key of COMPARE.json and of its EVAL.json files, and what it marks
    *recomputed*, by hand."""
    from etu_hf.benchmark import load_benchmark
    from etu_hf.benchmark.models import benchmark_models
    from etu_hf.commands.cli import main

    torch.set_num_threads(1)
    built = benchmark_models()
    bench = load_benchmark(built.benchmark)
    for name, n in (("forget", 8), ("retain", 16), ("holdout", 8)):
        setattr(bench, name, getattr(bench, name).select(range(n)))
    bench.save(str(tmp_path / "bench"))
    out = tmp_path / "cmp"
    argv = [
        "compare", "--benchmark", str(tmp_path / "bench"), "--model_name_or_path", str(built.target),
        "--retain_model", str(built.retain), "--output_dir", str(out), "--methods", "etu,npo", "--max_steps", "1",
        "--etu_epsilons", "0.05", "--learning_rates", "1e-3", "--relearn_steps", "1", "--eval_batch_size", "32",
        "--per_device_train_batch_size", "4", "--pmi_min_count", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    result = _json(out / "COMPARE.json")
    for key in documented_keys("COMPARE.json"):
        lookup(result, key)
    assert list(result) == ["settings", "models", "benchmark", "vs_size", "references", "runs", "over_seeds", "goals"]
    assert result["over_seeds"] == []  # one seed
    evals = {"reference": out / "reference", "target": out / "target"}
    evals.update({r["run_dir"]: out / r["run_dir"] for r in result["runs"]})
    for folder in evals.values():
        data = _json(folder / "EVAL.json")
        for key in documented_keys("EVAL.json"):
            lookup(data, key)
        assert data["format"] == "etu-hf/unlearning-eval" and data["version"] == 1
    assert _json(evals["reference"] / "EVAL.json")["settings"]["reference"] is None

    assert result["vs_size"] == len(_json(out / "V_S.ids.json")["ids"])
    assert result["references"]["retain"] == _json(out / "reference" / "EVAL.json")["aggregates"]
    assert result["references"]["target"] == _json(out / "target" / "EVAL.json")["aggregates"]
    assert [(r["method"], r["label"]) for r in result["runs"]] == [("etu", "eps=0.05"), ("npo", "lr=0.001")]
    assert [(r["setting"], r["seed"], r["hyperparameters"]["seed"]) for r in result["runs"]] == [
        ("eps=0.05", 0, 0),
        ("lr=0.001", 0, 0),
    ]
    assert result["settings"]["grid"] == [["etu", "eps=0.05"], ["npo", "lr=0.001"]]
    points = []
    for r in result["runs"]:
        assert r["eval"] == _json(out / r["run_dir"] / "EVAL.json")["aggregates"]
        assert r["relearned"]["eval"] == _json(out / r["run_dir"] / "EVAL_relearned.json")["aggregates"]
        assert r["relearned"]["attack"] == {"rows": 2, "steps": 1, "learning_rate": 1e-3}  # 25% of 8 questions
        points.append((r["eval"]["forget_quality"], r["eval"]["model_utility"]))
    for r, p in zip(result["runs"], points, strict=True):  # the front, by its definition
        beaten = any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)
        assert r["pareto"] is (not beaten)
    for r in result["runs"]:
        comeback = r["relearned"]["eval"]["forget_prob"] - r["eval"]["forget_prob"]
        assert result["goals"]["relearn"][r["method"]]["mean_comeback"] == pytest.approx(comeback)
    npo_metrics = _json(out / result["runs"][1]["run_dir"] / "metrics.json")
    assert npo_metrics["method"] == "npo" and "heldout" not in npo_metrics
