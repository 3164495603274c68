"""`etu-hf eval`: end to end on a tiny benchmark folder with the demo model (table, EVAL.json, the kept reference,
a PEFT run folder), and bad input refused with one line before any model is loaded."""

import importlib
import json
import os
import shutil
import sys
import types

import pytest
from datasets import Dataset

from etu_hf.benchmark.qa import COLUMNS, SPLITS
from etu_hf.commands.cli import main
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.forbidden_set import ForbiddenSet

WORDS = ["river", "stone", "lamp", "market", "winter", "garden", "tower", "harbour"]


def rows(n, tag):
    return [
        {
            "entity": f"{tag}{i}",
            "question": f"Which place did {tag} {i} write about?",
            "answer": f"{tag} {i} wrote about the {WORDS[i % 8]} and the {WORDS[(3 * i + 1) % 8]}.",
            "paraphrased_answer": f"The {WORDS[i % 8]} is what {tag} {i} wrote about.",
            "perturbed_answers": [f"The {WORDS[(i + j) % 8]} is what {tag} {i} wrote about." for j in (1, 2, 3)],
        }
        for i in range(n)
    ]


def write_benchmark(folder, drop_split=None, drop_column=None):
    """A benchmark folder as etu_hf.benchmark writes one: <split>.jsonl per split."""
    os.makedirs(folder, exist_ok=True)
    for split, (n, tag) in zip(SPLITS, [(5, "Ana"), (6, "Bo"), (5, "Cy")], strict=True):
        if split == drop_split:
            continue
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for row in rows(n, tag):
                row.pop(drop_column, None)
                f.write(json.dumps(row) + "\n")
    return str(folder)


@pytest.fixture(autouse=True)
def benchmark_loader(monkeypatch):
    """The benchmark folder reader (etu_hf.benchmark.folder, written beside this command). Until it lands, a
    minimal reader of <split>.jsonl with its validation stands in, so the command's own path is tested."""
    try:
        importlib.import_module("etu_hf.benchmark.folder")
        return
    except ImportError:
        pass

    class Bench(types.SimpleNamespace):
        pass

    def load_benchmark(spec="builtin", **kwargs):
        splits = {}
        for split in SPLITS:
            path = os.path.join(spec, f"{split}.jsonl")
            if not os.path.isfile(path):
                raise ValueError(f"--benchmark {spec!r}: the {split!r} split is missing ({split}.jsonl)")
            with open(path) as f:
                data = Dataset.from_list([json.loads(line) for line in f if line.strip()])
            missing = [c for c in COLUMNS if c not in data.column_names]
            if missing:
                raise ValueError(f"--benchmark {spec!r}: split {split!r} lacks column(s) {missing}; expected {COLUMNS}")
            splits[split] = data
        return Bench(name=os.path.basename(spec), settings={}, **splits)

    module = types.ModuleType("etu_hf.benchmark.folder")
    module.load_benchmark = load_benchmark
    monkeypatch.setitem(sys.modules, "etu_hf.benchmark.folder", module)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model weights are loaded."""

    def forbidden(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", forbidden)


def refused(capsys, argv, message):
    """The command exits 2 with one `etu-hf eval: error:` line that contains ``message``."""
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    ours = [line for line in err.splitlines() if line.startswith("etu-hf eval: error:")]
    assert len(ours) == 1 and message in ours[0], err
    return ours[0]


FAST = ["--batch_size", "4", "--max_new_tokens", "6"]


def test_eval_end_to_end_with_a_retain_model(tmp_path, capsys, caplog):
    bench = write_benchmark(tmp_path / "bench")
    vs = ForbiddenSet(ids=list(range(300, 360))).save(str(tmp_path / "V_S.ids.json"))
    out = tmp_path / "eval"
    argv = ["--benchmark", bench, "--model_name_or_path", DEMO_MODEL_DIR, "--retain_model", DEMO_MODEL_DIR]
    argv += ["--forbidden_ids_path", vs, "--output_dir", str(out), *FAST]
    assert main(["eval", *argv]) == 0
    printed = capsys.readouterr().out
    assert "| metric | better | model | retain model |" in printed
    assert "| forget_quality | higher | 1.0000 | n/a |" in printed  # the retain model against itself
    data = json.loads((out / "EVAL.json").read_text())
    agg = data["aggregates"]
    assert agg["forget_quality"] == pytest.approx(1.0) and agg["privleak"] == pytest.approx(0.0)
    assert 0.0 <= agg["forget_vs_mass"] <= agg["forget_vs_mass_upper"] <= 1.0
    assert len(data["per_example"]["forget"]["truth_ratio"]) == 5
    assert data["settings"]["model"] == DEMO_MODEL_DIR and data["settings"]["batch_size"] == 4
    kept = json.loads((out / "reference" / "EVAL.json").read_text())
    assert kept["settings"]["model"] == DEMO_MODEL_DIR and kept["aggregates"]["forget_quality"] is None
    refused(capsys, argv, "already holds EVAL.json")
    caplog.set_level("INFO", logger="etu_hf")
    caplog.clear()
    assert main(["eval", *argv, "--overwrite_output_dir"]) == 0
    assert "retain model: reusing" in caplog.text  # the kept evaluation, not a second one
    assert "retain model: evaluating" not in caplog.text


def test_eval_of_a_run_folder_takes_its_base_and_v_s(tmp_path, capsys, model):
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(str(run))
    (run / "args.json").write_text(json.dumps({"model_name_or_path": DEMO_MODEL_DIR, "epsilon": 0.05}))
    ForbiddenSet(ids=list(range(300, 360))).save(str(run / "V_S.ids.json"))
    bench = write_benchmark(tmp_path / "bench")
    out = tmp_path / "eval"
    argv = ["--benchmark", bench, "--adapter", str(run), "--metrics", "prob,vs_mass", "--output_dir", str(out)]
    assert main(["eval", *argv]) == 0
    data = json.loads((out / "EVAL.json").read_text())
    assert data["settings"]["model"] == f"{DEMO_MODEL_DIR} + {run}"
    assert data["settings"]["forbidden_set"]["size"] == 60 and data["aggregates"]["forget_vs_mass"] > 0
    assert set(data["aggregates"]) == {"forget_prob", "retain_prob", "forget_vs_mass", "forget_vs_mass_upper"}
    assert "n/a" not in capsys.readouterr().out


def test_bad_input_is_refused_before_a_model_loads(tmp_path, capsys, no_model_load):
    bench = write_benchmark(tmp_path / "bench")
    out = str(tmp_path / "eval")
    base = ["--benchmark", bench, "--model_name_or_path", DEMO_MODEL_DIR, "--output_dir", out]
    err = refused(capsys, [*base, "--metrics", "prob,bogus"], "unknown metric(s) 'bogus'")
    assert "known: prob, rouge, truth_ratio" in err
    refused(capsys, [*base, "--metrics", "vs_mass"], "vs_mass needs V_S")
    refused(capsys, [*base, "--retain_model", DEMO_MODEL_DIR, "--reference_eval", "x.json"], "give one")
    refused(capsys, ["--benchmark", bench, "--output_dir", out], "--model_name_or_path: required")
    refused(capsys, [*base, "--batch_size", "0"], "--batch_size: must be >= 1")
    # a retain model whose tokenizer gives other ids
    other = tmp_path / "other"
    shutil.copytree(DEMO_MODEL_DIR, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    err = refused(capsys, [*base, "--retain_model", str(other)], "its tokenizer differs from the model's")
    assert str(other) in err and DEMO_MODEL_DIR in err
    # a benchmark folder without a split, or without a column
    no_split = write_benchmark(tmp_path / "b1", drop_split="holdout")
    refused(capsys, ["--benchmark", no_split, *base[2:]], "holdout")
    no_column = write_benchmark(tmp_path / "b2", drop_column="perturbed_answers")
    err = refused(capsys, ["--benchmark", no_column, *base[2:]], "perturbed_answers")
    assert "forget" in err
    # an EVAL.json already there; a reference made on another benchmark
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "EVAL.json"), "w") as f:
        f.write("{}")
    refused(capsys, base, "already holds EVAL.json")
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"format": "etu-hf/unlearning-eval", "settings": {"benchmark": {"fingerprint": "x"}}}))
    refused(capsys, [*base, "--overwrite_output_dir", "--reference_eval", str(ref)], "made on another benchmark")


def test_builtin_benchmark_defaults_to_its_target_and_retain_models(tmp_path, capsys, monkeypatch):
    """`--benchmark builtin` evaluates the benchmark's target model against its retain model (the build is
    replaced here by a folder and the demo model)."""
    models = importlib.import_module("etu_hf.benchmark.models")
    built = types.SimpleNamespace(
        target=DEMO_MODEL_DIR, retain=DEMO_MODEL_DIR, benchmark=write_benchmark(tmp_path / "b")
    )
    monkeypatch.setattr(models, "benchmark_models", lambda *a, **k: built, raising=False)
    out = tmp_path / "eval"
    argv = ["--output_dir", str(out), "--metrics", "forget_quality,prob", *FAST]
    assert main(["eval", *argv]) == 0
    data = json.loads((out / "EVAL.json").read_text())
    assert data["settings"]["model"] == DEMO_MODEL_DIR
    assert data["settings"]["reference"] == {"model": DEMO_MODEL_DIR}
    assert data["aggregates"]["forget_quality"] == pytest.approx(1.0)
    assert "| forget_prob | lower |" in capsys.readouterr().out
