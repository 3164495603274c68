"""The real-knowledge benchmark (etu_hf.benchmark.knowledge, etu_hf.evaluation.knowledge) on the tiny demo model:
loader and its refusals, probe encoding, metrics against a hand computation, and `etu-hf eval` / `etu-hf compare`
end to end on tiny settings. The shipped smollm2-knowledge folder is checked as data (no model is downloaded)."""

import json
import math
import os

import pytest
import torch

from etu_hf.benchmark.knowledge import (
    BUILTIN_NAME,
    KnowledgeBenchmark,
    encode_probe,
    is_knowledge_spec,
    load_knowledge_benchmark,
)
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import forget_documents, retain_documents


def _probe(i, target, group, form, prompt, answer, keywords=None):
    return {
        "id": f"t{i}",
        "target": target,
        "group": group,
        "form": form,
        "prompt": prompt,
        "answer": answer,
        "keywords": keywords or [answer],
    }


def tiny_benchmark() -> KnowledgeBenchmark:
    probes = [
        _probe(0, "alpha", "forget", "completion", "The wizard of the tower is called", "Merlin"),
        _probe(1, "alpha", "forget", "question", "Who lives in the tower?", "the old wizard", ["wizard"]),
        _probe(2, "alpha", "neighbour", "completion", "The farmer grows", "wheat"),
        _probe(3, "beta", "forget", "completion", "The river flows to the", "sea"),
        _probe(4, "", "utility", "completion", "The sun rises in the", "east"),
        _probe(5, "", "utility", "question", "What colour is the sky?", "blue"),
    ]
    return KnowledgeBenchmark(
        name="tiny-knowledge",
        targets=["alpha", "beta"],
        probes=probes,
        forget={"alpha": forget_documents(30, seed=1), "beta": forget_documents(10, seed=2)},
        retain=retain_documents(30, seed=3),
        retain_heldout=retain_documents(8, seed=4),
    )


@pytest.fixture
def bench_dir(tmp_path):
    return tiny_benchmark().save(str(tmp_path / "kb"))


def test_save_load_round_trip_and_target_selection(bench_dir):
    assert is_knowledge_spec(bench_dir) and is_knowledge_spec(BUILTIN_NAME)
    b = load_knowledge_benchmark(bench_dir)
    assert b.targets == ["alpha", "beta"] and len(b.forget["alpha"]) == 30 and len(b.retain_heldout) == 8
    assert b.resolve_targets(None) == ["alpha"] and b.resolve_targets("all") == ["alpha", "beta"]
    assert b.resolve_targets("beta,alpha") == ["beta", "alpha"]
    with pytest.raises(ValueError, match=r"--target.*choose from alpha, beta"):
        b.resolve_targets("gamma")
    groups = b.probes_for(["alpha"])
    assert [p["id"] for p in groups["forget"]] == ["t0", "t1"]
    assert [p["id"] for p in groups["neighbour"]] == ["t2"] and len(groups["utility"]) == 2
    assert len(b.forget_texts(["alpha", "beta"])) == 40


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: os.remove(os.path.join(d, "probes.jsonl")), "no probes.jsonl"),
        (lambda d: _rewrite_probe(d, "answer", ""), "answer must be a non-empty string"),
        (lambda d: _rewrite_probe(d, "answer", None, drop=True), "missing answer"),
        (lambda d: _rewrite_probe(d, "group", "other"), "group 'other'"),
        (lambda d: _rewrite_probe(d, "keywords", []), "keywords must be"),
        (lambda d: _rewrite_probe(d, "target", "nobody"), "target 'nobody' is not in"),
        (lambda d: open(os.path.join(d, "retain_heldout.jsonl"), "w").close(), "retain_heldout.jsonl is empty"),
        (lambda d: open(os.path.join(d, "forget.jsonl"), "a").write("{broken\n"), "forget.jsonl line 41 is not JSON"),
    ],
)
def test_bad_folders_are_refused_with_one_line(bench_dir, edit, match):
    edit(bench_dir)
    with pytest.raises(ValueError, match=match) as err:
        load_knowledge_benchmark(bench_dir)
    assert "\n" not in str(err.value) and "--benchmark" in str(err.value)


def _rewrite_probe(folder, key, value, drop=False):
    path = os.path.join(folder, "probes.jsonl")
    rows = [json.loads(line) for line in open(path)]
    if drop:
        rows[0].pop(key)
    else:
        rows[0][key] = value
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_encode_probe_with_and_without_a_chat_template(tokenizer):
    comp = _probe(0, "a", "forget", "completion", "The sun rises in the", "east")
    prompt, answer = encode_probe(tokenizer, comp)
    assert prompt == tokenizer("The sun rises in the")["input_ids"]
    assert answer == tokenizer(" east", add_special_tokens=False)["input_ids"]
    q = _probe(1, "a", "forget", "question", "Where does the sun rise?", "in the east")
    prompt, answer = encode_probe(tokenizer, q)
    assert tokenizer.decode(prompt).endswith("Question: Where does the sun rise?\nAnswer:")
    assert tokenizer.decode(answer) == " in the east"
    from transformers import AutoTokenizer

    chat = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    chat.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    prompt, answer = encode_probe(chat, q)
    assert chat.decode(prompt) == "<user>Where does the sun rise?<assistant>"
    assert chat.decode(answer) == "in the east"  # no leading space after a chat turn


def test_probe_metrics_match_a_hand_computation(model, tokenizer):
    """answer_prob = exp(mean log p(answer tokens)), first_token_top1 = argmax at the answer's first position,
    recomputed here with one plain forward per probe (no batching, no padding)."""
    from etu_hf.evaluation.knowledge import aggregate, keyword_hit, score_probes

    probes = tiny_benchmark().probes
    model.eval()
    rows = score_probes(model, tokenizer, probes, batch_size=4)
    for p, row in zip(probes, rows, strict=True):
        prompt, answer = encode_probe(tokenizer, p)
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        pos = range(len(prompt) - 1, len(prompt) + len(answer) - 1)
        lps = [float(logp[t, answer[k]]) for k, t in enumerate(pos)]
        assert row["answer_prob"] == pytest.approx(math.exp(sum(lps) / len(lps)), rel=1e-4)
        assert row["first_token_top1"] == (int(logp[len(prompt) - 1].argmax()) == answer[0])
        assert row["keyword_hit"] == keyword_hit(row["generation"], p["keywords"])
    agg = aggregate(rows)
    assert agg["forget_probes"] == 3 and agg["utility_probes"] == 2
    assert agg["forget_answer_prob"] == pytest.approx(sum(r["answer_prob"] for r in [*rows[:2], rows[3]]) / 3)
    assert keyword_hit("It is BLUE today", ["blue"]) and not keyword_hit("green", ["blue"])


def test_retain_perplexity_is_exp_mean_nll(model, tokenizer):
    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.evaluation.knowledge import retain_perplexity

    texts = retain_documents(4, seed=9)
    model.eval()
    got = retain_perplexity(model, tokenizer, texts, block_size=32)
    blocks = tokenize_and_block(texts, tokenizer, 32)
    total, n = 0.0, 0
    for row in blocks:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
        with torch.no_grad():
            logp = torch.log_softmax(
                model(ids, attention_mask=torch.tensor([row["attention_mask"]])).logits[0].double(), -1
            )
        for t in range(31):
            if labels[t + 1] != -100:
                total -= float(logp[t, labels[t + 1]])
                n += 1
    assert got == pytest.approx(math.exp(total / n), rel=1e-4)


def test_shipped_smollm2_knowledge_folder():
    b = load_knowledge_benchmark(BUILTIN_NAME)
    assert len(b.targets) >= 3
    scores = b.settings["base_probe_scores"]
    for t in b.targets:  # each kept target was demonstrably known by the base model
        assert scores[t]["forget_keyword_acc"] >= 0.5
        assert len(b.forget[t]) >= 20
    dropped = [t for t in b.settings["candidates"] if t not in b.targets]
    assert all(scores[t]["forget_keyword_acc"] < 0.5 for t in dropped)
    groups = b.probes_for(b.targets[:1])
    assert groups["forget"] and groups["neighbour"] and groups["utility"]


@pytest.mark.slow
def test_eval_and_compare_end_to_end(bench_dir, tmp_path, capsys):
    from etu_hf.commands.cli import main

    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--benchmark",
        bench_dir,
        "--model_name_or_path",
        DEMO_MODEL_DIR,
        "--methods",
        "etu,npo",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--block_size",
        "32",
        "--learning_rates",
        "1e-3",
        "--etu_epsilons",
        "0.1",
        "--pmi_min_count",
        "2",
        "--output_dir",
        str(out),
    ]
    assert main([*argv, "--seeds", "0,1"]) == 0
    result = json.load(open(out / "COMPARE.json"))
    assert result["kind"] == "knowledge" and [r["method"] for r in result["runs"]] == ["etu"] * 2 + ["npo"] * 2
    assert [r["label"] for r in result["runs"]][:2] == ["eps=0.1 seed=0", "eps=0.1 seed=1"]
    base = result["references"]["base"]
    assert base["forgetting"] == pytest.approx(1 - base["forget_answer_prob"])
    for r in result["runs"]:
        ev = json.load(open(out / r["run_dir"] / "EVAL.json"))
        assert ev["aggregates"]["forget_answer_prob"] == pytest.approx(r["eval"]["forget_answer_prob"])
        goals = result["goals"]["runs"][f"{r['method']} {r['label']}"]
        assert goals["retain_ppl_ratio"] == pytest.approx(r["eval"]["retain_ppl"] / base["retain_ppl"])
    assert result["runs"][1]["run_dir"] == os.path.join("runs", "etu_eps0.1_seed1")
    # over seeds: each setting's mean, recomputed from its two runs, and its goal checks on that mean
    for g, pair in zip(result["over_seeds"], (result["runs"][:2], result["runs"][2:]), strict=True):
        assert g["seeds"] == [0, 1] and g["setting"] == pair[0]["setting"]
        values = [r["eval"]["neighbour_answer_prob"] for r in pair]
        assert g["mean"]["neighbour_answer_prob"] == pytest.approx(sum(values) / 2)
        assert (g["min"]["neighbour_answer_prob"], g["max"]["neighbour_answer_prob"]) == (min(values), max(values))
        checks = result["goals"]["over_seeds"][f"{g['method']} {g['setting']}"]
        assert checks["neighbour_ratio"] == pytest.approx(sum(values) / 2 / base["neighbour_answer_prob"])
    md = (out / "COMPARE.md").read_text()
    assert (out / "pareto.png").stat().st_size > 0 and "| (base model) |" in md and "seeds 0,1;" in md
    assert "| etu | eps=0.1 | 0,1 |" in md
    # the second seed's run is the run a comparison at that one seed gives: runs do not leak into each other
    one = tmp_path / "cmp_seed1"
    argv_one = [*argv[: argv.index("--output_dir")], "--output_dir", str(one), "--seed", "1", "--methods", "etu"]
    assert main(argv_one) == 0
    alone = json.load(open(one / "COMPARE.json"))["runs"][0]["eval"]
    for key in ("forget_answer_prob", "neighbour_answer_prob", "retain_ppl"):
        assert alone[key] == pytest.approx(result["runs"][1]["eval"][key], rel=1e-6)
    capsys.readouterr()
    run = out / result["runs"][0]["run_dir"]
    assert (
        main(
            [
                "eval",
                "--benchmark",
                bench_dir,
                "--model_name_or_path",
                DEMO_MODEL_DIR,
                "--adapter",
                str(run),
                "--output_dir",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| metric | base | model |" in printed
    ev = json.load(open(tmp_path / "ev" / "EVAL.json"))
    assert ev["aggregates"]["forget_answer_prob"] == pytest.approx(
        result["runs"][0]["eval"]["forget_answer_prob"], rel=1e-4
    )
    ref = json.load(open(tmp_path / "ev" / "reference" / "EVAL.json"))
    assert ref["aggregates"]["forget_answer_prob"] == pytest.approx(base["forget_answer_prob"], rel=1e-4)


def test_cli_refusals_before_anything_is_written(bench_dir, tmp_path, capsys):
    from etu_hf.commands.cli import main

    out = tmp_path / "o"
    assert (
        main(
            [
                "eval",
                "--benchmark",
                bench_dir,
                "--target",
                "gamma",
                "--model_name_or_path",
                DEMO_MODEL_DIR,
                "--output_dir",
                str(out),
            ]
        )
        == 2
    )
    assert "--target" in capsys.readouterr().err
    assert main(["eval", "--target", "alpha", "--output_dir", str(out)]) == 2
    assert "only for knowledge benchmarks" in capsys.readouterr().err
    assert (
        main(
            [
                "compare",
                "--benchmark",
                bench_dir,
                "--retain_model",
                DEMO_MODEL_DIR,
                "--model_name_or_path",
                DEMO_MODEL_DIR,
                "--output_dir",
                str(out),
            ]
        )
        == 2
    )
    assert "no retain model" in capsys.readouterr().err
    assert not out.exists()
