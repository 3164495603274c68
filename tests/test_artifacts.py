"""The artifacts' contract (docs/artifacts.md) against a real run.

One short `etu-hf unlearn` run and one `etu-hf audit` of its adapter on held-out files written here.
Every key that docs/artifacts.md lists for metrics.json and suppression_report.json must be in the
files, and the numbers it marks *recomputed* are recomputed here with plain transformers + PEFT +
torch (float64 softmax over full logits), without etu-hf's maths: masses on V_S, shares above
epsilon, the tilted target and delta, perplexities, the token-level Wilson bound, the closed-form
lambda and eps'.
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


def documented_keys(section: str) -> list[str]:
    """The keys in the first column of the table under the ``## `<section>` ...`` heading."""
    text = open(DOC, encoding="utf-8").read()
    start = text.index(f"## `{section}`")
    end = text.find("\n## ", start + 1)
    keys = []
    for line in text[start : end if end > 0 else None].splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            keys += re.findall(r"`([^`]+)`", first)
    assert keys, f"no key table for {section} in docs/artifacts.md"
    return keys


def lookup(data: dict, dotted: str):
    for part in dotted.split("."):
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
        "--use_lora", "--max_steps", "12", "--block_size", str(BLOCK), "--lambda_update_freq", "6",
        "--epsilon", str(EPS), "--disable_tqdm", "true", "--audit_max_sequences", "0",
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


@torch.no_grad()
def _position_stats(model, blocks: list[list[int]], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per scored position: full float64 next-token distribution's mass on ids, log-probs, NLL of the target."""
    logps, nll = [], []
    for block in blocks:
        x = torch.tensor([block])
        logits = model(input_ids=x).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1)
        logps.append(lp)
        nll.append(-lp.gather(-1, x[0, 1:, None]).squeeze(-1))
    lp = torch.cat(logps)
    return {"logp": lp, "mass": lp[:, ids].exp().sum(-1), "nll": torch.cat(nll)}


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
    ids = torch.tensor(vs["ids"])
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    unlearned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR), str(out)).eval()
    vocab = base.config.vocab_size

    assert report["V_S_size"] == len(vs["ids"]) == metrics["V_S_size"]
    assert report["V_S_fraction"] == pytest.approx(len(vs["ids"]) / vocab)
    assert metrics["V_S_fraction"] == pytest.approx(len(vs["ids"]) / vocab)

    forget = _blocks(tokenizer, root / "heldout_forget.txt")
    b, u = _position_stats(base, forget, ids), _position_stats(unlearned, forget, ids)
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
    in_s = torch.zeros(vocab, dtype=torch.bool)
    in_s[ids] = True
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
    rb, ru = _position_stats(base, retain, ids), _position_stats(unlearned, retain, ids)
    assert report["retain_positions"] == len(rb["nll"])
    assert report["base_perplexity"] == pytest.approx(math.exp(float(rb["nll"].mean())), rel=1e-4)
    assert report["updated_perplexity"] == pytest.approx(math.exp(float(ru["nll"].mean())), rel=1e-4)
    assert report["perplexity_ratio"] == pytest.approx(report["updated_perplexity"] / report["base_perplexity"])


def test_metrics_agree_with_the_run_and_its_report(run):
    _, out, _ = run
    metrics = _json(out / "metrics.json")
    report = _json(out / "suppression_report.json")
    args = _json(out / "args.json")
    assert metrics["epsilon"] == EPS and metrics["steps"] == 12 and metrics["training_success"] is True
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
        "epsilon": "epsilon",
    }
    for mkey, rkey in pairs.items():
        assert held[mkey] == report[rkey], mkey
    data = metrics["data"]
    assert data["forget_heldout_blocks"] == report["forget_sequences"]
    assert data["retain_heldout_blocks"] == report["retain_sequences"]
    assert data["block_size"] == BLOCK == args["block_size"]
    assert data["controller_heldout_blocks"] == args["heldout_batches"] * args["per_device_train_batch_size"]
