"""The one model and tokenizer loader of the command line (checked before any weight is read)."""

from __future__ import annotations

import os
from typing import Any

from etu_hf.commands.arguments import ModelArguments
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.modeling.checks import (
    check_causal_config,
    check_sequence_length,
    check_weight_files,
    load_config,
    vocab_mismatch,
)
from etu_hf.training.config import ETUTrainingArguments


def load_causal_lm(
    path: str, flag: str, max_length: int | None = None, length_flag: str = "--block_size", **kwargs: Any
):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` after the checks of this module.

    ``max_length``, when given, is checked against the model's position limit under ``length_flag``.
    Raises ``TypeError`` (not a causal LM) or ``ValueError`` (anything else) naming ``flag``.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(path, flag, kwargs.get("trust_remote_code", False))
    check_causal_config(config, path, flag)
    if max_length is not None:
        check_sequence_length(config, max_length, length_flag, path)
    check_weight_files(path, flag)
    mismatch = vocab_mismatch(path, config)
    if mismatch:
        raise ValueError(f"{flag} {path!r}: the weights do not match config.json: {mismatch}.")
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise TypeError(
                f"{flag} {path!r} is not a causal language model (AutoModelForCausalLM cannot load it)."
            ) from err
        raise
    except RuntimeError as err:
        if "mismatched" in str(err) or "size mismatch" in str(err):
            raise ValueError(
                f"{flag} {path!r}: the weights do not match config.json (see the load report above); check that "
                "config.json belongs to these weights."
            ) from err
        raise


def load_tokenizer(model_args: ModelArguments) -> Any:
    """``AutoTokenizer`` from ``tokenizer_name_or_path`` (default ``model_name_or_path``, else the demo
    model), with the EOS token as pad token when it has none."""
    from transformers import AutoTokenizer

    path = model_args.tokenizer_name_or_path or model_args.model_name_or_path or DEMO_MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelArguments, gradient_checkpointing: bool = False, max_length: int | None = None):
    """``AutoModelForCausalLM`` from ``model_name_or_path`` (the demo model by default).

    Before any weight is read, :func:`etu_hf.commands.loader.load_causal_lm` checks that the checkpoint is a
    causal LM, that ``max_length`` (``--block_size``) fits its positions, and that its weights files
    are whole and match its config. With ``use_qlora`` the weights load in 4-bit nf4 and go through
    PEFT's ``prepare_model_for_kbit_training``; bitsandbytes' CPU repacking is disabled on every
    4-bit layer.
    """
    import torch

    pass

    path = model_args.model_name_or_path or DEMO_MODEL_DIR
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_args.trust_remote_code}
    if model_args.use_qlora:
        from etu_hf.modeling.bnb import four_bit_config

        kwargs["quantization_config"] = four_bit_config(flag="--use_qlora")
        kwargs["device_map"] = {"": _local_device()}
    model = load_causal_lm(
        path, "--model_name_or_path", max_length=max_length, length_flag="--block_size (--max_length)", **kwargs
    )
    if model_args.use_qlora:
        from peft import prepare_model_for_kbit_training

        from etu_hf.modeling.bnb import prepare_4bit_model

        prepare_4bit_model(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def load_model_and_tokenizer(
    model_args: ModelArguments, gradient_checkpointing: bool = False, max_length: int | None = None
):
    """``(load_model(...), load_tokenizer(...))``: the model (checked before its weights are read, see
    :func:`load_model`) and its tokenizer."""
    return load_model(model_args, gradient_checkpointing, max_length), load_tokenizer(model_args)


def _init_deepspeed_for_zero3(training_args: ETUTrainingArguments) -> None:
    """ZeRO-3 partitions weights while ``from_pretrained`` loads them (``zero.Init``), which needs
    DeepSpeed's process group. ``accelerate launch`` sets it up; ``torchrun``/``deepspeed`` with a
    ``--deepspeed`` JSON do not, and zero.Init then sees one process and fails on the batch size."""
    if not training_args.deepspeed:
        return
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed
        import torch

        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() and not training_args.use_cpu else "gloo"
        )


def _local_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"
