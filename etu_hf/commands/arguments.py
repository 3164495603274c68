"""The flags of ``etu-hf unlearn`` (and ``etu-hf demo``): two dataclasses beside the training arguments
(:class:`~etu_hf.ETUTrainingArguments`, or :class:`~etu_hf.BaselineTrainingArguments` for a baseline chosen
with ``--method``), the short names the command accepts, and its parser.

:class:`ModelArguments` sits where TRL's ``trl.ModelConfig`` sits in TRL's scripts, but is not one:
its flags are etu-hf's (``--use_lora``/``--use_qlora``, not ``--use_peft``/``--load_in_4bit``; a
comma-separated ``--lora_target_modules`` that may combine ``all-linear`` with the output head;
``--layer_ids``, ``--name_keywords`` and ``--param_ids`` for layer and parameter selection; defaults
that fit the tilt), and a subclass would add flags (``--load_in_8bit``, ``--use_rslora``,
``--lora_modules_to_save``, ...) that the command does not honour. The 4-bit settings go through
TRL's ``get_quantization_config`` (:func:`etu_hf.commands.loader.quantization_config`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from etu_hf.commands.env import SUGGESTED_LORA_R
from etu_hf.evaluation.audit import DEFAULT_AUDIT_MAX_SEQUENCES

#: ``etu-hf unlearn --method`` values: ETU and the baselines of docs/baselines.md (the keys of
#: :data:`etu_hf.training.baselines.UNLEARNING_METHODS`, kept here so that parsing imports no trainer).
UNLEARNING_METHOD_NAMES = ("etu", "ga", "graddiff", "npo", "simnpo", "undial")

#: ``etu-hf unlearn``'s learning rate when an adapter is trained and --learning_rate is not given
#: (transformers' default, 5e-5, is a full fine-tuning rate; LoRA needs a larger one).
ADAPTER_LEARNING_RATE = 1e-3

#: ``etu-hf unlearn``'s batch (``--per_device_train_batch_size``) and block length (``--block_size``) when
#: not given. transformers' 8 blocks of 512 tokens make a handful of optimiser steps on a forget set of a few
#: dozen documents (6 on 40 documents about Harry Potter), which cost SmolLM2 a third of its knowledge next to
#: the topic, and a step that does not fit a 24 GB machine without gradient checkpointing; 4 blocks of 128
#: tokens make 33 steps there and kept 0.90x of it (BENCHMARKS.md, "The defaults of `etu-hf unlearn`").
UNLEARN_BATCH_SIZE = 4
UNLEARN_BLOCK_SIZE = 128

#: Training-argument defaults of ``etu-hf unlearn`` that differ from ``ETUTrainingArguments``' (the flag reference
#: in docs/cli.md shows these). The controller keeps its 4 held-out batches: at batch 4 that is 16 sequences, and
#: 8 batches (32) gave the same verdict and held-out mass on the real-text case (BENCHMARKS.md).
UNLEARN_TRAINING_DEFAULTS: dict[str, Any] = {"per_device_train_batch_size": UNLEARN_BATCH_SIZE}


@dataclass
class ModelArguments:
    """Which model to unlearn, by which method, and how to adapt it."""

    method: str = field(
        default="etu",
        metadata={
            "help": "Unlearning method: 'etu' (this package's tilt), or a baseline on the same data, adapters and "
            "launch options: 'ga', 'graddiff', 'npo', 'simnpo', 'undial' (docs/baselines.md). "
            "`--method M --help` lists M's flags.",
            "choices": list(UNLEARNING_METHOD_NAMES),
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model id or local folder (AutoModelForCausalLM). Default: the embedded demo model."},
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Default: model_name_or_path."})
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype.", "choices": ["auto", "float32", "bfloat16", "float16"]}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (PEFT) instead of all weights."})
    lora_r: int = field(default=SUGGESTED_LORA_R, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="all-linear,lm_head",
        metadata={
            "help": "Comma-separated module names; 'all-linear' is PEFT's set (every linear layer but the output "
            "head). The default adds the head, which the tilt needs to be fit (docs/method.md)."
        },
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA (weight-decomposed LoRA); implies --use_lora."})
    use_qlora: bool = field(
        default=False,
        metadata={"help": "QLoRA: base weights in 4-bit nf4 (bitsandbytes) with LoRA on top; implies --use_lora."},
    )
    layer_ids: str | None = field(
        default=None,
        metadata={
            "help": "Decoder layers to train, e.g. '10,11,12' or '10-13': LoRA only there "
            "(layers_to_transform), or without LoRA only their parameters."
        },
    )
    name_keywords: str | None = field(
        default=None, metadata={"help": "Without LoRA: train parameters whose name contains one of these (comma list)."}
    )
    param_ids: str | None = field(
        default=None, metadata={"help": "Without LoRA: train these indices of model.named_parameters() (comma list)."}
    )

    @property
    def adapter(self) -> bool:
        """True when a LoRA-family adapter is trained."""
        return self.use_lora or self.use_dora or self.use_qlora

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.adapter and (self.name_keywords or self.param_ids):
            raise ValueError(
                "--name_keywords/--param_ids select the model's own parameters; with LoRA use "
                "--lora_target_modules (and --layer_ids) instead"
            )
        if self.adapter:
            if self.lora_r < 1:
                raise ValueError(f"--lora_r: the LoRA rank must be >= 1, e.g. 16 (got {self.lora_r})")
            if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
                raise ValueError(f"--lora_alpha: must be > 0, e.g. 2 x --lora_r (got {self.lora_alpha})")
            if not (math.isfinite(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
                raise ValueError(f"--lora_dropout: must be in [0, 1) (got {self.lora_dropout})")


@dataclass
class DataArguments:
    """Forget and retain corpora, and how they are cut into blocks."""

    forget_corpora: list[str] | None = field(
        default=None,
        metadata={
            "help": "Corpus specs: local .txt/.json/.jsonl/.parquet/.csv files or folders, or hub datasets "
            "'repo:config[:split]'; several after the flag, comma-separated, or the flag repeated (a path that "
            "exists is taken whole, commas included). None: the embedded demo corpora.",
            "action": "extend",
        },
    )
    retain_corpora: list[str] | None = field(
        default=None,
        metadata={
            "help": "Retain specs, given like --forget_corpora: one per forget spec (or one with "
            "--retain_broadcast); '' for none.",
            "action": "extend",
        },
    )
    retain_broadcast: bool = field(default=False, metadata={"help": "Reuse one retain corpus for every forget corpus."})
    text_column: str = field(default="text", metadata={"help": "Text column of structured files and hub datasets."})
    block_size: int = field(
        default=UNLEARN_BLOCK_SIZE,
        metadata={
            "help": "Tokens per block of forget and retain text (training, held-out evaluation and the audit).",
            "aliases": ["--max_length"],
        },
    )
    max_num_batches: int | None = field(default=None, metadata={"help": "Forget batches per epoch per process."})
    eval_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of forget and retain documents held out of training; the before/after table and "
            "--eval_strategy evaluate on them."
        },
    )
    audit_max_sequences: int | None = field(
        default=DEFAULT_AUDIT_MAX_SEQUENCES,
        metadata={
            "help": "The end-of-run audit measures at most this many held-out blocks of each corpus (a seeded "
            "sample); 0 or None: all of them."
        },
    )

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"block_size (--max_length): must be >= 2, got {self.block_size}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: must be in (0, 1), got {self.eval_fraction}")
        if self.audit_max_sequences is not None and self.audit_max_sequences < 0:
            raise ValueError(f"--audit_max_sequences: must be >= 0 (0: no cap), got {self.audit_max_sequences}")
        if self.max_num_batches is not None and self.max_num_batches < 1:
            raise ValueError(f"max_num_batches: must be >= 1, got {self.max_num_batches}")


def _vs_method(value: str) -> str:
    from transformers.hf_argparser import string_to_bool

    return "pmi" if string_to_bool(value) else "frequency"


#: Short flag names of ``etu-hf unlearn`` and ``etu-hf demo``: ``name: (destination, argparse settings)``.
#: (``--max_length`` is declared on :class:`DataArguments` itself.)
SHORT_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "--batch_size": ("per_device_train_batch_size", {"type": int, "metavar": "N"}),
    "--log_every": ("logging_steps", {"type": float, "metavar": "N"}),
    "--verbose": ("log_level", {"action": "store_const", "const": "info"}),
    "--deterministic": ("full_determinism", {"action": "store_const", "const": True}),
    "--use_pmi_vs": ("vs_method", {"nargs": "?", "const": "true", "type": _vs_method, "metavar": "BOOL"}),
}


def add_short_names(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add :data:`SHORT_NAMES` to ``parser``, a parser that has the flags they stand for.

    Each short name is an option of the same parser writing the same destination as its full flag
    (with no default of its own), so the usual argparse rule holds across both spellings: the one
    given last wins.
    """
    group = parser.add_argument_group("short flag names")
    for name, (dest, settings) in SHORT_NAMES.items():
        meaning = f"--{dest} {settings.get('metavar', settings.get('const'))}"
        if dest == "vs_method":
            meaning = "--vs_method pmi (false: frequency)"
        group.add_argument(name, dest=dest, default=argparse.SUPPRESS, help=f"= {meaning}", **settings)
    return parser


def check_method(method: str) -> str:
    """``method`` when it is one of :data:`UNLEARNING_METHOD_NAMES`, else a ``ValueError`` listing them."""
    if method not in UNLEARNING_METHOD_NAMES:
        raise ValueError(f"--method: unknown unlearning method {method!r}; known: {', '.join(UNLEARNING_METHOD_NAMES)}")
    return method


def unlearn_method(argv: Sequence[str]) -> str:
    """The ``--method`` of an ``etu-hf unlearn`` command line (default ``etu``), read first (as ``etu-hf
    refine`` reads its own) because it decides which training arguments the command takes."""
    front = argparse.ArgumentParser(add_help=False)
    front.add_argument("--method", default="etu")
    return check_method(front.parse_known_args(list(argv))[0].method)


def training_arguments_class(method: str) -> type:
    """The training-arguments dataclass of ``method``: :class:`~etu_hf.ETUTrainingArguments` for ``etu``,
    :class:`~etu_hf.BaselineTrainingArguments` (ETU's fields plus the baselines', no controller) otherwise."""
    if check_method(method) == "etu":
        from etu_hf.training.config import ETUTrainingArguments

        return ETUTrainingArguments
    from etu_hf.training.baselines import BaselineTrainingArguments

    return BaselineTrainingArguments


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the description's and epilog's line breaks (RawDescription) and shows each flag's
    default (ArgumentDefaults, what ``HfArgumentParser`` uses by itself)."""


def unlearn_parser(
    prog: str = "etu-hf unlearn", description: str | None = None, epilog: str | None = None, method: str = "etu"
) -> Any:
    """``HfArgumentParser`` over ``(ModelArguments, DataArguments, <the method's training arguments>)``
    (:func:`training_arguments_class`), with the short flag names of :func:`add_short_names`, and
    the defaults of :data:`UNLEARN_TRAINING_DEFAULTS` (``--per_device_train_batch_size``
    :data:`UNLEARN_BATCH_SIZE` instead of transformers' 8)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, training_arguments_class(method)),
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(**UNLEARN_TRAINING_DEFAULTS)
    for action in parser._actions:  # the adapter rate is set at parse time (parse_unlearn_args): say so
        if action.dest == "learning_rate":
            adapter_rate = f"With an adapter (--use_lora/--use_dora/--use_qlora): {ADAPTER_LEARNING_RATE:g}."
            action.help = f"{action.help} {adapter_rate}"
    return add_short_names(parser)


def parse_unlearn_args(argv: Sequence[str], parser: Any = None) -> tuple[ModelArguments, DataArguments, Any]:
    """Parse ``etu-hf unlearn`` flags (short names included) into ``(ModelArguments, DataArguments,
    training arguments)``: ``ETUTrainingArguments``, or ``BaselineTrainingArguments`` for a ``--method``
    other than ``etu`` (``parser``, when given, must be :func:`unlearn_parser` of the same method).

    With an adapter (``--use_lora``/``--use_dora``/``--use_qlora``) the learning rate defaults to
    :data:`ADAPTER_LEARNING_RATE`: the model flags are read first, with ``parse_known_args``, and the
    parser's default is set from them, so an explicit ``--learning_rate`` still wins.
    """
    from transformers import HfArgumentParser

    argv = list(argv)
    method = unlearn_method(argv)
    parser = parser or unlearn_parser(method=method)
    model_flags, _ = HfArgumentParser(ModelArguments, add_help=False).parse_known_args(argv)
    if model_flags.use_lora or model_flags.use_dora or model_flags.use_qlora:
        parser.set_defaults(learning_rate=ADAPTER_LEARNING_RATE)  # transformers' 5e-5 is a full fine-tuning rate
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.method != method:
        raise ValueError(f"--method: give it in full, once (read as {method!r} first, then as {model_args.method!r})")
    if type(training_args) is not training_arguments_class(method):
        raise ValueError(
            f"parser: built for another method than --method {method}; use unlearn_parser(method={method!r})"
        )
    return model_args, data_args, training_args
