"""The etu-hf command line: unlearn on local files, artifacts and their schema, aliases, bad input."""

import json
import os
import subprocess
import sys

import pytest
from helpers import cli_flags

from etu_hf.commands.arguments import parse_unlearn_args
from etu_hf.commands.cli import main, prepare_process
from etu_hf.demo.corpus import write_demo_corpora

TOKEN = "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123"


@pytest.fixture
def files(tmp_path):
    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    # the retain corpus as JSON lines, to exercise a second local format
    jsonl = tmp_path / "data" / "retain.jsonl"
    with open(retain) as f, open(jsonl, "w") as out:
        for doc in f.read().split("\n\n"):
            if doc.strip():
                out.write(json.dumps({"text": doc.strip()}) + "\n")
    return forget, str(jsonl)


def base_flags(tmp_path, forget, retain):
    return cli_flags(
        tmp_path,
        forget,
        retain,
        "--log_every",
        "2",
        "--use_lora",
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--pmi_min_count",
        "5",
        "--pmi_top_k",
        "32",
        "--p_s_sample_size",
        "16",
        "--report_to",
        "none",
        "--use_cpu",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--dataloader_pin_memory",
        "false",
        steps=4,
    )


def test_unlearn_on_local_files_writes_the_three_artifacts(tmp_path, files, capsys, check_metrics_schema):
    forget, retain = files
    code = main(["unlearn", *base_flags(tmp_path, forget, retain), "--hub_token", TOKEN])
    assert code == 0
    out = tmp_path / "run"
    printed = capsys.readouterr().out
    assert "held-out forget mass on V_S" in printed and "artifacts:" in printed

    vs = json.loads((out / "V_S.ids.json").read_text())
    # the default V_S: forbidden words (with their pieces and evidence) and forbidden continuations
    assert vs["format"] == "etu-hf/forbidden-set" and vs["version"] == 2 and vs["method"] == "words"
    for key in ("ids", "tokens", "words", "continuations", "parameters", "vocab_size"):
        assert key in vs, key
    assert len(vs["ids"]) == len(vs["tokens"]) and vs["words"] and 0 < vs["parameters"]["coverage"] <= 1
    assert all({"word", "forms", "pieces", "g2", "forget_count", "retain_count"} <= set(w) for w in vs["words"])

    raw_args = (out / "args.json").read_text()
    assert TOKEN not in raw_args
    args = json.loads(raw_args)
    assert args["hub_token"] == "<redacted>"
    assert args["per_device_train_batch_size"] == 4 and args["logging_steps"] == 2 and args["block_size"] == 64
    assert args["forget_corpora"] == [forget] and args["use_lora"] is True and args["epsilon"] == 0.05

    metrics = json.loads((out / "metrics.json").read_text())
    check_metrics_schema(metrics, heldout=True)
    assert metrics["steps"] == 4
    # the controller's held-out slice: heldout_batches (default 4) batches of --batch_size 4 blocks
    assert metrics["data"]["controller_heldout_blocks"] == 4 * 4
    held = metrics["heldout"]
    assert held["positions"] > 0 and 0 < held["base_p_S"] < 1
    assert (out / "adapter_model.safetensors").exists()
    assert not any(
        TOKEN in p.read_text(errors="ignore") for p in out.iterdir() if p.is_file() and p.suffix in (".json", ".md")
    )


def test_short_flag_names_set_the_flags_they_stand_for(tmp_path):
    required = ["--forget_corpora", "unused.txt", "--output_dir", str(tmp_path / "o")]
    short = ["--batch_size", "3", "--log_every=5", "--max_length", "9", "--verbose", "--deterministic"]
    _, data_args, training_args = parse_unlearn_args([*short, "--use_pmi_vs", "false", *required])
    assert training_args.per_device_train_batch_size == 3 and training_args.logging_steps == 5
    assert data_args.block_size == 9 and training_args.log_level == "info" and training_args.full_determinism is True
    assert training_args.vs_method == "frequency"
    assert parse_unlearn_args(["--use_pmi_vs", *required])[2].vs_method == "pmi"
    assert parse_unlearn_args(["--use_pmi_vs", "true", *required])[2].vs_method == "pmi"
    # a short name and its full flag are one option: the one given last wins, and the default stays
    batch = [parse_unlearn_args([*pair, *required])[2].per_device_train_batch_size for pair in (
        ["--batch_size", "5", "--per_device_train_batch_size", "6"],
        ["--per_device_train_batch_size", "6", "--batch_size", "5"],
        [],
    )]  # fmt: skip
    assert batch == [6, 5, 4]  # unset: etu-hf unlearn's 4 blocks, not transformers' 8
    assert parse_unlearn_args(required)[2].vs_method == "words" and parse_unlearn_args(required)[1].block_size == 128


def test_unlearn_defaults_to_small_batches_of_short_blocks_and_help_shows_defaults(tmp_path, capsys, monkeypatch):
    """4 blocks of 128 tokens (BENCHMARKS.md, "The defaults of `etu-hf unlearn`"), for every --method;
    the flags win; the Python API keeps transformers' defaults; --help prints each flag's default."""
    from etu_hf import ETUTrainingArguments

    required = ["--forget_corpora", "unused.txt", "--output_dir", str(tmp_path / "o")]
    for method in ("etu", "npo"):
        _, data_args, training_args = parse_unlearn_args(["--method", method, *required])
        assert (data_args.block_size, training_args.per_device_train_batch_size) == (128, 4)
    _, data_args, training_args = parse_unlearn_args(["--max_length", "512", "--batch_size", "8", *required])
    assert (data_args.block_size, training_args.per_device_train_batch_size) == (512, 8)
    assert ETUTrainingArguments(output_dir=str(tmp_path / "p")).per_device_train_batch_size == 8
    assert main(["unlearn", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "held-out evaluation and the audit). (default: 128)" in help_text
    assert "The batch size per device for training. (default: 4)" in help_text
    assert "With an adapter (--use_lora/--use_dora/--use_qlora): 0.001. (default: 5e-05)" in help_text
    # the demo's help shows the demo's own settings as the defaults
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--help"]) == 0
    demo_help = " ".join(capsys.readouterr().out.split())
    assert "The batch size per device for training. (default: 8)" in demo_help
    assert "(default: 0.003)" in demo_help and "(default: 150)" in demo_help


def test_adapters_default_to_their_own_learning_rate(tmp_path):
    required = ["--forget_corpora", "unused.txt", "--output_dir", str(tmp_path / "o")]
    assert parse_unlearn_args(required)[2].learning_rate == 5e-5  # transformers' default for full fine-tuning
    assert parse_unlearn_args(["--use_lora", *required])[2].learning_rate == 1e-3
    assert parse_unlearn_args(["--use_qlora=true", *required])[2].learning_rate == 1e-3
    assert parse_unlearn_args(["--use_lora", "--learning_rate", "0.02", *required])[2].learning_rate == 0.02
    assert parse_unlearn_args(["--use_lora", "false", *required])[2].learning_rate == 5e-5


def test_subcommands_unknown_command_version_and_no_command(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "unlearn" in err
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "unlearn", "audit", "refine", "env"))
    assert main(["--version"]) == 0
    from etu_hf import __version__

    assert capsys.readouterr().out.strip() == f"etu-hf {__version__}"


@pytest.mark.parametrize(
    "argv,flags",
    [
        (["audit", "--help"], ["usage: etu-hf audit", "--adapter", "--forbidden", "--max_length"]),
        (["refine", "-h"], ["usage: etu-hf refine", "--chosen", "--beta"]),
        (["refine", "--method", "npo", "--help"], ["usage: etu-hf refine", "--loss_type", "--beta"]),
        (["env", "--help"], ["usage: etu-hf env", "--json"]),
        (["demo", "--help"], ["usage: etu-hf demo", "demo settings:", "--max_steps 150", "--forget_corpora"]),
        (["unlearn", "--help"], ["usage: etu-hf unlearn", "--max_length BLOCK_SIZE", "--log_every N"]),
    ],
)
def test_each_command_has_its_own_help(tmp_path, monkeypatch, capsys, argv, flags):
    monkeypatch.chdir(tmp_path)  # `demo --help` must write nothing
    assert main(argv) == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag
    assert os.listdir(tmp_path) == []


def test_command_usage_errors_exit_2(capsys):
    assert main(["env", "--no_such_flag"]) == 2
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    assert main(["audit", "--output_dir", "o", "--forget_corpora", "f", "--dtype", "int3"]) == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_audit_accepts_max_length_for_block_size():
    from transformers import HfArgumentParser

    from etu_hf.commands.audit import AuditArguments

    (args,) = HfArgumentParser(AuditArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--forget_corpora", "f", "--max_length", "64"]
    )
    assert args.block_size == 64


@pytest.mark.parametrize(
    "argv,passive", [(["unlearn", "--use_qlora"], True), (["audit", "--load_in_4bit=true"], True),
                     (["unlearn", "--use_qlora", "false"], False), (["unlearn", "--use_lora"], False)]
)  # fmt: skip
def test_4bit_on_cpu_makes_openmp_threads_wait_passively(monkeypatch, argv, passive):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("etu_hf.commands.cli.shutil.which", lambda name: None)  # no GPU
    prepare_process(argv)
    assert (os.environ.get("OMP_WAIT_POLICY") == "PASSIVE") is passive


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--epsilon", "1.5"], "epsilon"),
        (["--lambda_max", "-1"], "lambda_max"),
        (["--forget_corpora", "/no/such/forget.txt"], "--forget_corpora: corpus '/no/such/forget.txt' does not exist"),
        (["--retain_corpora", "RETAIN,RETAIN"], "--retain_corpora gives 2 corpora for 1 forget corpora"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, files, capsys, extra, message):
    forget, retain = files
    flags = base_flags(tmp_path, forget, retain)
    extra = [e.replace("RETAIN", retain) for e in extra]
    for i in range(0, len(extra), 2):  # later flags win in argparse, but replace for clarity
        if extra[i] in flags:
            flags[flags.index(extra[i]) + 1] = extra[i + 1]
        else:
            flags += extra[i : i + 2]
    assert main(["unlearn", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_previous_run_is_refused(tmp_path, files, capsys):
    forget, retain = files
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    assert main(["unlearn", *base_flags(tmp_path, forget, retain)]) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert os.listdir(tmp_path / "run") == ["metrics.json"]


def test_module_alias_and_help():
    done = subprocess.run([sys.executable, "-m", "etu_hf", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "unlearn" in done.stdout and "demo" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "etu_hf", "unlearn", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for flag in (
        "--forget_corpora",
        "--retain_broadcast",
        "--epsilon",
        "--span_masking",
        "--use_lora",
        "--gradient_accumulation_steps",
        "--batch_size",
    ):
        assert flag in done.stdout, flag


def test_max_num_batches_caps_the_forget_blocks(tmp_path, files):
    forget, retain = files
    assert main(["unlearn", *base_flags(tmp_path, forget, retain), "--max_num_batches", "2"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["forget_train_blocks"] == 2 * 4  # batches x --batch_size (one process)
    assert metrics["data"]["block_size"] == 64


def test_unlearn_without_corpora_runs_the_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    flags = ["--output_dir", str(out), "--max_steps", "2", "--disable_tqdm", "true", "--use_cpu"]
    assert main(["unlearn", *flags]) == 0
    printed = capsys.readouterr().out
    assert "running the embedded demo" in printed and "held-out forget mass" in printed
    assert (out / "demo_data" / "forget.txt").exists() and (out / "metrics.json").exists()


def test_retain_broadcast_and_paired_corpora(tmp_path, tokenizer):
    from etu_hf.commands.arguments import DataArguments
    from etu_hf.commands.unlearn import prepare_corpora
    from etu_hf.data.pairing import CORPUS_ID_COLUMN

    paths = {}
    for name in ("f1", "f2", "r1", "r2"):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("\n\n".join(f"{name} document number {i} with some words" for i in range(10)))
    two = f"{paths['f1']},{paths['f2']}"
    broadcast = prepare_corpora(
        DataArguments(forget_corpora=two, retain_corpora=str(paths["r1"]), retain_broadcast=True, block_size=16),
        tokenizer,
        seed=0,
    )
    assert CORPUS_ID_COLUMN not in broadcast["retain_train"].column_names  # one retain pool for every forget corpus
    paired = prepare_corpora(
        DataArguments(forget_corpora=two, retain_corpora=f"{paths['r1']},{paths['r2']}", block_size=16),
        tokenizer,
        seed=0,
    )
    assert set(paired["forget_train"][CORPUS_ID_COLUMN]) == {0, 1} == set(paired["retain_train"][CORPUS_ID_COLUMN])
    with pytest.raises(ValueError, match="--retain_broadcast"):
        prepare_corpora(DataArguments(forget_corpora=two, retain_corpora=str(paths["r1"])), tokenizer, seed=0)
