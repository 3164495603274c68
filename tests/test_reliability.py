"""Issue 21: nothing of the user's is lost or replaced unasked (the run lock, a failed resume, the model's
own folder, files no etu-hf run wrote, moving aside that fails half-way, a run killed while replacing
another), and no false verdict (a diverged run, 0 steps, the demo's data mixed with the user's)."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
from helpers import cli_flags
from test_bad_input import no_model_load, refused  # noqa: F401 (a fixture)
from test_run_folder import Boom, fake_checkpoint, snapshot

from etu_hf import ETUTrainingArguments
from etu_hf.artifacts import run_folder
from etu_hf.artifacts.run_folder import PREVIOUS_RUN_PREFIX, RunFolder, check_output_dir
from etu_hf.artifacts.run_lock import LOCK_FILE, acquire_lock, check_not_locked, release_lock
from etu_hf.commands.cli import main
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import write_demo_corpora


@pytest.fixture
def corpora(tmp_path):
    return write_demo_corpora(str(tmp_path / "data"))


def flags(tmp_path, forget, retain, *extra, steps=2):
    return cli_flags(
        tmp_path, forget, retain, "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", *extra, steps=steps
    )


def previous_run(folder):
    """A finished etu-hf run's files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps({"epsilon": 0.05}))
    (folder / "V_S.ids.json").write_text(json.dumps({"ids": [5, 6]}))
    (folder / "metrics.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"old adapter")
    return snapshot(folder)


def aside_folder(path):
    """Whether ``path`` is an entry of a ``_previous_run_*`` folder."""
    return os.path.basename(os.path.dirname(path)).startswith(PREVIOUS_RUN_PREFIX)


def dead_pid():
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------------------- the run lock
def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    with RunFolder(str(out)):
        assert (out / LOCK_FILE).exists()
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        # another process's view: the lock names a live process (this one), so both checks refuse
        RunFolder._active.clear()
        with pytest.raises(ValueError, match=rf"is in use by another etu-hf run \(pid {os.getpid()} on host"):
            check_output_dir(str(out), False)
        with pytest.raises(ValueError, match="is in use by another etu-hf run"), RunFolder(str(out)):
            pass
        RunFolder._active.add(os.path.realpath(out))
        (out / "args.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["args.json"]  # the lock is gone with the run


def test_a_stale_lock_after_sigkill_is_replaced_and_a_foreign_host_one_is_not(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "x", "command": "y"}))
    check_not_locked(str(out))  # stale: not a refusal
    with caplog.at_level(logging.WARNING, logger="etu_hf.artifacts.run_lock"):
        assert acquire_lock(str(out)) == str(lock)
    assert "stale lock" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_lock(str(out))
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x", "command": "y"}))
    with pytest.raises(ValueError, match=rf"on host elsewhere.*delete {lock}"):
        acquire_lock(str(out))
    assert json.loads(lock.read_text())["host"] == "elsewhere"  # untouched
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # no temporary file left


def test_a_run_that_finished_while_this_one_loaded_is_not_replaced(tmp_path):
    """Two runs started together into one new folder: the check before loading passed for both; the
    second one to reach its writes finds the first one's run and refuses instead of replacing it."""
    out = tmp_path / "run"
    check_output_dir(str(out), False)
    before = previous_run(out)  # the first run finished meanwhile
    with pytest.raises(ValueError, match="already holds a previous run"), RunFolder(str(out), existed=False):
        pass
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------- resume, overwrite
def test_a_failed_resume_puts_back_args_json(tmp_path):
    out = tmp_path / "run"
    previous_run(out)
    fake_checkpoint(out, 2)
    before = snapshot(out)
    with pytest.raises(Boom), RunFolder(str(out), resume=True):
        (out / "args.json").write_text(json.dumps({"epsilon": 0.3}))  # the resumed run's arguments
        (out / "V_S.ids.json").write_text(json.dumps({"ids": [5, 6]}))
        raise Boom
    assert snapshot(out) == before


def test_resume_with_other_lora_settings_is_one_line_and_changes_nothing(tmp_path, corpora, capsys):
    """Issue 21 item 1, end to end: the LoRA size mismatch of the resume is one line naming the flag, and
    args.json (and everything else) stays as the first run left it."""
    lora = ["--use_lora", "--lora_r", "4", "--lora_alpha", "8", "--save_strategy", "steps", "--save_steps", "2"]
    assert main(["unlearn", *flags(tmp_path, *corpora, *lora, "--audit_max_sequences", "4")]) == 0
    out = tmp_path / "run"
    before = snapshot(out)
    assert json.loads((out / "args.json").read_text())["epsilon"] == 0.05
    argv = flags(tmp_path, *corpora, *lora, "--lora_r", "16", "--epsilon", "0.3", "--resume_from_checkpoint", "true")
    line = refused(capsys, ["unlearn", *argv], "--resume_from_checkpoint ")
    assert "the checkpoint's weights do not fit this run's model" in line and "--lora_r" in line
    assert snapshot(out) == before


def test_moving_aside_that_fails_half_way_changes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    before = previous_run(out)
    real = os.rename

    def immutable(src, dst):
        if os.path.basename(src) == "metrics.json" and aside_folder(dst):
            raise PermissionError(1, "Operation not permitted")
        return real(src, dst)

    monkeypatch.setattr(run_folder.os, "rename", immutable)
    with pytest.raises(ValueError, match=r"could not move 'metrics.json'.*nothing was changed"):
        with RunFolder(str(out), overwrite=True):
            pass
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)


def test_a_previous_run_that_cannot_be_put_back_is_named(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    previous_run(out)
    real = os.rename

    def stuck(src, dst):
        if aside_folder(src) and os.path.basename(src) == "metrics.json":
            raise PermissionError(1, "Operation not permitted")
        return real(src, dst)

    monkeypatch.setattr(run_folder.os, "rename", stuck)
    with caplog.at_level(logging.ERROR), pytest.raises(Boom), RunFolder(str(out), overwrite=True):
        (out / "args.json").write_text("{}")
        raise Boom
    aside = [n for n in os.listdir(out) if n.startswith(PREVIOUS_RUN_PREFIX)]
    assert len(aside) == 1 and os.listdir(out / aside[0]) == ["metrics.json"]
    assert "metrics.json of the previous run could not be put back" in caplog.text
    assert json.loads((out / "args.json").read_text()) == {"epsilon": 0.05}  # the rest is back


def test_a_run_killed_while_replacing_is_named_next_time(tmp_path, corpora, capsys, no_model_load):  # noqa: F811
    out = tmp_path / "run"
    previous_run(out)
    aside = out / f"{PREVIOUS_RUN_PREFIX}20260101-000000"
    aside.mkdir()
    shutil.move(str(out / "adapter_model.safetensors"), aside)
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))  # SIGKILL
    line = refused(capsys, ["unlearn", *flags(tmp_path, *corpora, "--overwrite_output_dir")], aside.name)
    assert f"mv {aside}/* {out}/ && rmdir {aside}" in line and "was killed" in line
    assert (aside / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------- whose files
def test_output_dir_equal_to_the_model_folder_is_refused(tmp_path, corpora, capsys, no_model_load):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, model)
    before = snapshot(model)
    argv = flags(tmp_path, *corpora)
    argv[argv.index("--model_name_or_path") + 1] = str(model)
    argv[argv.index("--output_dir") + 1] = str(model)
    for extra in ([], ["--overwrite_output_dir"]):
        refused(capsys, ["unlearn", *argv, *extra], "is the --model_name_or_path folder: the run would write over")
    assert snapshot(model) == before


def test_files_no_etu_hf_run_wrote_are_refused(tmp_path, corpora, capsys, no_model_load):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    for extra in ([], ["--overwrite_output_dir"]):
        line = refused(capsys, ["unlearn", *flags(tmp_path, *corpora, *extra)], "holds README.md, which no etu-hf")
        assert "Move them elsewhere" in line
    (out / "README.md").unlink()
    (out / "config.json").write_text("{}")
    (out / "tokenizer.json").write_text("{}")
    refused(capsys, ["unlearn", *flags(tmp_path, *corpora)], "holds config.json, tokenizer.json, which no etu-hf")
    assert sorted(os.listdir(out)) == ["config.json", "tokenizer.json"]
    # in a previous etu-hf run's folder, its own model card is replaced; a README.md of yours is not
    shutil.rmtree(out)
    previous_run(out)
    (out / "README.md").write_text("---\ntags: [etu-hf]\n---\n")
    check_output_dir(str(out), True)
    (out / "README.md").write_text("# my notes\n")
    with pytest.raises(ValueError, match=r"holds README\.md, which no etu-hf run wrote"):
        check_output_dir(str(out), True)
    with pytest.raises(ValueError, match=r"holds README\.md, which no etu-hf run wrote"), RunFolder(str(out), True):
        pass


# ------------------------------------------------------------------------------------- false verdicts
def test_no_forget_corpora_with_your_own_model_or_data_is_refused(tmp_path, corpora, capsys, no_model_load):  # noqa: F811
    out = tmp_path / "run"
    for extra in (["--model_name_or_path", DEMO_MODEL_DIR], ["--retain_corpora", corpora[1]]):
        line = refused(capsys, ["unlearn", "--output_dir", str(out), *extra], "--forget_corpora: required with --")
        assert extra[0] in line
    assert not out.exists()


def test_zero_optimizer_steps_are_refused():
    with pytest.raises(ValueError, match="num_train_epochs: with max_steps <= 0 it trains 0 steps"):
        ETUTrainingArguments(output_dir="unused", max_steps=-1, num_train_epochs=0)


def test_a_diverged_run_stops_and_saves_nothing(tmp_path, corpora, capsys):
    argv = flags(tmp_path, *corpora, "--use_lora", "--learning_rate", "1e10", "--logging_steps", "1", steps=4)
    line = refused(capsys, ["unlearn", *argv], "training diverged at step ")
    assert "nothing was saved" in line and "--learning_rate (now 1e+10)" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- models, tokenizers, V_S
def _model_flags(tmp_path, corpora, model, *extra):
    argv = flags(tmp_path, *corpora, *extra)
    argv[argv.index("--model_name_or_path") + 1] = str(model)
    return argv


def test_model_path_problems_are_one_line_before_anything_loads(tmp_path, corpora, capsys, no_model_load, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{bad")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(DEMO_MODEL_DIR, "config.json"), no_weights)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(DEMO_MODEL_DIR, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        (tmp_path / "nowhere", "does not exist (and is not a hub id such as org/name)"),
        (empty, "holds no config.json: it is not a model folder"),
        (bad_config, "its config.json is not valid JSON (Expecting property name"),
        (no_weights, "holds config.json but no weights (model.safetensors, pytorch_model.bin, ...)"),
        (no_tokenizer, "holds no tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model, ...)"),
        (a_file, "is a file, not a model folder"),
        (fifo, "is a FIFO (named pipe), not a model folder"),
        ("some-org/not-cached", "is not a local folder and not in the hub cache, and HF_HUB_OFFLINE"),
    ]
    for model, message in cases:
        line = refused(capsys, ["unlearn", *_model_flags(tmp_path, corpora, model)], message)
        assert line.startswith(f"etu-hf unlearn: error: --model_name_or_path {str(model)!r}"), line
    for model, message in cases[:3] + cases[5:]:
        refused(capsys, ["env", "--model_name_or_path", str(model)], message)
    assert not (tmp_path / "run").exists()


def _small_tokenizer(folder):
    """A 10-token tokenizer: another model's (the demo model has 2048 rows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "a", "b", "c", "d", "e", "f", "g", "h"])}
    spec = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    spec.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=spec, unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    return folder


def test_a_tokenizer_of_another_model_is_refused_before_the_weights(tmp_path, corpora, capsys, no_model_load):  # noqa: F811
    tok = _small_tokenizer(tmp_path / "tok")
    argv = flags(tmp_path, *corpora, "--tokenizer_name_or_path", str(tok))
    line = refused(capsys, ["unlearn", *argv], "--tokenizer_name_or_path: the tokenizer has 10 tokens but the model's")
    assert "it is not the model's tokenizer" in line
    assert not (tmp_path / "run").exists()


def test_a_config_with_more_layers_than_the_weights_is_refused(tmp_path, corpora, capsys):
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 2}))
    line = refused(capsys, ["unlearn", *_model_flags(tmp_path, corpora, model)], "config.json describes weights")
    assert "model.layers.4." in line and "they would start random" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"ids": [5, 6], "vocab_size": 4096}, "V_S was built for a vocabulary of 4096 tokens (its vocab_size) but"),
        ([1, 5, 6], "V_S holds the tokenizer's pad token (id 1): padding is not text"),
        (list(range(2048)), "V_S holds every one of the model's 2048 tokens, so no token is left"),
        ([5, 99999], "forbidden token id(s) are outside the model's vocabulary [0, 2048)"),
    ],
)
def test_v_s_files_that_do_not_fit_are_refused_before_the_weights(
    tmp_path,
    corpora,
    capsys,
    no_model_load,  # noqa: F811
    content,
    message,
):
    path = tmp_path / "V_S.ids.json"
    path.write_text(json.dumps(content))
    line = refused(capsys, ["unlearn", *flags(tmp_path, *corpora, "--forbidden_ids_path", str(path))], message)
    assert line.startswith("etu-hf unlearn: error: --forbidden_ids_path: ")
    assert not (tmp_path / "run").exists()


def test_a_refused_trainer_leaves_no_empty_output_folder(tmp_path, model, tokenizer, make_args):
    from etu_hf import ETUTrainer
    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.demo.corpus import forget_documents

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="V_S holds the tokenizer's pad token"):
        ETUTrainer(
            model=model,
            args=make_args(output_dir=str(out)),
            train_dataset=tokenize_and_block(forget_documents(20, seed=1), tokenizer, 64),
            processing_class=tokenizer,
            forbidden_set=[tokenizer.pad_token_id, 7],
        )
    assert not out.exists()


# ------------------------------------------------------------------------------------- data, flags, one line
def test_corpora_that_are_not_text_files(tmp_path, corpora, capsys, no_model_load):  # noqa: F811
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 5}\n{"text": 7}\n')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    run = tmp_path / "old-run"
    previous_run(run)
    notes = tmp_path / "notes.md"
    notes.write_text("# notes\n")
    cases = [
        (numbers, "column 'text' row 1 holds int '5', not text"),
        (fifo, "is neither a file nor a folder (a FIFO or a device?)"),
        (run, "is an etu-hf run folder (V_S.ids.json, args.json), not a corpus"),
        (notes, "notes.md is not a corpus file this command reads"),
    ]
    for path, message in cases:
        line = refused(capsys, ["unlearn", *flags(tmp_path, str(path), corpora[1])], message)
        assert line.startswith("etu-hf unlearn: error: --forget_corpora: "), line
    assert not (tmp_path / "run").exists()


def test_compressed_json_lines_corpora_are_read(tmp_path, tokenizer):
    import gzip

    from etu_hf.commands.arguments import DataArguments
    from etu_hf.commands.unlearn import prepare_corpora
    from etu_hf.demo.corpus import forget_documents

    docs = forget_documents(20, seed=4)
    path = tmp_path / "forget.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    data = prepare_corpora(DataArguments(forget_corpora=[str(path)], block_size=32), tokenizer, seed=0)
    assert len(data["forget_train"]) + len(data["forget_eval"]) > 0
    from etu_hf.data.corpus import load_corpora, parse_corpus_specs

    loaded = load_corpora(parse_corpus_specs([str(path)]), "text", "--forget_corpora")
    assert loaded == [[d.strip() for d in docs]]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "-1"], "seed: must be in [0, 2**32)"),
        (["--use_lora", "--layer_ids", "99"], "--layer_ids: layer(s) [99] out of range: the model has 4"),
        (["--max_steps", "abc"], "invalid int value: 'abc' (see `etu-hf unlearn --help`)"),
        (["--report_to", "tensorboard"], "--report_to tensorboard: its package is not installed"),
        (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs: with max_steps <= 0 it trains 0 steps"),
    ],
)
def test_flag_errors_are_one_line_naming_the_flag(tmp_path, corpora, capsys, no_model_load, extra, message):  # noqa: F811
    if extra[0] == "--report_to":
        pytest.importorskip("transformers.integrations")
        from etu_hf.training.setup import check_report_to

        try:
            check_report_to(ETUTrainingArguments(output_dir="unused", report_to="tensorboard"))
            pytest.skip("tensorboard is installed here")
        except ValueError:
            pass
    line = refused(capsys, ["unlearn", *flags(tmp_path, *corpora, *extra)], message)
    assert capsys.readouterr().out.count("usage:") == 0, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["audit", "eval", "compare", "unlearn"])
def test_tokens_are_never_echoed(tmp_path, capsys, command):
    secret = "plain-secret-value-42"
    assert main([command, "--hub_token", secret, "--output_dir", str(tmp_path / "o"), "--no_such_flag"]) == 2
    captured = capsys.readouterr()
    assert secret not in captured.err + captured.out
    assert captured.err.count("\n") == 1 and "error:" in captured.err


def test_push_to_an_unreachable_endpoint_is_one_line(tmp_path, capsys, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused\n(and a long chain after it)")

    monkeypatch.setattr("etu_hf.hub.push.push_run", unreachable)
    argv = [
        "push",
        "--output_dir",
        str(tmp_path),
        "--repo_id",
        "me/unlearned",
        "--hub_token",
        "hf_abcdefghijklmnopqrstu",
    ]
    line = refused(capsys, argv, "the upload to me/unlearned failed (ConnectionError: [Errno 111] Connection refused)")
    assert "is unchanged" in line and "HF_ENDPOINT" in line and "hf_abcdef" not in line


def test_a_full_disk_is_one_line(tmp_path, corpora, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "V_S.ids.json"))

    monkeypatch.setattr("etu_hf.training.records.write_json", full)
    monkeypatch.setattr("etu_hf.forbidden_set.ForbiddenSet.save", full)
    assert main(["unlearn", *flags(tmp_path, *corpora)]) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("etu-hf")]
    assert len(ours) == 1 and ours[0].startswith("etu-hf unlearn: error: no space left on the device writing "), ours
    assert not (tmp_path / "run").exists()


def test_input_ids_beyond_the_vocabulary_from_python(tmp_path, model, tokenizer, make_args):
    import datasets

    from etu_hf import ETUTrainer

    data = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 5000]] * 4, "attention_mask": [[1] * 4] * 4})
    with pytest.raises(ValueError, match=r"train_dataset \(the forget data\) holds token id 5000 in 'input_ids'"):
        ETUTrainer(model=model, args=make_args(), train_dataset=data, processing_class=tokenizer, forbidden_set=[5])
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_output_dir_is_not_called_a_file_or_folder(tmp_path, corpora, capsys, no_model_load):  # noqa: F811
    os.mkfifo(tmp_path / "run")
    refused(capsys, ["unlearn", *flags(tmp_path, *corpora)], "is a FIFO or device, not a file, not a folder")
