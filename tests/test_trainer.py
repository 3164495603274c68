"""ETUTrainer on the shipped tiny Llama: exactness of the loss glue, training to target, artifacts."""

import gc
import json
import logging
import os

import datasets
import pytest
import torch
from helpers import LORA, lora_trainer
from peft import LoraConfig
from scripts.controller_run import StopAt  # a callback that interrupts training at a step
from transformers import TrainerCallback

from etu_hf import ETUTrainer, ETUTrainingArguments, adapters_disabled, evaluate_mass, evaluate_perplexity
from etu_hf.data.blocks import iter_batches
from etu_hf.modeling.base import AdapterDisabledBase, FrozenCopyBase
from etu_hf.ops.tilt import forbidden_mass


def padded(blocks, lengths, left=False, pad_id=1):
    """Cut each block to the given length and pad it back (attention 0, labels -100)."""
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, n in zip(blocks["input_ids"], lengths, strict=False):
        size = len(ids)
        keep = list(ids[:n])
        pad = [pad_id] * (size - n)
        rows["input_ids"].append(pad + keep if left else keep + pad)
        rows["attention_mask"].append([0] * (size - n) + [1] * n if left else [1] * n + [0] * (size - n))
        rows["labels"].append([-100] * (size - n) + keep if left else keep + [-100] * (size - n))
    return datasets.Dataset.from_dict(rows)


def naive_loss(trainer, batch):
    """Mean over scored positions of KL(q_lam || pi_theta) from FULL logits, float64, explicit shift;
    lam = max(m, logit p - logit eps) with m = --lambda_floor."""
    model = trainer.model
    S = torch.tensor(trainer.forbidden_set.ids)
    eps, floor = trainer.args.epsilon, trainer.args.lambda_floor
    with torch.no_grad():
        zb = trainer.base.logits(batch).double()
    zs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    total, count = 0.0, 0
    for b in range(zs.shape[0]):
        for t in range(zs.shape[1] - 1):
            if (
                batch["labels"][b, t + 1] == -100
                or not batch["attention_mask"][b, t]
                or not batch["attention_mask"][b, t + 1]
            ):
                continue
            pb = torch.softmax(zb[b, t], -1)
            p = pb[S].sum().clamp(1e-6, 1 - 1e-6)
            lam = max(floor, float(torch.log(p / (1 - p))) - float(torch.log(torch.tensor(eps / (1 - eps)))))
            w = torch.ones_like(pb)
            w[S] = torch.exp(torch.tensor(-lam, dtype=torch.float64))
            q = pb * w / (pb * w).sum()
            total = total + (q * (torch.log(q) - torch.log_softmax(zs[b, t], -1))).sum()
            count += 1
    return total / count


@pytest.mark.parametrize("left", [False, True])
def test_compute_loss_equals_naive_full_logits_reference(model, tokenizer, corpora, make_args, left):
    forget = corpora["forget"].select(range(4))
    data = padded(forget, [64, 40, 23, 51], left=left)
    labels = torch.tensor(data["labels"])
    labels[0, 5:12] = -100  # a masked span inside a sequence (e.g. a prompt)
    data = data.remove_columns("labels").add_column("labels", labels.tolist())
    trainer = ETUTrainer(model=model, args=make_args(), train_dataset=corpora["forget"], processing_class=tokenizer)
    batch = next(iter_batches(data, None, 4))
    loss = trainer.compute_loss(trainer.model, batch)
    ref = naive_loss(trainer, batch)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    # padding does not change anything: the same sequences one by one, unpadded
    pieces, counts = [], []
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        keep = one["attention_mask"][0].bool()
        one = {k: v[:, keep] for k, v in one.items()}
        pieces.append(trainer.compute_loss(trainer.model, one))
        counts.append(int((one["labels"][0, 1:] != -100).sum()))
    combined = sum(p * c for p, c in zip(pieces, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(loss, combined, atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_gives_the_gradient_of_one_large_batch(tokenizer, corpora, make_args, tmp_path):
    from transformers import AutoModelForCausalLM

    from etu_hf.demo import DEMO_MODEL_DIR

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 65, (16,), generator=g).tolist()
    forget = padded(corpora["forget"].select(range(16)), lengths)
    retain = padded(corpora["retain"].select(range(16)), torch.randint(8, 65, (16,), generator=g).tolist())
    vs = ETUTrainer(
        model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
        args=make_args(),
        train_dataset=corpora["forget"],
        processing_class=tokenizer,
    ).forbidden_set
    norms = []
    for bs, ga in ((16, 1), (4, 4)):
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
        args = make_args(
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            logging_steps=1,
            output_dir=str(tmp_path / f"ga{ga}"),
            retain_loss_type="nll",  # KL(base || model) is 0 at the first step: NLL makes both terms contribute
        )
        trainer = ETUTrainer(
            model=model,
            args=args,
            train_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
            forbidden_set=vs,
        )
        trainer.train()
        log = next(h for h in trainer.state.log_history if "grad_norm" in h)
        assert log["etu/loss"] > 0.1 and log["etu/retain_loss"] > 0.1  # both terms contribute
        norms.append(log["grad_norm"])
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


def _train_lora(model, tokenizer, corpora, make_args, retain_weight, steps=150):
    # The retain data always sets the PMI background of V_S; retain_weight=0 trains on forget data only.
    args = make_args(max_steps=steps, logging_steps=25, learning_rate=3e-3, retain_weight=retain_weight)
    trainer = lora_trainer(model, tokenizer, corpora, args)
    S = trainer.forbidden_set.ids
    with adapters_disabled(trainer.model):
        before = evaluate_mass(trainer.model, iter_batches(corpora["forget_heldout"], None, 32), S)
        ppl_before = evaluate_perplexity(trainer.model, iter_batches(corpora["retain_heldout"], None, 32))
    trainer.train()
    after = evaluate_mass(trainer.model, iter_batches(corpora["forget_heldout"], None, 32), S)
    ppl_after = evaluate_perplexity(trainer.model, iter_batches(corpora["retain_heldout"], None, 32))
    return trainer, before, after, ppl_before, ppl_after


def test_lora_training_without_retain_reaches_epsilon_on_heldout_text(model, tokenizer, corpora, make_args):
    trainer, before, after, _, _ = _train_lora(model, tokenizer, corpora, make_args, retain_weight=0.0)
    logs = [h for h in trainer.state.log_history if "etu/loss" in h]
    assert logs[-1]["etu/loss"] < 0.5 * logs[0]["etu/loss"]
    assert "etu/retain_loss" not in logs[-1]  # suppression-only training
    assert not trainer.pairs_retain
    assert before.mean > 0.3
    assert after.mean <= trainer.args.epsilon
    assert before.n_positions == after.n_positions > 1000


def test_lora_training_with_retain_keeps_perplexity_and_no_second_copy(model, tokenizer, corpora, make_args):
    from transformers import LlamaForCausalLM

    def llamas():
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, LlamaForCausalLM)}

    before = llamas()  # includes `model` (and any model other tests keep alive)
    trainer, _, after, ppl_before, ppl_after = _train_lora(model, tokenizer, corpora, make_args, retain_weight=1.0)
    assert isinstance(trainer.base, AdapterDisabledBase)
    assert llamas() == before  # no second model: the base is the same model with adapters disabled
    assert trainer.base.model.get_base_model() is model
    logs = [h for h in trainer.state.log_history if "etu/loss" in h]
    assert "etu/retain_loss" in logs[-1]
    assert {"etu/lambda", "etu/pi_s", "etu/q_s"} <= set(logs[-1])
    assert after.mean <= trainer.args.epsilon
    assert ppl_after.perplexity / ppl_before.perplexity <= 1.5


def test_full_finetune_uses_a_frozen_copy(model, tokenizer, corpora, make_args):
    args = make_args(max_steps=4, learning_rate=1e-3, frozen_on_cpu=True, retain_loss_type="kl")
    trainer = ETUTrainer(
        model=model,
        args=args,
        train_dataset=corpora["forget"],
        retain_dataset=corpora["retain"],
        processing_class=tokenizer,
    )
    assert isinstance(trainer.base, FrozenCopyBase)
    assert trainer.base.device.type == "cpu"
    frozen = {k: v.clone() for k, v in trainer.base.model.state_dict().items()}
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert all(torch.equal(frozen[k], v) for k, v in trainer.base.model.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())
    assert not any(p.requires_grad for p in trainer.base.model.parameters())


def test_ref_model_argument_is_the_base(model, tokenizer, corpora, make_args):
    from transformers import AutoModelForCausalLM

    from etu_hf.demo import DEMO_MODEL_DIR

    ref = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    trainer = ETUTrainer(
        model=model, args=make_args(), train_dataset=corpora["forget"], processing_class=tokenizer, ref_model=ref
    )
    assert trainer.base.model is ref


def test_artifacts_logging_evaluate_save_and_model_card(
    model, tokenizer, corpora, make_args, tmp_path, check_metrics_schema
):
    args = make_args(max_steps=6, logging_steps=3, hub_token="hf_abcdefghijklmnopqrstuvwxyz0123")
    trainer = ETUTrainer(
        model=model,
        args=args,
        train_dataset=corpora["forget"],
        retain_dataset=corpora["retain"],
        eval_dataset=corpora["forget_heldout"],
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        run_arguments={"block_size": 64, "service_api_key": "not-for-the-disk-42"},
    )
    assert trainer.training_metrics is None
    trainer.train()
    out = args.output_dir
    with open(os.path.join(out, "V_S.ids.json")) as f:
        vs = json.load(f)
    assert vs["ids"] == trainer.forbidden_set.ids and vs["method"] == "pmi" and len(vs["tokens"]) == len(vs["ids"])
    assert {"counts", "scores"} <= {k.replace("forget_", "") for k in vs}
    raw_args = open(os.path.join(out, "args.json")).read()
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in raw_args
    assert json.loads(raw_args)["epsilon"] == 0.05 and json.loads(raw_args)["block_size"] == 64
    assert "not-for-the-disk-42" not in raw_args  # run_arguments are recorded with secrets redacted
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    check_metrics_schema(metrics)
    assert metrics["steps"] == 6 and 0 < metrics["base_p_S"] < 1
    assert metrics["V_S_fraction"] == pytest.approx(len(vs["ids"]) / 2048)
    assert metrics["lambda"]["mode"] == "per_position" and metrics["lambda"]["min"] >= 0
    logged = [h for h in trainer.state.log_history if "etu/pi_s" in h]
    assert len(logged) == 2
    ev = trainer.evaluate()
    assert {"eval_loss", "eval_etu/pi_s", "eval_etu/q_s", "eval_etu/base_p_s", "eval_etu/lambda"} <= set(ev)
    # one naming for train and eval: the eval metrics are the training ones (no retain term in eval), prefixed
    trained_keys = {k for k in logged[-1] if k.startswith("etu/")} - {"etu/retain_loss"}
    assert {k.removeprefix("eval_") for k in ev if k.startswith("eval_etu/")} == trained_keys
    # on the held-out forget data the model is not trained on: its mass is the model's own, not a training number
    heldout_ids = torch.tensor(trainer.forbidden_set.ids)
    direct = evaluate_mass(trainer.model, iter_batches(corpora["forget_heldout"], None, 16), heldout_ids)
    assert ev["eval_etu/pi_s"] == pytest.approx(direct.mean, rel=1e-4)
    assert ev["eval_etu/forget_positions"] == direct.n_positions
    assert ev["eval_etu/q_s"] <= trainer.args.epsilon + 1e-6  # the per-position target is min(p, epsilon)
    assert trainer.training_metrics == metrics
    # the audit into the run's own folder completes metrics.json: its summary and the data's block counts
    report = trainer.audit(
        forget_data=corpora["forget_heldout"], retain_data=corpora["retain_heldout"], output_dir=out, overwrite=True
    )
    with open(os.path.join(out, "metrics.json")) as f:
        audited = json.load(f)
    assert {k: v for k, v in audited.items() if k not in ("heldout", "data")} == metrics  # training numbers kept
    check_metrics_schema(audited, heldout=True)
    assert audited["heldout"]["updated_p_S"] == report.updated_p_S and audited["heldout"]["report"] == (
        "suppression_report.json"
    )
    assert audited["data"] == {
        "forget_train_blocks": len(corpora["forget"]),
        "controller_heldout_blocks": 0,
        "forget_heldout_blocks": len(corpora["forget_heldout"]),
        "retain_train_blocks": len(corpora["retain"]),
        "retain_heldout_blocks": len(corpora["retain_heldout"]),
        "block_size": 64,
    }
    assert trainer.training_metrics == audited
    save_dir = tmp_path / "saved"
    trainer.save_model(str(save_dir))
    assert (save_dir / "adapter_model.safetensors").exists() and (save_dir / "V_S.ids.json").exists()
    # transformers pickles the arguments into training_args.bin; ours leave the hub token out
    assert b"hf_abcdefghijklmnopqrstuvwxyz0123" not in (save_dir / "training_args.bin").read_bytes()
    assert trainer.args.hub_token == "hf_abcdefghijklmnopqrstuvwxyz0123"  # still usable in memory
    trainer.create_model_card(model_name="etu-test")
    card = open(os.path.join(out, "README.md")).read()
    assert "etu-hf" in card and "unlearning" in card
    # etu-hf's card, with the audit just written into the run folder and no hub token
    assert card.startswith("---\n") and "# etu-test" in card and "## Audit on held-out data" in card
    assert f"{report.updated_p_S_upper:.4f}" in card and "hf_abcdefghijklmnopqrstuvwxyz0123" not in card


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tokenizer, corpora, make_args, tmp_path):
    from transformers import AutoModelForCausalLM

    from etu_hf.demo import DEMO_MODEL_DIR

    def run(output_dir, stop=None, resume=None):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
        args = make_args(output_dir=str(output_dir), max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1)
        trainer = lora_trainer(model, tokenizer, corpora, args, callbacks=[StopAt(stop)] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora" in k}, losses, trainer

    full, full_losses, _ = run(tmp_path / "full")
    _, first_losses, _ = run(tmp_path / "part", stop=3)
    resumed, resumed_losses, trainer = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    assert first_losses == pytest.approx(full_losses[:3], rel=1e-6)
    assert resumed_losses == pytest.approx(full_losses, rel=1e-6)  # the resumed log history continues the run
    for k, v in full.items():
        torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=1e-5)
    # metrics.json of the resumed run covers all 6 steps, like the uninterrupted run's
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("full", "part")}
    assert metrics["part"]["resumed_from_checkpoint"] == str(tmp_path / "part" / "checkpoint-3")
    assert metrics["part"]["train_loss"] == pytest.approx(metrics["full"]["train_loss"], rel=1e-5)
    assert metrics["part"]["train_loss"] == pytest.approx(sum(full_losses) / 6, rel=1e-5)
    for key in ("mean", "min", "max"):
        assert metrics["part"]["lambda"][key] == pytest.approx(metrics["full"]["lambda"][key], rel=1e-4)
    for key in ("training_forget_positions", "mean_training_pi_s"):
        assert metrics["part"][key] == pytest.approx(metrics["full"][key], rel=1e-4)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("epsilon", 0.0, "epsilon"),
        ("epsilon", 1.0, "epsilon"),
        ("epsilon", -0.1, "epsilon"),
        ("lambda_max", 0.0, "lambda_max"),
        ("lambda_mode", "exact", "lambda_mode"),
        ("vs_method", "tfidf", "vs_method"),
        ("retain_loss_type", "mse", "retain_loss_type"),
        ("pmi_smoothing", 0.0, "pmi_smoothing"),
        ("forbidden_ids_path", "/no/such/V_S.ids.json", "forbidden_ids_path"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        ETUTrainingArguments(output_dir=str(tmp_path), **{field: value})


def test_plain_training_arguments_are_refused_with_the_fix(model, tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="ETUTrainingArguments"):
        ETUTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path)))


def test_empty_forget_data(model, tokenizer, make_args):
    empty = datasets.Dataset.from_dict({"input_ids": [], "labels": []})
    with pytest.raises(ValueError, match="nothing to forget"):
        ETUTrainer(model=model, args=make_args(), train_dataset=empty, processing_class=tokenizer)
    all_ignored = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7]], "labels": [[-100, -100, -100]]})
    with pytest.raises(ValueError, match="no scored token"):
        ETUTrainer(model=model, args=make_args(), train_dataset=all_ignored, processing_class=tokenizer)


def test_forbidden_ids_out_of_vocabulary(model, tokenizer, corpora, make_args, tmp_path):
    path = tmp_path / "V_S.ids.json"
    path.write_text("[5, 10, 99999]")
    with pytest.raises(ValueError, match=r"forbidden_ids_path.*outside the model's vocabulary"):
        ETUTrainer(
            model=model,
            args=make_args(forbidden_ids_path=str(path)),
            train_dataset=corpora["forget"],
            processing_class=tokenizer,
        )


def test_empty_forbidden_set_says_which_flags_to_loosen(model, tokenizer, corpora, make_args):
    with pytest.raises(ValueError, match=r"V_S is empty.*pmi_min_count"):
        ETUTrainer(
            model=model,
            args=make_args(pmi_min_count=10**9),
            train_dataset=corpora["forget"],
            processing_class=tokenizer,
        )


def test_tokenizer_that_does_not_match_the_model(tokenizer, corpora, make_args):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="tokenizer does not match"):
        ETUTrainer(model=small, args=make_args(), train_dataset=corpora["forget"], processing_class=tokenizer)


def test_model_that_is_not_a_causal_lm(make_args):
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    for cls in (LlamaModel, LlamaForSequenceClassification):
        with pytest.raises(TypeError, match="causal language model"):
            ETUTrainer(model=cls(config), args=make_args())


def test_rerun_replaces_a_previous_run_like_trainer_and_only_when_it_succeeds(
    model, tokenizer, corpora, make_args, tmp_path, caplog
):
    """Drop-in: an unchanged script runs again into the same output_dir (Trainer writes over a previous
    run); the previous run is named in a warning, put back if the new run fails, removed when it succeeds."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "V_S.ids.json").write_text('{"ids": [5, 6]}')  # an etu-hf run's (a folder without one is refused)
    (out / "metrics.json").write_text('{"precious": true}')
    (out / "checkpoint-7").mkdir()
    (out / "my_notes.txt").write_text("not a run artifact")

    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("simulated crash")

    def rerun(callbacks=None, **kwargs):
        args = make_args(output_dir=str(out), max_steps=2, **kwargs)
        return ETUTrainer(
            model=model,
            args=args,
            train_dataset=corpora["forget"],
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    with caplog.at_level(logging.WARNING, logger="etu_hf"), pytest.raises(RuntimeError, match="simulated crash"):
        rerun([Fail()]).train()
    warning = next(r.getMessage() for r in caplog.records if "holds a previous run" in r.getMessage())
    assert "checkpoint-7, metrics.json" in warning and "my_notes.txt" not in warning
    assert "--overwrite_output_dir" in warning  # says the command line is stricter
    # the failed run wrote V_S.ids.json and args.json, then crashed: the previous run is back as it was
    assert sorted(os.listdir(out)) == ["V_S.ids.json", "checkpoint-7", "metrics.json", "my_notes.txt"]
    assert (out / "metrics.json").read_text() == '{"precious": true}'
    rerun().train()
    # a run that succeeds replaces the previous run entirely (no stale checkpoint-7 beside the new V_S);
    # files that are not run artifacts stay
    assert sorted(os.listdir(out)) == ["V_S.ids.json", "args.json", "metrics.json", "my_notes.txt"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="etu_hf"):
        rerun(overwrite_output_dir=True).train()  # asked for: replaced without a warning
    assert not any("holds a previous run" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(out)) == ["V_S.ids.json", "args.json", "metrics.json", "my_notes.txt"]


def test_mass_estimator_matches_direct_computation(model, tokenizer, corpora, make_args):
    trainer = ETUTrainer(model=model, args=make_args(), train_dataset=corpora["forget"], processing_class=tokenizer)
    data = corpora["forget_heldout"].select(range(5))
    S = torch.tensor(trainer.forbidden_set.ids)
    res = evaluate_mass(model, iter_batches(data, None, 2), S, chunk_size=37, keep_positions=True)
    batch = next(iter_batches(data, None, 5))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
    direct = forbidden_mass(logits[:, :-1], S)[mask]
    assert res.n_positions == int(mask.sum())
    assert res.mean == pytest.approx(float(direct.double().mean()), abs=1e-6)
    ppl = evaluate_perplexity(model, iter_batches(data, None, 2), chunk_size=10)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1][mask], batch["labels"][:, 1:][mask])
    assert ppl.perplexity == pytest.approx(float(torch.exp(nll)), rel=1e-5)


def test_adapter_on_the_output_head_is_saved_without_a_copy_of_the_head(model, tokenizer, corpora, make_args):
    """PEFT's save_embedding_layers='auto' would store the base head (|V| x hidden) in the adapter; the trainer
    saves only the LoRA factors, and the reloaded adapter gives the same logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from etu_hf.demo import DEMO_MODEL_DIR

    trainer = ETUTrainer(
        model=model,
        args=make_args(max_steps=2, adaptive_lambda=False),
        train_dataset=corpora["forget"],
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"]),
    )
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir
    keys = set(load_file(os.path.join(out, "adapter_model.safetensors")))
    assert any("lm_head.lora_A" in k for k in keys)
    assert not [k for k in keys if "lora_" not in k]  # no base weights (no lm_head.weight, no embed_tokens)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR), out).eval()
    batch = next(iter_batches(corpora["forget_heldout"], None, 2))
    trainer.model.eval()
    with torch.no_grad():
        a = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b)


def test_adapter_that_leaves_the_head_frozen_is_warned_about(model, tokenizer, corpora, make_args, caplog):
    with caplog.at_level("WARNING", logger="etu_hf.training"):
        ETUTrainer(
            model=model,
            args=make_args(max_steps=1),
            train_dataset=corpora["forget"],
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )
    assert "leaves the output head (lm_head) frozen" in caplog.text


def test_loss_chunk_size_zero_means_unchunked(tokenizer, corpora, make_args):
    """``loss_chunk_size=0`` computes the loss in one piece (it used to become 1024): the output head sees
    every position at once, and loss and gradient equal those of small chunks."""
    from transformers import AutoModelForCausalLM

    from etu_hf.demo import DEMO_MODEL_DIR

    batch = next(iter_batches(corpora["forget"].select(range(4)), None, 4))
    positions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    results = {}
    for chunk in (0, 7):
        trainer = ETUTrainer(
            model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
            args=make_args(loss_chunk_size=chunk, retain_weight=0.0),
            train_dataset=corpora["forget"],
            processing_class=tokenizer,
        )
        trainer.tilt_state.decide_head(trainer.model, batch)
        rows = []
        hook = trainer.model.lm_head.register_forward_hook(lambda m, i, o, rows=rows: rows.append(i[0].shape[0]))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        head_calls = rows[1:]  # rows[0]: the model's own forward, truncated to no position
        hook.remove()
        loss.backward()
        grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
        results[chunk] = loss.detach(), grads, head_calls
    assert results[0][2] == [positions]  # one chunk of every position
    assert results[7][2] == [7] * (positions // 7) + ([positions % 7] if positions % 7 else [])
    torch.testing.assert_close(results[0][0], results[7][0], atol=1e-6, rtol=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[7][1][name], atol=1e-6, rtol=1e-5)


def test_loss_chunk_size_zero_trains_with_the_controller(model, tokenizer, corpora, make_args):
    """Unchunked everywhere: the p_S estimate, the loss and the held-out probe."""
    args = make_args(loss_chunk_size=0, max_steps=2, adaptive_lambda=True, lambda_update_freq=2, logging_steps=2)
    trainer = lora_trainer(model, tokenizer, corpora, args)
    assert trainer.heldout_probe.chunk_size == 0
    trainer.train()
    assert trainer.lambda_controller.history[0]["positions"] > 0
    assert 0 < trainer.base_p_s < 1


def test_a_run_of_few_optimiser_steps_is_warned_about(model, tokenizer, corpora, make_args, caplog):
    """Fewer than FEW_STEPS optimiser steps: one warning that names the steps and the flags to change."""
    from etu_hf.training.trainer import FEW_STEPS

    def run(steps):
        caplog.clear()
        trainer = ETUTrainer(
            model=model,
            args=make_args(max_steps=steps, adaptive_lambda=False),
            train_dataset=corpora["forget"],
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )
        with caplog.at_level("WARNING", logger="etu_hf.training.trainer"):
            trainer.train()
        return caplog.text

    text = run(2)
    assert "this run trains 2 optimiser steps" in text and "--max_steps 40" in text
    assert "optimiser steps." not in run(FEW_STEPS)
