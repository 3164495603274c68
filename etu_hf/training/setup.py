"""What ``ETUTrainer`` checks and builds before the Trainer takes over: the model (PEFT, 4-bit), the
input data, and the base distribution pi_b (docs/method.md, "The loss")."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import enable_full_determinism, set_seed

from etu_hf.data.blocks import check_token_dataset
from etu_hf.modeling.base import AdapterDisabledBase, BaseDistribution, FrozenCopyBase
from etu_hf.modeling.bnb import prepare_4bit_model
from etu_hf.modeling.checks import check_causal_lm, check_tokenizer_matches
from etu_hf.modeling.head import (
    is_peft_model,
    output_head_name,
    output_head_trainable,
    output_vocab_size,
    unwrap_model,
)
from etu_hf.training.config import ETUTrainingArguments

logger = logging.getLogger(__name__)


def check_arguments(args: ETUTrainingArguments | None) -> ETUTrainingArguments:
    """``args``, or defaults in ``tmp_trainer``; plain ``TrainingArguments`` are refused with the fix."""
    if args is None:
        return ETUTrainingArguments(output_dir="tmp_trainer")
    if not isinstance(args, ETUTrainingArguments):
        raise TypeError(
            f"ETUTrainer needs ETUTrainingArguments, got {type(args).__name__}: replace "
            "TrainingArguments(...) with etu_hf.ETUTrainingArguments(...) (same fields plus the ETU ones)."
        )
    check_report_to(args)
    return args


def check_report_to(args: Any) -> None:
    """``ValueError`` naming ``--report_to`` when an integration in ``args.report_to`` is unknown or its
    package is not installed (transformers raises a RuntimeError only when the Trainer is built).

    Each integration's callback is constructed once, as the Trainer would; constructing one only checks
    its package (they connect when training starts)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    for name in args.report_to or []:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(
                f"--report_to: unknown integration {name!r}; known: {', '.join(INTEGRATION_TO_CALLBACK)}, none"
            )
        try:
            INTEGRATION_TO_CALLBACK[name]()
        except (RuntimeError, ImportError) as err:
            raise ValueError(
                f"--report_to {name}: its package is not installed ({str(err).strip().splitlines()[0]}); install it "
                "(e.g. pip install tensorboard) or pass --report_to none."
            ) from err


def prepare_model(model: nn.Module | None, args: ETUTrainingArguments, peft_config: Any, tokenizer: Any) -> nn.Module:
    """Check the model and the tokenizer; wrap the model with ``peft_config`` (seeded as the Trainer would
    seed, but before the adapter weights are drawn, so runs reproduce)."""
    if model is None:
        raise ValueError("ETUTrainer needs a model (model_init is not supported)")
    check_causal_lm(model)
    if peft_config is not None:
        if is_peft_model(model):
            raise ValueError("peft_config was given but the model is already a PeftModel; pass one or the other")
        from peft import get_peft_model

        if args.full_determinism:
            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)
        model = get_peft_model(model, peft_config)
    prepare_4bit_model(model)  # bitsandbytes' CPU repacking would corrupt LoRA gradients (and crash)
    check_tokenizer_matches(model, tokenizer)
    return model


def check_datasets(train: Any, retain: Any, heldout: Any, evaluation: Any) -> None:
    """Empty or untokenized data fails now, naming the argument."""
    if retain is not None and len(retain) == 0:
        raise ValueError("retain_dataset is empty; pass None for suppression-only training")
    if train is not None and hasattr(train, "__len__") and len(train) == 0:
        raise ValueError("train_dataset (the forget data) is empty: there is nothing to forget")
    for name, dataset in (
        ("train_dataset (the forget data)", train),
        ("retain_dataset", retain),
        ("heldout_dataset", heldout),
        ("eval_dataset", evaluation if not isinstance(evaluation, dict) else None),
    ):
        check_token_dataset(dataset, name)


def check_token_ids(vocab_size: int, **data: Any) -> None:
    """``ValueError`` naming the argument when a ``datasets.Dataset``'s ``input_ids`` (or ``labels``, -100
    aside) hold an id outside ``[0, vocab_size)``; the embedding lookup would fail with torch's "index out of
    range in self" at the first batch. One Arrow min/max pass per column; other data kinds are not read."""
    import pyarrow.compute as pc

    for name, dataset in data.items():
        table = getattr(getattr(dataset, "data", None), "table", None)
        if table is None:
            continue
        for column in ("input_ids", "labels"):
            if column not in table.column_names:
                continue
            values = pc.list_flatten(table.column(column))
            if column == "labels":
                values = pc.filter(values, pc.not_equal(values, -100))
            bounds = pc.min_max(values).as_py() if len(values) else {"min": None, "max": None}
            bad = [b for b in (bounds["max"], bounds["min"]) if b is not None and not 0 <= b < vocab_size]
            if bad:
                raise ValueError(
                    f"{name} holds token id {bad[0]} in {column!r}, outside the model's vocabulary of {vocab_size}: "
                    "the data was tokenized with another tokenizer; tokenize it with the model's own."
                )


def choose_base(
    model: nn.Module, ref_model: nn.Module | None, args: ETUTrainingArguments, *, tilted_target: bool = True
) -> BaseDistribution:
    """The base distribution: ``ref_model`` when given; the PEFT model with adapters disabled (no copy);
    else a frozen copy of ``model`` taken now (on CPU with ``frozen_on_cpu``).

    ``tilted_target``: the run trains toward ETU's tilted target (``ETUTrainer.fits_tilted_target``), so
    an adapter that leaves the output head frozen gets a warning; the baselines (docs/baselines.md) have no
    mass bound to reach and are commonly trained with adapters on the layers alone."""
    device = "cpu" if args.frozen_on_cpu else args.device
    if ref_model is not None:
        check_causal_lm(ref_model)
        if output_vocab_size(ref_model) != output_vocab_size(model):
            raise ValueError("ref_model has a different vocabulary size than model")
        return FrozenCopyBase(ref_model, device=device, copy_model=False)
    if is_peft_model(model):
        if tilted_target and not output_head_trainable(unwrap_model(model)):
            logger.warning(
                "the adapter leaves the output head (%s) frozen: ETU's tilted target lowers the logits of V_S, "
                "against every other token, by lambda(x), which adapters on the transformer layers alone generally "
                "cannot fit (held-out mass then stays above epsilon). Add it to the LoRA target_modules (e.g. "
                "target_modules=['q_proj', ..., 'lm_head'], or --lora_target_modules all-linear,lm_head).",
                output_head_name(unwrap_model(model)),
            )
        return AdapterDisabledBase(model)
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "full fine-tuning under DeepSpeed ZeRO-3 needs the base model as ref_model= (its parameters are "
            "partitioned, so the trainer cannot copy them): pass ref_model=, train LoRA (--use_lora), or use "
            "ZeRO-2."
        )
    logger.info("model has no PEFT adapters: keeping a frozen copy as the base distribution")
    return FrozenCopyBase(model, device=device)
