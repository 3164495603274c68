"""`--epsilon_ratio r`: epsilon = r x the base mass p_S estimated at the start of training (issue 20). Every
reader of epsilon gets the resolved value (the tilt, the controller, metrics.json, the audit, the run record),
the files record r, epsilon and p_S, a resume keeps the checkpoint's epsilon, bad values fail in one line."""

import json

import pytest
import torch
from helpers import lora_trainer
from scripts.controller_run import StopAt  # a callback that interrupts training at a step

from etu_hf import ETUTrainingArguments
from etu_hf.artifacts.record import RunRecord
from etu_hf.commands.cli import main
from etu_hf.demo.corpus import write_demo_corpora

RATIO = 0.25


def test_epsilon_defaults_and_the_ratio():
    args = ETUTrainingArguments(output_dir="unused")
    assert args.epsilon == 0.05 and isinstance(args.epsilon, float) and args.epsilon_ratio is None
    assert ETUTrainingArguments(output_dir="unused", epsilon=0.1).epsilon == 0.1
    # with a ratio, epsilon is unknown until p_S is estimated: None, never a number that is not the run's
    assert ETUTrainingArguments(output_dir="unused", epsilon_ratio=RATIO).epsilon is None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"epsilon_ratio": 1.0}, "epsilon_ratio: must be strictly between 0 and 1"),
        ({"epsilon_ratio": 0.0}, "epsilon_ratio: must be strictly between 0 and 1"),
        ({"epsilon_ratio": -0.5}, "epsilon_ratio: must be strictly between 0 and 1"),
        ({"epsilon_ratio": 0.25, "epsilon": 0.05}, "epsilon_ratio: give --epsilon_ratio"),
    ],
)
def test_bad_ratios_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ETUTrainingArguments(output_dir="unused", **kwargs)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--epsilon_ratio", "1.5"], "epsilon_ratio: must be strictly between 0 and 1"),
        (["--epsilon_ratio", "0.25", "--epsilon", "0.05"], "epsilon_ratio: give --epsilon_ratio (epsilon = r x"),
    ],
)
def test_bad_ratio_flags_fail_in_one_line_before_anything_is_written(tmp_path, capsys, extra, message):
    from helpers import cli_flags

    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    argv = cli_flags(tmp_path, forget, retain, "--use_cpu", "--report_to", "none", *extra)
    assert main(["unlearn", *argv]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("etu-hf")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_demo_takes_a_ratio_instead_of_its_epsilon(tmp_path):
    from etu_hf.commands.arguments import parse_unlearn_args
    from etu_hf.commands.demo import demo_argv

    argv = demo_argv(["--epsilon_ratio", "0.3", "--output_dir", str(tmp_path / "demo")])
    assert "--epsilon" not in argv
    training = parse_unlearn_args(argv)[2]
    assert training.epsilon is None and training.epsilon_ratio == 0.3
    assert parse_unlearn_args(demo_argv(["--output_dir", str(tmp_path / "demo")]))[2].epsilon == 0.05


def _run(tokenizer, corpora, make_args, output_dir, resume=None, stop=None, **overrides):
    from transformers import AutoModelForCausalLM

    from etu_hf.demo import DEMO_MODEL_DIR

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    settings = dict(
        output_dir=str(output_dir),
        epsilon_ratio=RATIO,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        adaptive_lambda=True,
        lambda_update_freq=1,
        heldout_batches=2,
        per_device_train_batch_size=4,
    )
    args = make_args(**{**settings, **overrides})
    trainer = lora_trainer(model, tokenizer, corpora, args, callbacks=[StopAt(stop)] if stop else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_the_ratio_resolves_to_r_times_p_s_everywhere_and_a_resume_keeps_it(tokenizer, corpora, make_args, tmp_path):
    out = tmp_path / "run"
    first = _run(tokenizer, corpora, make_args, out, stop=2)
    tilt = first.tilt_state
    assert first.args.epsilon is None  # the arguments keep what the user gave
    assert tilt.epsilon == pytest.approx(RATIO * first.base_p_s, rel=1e-12) and tilt.epsilon_base_p_s == first.base_p_s
    assert first.tilt_spec().epsilon == tilt.epsilon
    # the controller decided against the resolved epsilon (its record and settings)
    controller = first.lambda_controller
    assert controller.settings.epsilon == tilt.epsilon and len(controller.history) == 2
    record = controller.history[-1]
    expected_error = torch.logit(torch.tensor(record["heldout_upper"], dtype=torch.float64)) - torch.logit(
        torch.tensor(tilt.epsilon, dtype=torch.float64)
    )
    assert record["error_logit"] == pytest.approx(float(expected_error), rel=1e-9)
    # the checkpoint and metrics.json record r, epsilon and the p_S it came from; args.json the flags as given
    state = json.loads((out / "checkpoint-2" / "etu_trainer_state.json").read_text())
    assert state["epsilon"] == {"epsilon": tilt.epsilon, "epsilon_ratio": RATIO, "epsilon_base_p_S": first.base_p_s}
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["epsilon"], metrics["epsilon_ratio"]) == (tilt.epsilon, RATIO)
    assert metrics["epsilon_base_p_S"] == metrics["base_p_S"] == first.base_p_s
    args = json.loads((out / "args.json").read_text())
    assert args["epsilon"] is None and args["epsilon_ratio"] == RATIO
    assert RunRecord.read(str(out)).epsilon == tilt.epsilon == RunRecord.read(str(out)).tilt.epsilon

    # Resumed with another p_S sample: p_S is estimated again, but epsilon stays the checkpoint's.
    resumed = _run(tokenizer, corpora, make_args, out, resume=str(out / "checkpoint-2"), p_s_sample_size=8)
    assert resumed.state.global_step == 4
    assert resumed.base_p_s != pytest.approx(first.base_p_s, rel=1e-6)
    assert resumed.tilt_state.epsilon == tilt.epsilon and resumed.tilt_spec().epsilon == tilt.epsilon
    assert resumed.lambda_controller.history[-1]["step"] == 4
    assert json.loads((out / "metrics.json").read_text())["epsilon"] == tilt.epsilon

    # the audit at the end judges against the same epsilon, and the card says where it came from
    report = resumed.audit(
        forget_data=corpora["forget_heldout"].select(range(8)),
        output_dir=str(out),
        overwrite=True,
        num_samples=0,
        bootstrap_samples=100,
    )
    assert report.epsilon == tilt.epsilon and report.tilt["epsilon"] == tilt.epsilon
    assert json.loads((out / "metrics.json").read_text())["heldout"]["epsilon"] == tilt.epsilon
    from etu_hf.hub import build_model_card

    card = str(build_model_card(str(out)))
    assert (
        f"| epsilon (target mass on V_S) | {tilt.epsilon:g} = 0.25 x p_S {first.base_p_s:.4f} (`--epsilon_ratio`) |"
        in card
    )

    # another ratio cannot continue this checkpoint
    with pytest.raises(ValueError, match=r"trained with epsilon_ratio=0.25 .*this run gives epsilon_ratio=0.5"):
        _run(tokenizer, corpora, make_args, out, resume=str(out / "checkpoint-2"), epsilon_ratio=0.5)
