"""Every bad input of docs/bad_inputs.md gets its one-line error (naming the flag or file and the fix)
or its warning, before anything is written; the output folder is left as it was. For the unlearning
methods, `etu-hf eval` and `etu-hf compare`, the messages the commands print must also be the ones the
document quotes."""

import json
import logging
import math
import os
import re
import shutil
import warnings

import datasets
import pytest
from helpers import cli_flags, make_read_only

from etu_hf import ETUTrainer, ETUTrainingArguments
from etu_hf.commands.arguments import DataArguments, parse_unlearn_args
from etu_hf.commands.cli import main
from etu_hf.commands.unlearn import prepare_corpora
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import forget_documents, write_demo_corpora
from etu_hf.evaluation.audit import audit
from etu_hf.forbidden_set import ForbiddenSet, resolve_forbidden_set


@pytest.fixture
def corpora(tmp_path):
    return write_demo_corpora(str(tmp_path / "data"))


def flags(tmp_path, forget, retain, *extra):
    return cli_flags(tmp_path, forget, retain, "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", *extra)


def refused(capsys, argv, message):
    """Run the CLI; it must exit 2 with one line on stderr that contains ``message``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    ours = [line for line in err.splitlines() if line.startswith("etu-hf")]
    assert len(ours) == 1 and message in ours[0], err  # one line (besides any library progress bar)
    return ours[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model weights are loaded."""

    def forbidden(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", forbidden)


# ------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--learning_rate", "-1"], "learning_rate: must be >= 0"),
        (["--per_device_train_batch_size", "0", "--adaptive_lambda", "false"], "per_device_train_batch_size: must be"),
        (["--batch_size", "0"], "per_device_train_batch_size: must be >= 1"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps: must be >= 1"),
        (["--lambda_max", "nan"], "lambda_max: must be a finite number"),
        (["--lambda_max", "inf"], "lambda_max: must be a finite number"),
        (["--lambda_eta", "inf"], "lambda_eta: must be a finite number"),
        (["--retain_weight", "nan"], "retain_weight: must be a finite number"),
        (["--learning_rate", "nan"], "learning_rate: must be a finite number"),
        (["--epsilon", "1e-30", "--lambda_max", "50"], "epsilon: 1e-30 is unreachable with lambda_max=50.0"),
        (["--use_lora", "--lora_r", "0"], "--lora_r: the LoRA rank must be >= 1"),
        (["--use_lora", "--lora_dropout", "nan"], "--lora_dropout: must be in [0, 1)"),
        (["--audit_max_sequences", "-1"], "--audit_max_sequences: must be >= 0"),
    ],
)
def test_bad_flags_fail_before_anything_is_loaded_or_written(tmp_path, corpora, capsys, no_model_load, extra, message):
    refused(capsys, ["unlearn", *flags(tmp_path, *corpora, *extra)], message)
    assert not (tmp_path / "run").exists()


def test_demo_with_a_bad_flag_removes_the_corpora_it_generated(tmp_path, capsys, no_model_load):
    out = tmp_path / "demo"
    refused(capsys, ["demo", "--output_dir", str(out), "--learning_rate", "-1"], "learning_rate")
    assert not out.exists()


def test_refine_bad_numbers(tmp_path, corpora, capsys):
    adapter = tmp_path / "not-used"
    common = ["--adapter", str(adapter), "--forget_corpora", corpora[0], "--output_dir", str(tmp_path / "r")]
    refused(capsys, ["refine", "--method", "npo", *common, "--beta", "nan"], "beta: must be a finite number")
    refused(capsys, ["refine", "--method", "dpo", *common, "--learning_rate", "-1"], "learning_rate: must be >= 0")
    assert not (tmp_path / "r").exists()


def test_epsilon_of_the_wrong_type_and_reachability():
    with pytest.raises(TypeError, match=r"epsilon: must be a number, got '0.05' \(str\)"):
        ETUTrainingArguments(output_dir="unused", epsilon="0.05")
    with pytest.raises(TypeError, match="adaptive_lambda: must be True or False"):
        ETUTrainingArguments(output_dir="unused", adaptive_lambda="false")  # "false" would be true
    with pytest.raises(TypeError, match="per_device_train_batch_size: must be an integer"):
        ETUTrainingArguments(output_dir="unused", per_device_train_batch_size=4.5)
    # -logit(1e-6) = 13.8 > 12: even a context at base mass 0.5 cannot be tilted to epsilon
    with pytest.raises(ValueError, match=r"epsilon: 1e-06 is unreachable with lambda_max=12.*above 14"):
        ETUTrainingArguments(output_dir="unused", epsilon=1e-6, lambda_max=12.0)
    # -logit(1e-4) = 9.2: contexts above sigmoid(12 - 9.2) = 0.94 stay above epsilon
    with pytest.warns(UserWarning, match=r"base mass on V_S exceeds 0.942 cannot be tilted down"):
        ETUTrainingArguments(output_dir="unused", epsilon=1e-4, lambda_max=12.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ETUTrainingArguments(output_dir="unused", epsilon=0.05, lambda_max=12.0)  # reaches 0.9999: no warning


# ------------------------------------------------------------------------------------- output folder
def test_output_dir_that_is_a_file(tmp_path, corpora, capsys, no_model_load):
    target = tmp_path / "run"
    target.write_text("a file")
    refused(capsys, ["unlearn", *flags(tmp_path, *corpora)], "is a file, not a folder")
    assert target.read_text() == "a file"


def test_read_only_output_dir_is_refused_before_the_model_loads(tmp_path, corpora, capsys, no_model_load, monkeypatch):
    ro = tmp_path / "run"
    ro.mkdir()
    make_read_only(ro, monkeypatch)
    refused(capsys, ["unlearn", *flags(tmp_path, *corpora)], "is not writable: Permission denied")
    ro.chmod(0o755)
    assert os.listdir(ro) == []


# ------------------------------------------------------------------------------------- corpora
def test_binary_non_utf8_and_malformed_corpora(tmp_path, corpora, capsys, no_model_load):
    retain = corpora[1]
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\n\ncaf\xe9 au lait\n".encode("latin-1"))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c" oops}\n')
    not_rows = tmp_path / "numbers.jsonl"
    not_rows.write_text('{"text": "a"}\n42\n')
    pretty = tmp_path / "rows.json"
    pretty.write_text('[\n {"text": "a"},\n {"text": "b"}\n {"text": "c"}\n]\n')
    cases = [
        (binary, "binary.txt looks binary (a NUL byte at byte 0)"),
        (latin, "latin.txt is not UTF-8 text (byte 0xe9 at line 3, byte 15)"),
        (jsonl, "rows.jsonl line 3 is not valid JSON"),
        (not_rows, "numbers.jsonl line 2 is not a JSON object"),
        (pretty, "rows.json is not valid JSON (Expecting ',' delimiter at line 4, column 2)"),
    ]
    for path, message in cases:
        err = refused(capsys, ["unlearn", *flags(tmp_path, str(path), retain)], message)
        assert err.startswith("etu-hf unlearn: error: --forget_corpora:")
        assert not (tmp_path / "run").exists()


def test_paths_with_commas_by_repeating_the_flag_or_whole(tmp_path, tokenizer):
    folder = tmp_path / "a,b"
    folder.mkdir()
    docs = forget_documents(12, seed=1)
    one, two = folder / "x,y.txt", tmp_path / "z.txt"
    one.write_text("\n\n".join(docs[:6]))
    two.write_text("\n\n".join(docs[6:]))
    _, data_args, _ = parse_unlearn_args(
        ["--forget_corpora", str(one), "--forget_corpora", str(two), "--output_dir", str(tmp_path / "o")]
    )
    assert data_args.forget_corpora == [str(one), str(two)]
    data = prepare_corpora(DataArguments(forget_corpora=data_args.forget_corpora, block_size=32), tokenizer, seed=0)
    assert len(data["forget_train"]) > 0
    _, data_args, _ = parse_unlearn_args(["--forget_corpora", f"{two},{two}", "--output_dir", str(tmp_path / "o")])
    assert data_args.forget_corpora == [f"{two},{two}"]  # a comma list still works; it names two specs


def test_identical_forget_and_retain_corpora_warn(tmp_path, tokenizer, caplog):
    path = tmp_path / "same.txt"
    path.write_text("\n\n".join(forget_documents(10, seed=3)))
    with pytest.warns(UserWarning, match=r"100% of the forget documents are also in the retain corpus"):
        prepare_corpora(
            DataArguments(forget_corpora=[str(path)], retain_corpora=[str(path)], block_size=32), tokenizer, 0
        )


# ------------------------------------------------------------------------------------- models
def _bert(tmp_path, cls_name):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(
        vocab_size=2048, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    folder = tmp_path / cls_name
    {"BertForMaskedLM": BertForMaskedLM, "BertModel": BertModel}[cls_name](config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertModel"])
def test_non_causal_models_are_refused_before_loading_weights(tmp_path, corpora, capsys, no_model_load, cls_name):
    folder = _bert(tmp_path, cls_name)
    argv = flags(tmp_path, *corpora, "--tokenizer_name_or_path", DEMO_MODEL_DIR)
    argv[argv.index("--model_name_or_path") + 1] = str(folder)
    refused(capsys, ["unlearn", *argv], f"is a {cls_name} checkpoint, not a causal language model")
    assert not (tmp_path / "run").exists()


def test_bert_config_without_architectures_is_refused(tmp_path, capsys, corpora, no_model_load):
    folder = _bert(tmp_path, "BertModel")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    argv = flags(tmp_path, *corpora, "--tokenizer_name_or_path", DEMO_MODEL_DIR)
    argv[argv.index("--model_name_or_path") + 1] = str(folder)
    refused(capsys, ["unlearn", *argv], "is a bert model, a bidirectional encoder")


def _model_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, folder)
    return folder


def test_broken_model_folders(tmp_path, corpora, capsys, no_model_load):
    folder = _model_copy(tmp_path)
    argv = flags(tmp_path, *corpora)
    argv[argv.index("--model_name_or_path") + 1] = str(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])  # an interrupted download
    refused(capsys, ["unlearn", *argv], "model.safetensors is truncated")
    weights.write_bytes(data)

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 4096}))
    refused(capsys, ["unlearn", *argv], "config.json says vocab_size=4096 but")
    (folder / "config.json").write_text(json.dumps(config))

    argv[argv.index("--max_length") + 1] = "4096"
    refused(capsys, ["unlearn", *argv], "--block_size (--max_length) 4096 is above the 512 positions")
    assert not (tmp_path / "run").exists()


def test_corrupted_adapter_is_named(tmp_path, corpora, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    argv = ["audit", "--adapter", str(adapter), "--forget_corpora", corpora[0], "--forbidden", "unused"]
    refused(capsys, [*argv, "--output_dir", str(tmp_path / "a")], "adapter_model.safetensors is truncated (5 bytes")
    assert not (tmp_path / "a").exists()


def test_resuming_a_checkpoint_of_another_v_s(tmp_path, model, tokenizer, make_args):
    from helpers import lora_trainer
    from test_run_folder import fake_checkpoint

    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.demo.corpus import retain_documents

    blocks = {
        "forget": tokenize_and_block(forget_documents(60, seed=1), tokenizer, 64),
        "retain": tokenize_and_block(retain_documents(60, seed=1), tokenizer, 64),
    }
    out = tmp_path / "out"
    checkpoint = fake_checkpoint(out, 2)
    ForbiddenSet(ids=[3, 4, 5]).save(str(checkpoint / "V_S.ids.json"))
    trainer = lora_trainer(model, tokenizer, blocks, make_args(output_dir=str(out)))
    with pytest.raises(ValueError, match=r"trained with another V_S \(3 tokens.*--forbidden_ids_path"):
        trainer.train(resume_from_checkpoint=True)
    assert sorted(os.listdir(out)) == ["checkpoint-2"]


# ------------------------------------------------------------------------------------- Python API
def test_dataset_without_input_ids(model, tokenizer, make_args):
    text = datasets.Dataset.from_dict({"text": ["some words", "more words"]})
    with pytest.raises(ValueError, match=r"train_dataset \(the forget data\) has no 'input_ids' column.*text"):
        ETUTrainer(model=model, args=make_args(), train_dataset=text, processing_class=tokenizer)


@pytest.mark.parametrize("ids", [[5, 1.5], [5, 2.0], [True, 7], ["7"]])
def test_forbidden_ids_must_be_integers(tmp_path, ids):
    with pytest.raises(ValueError, match="token ids must be integers"):
        resolve_forbidden_set(ids)
    path = tmp_path / "V_S.ids.json"
    path.write_text(json.dumps(ids))
    with pytest.raises(ValueError, match=r"V_S.ids.json: token ids must be integers"):
        ForbiddenSet.load(str(path))
    path.write_text(json.dumps({"ids": ids}))
    with pytest.raises(ValueError, match=r"V_S.ids.json: token ids must be integers"):
        ForbiddenSet.load(str(path))
    path.write_text("[5, 6")
    with pytest.raises(ValueError, match=r"V_S.ids.json is not a valid V_S.ids.json file"):
        ForbiddenSet.load(str(path))


def test_the_audit_is_capped_and_cuts_long_documents_into_blocks(model, tokenizer, caplog):
    """One huge held-out document is blocks like training data; the audit measures a seeded sample of
    ``max_sequences`` of them and logs each pass."""
    huge = " ".join(forget_documents(60, seed=5))
    with caplog.at_level(logging.INFO, logger="etu_hf.evaluation.audit"):
        report = audit(
            model,
            [huge],
            [5, 6, 7],
            epsilon=0.05,
            base=model,
            tokenizer=tokenizer,
            block_size=32,
            max_sequences=5,
            bootstrap_samples=20,
            num_samples=0,
        )
    assert report.forget_sequences == 5
    assert "a seeded sample of 5 of its" in caplog.text and "batches (" in caplog.text
    n_blocks = int(caplog.text.split("a seeded sample of 5 of its ")[1].split()[0])
    assert n_blocks > 50 and math.isfinite(report.updated_p_S)
    everything = audit(model, [huge], [5, 6, 7], epsilon=0.05, base=model, tokenizer=tokenizer, block_size=32,
                       max_sequences=None, bootstrap_samples=20, num_samples=0)  # fmt: skip
    assert everything.forget_sequences == n_blocks


# ------------------------------------------------------------------------------------- methods, eval, compare
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "bad_inputs.md")


def documented(*fragments):
    """Each fragment of a message is quoted in docs/bad_inputs.md."""
    text = open(DOC, encoding="utf-8").read()
    for fragment in fragments:
        assert fragment in text, f"docs/bad_inputs.md does not quote {fragment!r}"


def refused_as_documented(capsys, argv, *fragments):
    """The command exits 2 with one error line holding every fragment, and the document quotes them."""
    documented(*fragments)
    line = refused(capsys, argv, fragments[0])
    assert all(f in line for f in fragments), line
    return line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "gd"], "--method: unknown unlearning method 'gd'; known: etu, ga, graddiff, npo, simnpo, undial"),
        (
            ["--method", "npo", "--adaptive_lambda", "true"],
            "adaptive_lambda: the baselines have no tilt for a lambda controller to steer: leave it False (got True)",
        ),
        (
            ["--method", "simnpo", "--preference_weight", "0.5"],
            "preference_weight: ETU's in-loop preference term is not a baseline's: set it to 0 (--method npo) "
            "(got 0.5)",
        ),
        (
            ["--method", "undial", "--stop_when_certified", "2"],
            "stop_when_certified: needs ETU's lambda controller, which the baselines do not have: set it to 0 (got 2)",
        ),
        (["--method", "npo", "--npo_beta", "0"], "npo_beta: must be > 0, e.g. 0.1 (got 0.0)"),
        (["--method", "simnpo", "--simnpo_gamma", "-1"], "simnpo_gamma: must be >= 0, e.g. 0.0 (got -1.0)"),
        (
            ["--method", "undial", "--undial_gamma", "0"],
            "undial_gamma: must be > 0 (0 leaves the base model as the target), e.g. 10.0 (got 0.0)",
        ),
        (["--method", "npo", "--npo_beta", "nan"], "npo_beta: must be a finite number, got nan"),
        (["--npo_beta", "0.2"], "Some specified arguments are not used by the HfArgumentParser: ['--npo_beta', '0.2']"),
    ],
)
def test_bad_method_flags(tmp_path, corpora, capsys, no_model_load, extra, message):
    refused_as_documented(capsys, ["unlearn", *flags(tmp_path, *corpora, *extra)], message)
    assert not (tmp_path / "run").exists()


def test_a_frozen_output_head_is_warned_about_for_etu_only(tmp_path, tokenizer, caplog):
    """ETU's target needs the head; a baseline (GA here, same settings) is not warned about it, but GA is
    warned that it has no retain term; a lambda controller is refused for a baseline."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from etu_hf import AdaptiveLambdaCallback, BaselineTrainingArguments, GradAscentTrainer
    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.demo.corpus import retain_documents

    forget = tokenize_and_block(forget_documents(20, seed=2), tokenizer, 64)
    retain = tokenize_and_block(retain_documents(20, seed=2), tokenizer, 64)
    head = "the adapter leaves the output head (lm_head) frozen: ETU's tilted target lowers the logits of V_S,"
    no_retain = (
        "GradAscentTrainer has no retain term: the retain data only sets V_S's PMI background (use graddiff for one)"
    )
    refusal = "callbacks: GradAscentTrainer has no tilt for an AdaptiveLambdaCallback to steer; remove it"
    documented(head, no_retain, refusal)
    common = dict(output_dir=str(tmp_path / "o"), max_steps=1, use_cpu=True, report_to="none", save_strategy="no",
                  pmi_min_count=1, pmi_top_k=32, p_s_sample_size=8, adaptive_lambda=False)  # fmt: skip
    for cls, arguments, etu in (
        (ETUTrainer, ETUTrainingArguments(**common), True),
        (GradAscentTrainer, BaselineTrainingArguments(**common), False),
    ):
        caplog.clear()
        with caplog.at_level("WARNING", logger="etu_hf.training"):
            cls(
                model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
                args=arguments,
                train_dataset=forget,
                retain_dataset=retain,
                processing_class=tokenizer,
                peft_config=LoraConfig(r=4, target_modules="all-linear"),
            )
        assert ("leaves the output head (lm_head) frozen" in caplog.text) is etu, (cls.__name__, caplog.text)
        assert (head in caplog.text) is etu
        assert (no_retain in caplog.text) is not etu
    with pytest.raises(ValueError, match=re.escape(refusal)):
        GradAscentTrainer(args=BaselineTrainingArguments(**common), callbacks=[AdaptiveLambdaCallback()])


def qa_benchmark(folder, drop_split=None, drop_column=None):
    """A benchmark folder of 3 question/answer rows per split (<split>.jsonl), maybe missing a split or a column."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("forget", "retain", "holdout"):
        if split == drop_split:
            continue
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(3):
                name = f"{split} author {i}"
                row = {
                    "entity": name,
                    "question": f"Where was {name} born?",
                    "answer": f"{name} was born in town {i}.",
                    "paraphrased_answer": f"Town {i} is where {name} was born.",
                    "perturbed_answers": [f"Town {i + j} is where {name} was born." for j in (1, 2)],
                }
                row.pop(drop_column, None)
                f.write(json.dumps(row) + "\n")
    return str(folder)


def other_tokenizer_model(tmp_path):
    """A copy of the demo model whose tokenizer swaps the ids of two tokens."""
    folder = _model_copy(tmp_path)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return str(folder)


def test_eval_bad_inputs(tmp_path, capsys, no_model_load):
    bench = qa_benchmark(tmp_path / "bench")
    out = tmp_path / "eval"
    base = ["eval", "--benchmark", bench, "--model_name_or_path", DEMO_MODEL_DIR, "--output_dir", str(out)]
    known = "prob, rouge, truth_ratio, forget_quality, model_utility, exact_memorization, extraction_strength, "
    known += "mia_loss, mia_zlib, mia_mink, mia_minkpp, privleak, vs_mass (or 'all')"
    cases = [
        ([*base, "--metrics", "prob,bogus"], [f"--metrics: unknown metric(s) 'bogus'; known: {known}"]),
        (
            [*base, "--metrics", "vs_mass"],
            [
                "metrics: vs_mass needs V_S (etu-hf eval: --forbidden_ids_path or a run folder as --adapter; "
                "Python: forbidden_set=)"
            ],
        ),
        (
            [*base, "--retain_model", DEMO_MODEL_DIR, "--reference_eval", "x.json"],
            ["--retain_model and --reference_eval: give one (the EVAL.json replaces evaluating it)"],
        ),
        (
            [*base, "--retain_model", other_tokenizer_model(tmp_path)],
            [
                "its tokenizer differs from the model's (",
                "2048 vs 2048 tokens, 4 (token, id) pairs not shared. The retain model must use the model's tokenizer.",
            ],
        ),
        (
            [*base, "--benchmark", qa_benchmark(tmp_path / "b1", drop_split="holdout")],
            [
                ": no holdout split; expected a file holdout.jsonl (or holdout.json, holdout.parquet, holdout.csv) "
                "with the columns entity, question, answer, paraphrased_answer, perturbed_answers."
            ],
        ),
        (
            [*base, "--benchmark", qa_benchmark(tmp_path / "b2", drop_column="perturbed_answers")],
            [
                ": the forget split lacks the column(s) perturbed_answers; every split needs entity, question, answer, "
                "paraphrased_answer, perturbed_answers (it has entity, question, answer, paraphrased_answer)."
            ],
        ),
        (
            [*base, "--benchmark", str(tmp_path / "nowhere")],
            ["': not 'builtin', not 'smollm2-knowledge' and not a folder"],
        ),
        (
            ["eval", "--benchmark", bench, "--output_dir", str(out)],
            ["--model_name_or_path: required with the benchmark folder '", "(the model to evaluate, or the base of "],
        ),
        ([*base, "--batch_size", "0"], ["--batch_size: must be >= 1, got 0"]),
        ([*base, "--max_new_tokens", "0"], ["--max_new_tokens: must be >= 1, got 0"]),
    ]
    for argv, fragments in cases:
        refused_as_documented(capsys, argv, *fragments)
        assert not out.exists()
    reference = tmp_path / "ref.json"
    reference.write_text(
        json.dumps({"format": "etu-hf/unlearning-eval", "settings": {"benchmark": {"fingerprint": "x"}}})
    )
    fragments = ["was made on another benchmark (fingerprint ", "; evaluate the retain model on this benchmark"]
    refused_as_documented(capsys, [*base, "--reference_eval", str(reference)], *fragments)
    out.mkdir()
    (out / "EVAL.json").write_text("{}")
    message = (
        "already holds EVAL.json; nothing was written. Pass --overwrite_output_dir or choose another --output_dir."
    )
    refused_as_documented(capsys, base, message)
    assert os.listdir(out) == ["EVAL.json"]


def test_compare_bad_inputs(tmp_path, capsys, no_model_load):
    out = tmp_path / "cmp"
    base = ["compare", "--output_dir", str(out)]
    lr_message = "--learning_rates / --etu_learning_rate: learning rates must be > 0"
    cases = [
        (
            ["--methods", "etu,rmu"],
            "--methods: unknown method(s) ['rmu']; known: etu, etu-pmi, etu-words, etu-cont, etu-npo, ga, graddiff, "
            "npo, simnpo, undial",
        ),
        (["--etu_epsilons", "0.1,1.5"], "--etu_epsilons: every epsilon must be in (0, 1) (got 0.1,1.5)"),
        (["--learning_rates", "fast"], "--learning_rates: cannot read 'fast' as comma-separated float values"),
        (
            ["--learning_rates", ""],
            "--learning_rates: empty list; give comma-separated values, e.g. --learning_rates 1e-4,3e-4",
        ),
        (["--learning_rates", "0,1e-3"], lr_message),
        (["--learning_rates", "nan"], lr_message),
        (["--etu_learning_rate", "-1"], lr_message),
        (["--max_steps", "0"], "--max_steps: must be >= 1 (got 0)"),
        (["--relearn_steps", "-1"], "--relearn_steps: must be >= 0 (got -1)"),
        (["--relearn_fraction", "0"], "--relearn_fraction: must be in (0, 1] (got 0.0)"),
        (["--retain_weight", "-1"], "--retain_weight: must be >= 0 (got -1.0)"),
        (["--benchmark", str(tmp_path / "nowhere")], "': not 'builtin', not 'smollm2-knowledge' and not a folder"),
    ]
    for extra, message in cases:
        refused_as_documented(capsys, [*base, *extra], message)
        assert not out.exists()
    # found once the benchmark is read, still before anything is written
    bench = qa_benchmark(tmp_path / "bench")
    message = (
        "--model_name_or_path and --retain_model are required with a benchmark folder (the model trained on forget "
        "+ retain, and the one trained on retain only)"
    )
    refused_as_documented(capsys, [*base, "--benchmark", bench], message)
    assert not out.exists()
    other = other_tokenizer_model(tmp_path)
    argv = [*base, "--benchmark", bench, "--model_name_or_path", DEMO_MODEL_DIR, "--retain_model", other]
    fragments = [
        "--retain_model: ",
        " has another tokenizer (2048 tokens) than the model being unlearned (2048 tokens, ",
    ]
    refused_as_documented(capsys, argv, *fragments, "; both models must share one tokenizer")
    assert not out.exists()
    out.mkdir()
    (out / "COMPARE.json").write_text("{}")
    message = (
        "already holds COMPARE.json; nothing was written. Pass --overwrite_output_dir or choose another --output_dir."
    )
    refused_as_documented(capsys, base, message)
