"""The etu-hf command line: unlearn on local files, artifacts and their schema, aliases, bad input."""

import json
import os
import subprocess
import sys

import pytest
from helpers import cli_flags

from etu_hf.commands.cli import main, rewrite_aliases
from etu_hf.demo.run import write_demo_corpora

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
    assert vs["format"] == "etu-hf/forbidden-set" and vs["version"] == 1
    for key in ("ids", "tokens", "forget_counts", "retain_counts", "scores", "method", "parameters", "vocab_size"):
        assert key in vs, key
    assert len(vs["ids"]) == len(vs["tokens"]) == len(vs["scores"]) <= 32

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


def test_aliases_are_rewritten():
    assert rewrite_aliases(
        [
            "--batch_size",
            "3",
            "--log_every=5",
            "--max_length",
            "9",
            "--verbose",
            "--deterministic",
            "--use_pmi_vs",
            "false",
            "--epsilon",
            "0.1",
        ]
    ) == [
        "--per_device_train_batch_size",
        "3",
        "--logging_steps=5",
        "--block_size",
        "9",
        "--log_level",
        "info",
        "--full_determinism",
        "--vs_method",
        "frequency",
        "--epsilon",
        "0.1",
    ]
    assert rewrite_aliases(["--use_pmi_vs"]) == ["--vs_method", "pmi"]


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
