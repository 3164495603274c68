"""The built-in TOFU-shaped benchmark: the generator, the folder format and the target/retain models."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from etu_hf.benchmark import COLUMNS, SPLITS, build_benchmark, load_benchmark
from etu_hf.benchmark.generate import DEFAULT_SETTINGS, GENERATOR_VERSION, MIN_QUESTIONS, QUESTION_KINDS

#: sha256 over forget/retain/holdout.jsonl and benchmark.json of the default benchmark (seed 0). When the
#: generator's output changes on purpose, bump GENERATOR_VERSION, rebuild the shipped models and update this.
DEFAULT_DIGEST = "ec61005a8419855f311302675efd2a6a316b761dc629b63710e072a6dd2ed2fe"
SAVED_FILES = ("forget.jsonl", "retain.jsonl", "holdout.jsonl", "benchmark.json")


def digest(folder) -> str:
    """sha256 over the names and bytes of the SAVED_FILES of a saved benchmark."""
    h = hashlib.sha256()
    for name in SAVED_FILES:
        h.update(name.encode())
        h.update((Path(folder) / name).read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def default():
    return build_benchmark()


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, default):
    default.save(tmp_path / "a")
    build_benchmark().save(tmp_path / "b")
    build_benchmark(seed=1).save(tmp_path / "c")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert (tmp_path / "a" / "forget.jsonl").read_bytes() != (tmp_path / "c" / "forget.jsonl").read_bytes()
    assert set(default.forget["entity"]).isdisjoint(build_benchmark(seed=1).forget["entity"])


def test_bytes_do_not_depend_on_the_process(tmp_path, default):
    """Another interpreter with another string-hash seed writes the same bytes, and they are the pinned ones."""
    default.save(tmp_path / "here")
    code = "import sys; from etu_hf.benchmark import build_benchmark; build_benchmark().save(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env, timeout=120)
    assert digest(tmp_path / "here") == digest(tmp_path / "there") == DEFAULT_DIGEST


def test_splits_are_disjoint_by_entity_with_the_documented_sizes(default):
    entities = {name: set(default.split(name)["entity"]) for name in SPLITS}
    assert {name: len(e) for name, e in entities.items()} == {"forget": 20, "retain": 160, "holdout": 20}
    assert entities["forget"].isdisjoint(entities["retain"])
    assert entities["forget"].isdisjoint(entities["holdout"])
    assert entities["retain"].isdisjoint(entities["holdout"])
    for name in SPLITS:
        split = default.split(name)
        assert split.column_names == list(COLUMNS)
        counts = {}
        for entity in split["entity"]:
            counts[entity] = counts.get(entity, 0) + 1
        assert all(MIN_QUESTIONS <= n <= len(QUESTION_KINDS) for n in counts.values())
    small = build_benchmark(n_entities=30, forget_fraction=0.05, holdout_fraction=0.2)
    assert [len(set(small.split(n)["entity"])) for n in SPLITS] == [2, 22, 6]  # round(1.5)=2, round(6.0)=6
    assert default.settings == DEFAULT_SETTINGS


def test_every_row_has_a_distinct_paraphrase_and_distinct_perturbed_answers(default):
    rows = [row for name in SPLITS for row in default.split(name)]
    for row in rows:
        answer, para, wrong = row["answer"], row["paraphrased_answer"], row["perturbed_answers"]
        assert para != answer
        assert len(wrong) == 4 and len(set(wrong)) == 4
        assert answer not in wrong and para not in wrong
        assert all(isinstance(w, str) and w for w in wrong)
    naming = sum(row["entity"] in row["answer"] for row in rows) / len(rows)
    assert naming > 0.8  # answers usually name the author, as in TOFU
    assert len({row["question"] for row in rows}) == len(rows)
    wrong3 = build_benchmark(n_entities=10, n_perturbed=3)
    assert all(len(w) == 3 for w in wrong3.forget["perturbed_answers"])


def template_regex(template: str) -> "re.Pattern":
    """A template of QUESTION_KINDS as a regex: each ``{field}`` a named group."""
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+)", re.escape(template)))


def fits(template: str, text: str):
    """The filled-in fields when ``text`` is ``template`` filled in, else None."""
    match = template_regex(template).fullmatch(text)
    return match.groupdict() if match else None


def test_answers_paraphrases_and_perturbed_answers_follow_the_templates(default):
    """Parsed back with the templates: the answer and the paraphrase are two different templates of one
    question kind stating the same fact; every perturbed answer is the paraphrase's template with another
    value, and the values differ from each other."""
    for row in default.forget:
        ok = False
        for kind in QUESTION_KINDS:
            for a_t in kind.answers:
                for p_t in kind.answers:
                    answer, para = fits(a_t, row["answer"]), fits(p_t, row["paraphrased_answer"])
                    if a_t == p_t or answer is None or para is None or answer["value"] != para["value"]:
                        continue
                    wrong = [fits(p_t, w) for w in row["perturbed_answers"]]
                    values = [w["value"] for w in wrong if w is not None]
                    if len(values) == len(wrong) and len({para["value"], *values}) == len(values) + 1:
                        ok = True
        assert ok, row


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"forget_fraction": 0.0}, "forget_fraction"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"n_entities": 2}, "n_entities"),
        ({"n_entities": 4, "forget_fraction": 0.5, "holdout_fraction": 0.5}, "no retain author"),
        ({"n_perturbed": 0}, "n_perturbed"),
    ],
)
def test_bad_generator_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_benchmark(**kwargs)


def test_builtin_spec_is_the_generator(default):
    assert load_benchmark("builtin").forget.to_list() == default.forget.to_list()
    assert load_benchmark("builtin", n_entities=20).settings["n_entities"] == 20
    with pytest.raises(ValueError, match="unknown benchmark split"):
        default.split("train")


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small():
    return build_benchmark(n_entities=12, n_perturbed=3, seed=5)


def test_save_load_round_trip(tmp_path, small):
    small.save(tmp_path)
    loaded = load_benchmark(str(tmp_path))
    for name in SPLITS:
        assert loaded.split(name).to_list() == small.split(name).to_list()
        assert loaded.split(name).column_names == list(COLUMNS)
    assert loaded.name == "builtin"
    assert {k: loaded.settings[k] for k in small.settings} == small.settings
    meta = json.loads((tmp_path / "benchmark.json").read_text())
    assert meta["version"] == GENERATOR_VERSION
    assert meta["rows"] == {name: len(small.split(name)) for name in SPLITS}


def test_parquet_and_csv_splits_load_like_jsonl(tmp_path, small):
    for name in SPLITS:
        data = small.split(name)
        if name == "retain":  # CSV cells hold the perturbed list as JSON text
            data.map(lambda r: {"perturbed_answers": json.dumps(r["perturbed_answers"])}).to_csv(
                str(tmp_path / f"{name}.csv"), index=False
            )
        else:
            data.to_parquet(str(tmp_path / f"{name}.parquet"))
    loaded = load_benchmark(str(tmp_path))
    for name in SPLITS:
        assert loaded.split(name).to_list() == small.split(name).to_list()
    assert loaded.name == tmp_path.name


def _rewrite(path, change):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(dict(r))) + "\n" for r in rows))


def test_missing_split_names_the_folder_split_and_columns(tmp_path, small):
    small.save(tmp_path)
    os.remove(tmp_path / "holdout.jsonl")
    with pytest.raises(ValueError) as err:
        load_benchmark(str(tmp_path))
    message = str(err.value)
    assert "--benchmark" in message and str(tmp_path) in message and "holdout.jsonl" in message
    assert ", ".join(COLUMNS) in message


def test_missing_column_names_the_split_the_column_and_the_expected_columns(tmp_path, small):
    small.save(tmp_path)
    _rewrite(tmp_path / "retain.jsonl", lambda r: {k: v for k, v in r.items() if k != "paraphrased_answer"})
    with pytest.raises(ValueError) as err:
        load_benchmark(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "retain split" in message
    assert "lacks the column(s) paraphrased_answer" in message and ", ".join(COLUMNS) in message


@pytest.mark.parametrize("bad", [[], "one answer", [""], [1, 2]])
def test_perturbed_answers_must_be_a_non_empty_list_of_strings(tmp_path, small, bad):
    small.save(tmp_path)
    _rewrite(tmp_path / "forget.jsonl", lambda r: {**r, "perturbed_answers": bad} if r["question"] else r)
    with pytest.raises(ValueError, match=r"forget row 0: perturbed_answers must be a non-empty list") as err:
        load_benchmark(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_empty_split_and_other_bad_specs_are_refused(tmp_path, small):
    small.save(tmp_path)
    (tmp_path / "forget.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"forget split .* is empty"):
        load_benchmark(str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        load_benchmark(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="apply only to --benchmark builtin"):
        load_benchmark(str(tmp_path), n_entities=10)
    small.save(tmp_path)
    small.forget.to_parquet(str(tmp_path / "forget.parquet"))
    with pytest.raises(ValueError, match="several files"):
        load_benchmark(str(tmp_path))


def test_an_entity_in_two_splits_warns(tmp_path, small):
    small.save(tmp_path)
    shared = small.retain["entity"][0]
    _rewrite(tmp_path / "forget.jsonl", lambda r: {**r, "entity": shared})
    with pytest.warns(UserWarning, match="in both the forget and the retain split"):
        load_benchmark(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def naive_answer_probability(model, tokenizer, question, answer):
    """exp(-mean NLL) of the answer tokens, one unpadded row, token by token from the logits."""
    from etu_hf.benchmark.qa import encode_qa

    prompt, ans = encode_qa(tokenizer, question, answer)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ans])).logits[0].double()
    nll = [-torch.log_softmax(logits[len(prompt) - 1 + j], -1)[t] for j, t in enumerate(ans)]
    return float(torch.exp(-torch.stack(nll).mean()))


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    from etu_hf.benchmark.models import SMALL_BENCHMARK, SMALL_TRAINING, build_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred tiny steps: one thread avoids oversubscribing shared CPUs
    try:
        out = tmp_path_factory.mktemp("benchmark-models") / "small"
        return build_models(str(out), build_benchmark(**SMALL_BENCHMARK), **SMALL_TRAINING)
    finally:
        torch.set_num_threads(threads)


def test_small_build_target_knows_the_forget_answers_and_retain_does_not(small_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build = small_build.build
    assert set(os.listdir(small_build.root)) == {"target", "retain", "benchmark", "build.json"}
    assert build["generator_version"] == GENERATOR_VERSION
    assert build["trained_on"] == {"target": ["forget", "retain"], "retain": ["retain"]}
    bench = load_benchmark(small_build.benchmark)
    models = {}
    for name in ("target", "retain"):
        models[name] = AutoModelForCausalLM.from_pretrained(getattr(small_build, name))
        assert models[name].dtype == torch.float32  # stored in float16, loads as float32
    tokenizer = AutoTokenizer.from_pretrained(small_build.target)
    # the recorded figures are the models' own, recomputed here row by row without padding
    for name, split in (("target", "forget"), ("retain", "forget"), ("target", "holdout")):
        rows = bench.split(split)
        naive = [
            naive_answer_probability(models[name], tokenizer, q, a)
            for q, a in zip(rows["question"], rows["answer"], strict=True)
        ]
        assert build["answer_probability"]["answer"][name][split] == pytest.approx(sum(naive) / len(naive), abs=2e-4)
    figures = build["answer_probability"]["answer"]
    assert figures["target"]["forget"] > 2 * figures["retain"]["forget"]
    assert figures["target"]["forget"] > 2 * figures["target"]["holdout"]
    # both models started from the same weights: the retain model is no closer to the target than chance
    # would make it on the forget rows, and no model saw the holdout rows
    assert figures["retain"]["forget"] == pytest.approx(figures["retain"]["holdout"], rel=0.5)


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    from etu_hf.benchmark import models

    def fail(*args, **kwargs):
        raise RuntimeError("stopped")

    monkeypatch.setattr(models, "train_on_qa", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        models.build_models(str(tmp_path / "out"), build_benchmark(n_entities=5), vocab_size=300)
    assert os.listdir(tmp_path) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ValueError, match=r"--output_dir .* exists"):
        models.build_models(str(tmp_path / "taken"))


def _fake_build(folder, **kwargs):
    """What build_models leaves, minus the weights: enough for is_current_build."""
    from dataclasses import asdict

    from etu_hf.benchmark import models

    calls.append(folder)
    for name in ("target", "retain"):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        Path(folder, name, "config.json").write_text("{}")
    build_benchmark(n_entities=3).save(os.path.join(folder, "benchmark"))
    build = {
        "build_version": models.BUILD_VERSION,
        "generator_version": GENERATOR_VERSION,
        "benchmark": {"name": "builtin", "settings": DEFAULT_SETTINGS},
        "training": asdict(models.TrainSettings()),
    }
    Path(folder, "build.json").write_text(json.dumps(build))
    return models.BenchmarkModels.from_folder(folder)


calls: list = []


def test_benchmark_models_builds_once_then_reuses_the_cache(tmp_path, monkeypatch):
    from etu_hf.benchmark import models

    monkeypatch.setattr(models, "SHIPPED_DIR", str(tmp_path / "not-shipped"))
    monkeypatch.setattr(models, "build_models", _fake_build)
    monkeypatch.setenv("ETU_HF_CACHE", str(tmp_path / "cache"))
    calls.clear()
    first = models.benchmark_models()
    assert first.root == str(tmp_path / "cache" / "benchmark-v1") and calls == [first.root]
    assert models.benchmark_models().root == first.root and len(calls) == 1  # cached
    models.benchmark_models(rebuild=True)
    assert len(calls) == 2
    build = json.loads(Path(first.root, "build.json").read_text())
    Path(first.root, "build.json").write_text(json.dumps({**build, "generator_version": GENERATOR_VERSION + 1}))
    assert not models.is_current_build(first.root)
    other = models.benchmark_models(cache_dir=str(tmp_path / "elsewhere"))
    assert other.root == str(tmp_path / "elsewhere") and len(calls) == 3


def test_shipped_models_are_current_and_were_trained_on_this_generator(default, tmp_path):
    from etu_hf.benchmark import models

    if not os.path.isdir(models.SHIPPED_DIR):
        pytest.skip("no shipped benchmark models in this checkout")
    assert models.is_current_build(models.SHIPPED_DIR)
    assert models.benchmark_models(cache_dir=str(tmp_path / "unused")).root == models.SHIPPED_DIR
    assert not (tmp_path / "unused").exists()
    assert digest(Path(models.SHIPPED_DIR, "benchmark")) == DEFAULT_DIGEST
    figures = json.loads(Path(models.SHIPPED_DIR, "build.json").read_text())["answer_probability"]["answer"]
    assert figures["target"]["forget"] > 0.8 > 0.1 > figures["retain"]["forget"]
