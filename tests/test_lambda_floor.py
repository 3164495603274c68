"""`--lambda_floor m`: a floor under the tilt, lam(x) = max(m, logit p(x) - logit eps), so the odds of S(x) fall by
at least e^m at every forget context. The trainer's loss is recomputed from full float64 logits (the floor applied
by hand), the run's files carry m to the audit and the model card, and bad values fail in one line."""

import json
import shutil

import pytest
import torch
from helpers import fast_args
from test_forbidden_context import naive_tilt_loss

from etu_hf import ETUTrainer, ETUTrainingArguments
from etu_hf.artifacts.record import RunRecord
from etu_hf.data.blocks import iter_batches
from etu_hf.hub.card import build_model_card


def test_no_floor_by_default():
    assert ETUTrainingArguments(output_dir="unused").lambda_floor == 0.0
    assert ETUTrainingArguments(output_dir="unused", allow_negative_lambda=True).lambda_floor == 0.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lambda_floor": -0.5}, r"lambda_floor: must be in \[0, lambda_max=100.0\)"),
        ({"lambda_floor": 5.0, "lambda_max": 5.0}, r"lambda_floor: must be in \[0, lambda_max=5.0\)"),
        ({"lambda_floor": float("nan")}, "lambda_floor: must be a finite number"),
        ({"lambda_floor": 1.0, "allow_negative_lambda": True}, "lambda_floor: a floor above 0 contradicts"),
    ],
)
def test_bad_floors_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ETUTrainingArguments(output_dir="unused", **kwargs)


def test_the_library_refuses_a_floor_it_would_ignore():
    from etu_hf.ops.tilt import TiltSpec, per_position_lambda

    with pytest.raises(ValueError, match="contradicts allow_negative"):
        TiltSpec(epsilon=0.05, allow_negative=True, lambda_floor=1.0)
    with pytest.raises(ValueError, match="lambda_floor must be a finite number >= 0"):
        TiltSpec(epsilon=0.05, lambda_floor=-1.0)
    with pytest.raises(ValueError, match="contradicts allow_negative"):
        per_position_lambda(torch.zeros(2, 5), torch.tensor([1]), 0.05, allow_negative=True, lambda_floor=2.0)


def test_the_loss_is_the_floored_tilt_on_per_context_sets(tokenizer, corpora, tmp_path):
    """Words + continuations (S(x) per position), floor 1.5: the trainer's loss equals the hand computation, and
    it differs from the loss without a floor (the floor binds somewhere)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from etu_hf.demo import DEMO_MODEL_DIR

    losses = {}
    batch = next(iter_batches(corpora["forget_heldout"].select(range(3)), None, 3))
    for floor in (0.0, 1.5):
        args = fast_args(
            str(tmp_path / f"out{floor}"),
            vs_method="words",
            forbid_continuations=True,
            continuation_skip_top_k=20,
            lambda_floor=floor,
        )
        torch.manual_seed(0)
        trainer = ETUTrainer(
            model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
            args=args,
            train_dataset=corpora["forget"],
            retain_dataset=corpora["retain"],
            processing_class=tokenizer,
            peft_config=LoraConfig(
                r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False
            ),
        )
        assert trainer.tilt_state.tilt_spec().lambda_floor == floor
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
            torch.testing.assert_close(
                loss.double(), naive_tilt_loss(trainer, trainer.forbidden_set, batch), atol=1e-5, rtol=1e-5
            )
        losses[floor] = float(loss)
    assert losses[1.5] > losses[0.0] + 1e-3


def test_the_floor_reaches_args_the_audit_and_the_card(trained, tmp_path):
    """The flag parses; a run folder whose args.json holds the floor gives it to RunRecord.tilt (what `etu-hf audit`
    measures delta against, unless --lambda_floor overrides it) and to the model card's settings."""
    from etu_hf.commands.arguments import parse_unlearn_args
    from etu_hf.commands.audit import AuditArguments, resolve_tilt
    from etu_hf.commands.demo import demo_argv

    parsed = parse_unlearn_args(demo_argv(["--lambda_floor", "0.5", "--output_dir", str(tmp_path / "d")]))[2]
    assert parsed.lambda_floor == 0.5
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    args = json.loads((run / "args.json").read_text())
    assert args["lambda_floor"] == 0.0 and RunRecord.read(str(run)).tilt.lambda_floor == 0.0
    assert "lambda floor" not in str(build_model_card(str(run)))
    del args["lambda_floor"]  # a run of an earlier version: trained without a floor
    (run / "args.json").write_text(json.dumps(args))
    assert RunRecord.read(str(run)).tilt.lambda_floor == 0.0
    (run / "args.json").write_text(json.dumps({**args, "lambda_floor": 2.0}))
    record = RunRecord.read(str(run))
    assert record.tilt.lambda_floor == 2.0 and record.tilt.to_dict()["lambda_floor"] == 2.0
    audit_args = AuditArguments(adapter=str(run), forget_corpora=["unused"], output_dir="unused")
    assert resolve_tilt(audit_args, record).lambda_floor == 2.0
    audit_args.lambda_floor = 0.5
    assert resolve_tilt(audit_args, record).lambda_floor == 0.5
    card = str(build_model_card(str(run)))
    assert "lambda floor (`--lambda_floor`): odds of S(x) divided by at least | e^2" in card
