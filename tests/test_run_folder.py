"""What runs leave in their output folder: no secret in any byte of it, nothing from a run that fails,
atomic artifacts, replacement of a previous run only by a run that succeeds, and resumable checkpoints."""

import json
import logging
import math
import os
import zipfile

import pytest
import torch
from helpers import make_read_only
from safetensors.torch import save_file

from etu_hf.artifacts.files import atomic_write, safetensors_problem, write_json
from etu_hf.artifacts.run_folder import (
    PREVIOUS_RUN_PREFIX,
    RunFolder,
    check_output_dir,
    checkpoint_problem,
    resolve_resume_checkpoint,
)
from etu_hf.commands.cli import main
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import write_demo_corpora

TOKEN = "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0123"
ENV_TOKEN = "hf_EnvTokenThatMustNeverReachTheDisk4567"


def fake_checkpoint(folder, step, **broken):
    """A checkpoint folder the completeness check accepts; ``broken`` maps a file name to the bytes it
    should hold instead (b"" for the 0-byte file a Ctrl-C during the save leaves)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": torch.zeros(4)}, str(path / "adapter_model.safetensors"))
    for name, content in broken.items():
        (path / name).write_bytes(content)
    return path


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` (None when it does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------- atomic writes
def test_artifacts_are_written_atomically(tmp_path):
    path = tmp_path / "args.json"
    write_json(str(path), {"a": 1})

    def crash(f):
        f.write('{"half": ')
        raise KeyboardInterrupt  # Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), crash)
    assert json.loads(path.read_text()) == {"a": 1}  # the old content, whole
    assert os.listdir(tmp_path) == ["args.json"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # the permissions of a plain open(), not mkstemp's


def test_safetensors_problem_reads_only_the_header(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    assert safetensors_problem(str(path)) is None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in safetensors_problem(str(path))
    path.write_bytes(b"\xff" * 64)
    assert "model.safetensors" in safetensors_problem(str(path))


# ------------------------------------------------------------------------------------- checkpoints
def test_incomplete_checkpoints_are_named_and_skipped(tmp_path, caplog):
    out = tmp_path / "run"
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 4, **{"trainer_state.json": b""})  # Ctrl-C while transformers wrote it
    fake_checkpoint(out, 6, **{"adapter_model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{"})
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    assert checkpoint_problem(str(out / "checkpoint-4")) == "trainer_state.json is empty (0 bytes)"
    assert "adapter_model.safetensors" in checkpoint_problem(str(out / "checkpoint-6"))

    with caplog.at_level(logging.WARNING, logger="etu_hf.artifacts.run_folder"):
        assert resolve_resume_checkpoint(True, str(out)) == str(out / "checkpoint-2")
        assert resolve_resume_checkpoint("true", str(out)) == str(out / "checkpoint-2")  # the CLI's spelling
    assert "checkpoint-6" in caplog.text and "checkpoint-4" in caplog.text and "trainer_state.json" in caplog.text
    assert resolve_resume_checkpoint(str(out), str(tmp_path)) == str(out / "checkpoint-2")  # a run folder

    with pytest.raises(ValueError, match=r"checkpoint-4.*incomplete: trainer_state.json is empty.*checkpoint-2"):
        resolve_resume_checkpoint(str(out / "checkpoint-4"), str(out))
    (out / "checkpoint-2" / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"no complete checkpoint.*checkpoint-2: trainer_state.json is not valid JSON"):
        resolve_resume_checkpoint(True, str(out))
    with pytest.raises(ValueError, match="holds no checkpoint"):
        resolve_resume_checkpoint(True, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_resume_checkpoint(str(tmp_path / "nowhere"), str(out))
    assert resolve_resume_checkpoint(None, str(out)) is None


# ------------------------------------------------------------------------------------- the run folder
class Boom(Exception):
    pass


def test_a_failed_run_leaves_the_folder_as_it_found_it(tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(Boom), RunFolder(str(fresh)):
        write_json(str(fresh / "args.json"), {})
        (fresh / "V_S.ids.json").write_text("[]")
        raise Boom
    assert not fresh.exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = snapshot(mine)
    with pytest.raises(KeyboardInterrupt), RunFolder(str(mine)):
        write_json(str(mine / "args.json"), {})
        fake_checkpoint(mine, 3, **{"trainer_state.json": b""})  # interrupted during its first save
        raise KeyboardInterrupt
    assert snapshot(mine) == before


def test_a_failed_run_keeps_its_complete_checkpoints_for_resuming(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING), pytest.raises(Boom), RunFolder(str(out)):
        write_json(str(out / "args.json"), {})
        (out / "V_S.ids.json").write_text("[]")
        fake_checkpoint(out, 2)
        fake_checkpoint(out, 4, **{"trainer_state.json": b""})
        (out / "suppression_report.json").write_text("{")
        raise Boom
    assert sorted(os.listdir(out)) == ["V_S.ids.json", "args.json", "checkpoint-2"]
    assert "--resume_from_checkpoint true" in caplog.text
    assert resolve_resume_checkpoint(True, str(out)) == str(out / "checkpoint-2")


def test_overwrite_replaces_a_previous_run_only_when_the_new_one_succeeds(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    write_json(str(out / "args.json"), {"run": "old"})
    (out / "V_S.ids.json").write_text("[1, 2]")
    (out / "adapter_model.safetensors").write_bytes(b"old weights")
    fake_checkpoint(out, 7)
    (out / "notes.txt").write_text("not a run artifact")
    before = snapshot(out)

    with pytest.raises(Boom), RunFolder(str(out), overwrite=True):
        assert not (out / "V_S.ids.json").exists()  # moved aside: the new run never mixes with it
        (out / "V_S.ids.json").write_text("[3]")
        raise Boom
    assert snapshot(out) == before  # the old V_S and the old adapter together, as before

    with RunFolder(str(out), overwrite=True):
        (out / "V_S.ids.json").write_text("[3]")
        write_json(str(out / "args.json"), {"run": "new"})
    assert sorted(os.listdir(out)) == ["V_S.ids.json", "args.json", "notes.txt"]
    assert not any(n.startswith(PREVIOUS_RUN_PREFIX) for n in os.listdir(out))

    with RunFolder(str(out), overwrite=True), RunFolder(str(out), overwrite=True):  # nested: the outer one decides
        (out / "metrics.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["metrics.json", "notes.txt"]


def test_output_dir_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"--output_dir .*out.txt' is a file"):
        check_output_dir(str(a_file), False)
    with pytest.raises(ValueError, match=r"cannot be created: .*out.txt' is a file"):
        check_output_dir(str(a_file / "sub"), False)
    ro = tmp_path / "ro"
    ro.mkdir()
    make_read_only(ro, monkeypatch)
    with pytest.raises(ValueError, match=r"--output_dir .*ro' is not writable: Permission denied"):
        check_output_dir(str(ro), False)
    with pytest.raises(ValueError, match=r"ro/new' is not writable \(its parent"):
        check_output_dir(str(ro / "new"), False)


# ------------------------------------------------------------------------------------- secrets
def _scan(folder, secrets):
    """Paths under ``folder`` whose bytes (and, for zip archives such as torch's .bin, whose members'
    bytes) contain one of ``secrets``."""
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        blobs = [path.read_bytes()]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs += [z.read(name) for name in z.namelist()]
        if any(s.encode() in b for b in blobs for s in secrets):
            found.append(str(path.relative_to(folder)))
    return found


COMMON = [
    "--max_steps",
    "4",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--use_cpu",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--hub_token",
    TOKEN,
    "--audit_max_sequences",
    "4",
]


def test_no_command_writes_a_secret(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    run = tmp_path / "unlearn"
    code = main(
        [
            "unlearn",
            "--model_name_or_path",
            DEMO_MODEL_DIR,
            "--forget_corpora",
            forget,
            "--retain_corpora",
            retain,
            "--output_dir",
            str(run),
            "--use_lora",
            "--lora_target_modules",
            "all-linear",  # the DPO stage below (TRL) cannot take an adapter on the output head
            "--lora_r",
            "4",
            "--max_length",
            "64",
            "--batch_size",
            "4",
            "--pmi_top_k",
            "32",
            "--log_level",
            "info",
            *COMMON,
        ]
    )
    assert code == 0
    refine_common = ["--adapter", str(run), "--forget_corpora", forget, "--retain_corpora", retain]
    refine_common += ["--per_device_train_batch_size", "4", "--audit_block_size", "64", *COMMON]
    for method in ("npo", "dpo"):
        extra = ["--bf16", "false"] if method == "dpo" else []
        out = tmp_path / method
        assert main(["refine", "--method", method, "--output_dir", str(out), *refine_common, *extra]) == 0
    written = {name: tmp_path / name for name in ("unlearn", "npo", "dpo")}
    for name, folder in written.items():
        files = [p.name for p in folder.rglob("training_args.bin")]
        assert len(files) >= 3, (name, files)  # the output folder and each of its two checkpoints
        assert _scan(folder, [TOKEN, ENV_TOKEN]) == [], name
    logs = capfd.readouterr()
    assert TOKEN not in logs.out + logs.err and ENV_TOKEN not in logs.out + logs.err


# ------------------------------------------------------------------------------------- the CLI
def test_cli_refuses_an_incomplete_checkpoint_before_loading_anything(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 4, **{"trainer_state.json": b""})
    (out / "args.json").write_text('{"run": "previous"}')
    before = snapshot(out)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("etu_hf.commands.loader.load_causal_lm", no_model)
    flags = ["--forget_corpora", "unused.txt", "--output_dir", str(out), "--use_cpu"]
    assert main(["unlearn", *flags, "--resume_from_checkpoint", str(out / "checkpoint-4")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4" in err and "trainer_state.json is empty" in err and "checkpoint-2" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(out) == before  # args.json was not rewritten


# ------------------------------------------------------------------------------------- the run record
def test_run_record_reads_the_tilt_a_run_ended_with(tmp_path):
    from etu_hf.artifacts.record import RunRecord

    run = tmp_path / "run"
    run.mkdir()
    args = {"epsilon": 0.02, "lambda_mode": "global", "lambda_max": 3.0, "allow_negative_lambda": True, "seed": 7}
    (run / "args.json").write_text(json.dumps(args))
    lam = {"mode": "global", "closed_form_global": 4.5, "offset": -0.75, "adaptive": True}
    (run / "metrics.json").write_text(json.dumps({"epsilon": 0.02, "lambda": lam, "steps": 9}))
    (run / "V_S.ids.json").write_text("[3, 4]")
    record = RunRecord.read(str(run))
    assert record and record.args == args and record.metrics["steps"] == 9
    assert record.forbidden_path == str(run / "V_S.ids.json")
    tilt = record.tilt
    assert (tilt.epsilon, tilt.mode, tilt.lambda_max, tilt.allow_negative) == (0.02, "global", 3.0, True)
    assert (tilt.global_lambda, tilt.offset) == (4.5, -0.75)
    assert tilt.global_value() == 3.0  # clamp(4.5 - 0.75, -3, 3): lambda_max binds

    # per-position mode: eps' = sigmoid(logit(eps) - offset), computed here by hand
    args.update(lambda_mode="per_position")
    (run / "args.json").write_text(json.dumps(args))
    eps = RunRecord.read(str(run)).tilt.effective_epsilon
    assert abs(eps - 1 / (1 + (0.98 / 0.02) * math.exp(-0.75))) < 1e-12


def test_run_record_of_a_folder_without_a_run(tmp_path, monkeypatch):
    from etu_hf.artifacts.record import RunRecord
    from etu_hf.ops.tilt import DEFAULT_LAMBDA_MAX

    empty = RunRecord.read(str(tmp_path))
    assert not empty and empty.args == {} and empty.metrics == {} and empty.forbidden_path is None
    tilt = empty.tilt
    assert (tilt.epsilon, tilt.mode, tilt.lambda_max, tilt.allow_negative, tilt.global_lambda, tilt.offset) == (
        0.05, "per_position", DEFAULT_LAMBDA_MAX, False, None, 0.0
    )  # fmt: skip
    (tmp_path / "metrics.json").write_text('{"lambda": ')  # a write interrupted before atomic writes
    with pytest.raises(ValueError, match=r"metrics.json is not valid JSON"):
        RunRecord.read(str(tmp_path))
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"metrics.json is not a JSON object"):
        RunRecord.read(str(tmp_path))


def test_a_checkpoint_folder_reads_as_the_run_at_that_step(tmp_path):
    """A checkpoint-<step> folder has no args.json or metrics.json: the run's args come from the folder above,
    epsilon and the offset from the checkpoint's own state files (not the run's final offset)."""
    from etu_hf.artifacts.record import RunRecord
    from etu_hf.commands.audit import AuditArguments, resolve_block_size, resolve_tilt, run_of

    run = tmp_path / "run"
    ckpt = run / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"epsilon": None, "epsilon_ratio": 0.25, "block_size": 64}))
    (run / "metrics.json").write_text(
        json.dumps({"epsilon": 0.04, "lambda": {"closed_form_global": 2.0, "offset": 3.0}})
    )
    (ckpt / "etu_trainer_state.json").write_text(json.dumps({"global_step": 5, "epsilon": {"epsilon": 0.04}}))
    (ckpt / "etu_controller.json").write_text(json.dumps({"offset": 1.25, "history": []}))
    (ckpt / "V_S.ids.json").write_text("[3]")
    record = RunRecord.read(str(ckpt))
    assert record and record.block_size == 64 and record.forbidden_path == str(ckpt / "V_S.ids.json")
    tilt = record.tilt
    assert (tilt.epsilon, tilt.offset, tilt.global_lambda) == (0.04, 1.25, 2.0)
    args = AuditArguments(output_dir="unused", adapter=str(ckpt), forget_corpora=["f"])
    assert resolve_tilt(args, run_of(args)).offset == 1.25 and resolve_block_size(args, run_of(args)) == 64
    # a checkpoint of a run still training (no metrics.json above it) and one with no controller state
    (run / "metrics.json").unlink()
    (ckpt / "etu_controller.json").unlink()
    tilt = RunRecord.read(str(ckpt)).tilt
    assert (tilt.epsilon, tilt.offset, tilt.global_lambda) == (0.04, 0.0, None)
    # a folder that is not named as a checkpoint reads as before: empty
    other = tmp_path / "copy"
    other.mkdir()
    (other / "etu_controller.json").write_text(json.dumps({"offset": 1.25}))
    assert not RunRecord.read(str(other))


def test_audit_settings_come_from_the_run_and_flags_win(tmp_path):
    from etu_hf.artifacts.record import RunRecord
    from etu_hf.commands.audit import (
        DEFAULT_AUDIT_BLOCK_SIZE,
        AuditArguments,
        resolve_block_size,
        resolve_forbidden,
        resolve_tilt,
        run_of,
    )

    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(
        json.dumps({"epsilon": 0.02, "lambda_mode": "global", "lambda_max": 9.0, "block_size": 128})
    )
    (run / "metrics.json").write_text(json.dumps({"lambda": {"closed_form_global": 2.0, "offset": 0.5}}))
    (run / "V_S.ids.json").write_text("[3]")
    merged = tmp_path / "merged"
    merged.mkdir()
    args = AuditArguments(
        output_dir="unused", adapter=str(merged), forget_corpora=["f"], forbidden=str(run / "V_S.ids.json")
    )
    tilt = resolve_tilt(args, run_of(args))  # a merged model with its run's V_S: that run's settings
    assert (tilt.epsilon, tilt.mode, tilt.lambda_max, tilt.global_lambda, tilt.offset) == (
        0.02,
        "global",
        9.0,
        2.0,
        0.5,
    )
    args = AuditArguments(output_dir="unused", adapter=str(run), forget_corpora=["f"], epsilon=0.1, lambda_max=4.0)
    tilt = resolve_tilt(args, run_of(args))
    assert (tilt.epsilon, tilt.mode, tilt.lambda_max, tilt.offset) == (0.1, "global", 4.0, 0.5)
    assert resolve_forbidden(args) == str(run / "V_S.ids.json")
    # the blocks: the run's length (its own audit cut the held-out text so), a flag wins, no run: the default
    assert resolve_block_size(args, run_of(args)) == 128
    flagged = AuditArguments(output_dir="unused", adapter=str(run), forget_corpora=["f"], block_size=64)
    assert resolve_block_size(flagged, run_of(flagged)) == 64
    bare = AuditArguments(output_dir="unused", adapter=str(merged), forget_corpora=["f"])
    assert resolve_block_size(bare, run_of(bare)) == DEFAULT_AUDIT_BLOCK_SIZE == 512
    # a refined run: its own audit's --audit_block_size when given, else the ETU run's block_size it carries
    refined = RunRecord(folder="", args={"block_size": 128, "refine": {"audit_block_size": 256}})
    assert refined.block_size == 256
    assert RunRecord(folder="", args={"block_size": 128, "refine": {"audit_block_size": None}}).block_size == 128
    assert RunRecord(folder="", args={"block_size": True}).block_size is None  # not a length
    with pytest.raises(ValueError, match="--forbidden: no V_S given"):
        resolve_forbidden(AuditArguments(output_dir="unused", adapter=str(merged), forget_corpora=["f"]))
