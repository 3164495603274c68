"""The adaptive-lambda controller: the rule, its effect on a tiny model, resume and multi-process."""

import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import TWO_PROCESSES
from peft import LoraConfig
from safetensors.torch import load_file

from etu_hf import AdaptiveLambdaCallback, ETUTrainer, evaluate_mass
from etu_hf.data.blocks import iter_batches
from etu_hf.ops.bounds import sequence_upper_bound
from etu_hf.training.controller import ControllerSettings, ControllerState, HeldoutMeasurement, controller_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "controller_run.py")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


# ------------------------------------------------------------------------------------- the rule itself
def _logit(p):
    return math.log(p) - math.log1p(-p)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_rule_raises_lowers_and_holds_in_logit_space():
    s = ControllerSettings(epsilon=0.05, eta=1.0, band=0.5, step_max=2.0, use_upper=True)
    bounds = (0.0, 100.0)
    m = HeldoutMeasurement(mass=0.05, upper=0.08)  # upper above epsilon: raise to the middle of the band
    _, rec = controller_step(ControllerState(), s, m, bounds)
    expected = _logit(0.08) - _logit(0.05) + 0.25
    assert rec["decision"] == "raise" and rec["offset"] == pytest.approx(expected)
    # certified and inside the band: hold
    _, rec = controller_step(ControllerState(offset=1.0), s, HeldoutMeasurement(mass=0.03, upper=0.045), bounds)
    assert rec["decision"] == "hold" and rec["offset"] == 1.0
    # far below the band: hold once, and lower at half gain only when the next measurement confirms it
    low = HeldoutMeasurement(mass=0.005, upper=0.02)
    st, rec = controller_step(ControllerState(offset=3.0), s, low, bounds)
    assert rec["decision"] == "hold" and st.offset == 3.0
    _, rec = controller_step(st, s, low, bounds)
    assert rec["decision"] == "lower"
    assert rec["offset"] == pytest.approx(3.0 + 0.5 * (_logit(0.02) - _logit(0.05) + 0.25))
    # ... but never below the floor: a model already under epsilon at offset 0 keeps min(p, epsilon)
    st = ControllerState(offset=0.0, last_error=-3.0)
    _, rec = controller_step(st, s, HeldoutMeasurement(mass=0.005, upper=0.01), bounds)
    assert rec["decision"] == "hold" and rec["offset"] == 0.0
    # the step is capped
    _, rec = controller_step(ControllerState(), s, HeldoutMeasurement(mass=0.5, upper=0.6), bounds)
    assert rec["offset"] == 2.0
    # and the offset is clamped at the ceiling
    _, rec = controller_step(ControllerState(offset=99.5), s, HeldoutMeasurement(mass=0.5, upper=0.6), bounds)
    assert rec["offset"] == 100.0 and rec["offset_at_bound"]


def test_settings_come_from_the_training_arguments_with_overrides(tmp_path):
    from etu_hf import ETUTrainingArguments

    args = ETUTrainingArguments(
        output_dir=str(tmp_path), epsilon=0.1, lambda_update_freq=7, lambda_eta=0.3, use_upper_for_lambda=False
    )
    s = ControllerSettings.from_args(args, band=0.2, step_max=None)
    assert (s.epsilon, s.update_freq, s.eta, s.band, s.use_upper) == (0.1, 7, 0.3, 0.2, False)
    assert s.step_max == args.lambda_step_max == 2.0  # None does not override
    defaults = ETUTrainingArguments(output_dir=str(tmp_path))
    assert ControllerSettings() == ControllerSettings.from_args(defaults)  # one set of defaults
    with pytest.raises(ValueError, match=r"lambda_band \(band\)"):
        ControllerSettings.from_args(args, band=-1.0)


def test_the_tilt_state_is_the_one_owner_of_the_offset(tmp_path):
    from etu_hf import ETUTrainingArguments
    from etu_hf.training.tilt_state import TiltState

    per_position = TiltState(ETUTrainingArguments(output_dir=str(tmp_path), lambda_max=20.0), None)
    assert per_position.set_offset(-3.0) == 0.0 and per_position.set_offset(25.0) == 20.0
    assert per_position.tilt_spec().offset == 20.0
    glob = TiltState(ETUTrainingArguments(output_dir=str(tmp_path), lambda_mode="global", lambda_max=20.0), None)
    glob.set_offset(30.0)  # the range is unknown before p_S: kept, then clamped once p_S is known
    glob.set_base_mass(0.5, 100)
    assert glob.global_lambda == pytest.approx(-_logit(0.05))
    assert glob.offset == pytest.approx(20.0 - glob.global_lambda)
    assert glob.tilt_spec().global_value() == pytest.approx(20.0)


def test_point_estimate_decides_without_use_upper():
    s = ControllerSettings(epsilon=0.05, use_upper=False)
    _, rec = controller_step(ControllerState(), s, HeldoutMeasurement(mass=0.04, upper=0.09), (0.0, 100.0))
    assert rec["decision"] == "hold" and rec["decided_on"] == "point"


def _per_context_target(p, offset, eps):
    """The per-position target mass min(p, eps') with eps' = sigmoid(logit(eps) - offset) (before any training)."""
    return np.minimum(p, _sigmoid(_logit(eps) - offset))


def _sequence_masses(position_mass, n_seq):
    """Per-sequence (sum, count) for positions dealt round-robin into ``n_seq`` sequences."""
    owner = np.arange(len(position_mass)) % n_seq
    return np.bincount(owner, weights=position_mass, minlength=n_seq), np.bincount(owner, minlength=n_seq)


def _measure(position_mass, n_seq=64):
    sums, counts = _sequence_masses(position_mass, n_seq)
    bound = sequence_upper_bound(sums, counts)
    return HeldoutMeasurement(mass=float(position_mass.mean()), upper=bound.upper, sequences=n_seq)


@pytest.mark.parametrize("high_p", [0.5, 0.999999])
def test_perfect_model_offset_stays_at_its_floor_and_targets_stay_under_epsilon(high_p):
    """A model that always equals its target: 90% of contexts at p = 0.001 and 10% at a high p. The old rule
    drove the offset negative here (mean target mass mean(min(p, eps)) < eps) and left high-p contexts with
    a target of 0.39; now the offset never goes below 0 and every context's target is <= epsilon."""
    eps = 0.05
    p = np.where(np.arange(4096) % 10 == 0, high_p, 0.001)
    s = ControllerSettings(epsilon=eps)
    state = ControllerState()
    for _ in range(20):
        target = _per_context_target(p, state.offset, eps)
        state, rec = controller_step(state, s, _measure(target), (0.0, 100.0))
        assert state.offset >= 0.0
        assert _per_context_target(p, state.offset, eps).max() <= eps + 1e-12
    assert rec["heldout_upper"] <= eps


@pytest.mark.parametrize("fraction,gap", [(0.05, 0.5), (0.2, 1.0), (0.02, 0.3), (0.01, 0.3)])
def test_lagging_model_meets_the_bound_within_six_updates_without_oscillating(fraction, gap):
    """The model moves a fixed ``fraction`` of the way (in logit space) toward its target each step, and
    held-out text sits ``gap`` logits above what it fits (a generalisation gap). With updates every 25
    steps the upper bound is <= epsilon within 6 updates, and the offset never turns back up after
    coming down (no oscillation)."""
    eps = 0.05
    rng = np.random.default_rng(0)
    p = rng.beta(0.6, 0.9, size=4096)  # many contexts far above epsilon, some near 1
    logit_model = np.log(p) - np.log1p(-p)
    s = ControllerSettings(epsilon=eps)
    state = ControllerState()
    offsets, uppers = [], []
    for _ in range(12):
        for _ in range(25):
            target = _per_context_target(p, state.offset, eps)
            logit_target = np.log(target) - np.log1p(-target)
            logit_model += fraction * (logit_target - logit_model)
        heldout = 1.0 / (1.0 + np.exp(-(logit_model + gap)))
        state, rec = controller_step(state, s, _measure(heldout), (0.0, 100.0))
        state.history.append(rec)  # as the callback does: the stall test reads the history
        assert rec["decision"] != "stalled", (rec, offsets)  # a lagging model still follows the offset
        offsets.append(state.offset)
        uppers.append(rec["heldout_upper"])
    first = next(i for i, u in enumerate(uppers) if u <= eps)
    assert first < 6, uppers
    assert all(u <= eps for u in uppers[first:]), uppers  # stays certified
    moves = np.sign(np.diff([0.0, *offsets]))
    moves = moves[moves != 0]
    assert not any(a < 0 < b for a, b in itertools.pairwise(moves)), offsets  # no down-then-up


def test_automatic_period_from_the_step_budget():
    from etu_hf.training.controller_rule import auto_update_freq

    # min(25, ceil(max_steps / 8)), at least 1
    assert [auto_update_freq(n) for n in (1, 8, 9, 40, 150, 200, 201, 10_000)] == [1, 1, 2, 5, 19, 25, 25, 25]
    assert ControllerSettings(update_freq=None).update_freq is None  # resolved when training begins


# ------------------------------------------------------------------------------------- on a tiny model
def controller_trainer(model, tokenizer, corpora, make_args, **args):
    defaults = dict(adaptive_lambda=True, lambda_update_freq=5, logging_steps=5, learning_rate=3e-3)
    defaults.update(args)
    return ETUTrainer(
        model=model,
        args=make_args(**defaults),
        train_dataset=corpora["forget"],
        retain_dataset=corpora["retain"],
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )


def test_global_mode_controller_raises_lambda_until_the_bound_is_met(model, tokenizer, corpora, make_args):
    trainer = controller_trainer(model, tokenizer, corpora, make_args, lambda_mode="global", max_steps=60)
    trainer.train()
    hist = trainer.lambda_controller.history
    lam0 = trainer.global_lambda
    assert len(hist) == 12 and hist[0]["step"] == 5
    # the closed form leaves the held-out mass far above epsilon (Jensen gap), so the controller raises
    assert hist[0]["heldout_upper"] > 0.05 and hist[0]["decision"] == "raise"
    assert hist[-1]["lam"] > lam0 + 1.0
    for rec in hist:  # the rule, as documented: raise (or hold, stalled) exactly while the upper bound is above epsilon
        assert (rec["heldout_upper"] > 0.05) == (rec["decision"] in ("raise", "stalled"))
        assert rec["heldout_upper"] >= rec["heldout_mass"]
    assert hist[-1]["heldout_mass"] < hist[0]["heldout_mass"]
    assert all(h["positions"] == hist[0]["positions"] > 0 for h in hist)  # always the same held-out slice
    # the training loss used the moved lambda
    assert trainer.tilt_spec().global_value() == pytest.approx(hist[-1]["lam"])


def test_default_period_follows_the_budget(model, tokenizer, corpora, make_args):
    trainer = controller_trainer(model, tokenizer, corpora, make_args, lambda_update_freq=None, max_steps=12)
    trainer.train()
    # 12 steps: ceil(12 / 8) = 2, so updates at 2, 4, ..., 12 (a fixed 25 would never update)
    assert [h["step"] for h in trainer.lambda_controller.history] == [2, 4, 6, 8, 10, 12]
    assert trainer.lambda_controller.settings.update_freq == 2


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
    assert hist[0]["decision"] == "hold"  # below the band once: wait for a second measurement
    assert hist[1]["decision"] == "lower" and "raise" not in {h["decision"] for h in hist}
    band_edge = 1 / (1 + math.exp(-(_logit(0.6) - 0.5)))
    for prev, h in itertools.pairwise(hist):  # lowers exactly when this and the previous bound are under the band
        assert (h["decision"] == "lower") == (h["heldout_upper"] < band_edge and prev["heldout_upper"] < band_edge)
    assert hist[-1]["lam"] < trainer.global_lambda < 0


def test_without_use_upper_the_point_estimate_decides(model, tokenizer, corpora, make_args):
    trainer = controller_trainer(
        model, tokenizer, corpora, make_args, lambda_mode="global", max_steps=10, use_upper_for_lambda=False
    )
    trainer.train()
    for rec in trainer.lambda_controller.history:
        assert rec["decided_on"] == "point"
        assert (rec["heldout_mass"] > 0.05) == (rec["decision"] == "raise")


def test_a_slice_too_small_for_the_bound_decides_on_the_point_estimate(model, tokenizer, corpora, make_args, caplog):
    """3 held-out sequences (< MIN_SEQUENCES): the bound is 1.0, so every update decides on the point estimate, says so
    once, and records it."""
    from etu_hf.ops.bounds import MIN_SEQUENCES

    small = controller_trainer(
        model, tokenizer, corpora, make_args, max_steps=10, heldout_batches=1, per_device_train_batch_size=3
    )
    with caplog.at_level(logging.WARNING, logger="etu_hf.training.controller"):
        small.train()
    hist = small.lambda_controller.history
    assert len(hist) == 2 and len(small.heldout_dataset) == 3 < MIN_SEQUENCES
    for rec in hist:
        assert rec["heldout_upper"] == 1.0 and rec["sequences"] == 3
        assert rec["decided_on"] == "point" and rec["too_few_sequences"] is True
        assert (rec["heldout_mass"] > 0.05) == (rec["decision"] == "raise")
    assert caplog.text.count("fewer than the 8 its upper bound needs") == 1


def test_a_slice_of_eight_sequences_decides_on_the_bound(model, tokenizer, corpora, make_args):
    enough = controller_trainer(
        model, tokenizer, corpora, make_args, max_steps=5, heldout_batches=1, per_device_train_batch_size=8
    )
    enough.train()
    rec = enough.lambda_controller.history[0]
    assert rec["sequences"] == 8 and rec["decided_on"] == "upper" and rec["too_few_sequences"] is False


def test_history_files_logs_and_checkpoint_state(model, tokenizer, corpora, make_args, tmp_path):
    trainer = controller_trainer(
        model, tokenizer, corpora, make_args, max_steps=10, save_strategy="steps", save_steps=5, logging_steps=5
    )
    trainer.train()
    out = trainer.args.output_dir
    hist = json.loads(open(os.path.join(out, "lambda_history.json")).read())
    assert hist["format"] == "etu-hf/lambda-history" and hist["mode"] == "per_position"
    rec = hist["records"][0]
    for key in ("step", "offset", "effective_epsilon", "heldout_mass", "heldout_upper", "delta", "decision", "bound"):
        assert key in rec, key
    assert rec["delta"] >= 0
    assert rec["pinsker_bound"] == pytest.approx(rec["mean_target_mass"] + math.sqrt(rec["delta"] / 2))
    assert rec["effective_epsilon"] == pytest.approx(_sigmoid(_logit(0.05) - rec["offset"]))
    assert rec["effective_epsilon"] <= 0.05  # the offset never relaxes the target above epsilon
    assert os.path.getsize(os.path.join(out, "lambda_history.png")) > 1000
    state = json.loads(open(os.path.join(out, "checkpoint-10", "etu_controller.json")).read())
    assert state["history"] == hist["records"] and state["offset"] == trainer.lambda_offset
    logged = [h for h in trainer.state.log_history if "etu/heldout_pi_s" in h]
    assert len(logged) == 2
    assert {"etu/lambda", "etu/delta", "etu/heldout_upper", "etu/effective_epsilon", "etu/clamped_share"} <= set(
        logged[-1]
    )
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["lambda"]["adaptive"] is True and metrics["lambda"]["controller_updates"] == 2
    assert metrics["lambda"]["offset"] == trainer.lambda_offset == state["offset"]
    assert metrics["lambda"]["effective_epsilon"] == pytest.approx(_sigmoid(_logit(0.05) - trainer.lambda_offset))
    assert metrics["lambda"]["last_update"]["heldout_upper"] == hist["records"][-1]["heldout_upper"]


def test_measurement_restores_train_and_eval_modes(model, tokenizer, corpora, make_args):
    trainer = controller_trainer(model, tokenizer, corpora, make_args, max_steps=1)
    trainer.model.train()
    frozen = next(m for m in trainer.model.modules() if m is not trainer.model)
    frozen.eval()  # a submodule deliberately in eval mode stays so
    modes = {id(m): m.training for m in trainer.model.modules()}
    trainer._setup_target()
    stats = trainer.heldout_probe.measure()
    assert stats.n_positions > 0 and 0 <= stats.mean_mass <= 1 and stats.delta >= 0
    assert {id(m): m.training for m in trainer.model.modules()} == modes
    # the probe's numbers are those of one pass over the held-out slice, computed here without it
    S = torch.tensor(trainer.forbidden_set.ids)
    with torch.no_grad():
        direct = evaluate_mass(trainer.model, iter_batches(trainer.heldout_dataset, None, 5), S)
    assert stats.n_positions == direct.n_positions
    assert stats.mean_mass == pytest.approx(direct.mean, rel=1e-5)
    assert len(stats.sequence_sums) == len(trainer.heldout_dataset)


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
        ("lambda_eta", float("nan")),
        ("lambda_band", 0.0),
        ("lambda_band", float("inf")),
        ("lambda_step_max", -1.0),
        ("lambda_max", 0.0),
        ("lambda_max", -3.0),
        ("lambda_max", float("inf")),
        ("lambda_min_response", -0.1),
        ("lambda_min_response", float("nan")),
        ("heldout_batches", 0),
        ("heldout_max_share", 0.0),
        ("heldout_max_share", 1.5),
        ("heldout_max_share", float("nan")),
        ("heldout_fraction", 1.5),
        ("wilson_max_n", 0),
    ],
)
def test_bad_controller_settings_name_the_field(tmp_path, field, value):
    from etu_hf import ETUTrainingArguments

    with pytest.raises(ValueError, match=field):
        ETUTrainingArguments(output_dir=str(tmp_path), **{field: value})


def test_heldout_slice_of_a_small_forget_set_is_capped(model, tokenizer, corpora, make_args, caplog):
    """heldout_batches asks for 2 x 8 = 16 of 10 examples: the slice is floor(0.25 x 10) = 2, logged, and the
    other 8 are trained on; a larger share or no cap changes it as the docstring says."""
    small = corpora["forget"].select(range(10))
    expected = {None: 2, 0.5: 5, 0.05: 1}  # heldout_max_share -> slice (at least one example)
    for share, k in expected.items():
        extra = {} if share is None else {"heldout_max_share": share}
        with caplog.at_level(logging.INFO, logger="etu_hf.training.probe"):
            caplog.clear()
            trainer = ETUTrainer(
                model=model,
                args=make_args(adaptive_lambda=True, heldout_batches=2, per_device_train_batch_size=8, **extra),
                train_dataset=small,
                processing_class=tokenizer,
            )
        assert (len(trainer.heldout_dataset), len(trainer.forget_dataset)) == (k, 10 - k)
        assert f"{k} of the 10 forget examples" in caplog.text and "asks for 16" in caplog.text
    # a slice below the cap is what heldout_batches asks for, and nothing is logged about a cap
    with caplog.at_level(logging.INFO, logger="etu_hf.training.probe"):
        caplog.clear()
        trainer = ETUTrainer(
            model=model,
            args=make_args(adaptive_lambda=True, heldout_batches=1, per_device_train_batch_size=2),
            train_dataset=small,
            processing_class=tokenizer,
        )
    assert len(trainer.heldout_dataset) == 2 and "heldout_max_share" not in caplog.text


def test_heldout_that_leaves_no_training_data(model, tokenizer, corpora, make_args):
    small = corpora["forget"].select(range(10))
    with pytest.raises(ValueError, match=r"heldout_batches.*leaves no training data"):
        ETUTrainer(
            model=model,
            args=make_args(
                adaptive_lambda=True, heldout_batches=2, per_device_train_batch_size=8, heldout_max_share=1.0
            ),
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
    assert trainer.lambda_controller is cb
    assert cb.tilt is trainer.tilt_state and cb.probe is trainer.heldout_probe  # bound to the run, not the trainer
    assert not hasattr(cb, "trainer")
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


@TWO_PROCESSES
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
    from etu_hf.data.blocks import iter_batches, scored_positions, tokenize_and_block
    from etu_hf.demo import DEMO_MODEL_DIR
    from etu_hf.demo.corpus import forget_documents
    from etu_hf.training.trainer import split_heldout

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


def test_stop_when_certified_stops_after_n_certified_updates_in_a_row():
    from transformers import TrainerControl, TrainerState

    cb = AdaptiveLambdaCallback(update_freq=5, stop_when_certified=2)
    cb.settings = ControllerSettings(epsilon=0.05, update_freq=5, stop_when_certified=2)
    uppers = iter([0.08, 0.04, 0.06, 0.045, 0.03])
    cb.update = lambda step, args=None: cb.history.append({"step": step, "heldout_upper": next(uppers)})
    state, control = TrainerState(), TrainerControl()
    stopped_at = None
    for step in range(1, 26):
        state.global_step = step
        cb.on_step_end(None, state, control)
        if control.should_training_stop:
            stopped_at = step
            break
    assert stopped_at == 25  # 0.045 then 0.03: two in a row (0.04 alone was not enough)
    assert cb.certified_streak() == 2
    with pytest.raises(ValueError, match="stop_when_certified"):
        AdaptiveLambdaCallback(stop_when_certified=-1)


# ------------------------------------------------------------------------------------- the stall
def _run_saturating(settings, updates=10, cap=1.0, base=0.2):
    """A model whose held-out logit follows the offset only up to ``cap`` nats (a generalisation gap the tighter
    target cannot close): m(o) = sigmoid(logit(base) - min(o, cap)), 0.084 > epsilon for base 0.2, cap 1."""
    state, records = ControllerState(), []
    for _ in range(updates):
        m = _sigmoid(_logit(base) - min(state.offset, cap))
        state, rec = controller_step(state, settings, HeldoutMeasurement(mass=m, upper=m), (0.0, 12.0))
        state.history.append(rec)
        records.append(rec)
    return records


def test_the_controller_stops_raising_when_the_heldout_mass_stops_following():
    """Raises 0 -> 1.81 -> 2.62 -> 3.42 (by hand: e = logit(0.2) - logit(0.05) = 1.558, then logit(0.084) -
    logit(0.05) = 0.558, each plus the half band 0.25); at the fourth update the last two updates added 1.62 nats
    and the held-out logit fell by 0 (the cap was reached at offset 1), so it stalls there, and holds."""
    records = _run_saturating(ControllerSettings(epsilon=0.05, use_upper=False))
    decisions = [r["decision"] for r in records]
    assert decisions[:3] == ["raise"] * 3 and set(decisions[3:]) == {"stalled"}, decisions
    first = _logit(0.2) - _logit(0.05) + 0.25
    assert records[0]["offset"] == pytest.approx(first)
    assert records[1]["offset"] == pytest.approx(first + _logit(_sigmoid(_logit(0.2) - 1.0)) - _logit(0.05) + 0.25)
    # the third update: 2.62 nats added since the first measurement (0.2), the logit fell by exactly 1
    assert records[2]["offset_response"] == pytest.approx(1.0 / records[1]["offset"])
    assert records[3]["offset_response"] == pytest.approx(0.0, abs=1e-9)
    assert {r["offset"] for r in records[3:]} == {records[2]["offset"]}
    # lambda_min_response = 0: raise while the bound is above epsilon, up to the ceiling
    records = _run_saturating(ControllerSettings(epsilon=0.05, use_upper=False, min_response=0.0), updates=14)
    assert {r["decision"] for r in records} == {"raise"} and records[-1]["offset"] == 12.0


def test_a_stalled_controller_raises_again_when_the_heldout_mass_falls():
    """While stalled it compares with the mass of the update that stalled: a fall of lambda_min_response logits
    (the model was lagging) resumes raising; a smaller one keeps it holding."""
    s = ControllerSettings(epsilon=0.05, use_upper=False, min_response=0.1)
    history = [
        {"heldout_mass": 0.09, "offset_before": 1.0, "decision": "raise"},
        {"heldout_mass": 0.08, "offset_before": 2.0, "decision": "stalled"},
        {"heldout_mass": 0.0795, "offset_before": 2.0, "decision": "stalled"},
    ]
    state = ControllerState(offset=2.0, history=history)
    still = _sigmoid(_logit(0.08) - 0.09)
    _, rec = controller_step(state, s, HeldoutMeasurement(mass=still, upper=still), (0.0, 12.0))
    assert rec["decision"] == "stalled" and rec["offset"] == 2.0
    fell = _sigmoid(_logit(0.08) - 0.11)
    _, rec = controller_step(state, s, HeldoutMeasurement(mass=fell, upper=fell), (0.0, 12.0))
    assert rec["decision"] == "raise" and rec["offset"] > 2.0
    # certified while stalled: the usual hold, the stall does not matter below epsilon
    _, rec = controller_step(state, s, HeldoutMeasurement(mass=0.04, upper=0.04), (0.0, 12.0))
    assert rec["decision"] == "hold"
    # less than 0.5 nats added over the window: too little to judge, raise
    small = ControllerState(offset=1.3, history=[{"heldout_mass": 0.09, "offset_before": 1.0, "decision": "raise"}] * 2)
    _, rec = controller_step(small, s, HeldoutMeasurement(mass=0.09, upper=0.09), (0.0, 12.0))
    assert rec["decision"] == "raise"
    with pytest.raises(ValueError, match=r"lambda_min_response \(min_response\)"):
        ControllerSettings(min_response=-0.1)


def test_the_callback_warns_once_when_the_controller_stalls(tmp_path, caplog):
    from etu_hf import ETUTrainingArguments
    from etu_hf.training.tilt_state import TiltState

    class Bound:
        def __init__(self, upper):
            self.upper, self.sequences = upper, 16

        def to_dict(self):
            return {"upper": self.upper, "sequences": self.sequences}

    class Stats:
        def __init__(self, mass):
            self.mean_mass, self.delta, self.mean_target_mass, self.n_positions = mass, 0.1, mass, 1000
            self.clamped_share, self.mean_lambda = 0.0, 1.0

        def upper_bound(self, seed=0):
            return Bound(self.mean_mass)

    args = ETUTrainingArguments(output_dir=str(tmp_path), use_upper_for_lambda=False)
    tilt = TiltState(args, None)

    class SaturatingProbe:
        def measure(self):
            return Stats(_sigmoid(_logit(0.2) - min(tilt.offset, 1.0)))

    cb = AdaptiveLambdaCallback()
    cb.bind(args, SaturatingProbe(), tilt)
    with caplog.at_level(logging.WARNING, logger="etu_hf.training.controller"):
        records = [cb.update(step) for step in (5, 10, 15, 20, 25, 30)]
    assert [r["decision"] for r in records] == ["raise"] * 3 + ["stalled"] * 3
    assert caplog.text.count("no longer follows the offset") == 1 and "--lambda_min_response" in caplog.text
    assert tilt.offset == records[2]["offset"]
