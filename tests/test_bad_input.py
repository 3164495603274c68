"""Every bad input of docs/bad_inputs.md gets its one-line error (naming the flag or file and the fix)
or its warning, before anything is written; the output folder is left as it was."""

import json
import logging
import math
import os
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
