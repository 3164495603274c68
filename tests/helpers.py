"""Helpers shared by test modules (fixtures live in conftest.py)."""


def fast_args(output_dir, **kwargs):
    """ETUTrainingArguments for fast CPU tests: no saving, no reporting, no progress bar, no controller
    unless asked (it holds data out of training)."""
    from etu_hf import ETUTrainingArguments

    defaults = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=10,
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        pmi_top_k=64,
        pmi_min_count=5,
        p_s_sample_size=32,
        seed=0,
        dataloader_pin_memory=False,
        adaptive_lambda=False,
    )
    defaults.update(kwargs)
    return ETUTrainingArguments(**defaults)


LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def lora_trainer(model, tokenizer, corpora, args, **kwargs):
    """An ETUTrainer with a LoRA adapter (LORA) on the forget corpus, with retain data."""
    from peft import LoraConfig

    from etu_hf import ETUTrainer

    return ETUTrainer(
        model=model,
        args=args,
        train_dataset=corpora["forget"],
        retain_dataset=corpora["retain"],
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        **kwargs,
    )
