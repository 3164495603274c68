"""`etu-hf compare`: the Pareto front, the goal checks, the settings and (slow) the command end to end."""

import json
import os

import pytest

from etu_hf.compare.pareto import dominates, pareto_front, plot_pareto
from etu_hf.compare.report import goal_checks, markdown_table
from etu_hf.compare.seeds import over_seeds, seeds_table
from etu_hf.compare.settings import CompareArguments, setting_of


def test_pareto_front_by_hand():
    pts = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.5, 0.5), (None, 1.0), (0.05, 0.05)]
    # (0.4,0.4) and (0.05,0.05) are dominated by (0.5,0.5); equal points do not dominate each other;
    # a point with a missing value is never on the front.
    assert pareto_front(pts) == [True, True, False, True, True, False, False]
    assert dominates((1, 1), (1, 0.5)) and not dominates((1, 1), (1, 1)) and not dominates((2, 0), (1, 1))


def test_pareto_front_against_brute_force():
    import random

    rng = random.Random(0)
    pts = [(rng.random(), rng.random()) for _ in range(60)]
    front = pareto_front(pts)
    for i, p in enumerate(pts):
        better = any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)
        assert front[i] == (not better)


def _run(method, label, fq, mu, prob, after=None):
    row = {"method": method, "label": label, "eval": {"forget_quality": fq, "model_utility": mu, "forget_prob": prob}}
    row["relearned"] = None if after is None else {"eval": {"forget_prob": after}}
    return row


def test_goal_checks_and_table(tmp_path):
    runs = [
        _run("etu", "eps=0.1", 0.5, 0.6, 0.2, 0.3),
        _run("etu", "eps=0.01", 0.2, 0.7, 0.3, 0.35),
        _run("npo", "lr=1e-3", 0.4, 0.5, 0.1, 0.4),  # dominated by eps=0.1
        _run("npo", "lr=1e-4", 0.1, 0.8, 0.5, 0.6),  # not dominated: higher utility
        _run("graddiff", "lr=1e-3", 0.6, 0.1, 0.05, 0.3),
    ]
    front = pareto_front([(r["eval"]["forget_quality"], r["eval"]["model_utility"]) for r in runs])
    for r, on in zip(runs, front, strict=True):
        r["pareto"] = on
    result = {"runs": runs, "references": {"target": {"forget_quality": 1e-9, "model_utility": 0.7}}}
    goals = goal_checks(result)
    assert goals["etu_on_front"] is True
    assert goals["etu_forget_prob_le_0.10_at_utility_ge_0.70"] is False  # forget_prob 0.2 and 0.3
    assert goals["dominated_by_etu"]["npo"] == [
        {"label": "lr=1e-3", "dominated_by": ["eps=0.1"]},
        {"label": "lr=1e-4", "dominated_by": []},
    ]
    assert goals["dominated_by_etu"]["graddiff"] == [{"label": "lr=1e-3", "dominated_by": []}]
    # comeback = mean(after - before): etu (0.1 + 0.05) / 2 = 0.075, npo (0.3 + 0.1) / 2 = 0.2
    assert goals["relearn"]["etu"]["mean_comeback"] == pytest.approx(0.075)
    assert goals["relearn"]["npo"]["mean_comeback"] == pytest.approx(0.2)
    assert goals["etu_less_comeback_than_npo"] is True
    table = markdown_table(result)
    assert table.count("\n") == 2 + 1 + len(runs) - 1  # header, rule, one reference, the runs
    assert "| npo | lr=1e-3 | 0.400 | 0.500 |" in table
    rows = [{"method": r["method"], "label": r["label"], "pareto": r["pareto"], **r["eval"]} for r in runs]
    png = plot_pareto(rows, str(tmp_path / "p.png"), references=[{"label": "target", **result["references"]["target"]}])
    assert os.path.getsize(png) > 1000


@pytest.mark.parametrize(
    "flags, match",
    [
        ({"methods": "etu,rmu"}, "--methods: unknown method"),
        ({"etu_epsilons": "0.1,1.5"}, "--etu_epsilons"),
        ({"learning_rates": "fast"}, "--learning_rates"),
        ({"relearn_fraction": 0.0}, "--relearn_fraction"),
        ({"max_steps": 0}, "--max_steps"),
        ({"etu_args": "no_such_flag=1"}, "--etu_args: 'no_such_flag' is not an ETUTrainingArguments field"),
        ({"etu_args": "continuation_skip_top_k"}, "is not name=value"),
        ({"etu_args": "continuation_skip_top_k=many"}, "continuation_skip_top_k takes a value of type int"),
        ({"etu_args": "forbid_continuations=maybe"}, "forbid_continuations takes true or false"),
        ({"etu_args": "epsilon=0.1"}, "epsilon is set by compare for every run"),
        ({"seeds": "0,x"}, "--seeds: cannot read"),
        ({"seeds": "1,1"}, "--seeds: seeds must be distinct"),
        ({"seeds": "0,-1"}, "--seeds: seeds must be distinct integers >= 0"),
        ({"seeds": "0,1", "seed": 3}, "either --seed N"),
    ],
)
def test_bad_settings(flags, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        CompareArguments(output_dir=str(tmp_path), **flags)


def test_grid():
    cfg = CompareArguments(output_dir="x", methods="etu,ga", etu_epsilons="0.1,0.01", learning_rates="1e-4")
    assert [(m, lab) for m, lab, _ in cfg.grid()] == [("etu", "eps=0.1"), ("etu", "eps=0.01"), ("ga", "lr=0.0001")]
    cfg = CompareArguments(output_dir="x", methods="etu-cont,npo", etu_epsilons="0.05", learning_rates="1e-3")
    assert [(m, lab) for m, lab, _ in cfg.grid()] == [("etu-cont", "eps=0.05"), ("npo", "lr=0.001")]
    assert cfg.grid()[0][2] == {"epsilon": 0.05, "learning_rate": 1e-3, "seed": 0}
    cfg = CompareArguments(output_dir="x", methods="etu,npo", etu_epsilons="0.05", learning_rates="1e-3", seeds="2,0")
    assert [(m, lab, h["seed"]) for m, lab, h in cfg.grid()] == [
        ("etu", "eps=0.05 seed=2", 2),
        ("etu", "eps=0.05 seed=0", 0),
        ("npo", "lr=0.001 seed=2", 2),
        ("npo", "lr=0.001 seed=0", 0),
    ]
    assert [setting_of(lab) for _, lab, _ in cfg.grid()] == ["eps=0.05", "eps=0.05", "lr=0.001", "lr=0.001"]
    assert CompareArguments(output_dir="x", seed=5).grid()[0][2]["seed"] == 5  # one seed: labels as before
    assert setting_of("eps=0.05") == "eps=0.05"


def test_over_seeds_by_hand():
    runs = [
        {"method": "etu", "setting": "eps=0.05", "seed": 0, "eval": {"a": 0.2, "b": 1.0}},
        {"method": "etu", "setting": "eps=0.05", "seed": 1, "eval": {"a": 0.5, "b": None}},
        {"method": "etu", "setting": "eps=0.05", "seed": 2, "eval": {"a": 0.8, "b": float("nan")}},
        {"method": "npo", "setting": "lr=0.001", "seed": 0, "eval": {"a": 0.1}},
    ]
    groups = over_seeds(runs, ["a", "b", "c"])
    assert len(groups) == 1  # npo ran one seed: nothing to summarise
    g = groups[0]
    assert (g["method"], g["setting"], g["seeds"]) == ("etu", "eps=0.05", [0, 1, 2])
    assert g["mean"]["a"] == pytest.approx(0.5) and (g["min"]["a"], g["max"]["a"]) == (0.2, 0.8)
    assert g["mean"]["b"] == 1.0 and g["min"]["b"] == g["max"]["b"] == 1.0  # the one finite value
    assert "c" not in g["mean"]
    table = seeds_table(groups, (("a", "A"), ("c", "C")), lambda v: f"{v:.2f}")
    assert table.splitlines()[2] == "| etu | eps=0.05 | 0,1,2 | 0.50 [0.20, 0.80] | n/a |"
    assert seeds_table([], (("a", "A"),), str) == ""


def test_etu_args_are_typed_like_the_training_arguments():
    cfg = CompareArguments(
        output_dir="x",
        etu_args="continuation_skip_top_k=0, forbid_continuations=false,word_min_g2=6.63,epsilon_ratio=none",
    )
    assert cfg.etu_overrides == {
        "continuation_skip_top_k": 0,
        "forbid_continuations": False,
        "word_min_g2": 6.63,
        "epsilon_ratio": None,
    }
    assert type(cfg.etu_overrides["continuation_skip_top_k"]) is int
    assert CompareArguments(output_dir="x").etu_overrides == {}


def test_etu_variants_build_their_own_forbidden_set(small_bench, tmp_path):
    from etu_hf.compare.runner import CompareInputs, build_forbidden, train_run

    built, _, folder = small_bench
    cfg = CompareArguments(
        output_dir=str(tmp_path),
        benchmark=folder,
        model_name_or_path=built.target,
        retain_model=built.retain,
        methods="etu-pmi,etu-cont",
        max_steps=1,
        etu_args="continuation_skip_top_k=7",
    )
    inputs = CompareInputs(cfg)
    shared = build_forbidden(cfg, inputs)
    hyper = {"epsilon": 0.05, "learning_rate": 1e-3}
    plain = train_run("etu-pmi", hyper, cfg, inputs, str(tmp_path / "a"), shared)
    assert plain.forbidden_set is shared and plain.forbidden_set.continuations is None
    cont = train_run("etu-cont", hyper, cfg, inputs, str(tmp_path / "b"), shared)
    fs = cont.forbidden_set
    assert fs.method == "words" and fs.continuations is not None and fs.per_context
    assert cont.args.continuation_skip_top_k == 7 and fs.continuations["skip_top_k"] == 7  # --etu_args reached it
    assert json.loads((tmp_path / "b" / "V_S.ids.json").read_text())["version"] == 2


def test_compare_refuses_existing_output(tmp_path, capsys):
    from etu_hf.commands.cli import main

    (tmp_path / "COMPARE.json").write_text(json.dumps({}))
    assert main(["compare", "--output_dir", str(tmp_path)]) == 2
    assert "already holds COMPARE.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
    """The built-in benchmark cut to a few rows per split (saved as a folder), with the shipped models."""
    from etu_hf.benchmark import load_benchmark
    from etu_hf.benchmark.models import benchmark_models

    built = benchmark_models()
    bench = load_benchmark(built.benchmark)
    for name, n in (("forget", 16), ("retain", 32), ("holdout", 16)):
        setattr(bench, name, getattr(bench, name).select(range(n)))
    folder = tmp_path_factory.mktemp("bench")
    bench.save(str(folder))
    return built, bench, str(folder)


@pytest.mark.slow
def test_compare_end_to_end(small_bench, tmp_path, capsys):
    from etu_hf.commands.cli import main

    built, _, folder = small_bench
    out = tmp_path / "cmp"
    flags = ["--benchmark", folder, "--model_name_or_path", built.target, "--retain_model", built.retain]
    flags += ["--output_dir", str(out), "--max_steps", "2", "--etu_epsilons", "0.05", "--learning_rates", "1e-3"]
    assert main(["compare", *flags, "--relearn_steps", "2", "--eval_batch_size", "32"]) == 0
    result = json.loads((out / "COMPARE.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["etu", "ga", "graddiff", "npo", "simnpo", "undial"]
    for r in result["runs"]:
        ev = json.loads((out / r["run_dir"] / "EVAL.json").read_text())
        assert ev["aggregates"] == r["eval"]  # the table is the runs' own EVAL.json
        assert 0 <= r["eval"]["forget_quality"] <= 1 and 0 <= r["eval"]["model_utility"] <= 1
        assert r["relearned"]["attack"] == {"rows": 4, "steps": 2, "learning_rate": 1e-3}
        assert os.path.isfile(out / r["run_dir"] / "adapter_config.json")
    front = pareto_front([(r["eval"]["forget_quality"], r["eval"]["model_utility"]) for r in result["runs"]])
    assert [r["pareto"] for r in result["runs"]] == front
    assert result["goals"] == goal_checks(result)
    assert (out / "pareto.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| undial | lr=0.001 |" in printed and "(retain model)" in printed
    # the reference is the retain model's own evaluation on the same rows
    ref = json.loads((out / "reference" / "EVAL.json").read_text())
    assert ref["aggregates"]["forget_prob"] == pytest.approx(result["references"]["retain"]["forget_prob"])


def test_compare_refuses_other_tokenizer(small_bench, tmp_path, capsys):
    from etu_hf.commands.cli import main
    from etu_hf.demo import DEMO_MODEL_DIR

    built, _, folder = small_bench
    flags = ["--benchmark", folder, "--model_name_or_path", built.target, "--retain_model", DEMO_MODEL_DIR]
    assert main(["compare", *flags, "--output_dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--retain_model" in err and "another tokenizer" in err
    assert not (tmp_path / "c" / "runs").exists()


def test_best_checkpoint_by_forget_quality(small_bench, tmp_path):
    """Evaluation at each epoch with the benchmark's metrics; the Trainer keeps the best checkpoint."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from etu_hf import ETUTrainer
    from etu_hf.benchmark import tokenize_qa
    from etu_hf.evaluation.unlearning import BenchmarkEvaluator, evaluate_benchmark
    from tests.helpers import fast_args

    built, bench, _ = small_bench
    tok = AutoTokenizer.from_pretrained(built.target)
    reference = evaluate_benchmark(AutoModelForCausalLM.from_pretrained(built.retain), tok, bench, batch_size=32)
    evaluator = BenchmarkEvaluator(bench, tok, reference, metrics="prob,rouge,truth_ratio,forget_quality,model_utility")
    forget = tokenize_qa(bench.forget, tok)
    args = fast_args(
        str(tmp_path / "run"),
        max_steps=-1,
        num_train_epochs=3,
        per_device_train_batch_size=4,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="forget_quality",
        pmi_min_count=2,
    )
    trainer = ETUTrainer(
        model=AutoModelForCausalLM.from_pretrained(built.target),
        args=args,
        train_dataset=forget,
        eval_dataset=forget,
        retain_dataset=tokenize_qa(bench.retain, tok),
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100),
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        benchmark_evaluator=evaluator,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_forget_quality" in h]
    assert len(evals) == 3 and all("eval_model_utility" in h and "eval_etu/pi_s" in h for h in evals)
    best = max(evals, key=lambda h: h["eval_forget_quality"])
    assert trainer.state.best_metric == pytest.approx(best["eval_forget_quality"])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    # the model kept at the end is the best checkpoint's: it scores that checkpoint's forget quality again
    assert evaluator(trainer.model)["forget_quality"] == pytest.approx(best["eval_forget_quality"], rel=1e-4)
