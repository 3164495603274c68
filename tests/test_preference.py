"""Preference refinement: the losses against their formulas and TRL, the reference model, the effect, refine."""

import json
import math
import shutil

import datasets
import pytest
import torch
from helpers import LORA, fast_args, lora_trainer
from peft import LoraConfig

import etu_hf.training.loss_terms as loss_terms
from etu_hf import ETUTrainer
from etu_hf.commands.cli import main
from etu_hf.data.blocks import iter_batches
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import write_demo_corpora
from etu_hf.ops.preference import dpo_sigmoid_loss, npo_loss, sequence_logps, simnpo_loss


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------- formulas
def test_npo_and_simnpo_equal_their_formulas_on_fixed_logps():
    policy = torch.tensor([-12.0, -30.5, -4.25])
    ref = torch.tensor([-10.0, -33.0, -4.0])
    beta = 0.1
    expected = [-(2 / beta) * log_sigmoid(-beta * (p - r)) for p, r in zip(policy.tolist(), ref.tolist(), strict=True)]
    torch.testing.assert_close(npo_loss(policy, ref, beta), torch.tensor(expected), atol=1e-6, rtol=1e-6)
    lengths, gamma = torch.tensor([4, 10, 2]), 0.5
    expected = [
        -(2 / beta) * log_sigmoid(-(beta / n) * p - gamma)
        for p, n in zip(policy.tolist(), lengths.tolist(), strict=True)
    ]
    torch.testing.assert_close(simnpo_loss(policy, lengths, beta, gamma), torch.tensor(expected), atol=1e-6, rtol=1e-6)
    # at policy == reference NPO is (2/beta) log 2, and it decreases as the forget log-prob falls
    assert float(npo_loss(ref, ref, beta)[0]) == pytest.approx(2 / beta * math.log(2))
    assert float(npo_loss(ref - 5, ref, beta)[0]) < float(npo_loss(ref, ref, beta)[0])


def _dpo_batch(tokenizer):
    from etu_hf.commands.refine import RefineArguments, preference_rows

    forget = [" ".join(["vexium korathine distill the residue slowly in the flask"] * 2)] * 4
    retain = ["the onion soup needs salt and a little butter before serving"] * 4
    args = RefineArguments(
        adapter="unused",
        forget_corpora="unused",
        method="dpo",
        chosen="retain",
        retain_corpora="unused",
        prompt_words=4,
        max_completion_words=8,
    )
    return datasets.Dataset.from_list(preference_rows(forget, retain, args))


def test_dpo_loss_equals_trl_and_reference_is_the_base_model(trained, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from etu_hf.commands.refine import build_dpo_trainer

    _, adapter = trained
    config = DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        beta=0.3,
        per_device_train_batch_size=4,
        max_steps=1,
    )
    trainer = build_dpo_trainer(
        AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR), str(adapter), config, _dpo_batch(tokenizer), tokenizer
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, dict(batch))
        logps = sequence_logps(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["input_ids"],
            batch["completion_mask"],
        )
        base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)  # an independent copy, no adapter anywhere
        base_logps = sequence_logps(
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["input_ids"],
            batch["completion_mask"],
        )
    # TRL's reference is the base model, not a copy of the ETU adapter
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), base_logps, atol=1e-6, rtol=1e-6)
    assert (logps - base_logps).abs().max() > 1e-3  # the ETU adapter really is loaded
    chosen, rejected = logps.chunk(2)
    ours = dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3).mean()
    torch.testing.assert_close(ours, trl_loss, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- in-loop
def _trainer(model, tokenizer, corpora, tmp_path, **kwargs):
    return lora_trainer(model, tokenizer, corpora, fast_args(str(tmp_path / "run"), **kwargs))


def _move_adapter_off_zero(trainer, seed: int) -> None:
    """Random LoRA B factors, so that the model differs from the base (fresh adapters equal it)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def test_in_loop_reference_logps_are_the_base_models(model, tokenizer, corpora, tmp_path, monkeypatch):
    trainer = _trainer(model, tokenizer, corpora, tmp_path, preference_weight=1.0, pref_prompt_tokens=5)
    _move_adapter_off_zero(trainer, seed=1)
    seen = {}
    real = loss_terms.preference_losses

    def spy(fmt, beta, margin, policy, ref, lengths, chosen=None):
        seen.update(policy=policy.detach(), ref=ref, lengths=lengths)
        return real(fmt, beta, margin, policy, ref, lengths, chosen)

    monkeypatch.setattr(loss_terms, "preference_losses", spy)
    batch = next(iter_batches(corpora["forget_heldout"].select(range(3)), None, 3))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    cm = batch["attention_mask"].clone()
    cm[:, :5] = 0  # completion = tokens after the 5-token prompt
    with torch.no_grad():
        policy = sequence_logps(trainer.model(input_ids=batch["input_ids"]).logits, batch["input_ids"], cm)
        with trainer.model.disable_adapter():
            ref = sequence_logps(trainer.model(input_ids=batch["input_ids"]).logits, batch["input_ids"], cm)
    torch.testing.assert_close(seen["ref"], ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seen["policy"], policy, atol=1e-4, rtol=1e-5)
    assert seen["lengths"].tolist() == (cm[:, 1:].sum(1)).tolist()


def _completion_logp(trainer, data, prompt_tokens=16):
    total, n = 0.0, 0
    with torch.no_grad():
        for b in iter_batches(data, None, 16):
            cm = b["attention_mask"].clone()
            cm[:, :prompt_tokens] = 0
            lp = sequence_logps(
                trainer.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["input_ids"], cm
            )
            total, n = total + float(lp.sum()), n + len(lp)
    return total / n


def test_npo_in_the_loop_lowers_forget_completions_more(tokenizer, corpora, tmp_path):
    from transformers import AutoModelForCausalLM

    results = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        trainer = _trainer(
            AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
            tokenizer,
            corpora,
            tmp_path / str(weight),
            max_steps=40,
            preference_weight=weight,
            logging_steps=20,
        )
        trainer.train()
        results[weight] = _completion_logp(trainer, corpora["forget_heldout"])
        if weight:
            assert "etu/pref_loss" in trainer.state.log_history[-2]
    assert results[1.0] < results[0.0] - 5.0


@pytest.mark.parametrize("source", ["refusal", "retain", "data"])
def test_dpo_chosen_completions_come_from_the_selected_source(model, tokenizer, corpora, tmp_path, monkeypatch, source):
    """The chosen log-probabilities fed to the DPO loss are those of prompt + the completion that
    ``pref_chosen`` names (a refusal in turn, the start of the paired retain row, or the row's
    pref_chosen_ids), under the model and under the base, recomputed here one sequence at a time."""
    prompt_tokens = 8
    forget = corpora["forget"].select(range(32))
    alt = tokenizer(" The weather is mild today.", add_special_tokens=False)["input_ids"]
    if source == "data":
        forget = forget.add_column("pref_chosen_ids", [alt] * len(forget))
    args = fast_args(
        str(tmp_path / "run"),
        per_device_train_batch_size=4,
        preference_weight=0.5,
        pref_format="dpo",
        pref_chosen=source,
        pref_prompt_tokens=prompt_tokens,
    )
    trainer = ETUTrainer(
        model=model,
        args=args,
        train_dataset=forget,
        retain_dataset=corpora["retain"],
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    _move_adapter_off_zero(trainer, seed=2)
    seen = {}
    real = loss_terms.preference_losses

    def spy(fmt, beta, margin, policy, ref, lengths, chosen=None):
        seen["chosen"] = chosen
        return real(fmt, beta, margin, policy, ref, lengths, chosen)

    monkeypatch.setattr(loss_terms, "preference_losses", spy)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    refusals = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in args.pref_refusals]
    expected_policy, expected_ref = [], []
    for i in range(batch["input_ids"].shape[0]):
        attended = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        prompt, completion = attended[:prompt_tokens], attended[prompt_tokens:]
        if source == "refusal":
            chosen = refusals[i % len(refusals)]
        elif source == "retain":
            retain_row = batch["retain_input_ids"][i][batch["retain_attention_mask"][i].bool()].tolist()
            chosen = retain_row[: len(completion)]
            assert chosen != completion
        else:
            chosen = alt
        ids = torch.tensor([prompt + chosen])
        cm = torch.tensor([[0] * len(prompt) + [1] * len(chosen)])
        with torch.no_grad():
            expected_policy.append(sequence_logps(trainer.model(input_ids=ids).logits, ids, cm))
            with trainer.model.disable_adapter():
                expected_ref.append(sequence_logps(trainer.model(input_ids=ids).logits, ids, cm))
    policy, ref = seen["chosen"]
    torch.testing.assert_close(policy.detach(), torch.cat(expected_policy), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ref, torch.cat(expected_ref), atol=1e-4, rtol=1e-5)
    assert (policy.detach() - ref).abs().max() > 1e-3  # model and base differ: each side is the right one


def test_gradient_accumulation_is_exact_with_the_preference_term(tokenizer, corpora, tmp_path):
    from transformers import AutoModelForCausalLM

    norms = []
    data = corpora["forget"].select(range(16))
    for bs, ga in ((16, 1), (4, 4)):
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
        args = fast_args(
            str(tmp_path / f"ga{ga}"),
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            logging_steps=1,
            preference_weight=1.0,
            retain_weight=0.0,
        )
        trainer = ETUTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, forbidden_set=list(range(200, 300))
        )
        trainer.train()
        norms.append(next(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h))
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


# ------------------------------------------------------------------------------------- etu-hf refine
@pytest.mark.parametrize("method", ["dpo", "npo", "simnpo"])
def test_refine_runs_offline_and_writes_an_audited_adapter(trained, tmp_path, method, capsys):
    _, adapter = trained
    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    out = tmp_path / f"refined-{method}"
    block = ["--audit_block_size", "64"]
    if method == "npo":  # an etu-hf unlearn run records its block_size: the final audit then cuts the text alike
        shutil.copytree(adapter, tmp_path / "run64")
        adapter = tmp_path / "run64"
        run_args = json.loads((adapter / "args.json").read_text())
        (adapter / "args.json").write_text(json.dumps({**run_args, "block_size": 64}))
        block = []
    code = main(
        [
            "refine",
            "--method",
            method,
            "--adapter",
            str(adapter),
            "--forget_corpora",
            forget,
            "--retain_corpora",
            retain,
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--use_cpu",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--save_strategy",
            "no",
            *block,
        ]
        + (["--bf16", "false"] if method == "dpo" else [])
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    for name in ("adapter_model.safetensors", "V_S.ids.json", "args.json", "metrics.json", "suppression_report.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refine_method"] == method and metrics["steps"] == 3
    report = json.loads((out / "suppression_report.json").read_text())
    assert report["tilt"]["epsilon"] == 0.05 and report["forget_positions"] > 0
    # 64-token blocks (63 scored positions each) whether given or read from the run
    assert report["forget_positions"] <= 63 * report["forget_sequences"]


def test_refine_bad_input(trained, tmp_path, capsys):
    _, adapter = trained
    forget, _ = write_demo_corpora(str(tmp_path / "data"))
    common = [
        "--forget_corpora",
        forget,
        "--output_dir",
        str(tmp_path / "x"),
        "--use_cpu",
        "--report_to",
        "none",
        "--max_steps",
        "1",
    ]
    not_etu = tmp_path / "plain"
    not_etu.mkdir()
    (not_etu / "adapter_config.json").write_text("{}")
    assert main(["refine", "--method", "npo", "--adapter", str(not_etu), *common]) == 2
    assert "is not an etu-hf output" in capsys.readouterr().err
    assert main(["refine", "--method", "npo", "--adapter", str(adapter), "--beta", "0", *common]) == 2
    assert "beta" in capsys.readouterr().err
    assert main(["refine", "--method", "npo", "--adapter", str(adapter), "--audit_block_size", "1", *common]) == 2
    assert "--audit_block_size: must be >= 2 (got 1)" in capsys.readouterr().err
    assert (
        main(["refine", "--method", "dpo", "--bf16", "false", "--adapter", str(adapter), "--chosen", "retain", *common])
        == 2
    )
    assert "--chosen retain needs --retain_corpora" in capsys.readouterr().err
    # an adapter on the output head (etu-hf unlearn's default) cannot go through TRL's DPOTrainer
    with_head = tmp_path / "with_head"
    shutil.copytree(adapter, with_head)
    config = json.loads((with_head / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], "lm_head"]
    (with_head / "adapter_config.json").write_text(json.dumps(config))
    assert main(["refine", "--method", "dpo", "--bf16", "false", "--adapter", str(with_head), *common]) == 2
    err = capsys.readouterr().err
    assert "adapts the output head (lm_head)" in err and "--method npo" in err
    assert not (tmp_path / "x").exists()


def test_in_loop_bad_input(model, tokenizer, corpora, tmp_path):
    from etu_hf import ETUTrainingArguments

    with pytest.raises(ValueError, match="pref_beta"):
        ETUTrainingArguments(output_dir=str(tmp_path), pref_beta=0.0)
    with pytest.raises(ValueError, match="pref_every"):
        ETUTrainingArguments(output_dir=str(tmp_path), pref_every=0)
    args = fast_args(str(tmp_path / "r"), preference_weight=1.0, pref_format="dpo", pref_chosen="retain")
    with pytest.raises(ValueError, match="pref_chosen='retain' needs retain data"):
        ETUTrainer(model=model, args=args, train_dataset=corpora["forget"], processing_class=tokenizer)
    args = fast_args(str(tmp_path / "d"), preference_weight=1.0, pref_format="dpo", pref_chosen="data")
    with pytest.raises(ValueError, match="pref_chosen_ids"):
        ETUTrainer(model=model, args=args, train_dataset=corpora["forget"], processing_class=tokenizer)
    with pytest.raises(ValueError, match="pref_refusals"):
        ETUTrainingArguments(output_dir=str(tmp_path), pref_refusals=[" "])


def test_npo_trainer_alone(tokenizer, tmp_path):
    """NPOTrainer follows TRL's shape: prompt/completion strings in, the base model as reference."""
    from transformers import AutoModelForCausalLM

    from etu_hf.training.npo import NPOConfig, NPOTrainer

    data = datasets.Dataset.from_list([{"prompt": "To make vexium,", "completion": " distill the korathine."}] * 8)
    config = NPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        learning_rate=1e-3,
    )
    trainer = NPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    assert {"etu-hf", "npo", "unlearning"} <= set(trainer.model.model_tags)  # for model cards and hub commits
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-4)  # policy == reference at step 0
    assert "npo/policy_logps" in first and "npo/ref_logps" in first
    with pytest.raises(ValueError, match="beta"):
        NPOConfig(output_dir=str(tmp_path), beta=-1.0)
    with pytest.raises(ValueError, match="'prompt' and 'completion'"):
        NPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
            args=config,
            train_dataset=datasets.Dataset.from_list([{"text": "x"}]),
            processing_class=tokenizer,
        )
