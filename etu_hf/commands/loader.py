"""The one model and tokenizer loader of the command line (``unlearn``, ``audit`` and ``refine``).

Every model goes through :func:`load_causal_lm`, which checks the checkpoint before any weight is
read; :func:`load_model` adds the dtype, 4-bit loading and placement; :func:`load_tokenizer` gives
a tokenizer with a pad token.
"""

from __future__ import annotations

from typing import Any

from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.modeling.checks import (
    check_causal_config,
    check_sequence_length,
    check_weight_files,
    load_config,
    vocab_mismatch,
)
from etu_hf.modeling.paths import check_model_path, load_failure


def load_causal_lm(
    path: str, flag: str, max_length: int | None = None, length_flag: str = "--block_size", **kwargs: Any
) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` after the checks of this module.

    ``max_length``, when given, is checked against the model's position limit under ``length_flag``.
    Raises ``TypeError`` (not a causal LM) or ``ValueError`` (anything else) naming ``flag``.
    """
    from transformers import AutoModelForCausalLM

    if path != DEMO_MODEL_DIR:
        check_model_path(path, flag)
    config = load_config(path, flag, kwargs.get("trust_remote_code", False))
    check_causal_config(config, path, flag)
    if max_length is not None:
        check_sequence_length(config, max_length, length_flag, path)
    check_weight_files(path, flag)
    mismatch = vocab_mismatch(path, config)
    if mismatch:
        raise ValueError(f"{flag} {path!r}: the weights do not match config.json: {mismatch}.")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
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
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would start them from random values, with a log line only
        shown = ", ".join(missing[:3]) + (f", ... ({len(missing)} in all)" if len(missing) > 3 else "")
        raise ValueError(
            f"{flag} {path!r}: config.json describes weights the files do not hold ({shown}); they would start "
            "random. Use the config.json the weights came with (num_hidden_layers, ...)."
        )
    return model


def check_before_weights(
    path: str | None,
    tokenizer: Any,
    tokenizer_flag: str,
    forbidden_ids_path: str | None = None,
    trust_remote_code: bool = False,
    layer_ids: str | None = None,
) -> None:
    """What can be checked from ``config.json``, the tokenizer and the V_S file before any weight is read:
    ``--layer_ids`` exist (``num_hidden_layers``), the tokenizer fits the model's vocabulary
    (:func:`~etu_hf.modeling.checks.tokenizer_mismatch`) and a ``--forbidden_ids_path`` fits both
    (:meth:`~etu_hf.ForbiddenSet.check_vocab`). ``ValueError`` naming the flag."""
    from etu_hf.forbidden_set import ForbiddenSet
    from etu_hf.modeling.adapters import parse_ids
    from etu_hf.modeling.checks import tokenizer_mismatch

    path = path or DEMO_MODEL_DIR
    text_config = load_config(path, "--model_name_or_path", trust_remote_code).get_text_config()
    layers = getattr(text_config, "num_hidden_layers", None)
    bad = [i for i in parse_ids(layer_ids, "--layer_ids") or [] if isinstance(layers, int) and not 0 <= i < layers]
    if bad:
        raise ValueError(
            f"--layer_ids: layer(s) {bad} out of range: the model has {layers} decoder layers (0..{layers - 1})"
        )
    rows = getattr(text_config, "vocab_size", None)
    if not isinstance(rows, int):
        return
    problem = tokenizer_mismatch(len(tokenizer), rows, f"{tokenizer_flag}: the tokenizer")
    if problem:
        raise ValueError(problem)
    if forbidden_ids_path:
        ForbiddenSet.load(forbidden_ids_path).check_vocab(rows, "--forbidden_ids_path", tokenizer.pad_token_id)


def local_device() -> Any:
    """This process's device (``accelerate.PartialState().device``: ``cuda:<local rank>``, else ``mps``,
    else ``cpu``)."""
    from accelerate import PartialState

    return PartialState().device


def quantization_config(flag: str = "--load_in_4bit") -> Any:
    """TRL's ``get_quantization_config`` for nf4 4-bit weights with double quantisation (the QLoRA
    recipe), computing in bfloat16 on a GPU and float32 on a CPU.

    TRL computes in the model's ``--dtype``; here the compute dtype follows the device instead, as
    CPUs without bfloat16 kernels would otherwise be slow. ``ImportError`` naming ``flag`` and the
    install command when bitsandbytes is missing.
    """
    import torch
    from trl import ModelConfig, get_quantization_config

    from etu_hf.modeling.bnb import require_bitsandbytes

    require_bitsandbytes(flag)
    compute_dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    settings = ModelConfig(load_in_4bit=True, dtype=compute_dtype, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    return get_quantization_config(settings)


def load_model(
    path: str | None,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    device: Any = None,
    max_length: int | None = None,
    flag: str = "--model_name_or_path",
    length_flag: str = "--block_size",
    four_bit_flag: str = "--load_in_4bit",
) -> Any:
    """The causal LM at ``path`` (the embedded demo model when ``None``), checked by
    :func:`load_causal_lm` before its weights are read.

    With ``load_in_4bit`` its weights load in 4-bit nf4 (:func:`quantization_config`) onto ``device``
    (default :func:`local_device`) and bitsandbytes' CPU repacking is disabled on every 4-bit layer
    (:func:`etu_hf.modeling.bnb.prepare_4bit_model`); otherwise it is moved to ``device`` when one is
    given (a Trainer places it itself).
    """
    import torch

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(four_bit_flag)
        kwargs["device_map"] = {"": device if device is not None else local_device()}
    model = load_causal_lm(path or DEMO_MODEL_DIR, flag, max_length=max_length, length_flag=length_flag, **kwargs)
    if load_in_4bit:
        from etu_hf.modeling.bnb import prepare_4bit_model

        prepare_4bit_model(model)
    elif device is not None:
        model.to(device)
    return model


def load_training_model(model_args: Any, gradient_checkpointing: bool = False, max_length: int | None = None) -> Any:
    """:func:`load_model` for ``etu-hf unlearn``'s :class:`~etu_hf.commands.arguments.ModelArguments`;
    with ``--use_qlora`` the 4-bit model then goes through PEFT's ``prepare_model_for_kbit_training``."""
    model = load_model(
        model_args.model_name_or_path,
        dtype=model_args.dtype,
        trust_remote_code=model_args.trust_remote_code,
        load_in_4bit=model_args.use_qlora,
        max_length=max_length,
        length_flag="--block_size (--max_length)",
        four_bit_flag="--use_qlora",
    )
    if model_args.use_qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def load_tokenizer(path: str | None, trust_remote_code: bool = False, flag: str = "--model_name_or_path") -> Any:
    """``AutoTokenizer`` from ``path`` (the embedded demo model's when ``None``), with the EOS token as
    pad token when it has none (:func:`etu_hf.data.blocks.ensure_pad_token`).

    The path is checked first (:func:`etu_hf.modeling.paths.check_model_path`), and a tokenizer that
    still fails to load is a ``ValueError`` naming ``flag``."""
    from transformers import AutoTokenizer

    from etu_hf.data.blocks import ensure_pad_token

    if path is None:
        return ensure_pad_token(AutoTokenizer.from_pretrained(DEMO_MODEL_DIR))
    check_model_path(path, flag, weights=False, tokenizer=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as err:
        raise load_failure(path, flag, "tokenizer", err) from err
    return ensure_pad_token(tokenizer)


def init_deepspeed_for_zero3(training_args: Any) -> None:
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
