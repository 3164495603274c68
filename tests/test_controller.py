"""The adaptive-lambda controller: the rule, its effect on a tiny model, resume and multi-process."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from etu_hf import AdaptiveLambdaCallback, ETUTrainer
from etu_hf.bounds import wilson_upper
from etu_hf.controller import ControllerSettings, ControllerState, controller_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "controller_run.py")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


# ------------------------------------------------------------------------------------- the rule itself
def test_rule_raises_lowers_and_holds():
    s = ControllerSettings(epsilon=0.05, eta=0.25, ema=0.0, use_upper=False)
    bounds = (-12.0, 12.0)
    # delta = 0.0008 -> slack sqrt(0.0004) = 0.02 -> margin 0.07
    _, rec = controller_step(ControllerState(), s, mass=0.09, delta=0.0008, n_positions=1000, offset_bounds=bounds)
    assert rec["decision"] == "raise" and rec["offset"] == 0.25 and rec["margin"] == pytest.approx(0.07)
    _, rec = controller_step(ControllerState(), s, mass=0.06, delta=0.0008, n_positions=1000, offset_bounds=bounds)
    assert rec["decision"] == "hold" and rec["offset"] == 0.0
    _, rec = controller_step(ControllerState(), s, mass=0.03, delta=0.0008, n_positions=1000, offset_bounds=bounds)
    assert rec["decision"] == "lower" and rec["offset"] == -0.25


def test_rule_uses_the_wilson_upper_bound_of_the_ema_with_capped_n():
    s = ControllerSettings(epsilon=0.05, ema=0.5, use_upper=True, wilson_max_n=100)
    st, _ = controller_step(ControllerState(), s, 0.04, 0.0, 5000, (-1, 1))
    st, rec = controller_step(st, s, 0.06, 0.0, 5000, (-1, 1))
    assert rec["ema_mass"] == pytest.approx(0.5 * 0.04 + 0.5 * 0.06)
    assert rec["wilson_n"] == 100
    assert rec["wilson_upper"] == pytest.approx(wilson_upper(0.05, 100))
    assert rec["decision"] == "raise"  # the point EMA equals epsilon, but its upper bound is above the margin


def test_rule_clamps_and_integral_has_anti_windup():
    s = ControllerSettings(epsilon=0.05, eta=0.5, ema=0.0, use_upper=False, ki=0.1, integral_max=3.0)
    st = ControllerState(offset=1.0)
    for _ in range(20):  # mass far above the margin: pushes against the upper clamp
        st, rec = controller_step(st, s, 0.9, 0.0, 1000, (-1.0, 1.0))
    assert st.offset == 1.0  # clamped
    assert rec["integral"] == 0.0  # not integrated while saturated
    st = ControllerState(offset=0.0)
    for _ in range(50):
        st, rec = controller_step(st, s, 0.9, 0.0, 1000, (-100.0, 100.0))
    assert rec["integral"] == 3.0  # clamped at +-integral_max
    assert math.isclose(st.offset, sum([0.5] * 50) + 0.1 * sum(min(3.0, 0.85 / 0.05 * k) for k in range(1, 51)))


def test_pinsker_cap_bounds_the_margin():
    s = ControllerSettings(epsilon=0.05, ema=0.0, use_upper=False, pinsker_cap=0.01)
    _, rec = controller_step(ControllerState(), s, 0.07, 2.0, 1000, (-1, 1))
    assert rec["margin"] == pytest.approx(0.06) and rec["decision"] == "raise"


# ------------------------------------------------------------------------------------- on a tiny model
def controller_trainer(model, tokenizer, corpora, make_args, **args):
    defaults = dict(adaptive_lambda=True, lambda_update_freq=5, lambda_eta=0.5, logging_steps=5, learning_rate=3e-3)
    defaults.update(args)
    return ETUTrainer(
        model=model,
        args=make_args(**defaults),
        train_dataset=corpora["forget"],
        retain_dataset=corpora["retain"],
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )


def test_global_mode_controller_raises_lambda_until_under_the_margin(model, tokenizer, corpora, make_args):
    trainer = controller_trainer(model, tokenizer, corpora, make_args, lambda_mode="global", max_steps=60)
    trainer.train()
    hist = trainer.lambda_controller.history
    lam0 = trainer.global_lambda
    assert len(hist) == 12 and hist[0]["step"] == 5
    # the closed form leaves the held-out mass far above epsilon (Jensen gap), so the controller raises
    assert hist[0]["heldout_mass"] > hist[0]["margin"] and hist[0]["decision"] == "raise"
    assert hist[-1]["lam"] > lam0 + 1.0
    assert hist[-1]["wilson_upper"] <= hist[-1]["margin"]  # and stops once the upper bound is under the margin
    assert hist[-1]["decision"] == "hold"
    assert hist[-1]["heldout_mass"] < hist[0]["heldout_mass"]
    assert all(h["positions"] == hist[0]["positions"] > 0 for h in hist)  # always the same held-out slice
    # the training loss used the moved lambda
    assert trainer.tilt_spec().global_value() == pytest.approx(hist[-1]["lam"])


def test_amplification_lowers_lambda_below_zero_and_mass_rises(model, tokenizer, corpora, make_args):
    trainer = controller_trainer(
        model,
        tokenizer,
        corpora,
        make_args,
        lambda_mode="global",
        epsilon=0.6,
        allow_negative_lambda=True,
        max_steps=40,
    )
    trainer.train()
    hist = trainer.lambda_controller.history
    assert trainer.base_p_s < 0.6
    assert all(h["decision"] == "lower" for h in hist)
    assert hist[-1]["lam"] < trainer.global_lambda < 0
    assert hist[-1]["heldout_mass"] > hist[0]["heldout_mass"] > trainer.base_p_s - 0.05


def test_without_use_upper_the_point_estimate_decides(model, tokenizer, corpora, make_args):
    trainer = controller_trainer(
        model, tokenizer, corpora, make_args, lambda_mode="global", max_steps=10, use_upper_for_lambda=False
    )
    trainer.train()
    for rec in trainer.lambda_controller.history:
        assert (rec["ema_mass"] > rec["margin"]) == (rec["decision"] == "raise")


def test_history_files_logs_and_checkpoint_state(model, tokenizer, corpora, make_args, tmp_path):
    trainer = controller_trainer(
        model, tokenizer, corpora, make_args, max_steps=10, save_strategy="steps", save_steps=5, logging_steps=5
    )
    trainer.train()
    out = trainer.args.output_dir
    hist = json.loads(open(os.path.join(out, "lambda_history.json")).read())
    assert hist["format"] == "etu-hf/lambda-history" and hist["mode"] == "per_position"
    rec = hist["records"][0]
    for key in ("step", "lam", "offset", "ema_mass", "heldout_mass", "wilson_upper", "delta", "margin", "decision"):
        assert key in rec, key
    assert rec["delta"] >= 0 and rec["margin"] == pytest.approx(0.05 + math.sqrt(rec["delta"] / 2))
    assert os.path.getsize(os.path.join(out, "lambda_history.png")) > 1000
    state = json.loads(open(os.path.join(out, "checkpoint-10", "etu_controller.json")).read())
    assert state["history"] == hist["records"] and state["offset"] == trainer.lambda_offset
    logged = [h for h in trainer.state.log_history if "etu/heldout_pi_s" in h]
    assert len(logged) == 2
    assert {"etu/lambda", "etu/delta", "etu/margin", "etu/heldout_upper"} <= set(logged[-1])
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["lambda"]["adaptive"] is True and metrics["lambda"]["controller_updates"] == 2


def test_measurement_restores_train_and_eval_modes(model, tokenizer, corpora, make_args):
    trainer = controller_trainer(model, tokenizer, corpora, make_args, max_steps=1)
    trainer.model.train()
    frozen = next(m for m in trainer.model.modules() if m is not trainer.model)
    frozen.eval()  # a submodule deliberately in eval mode stays so
    modes = {id(m): m.training for m in trainer.model.modules()}
    trainer._setup_target()
    stats = trainer.measure_heldout()
    assert stats.n_positions > 0 and 0 <= stats.mean_mass <= 1 and stats.delta >= 0
    assert {id(m): m.training for m in trainer.model.modules()} == modes


def test_heldout_slice_is_never_trained_on(model, tokenizer, corpora, make_args):
    trainer = controller_trainer(
        model, tokenizer, corpora, make_args, max_steps=1, heldout_batches=2, per_device_train_batch_size=8
    )
    held = {tuple(x) for x in trainer.heldout_dataset["input_ids"]}
    train = {tuple(x) for x in trainer.forget_dataset["input_ids"]}
    assert len(trainer.heldout_dataset) == 16
    assert not held & train and len(train) + len(held) == len({tuple(x) for x in corpora["forget"]["input_ids"]})


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "field,value",
    [
        ("lambda_update_freq", 0),
        ("lambda_eta", 0.0),
        ("lambda_ema", 1.0),
        ("heldout_batches", 0),
        ("heldout_fraction", 1.5),
        ("wilson_max_n", 0),
    ],
)
def test_bad_controller_settings_name_the_field(tmp_path, field, value):
    from etu_hf import ETUTrainingArguments

    with pytest.raises(ValueError, match=field):
        ETUTrainingArguments(output_dir=str(tmp_path), **{field: value})


def test_heldout_that_leaves_no_training_data(model, tokenizer, corpora, make_args):
    small = corpora["forget"].select(range(10))
    with pytest.raises(ValueError, match=r"heldout_batches.*leaves no training data"):
        ETUTrainer(
            model=model,
            args=make_args(adaptive_lambda=True, heldout_batches=2, per_device_train_batch_size=8),
            train_dataset=small,
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match=r"heldout_fraction.*holds out no forget example"):
        ETUTrainer(
            model=model,
            args=make_args(adaptive_lambda=True, heldout_fraction=0.01),
            train_dataset=small,
            processing_class=tokenizer,
        )


def test_callback_without_an_etu_trainer(model, tokenizer, corpora, tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=corpora["forget"],
        data_collator=default_data_collator,
        callbacks=[AdaptiveLambdaCallback()],
    )
    with pytest.raises(RuntimeError, match="needs an ETUTrainer"):
        trainer.train()
    with pytest.raises(ValueError, match="update_freq"):
        AdaptiveLambdaCallback(update_freq=0)


def test_user_supplied_callback_is_bound_and_overrides_arguments(model, tokenizer, corpora, make_args):
    cb = AdaptiveLambdaCallback(update_freq=3, eta=0.1)
    trainer = ETUTrainer(
        model=model,
        args=make_args(max_steps=6),
        train_dataset=corpora["forget"],
        processing_class=tokenizer,
        callbacks=[cb],
        retain_dataset=corpora["retain"],
    )
    assert trainer.lambda_controller is cb and cb.trainer is trainer
    assert cb.settings.update_freq == 3 and cb.settings.eta == 0.1 and trainer.heldout_dataset is not None
    trainer.train()
    assert [h["step"] for h in cb.history] == [3, 6]


# ------------------------------------------------------------------------------------- fresh processes
def _run(args, env_extra=None, launcher=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.update(env_extra or {})
    cmd = (launcher or [sys.executable]) + [SCRIPT, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_resume_in_a_new_process_continues_the_same_trajectory(tmp_path):
    _run([str(tmp_path / "full")])
    _run([str(tmp_path / "part"), "--stop_at", "6"])
    _run([str(tmp_path / "part"), "--resume", str(tmp_path / "part" / "checkpoint-6")])
    full = json.loads((tmp_path / "full" / "history_rank0.json").read_text())["history"]
    resumed = json.loads((tmp_path / "part" / "history_rank0.json").read_text())["history"]
    assert [h["step"] for h in full] == [2, 4, 6, 8, 10, 12]
    assert len({h["lam"] for h in full}) > 1  # the controller really moved lambda
    assert resumed == full
    a = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "final" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_two_processes_hold_identical_lambda(tmp_path):
    # (the shipped accelerate configs are launched in test_distributed.py)
    cmd = [shutil.which("torchrun") or "torchrun", "--nproc_per_node", "2"]
    _run([str(tmp_path / "ddp")], launcher=cmd)
    ranks = [json.loads((tmp_path / "ddp" / f"history_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["history"] == ranks[1]["history"]
    assert len(ranks[0]["history"]) == 6
    single = controller_heldout_positions()
    assert all(h["positions"] == single for h in ranks[0]["history"])  # statistics summed over both processes


def controller_heldout_positions():
    """Scored positions of the script's held-out slice, counted in this process (one process)."""
    from transformers import AutoTokenizer

    from etu_hf import ETUTrainingArguments
    from etu_hf.data import iter_batches, scored_positions, tokenize_and_block
    from etu_hf.demo.corpus import forget_documents
    from etu_hf.pipeline import DEMO_MODEL_DIR
    from etu_hf.trainer import split_heldout

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    forget = tokenize_and_block(forget_documents(120, seed=3), tok, 64)
    args = ETUTrainingArguments(
        output_dir="unused", per_device_train_batch_size=4, heldout_batches=3, seed=0, report_to="none", use_cpu=True
    )
    _, held = split_heldout(forget, args)
    return sum(
        int(scored_positions(b["input_ids"], b["attention_mask"], b["labels"])[0].sum())
        for b in iter_batches(held, None, 4)
    )
