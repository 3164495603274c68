"""The unlearning pipeline behind ``etu-hf unlearn`` and ``etu-hf demo``.

Load model and tokenizer -> load corpora, hold out documents -> token blocks -> ETUTrainer ->
before/after measurements on held-out text -> artifacts. Everything goes through the same public
API a user calls from Python (:class:`~etu_hf.ETUTrainer`, :func:`~etu_hf.evaluate_mass`, ...).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from etu_hf.artifacts import METRICS_FILE, write_json
from etu_hf.auditing.core import DEFAULT_AUDIT_MAX_SEQUENCES
from etu_hf.auditing.report import REPORT_FILE
from etu_hf.config import ETUTrainingArguments
from etu_hf.data import CorpusSpec, load_corpus, parse_corpus_specs, split_documents, tokenize_and_block
from etu_hf.run_folder import RunFolder, check_output_dir, resolve_resume_checkpoint

logger = logging.getLogger(__name__)

#: ``etu-hf unlearn``'s learning rate when an adapter is trained and --learning_rate is not given
#: (transformers' default, 5e-5, is a full fine-tuning rate; LoRA needs a larger one).
ADAPTER_LEARNING_RATE = 1e-3

DEMO_MODEL_DIR = os.path.join(os.path.dirname(__file__), "demo", "assets", "tiny-llama")


@dataclass
class ModelArguments:
    """Which model to unlearn and how to adapt it."""

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
    lora_r: int = field(default=256, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=512, metadata={"help": "LoRA scaling alpha."})
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
    block_size: int = field(default=512, metadata={"help": "Tokens per training block (alias --max_length)."})
    max_num_batches: int | None = field(
        default=None, metadata={"help": "Cap on forget batches per epoch (per process); None: all."}
    )
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


@dataclass
class UnlearnResult:
    """What a pipeline run produced: the trainer, the measurements and where the artifacts are."""

    output_dir: str
    metrics: dict[str, Any]
    trainer: Any = field(repr=False, default=None)
    report: Any = None


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

    Before any weight is read, :func:`etu_hf.loading.load_causal_lm` checks that the checkpoint is a
    causal LM, that ``max_length`` (``--block_size``) fits its positions, and that its weights files
    are whole and match its config. With ``use_qlora`` the weights load in 4-bit nf4 and go through
    PEFT's ``prepare_model_for_kbit_training``; bitsandbytes' CPU repacking is disabled on every
    4-bit layer.
    """
    import torch

    from etu_hf.loading import load_causal_lm

    path = model_args.model_name_or_path or DEMO_MODEL_DIR
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_args.trust_remote_code}
    if model_args.use_qlora:
        from etu_hf.quantization import four_bit_config

        kwargs["quantization_config"] = four_bit_config(flag="--use_qlora")
        kwargs["device_map"] = {"": _local_device()}
    model = load_causal_lm(
        path, "--model_name_or_path", max_length=max_length, length_flag="--block_size (--max_length)", **kwargs
    )
    if model_args.use_qlora:
        from peft import prepare_model_for_kbit_training

        from etu_hf.quantization import prepare_4bit_model

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


def load_documents(value: str | None, text_column: str, flag: str) -> list[str]:
    """All documents of a comma-separated list of corpus specs (see :func:`etu_hf.data.parse_corpus_specs`)."""
    return [doc for docs in _load_docs(parse_corpus_specs(value, flag), text_column, flag) for doc in docs]


def _load_docs(specs: list[CorpusSpec], text_column: str, flag: str) -> list[list[str]]:
    out = []
    for spec in specs:
        docs = load_corpus(spec, text_column, flag)
        logger.info("%s: %s -> %d documents", flag, spec.describe(), len(docs))
        out.append(docs)
    return out


#: Warn when at least this share of the forget documents also appears in the retain corpus.
OVERLAP_WARN_SHARE = 0.5


def warn_if_corpora_overlap(forget_docs: list[str], retain_docs: list[str]) -> float:
    """Share of the forget documents that are also retain documents; warns from :data:`OVERLAP_WARN_SHARE`.

    Identical corpora give V_S nothing to separate (PMI scores near 0: V_S becomes a few stray pieces)
    and the retain term trains back what the forget term removes.
    """
    if not forget_docs or not retain_docs:
        return 0.0
    retain = set(retain_docs)
    share = sum(doc in retain for doc in forget_docs) / len(forget_docs)
    if share >= OVERLAP_WARN_SHARE:
        msg = (
            f"{share:.0%} of the forget documents are also in the retain corpus (are --forget_corpora and "
            "--retain_corpora the same?): V_S cannot separate the topic and the retain term trains back what is "
            "forgotten. Give retain text that is not about the forget topic."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        logger.warning(msg)
    return share


def prepare_corpora(data_args: DataArguments, tokenizer: Any, seed: int) -> dict[str, Any]:
    """Load, split and block the corpora. Returns datasets ``forget_train``, ``forget_eval``,
    ``retain_train`` and ``retain_eval`` (the retain ones may be ``None``)."""
    import datasets

    forget_specs = parse_corpus_specs(data_args.forget_corpora, "--forget_corpora")
    if not forget_specs:
        raise ValueError("--forget_corpora: no corpus given; name at least one file, folder or hub dataset")
    retain_specs = parse_corpus_specs(data_args.retain_corpora, "--retain_corpora")
    if retain_specs and len(retain_specs) != len(forget_specs) and not data_args.retain_broadcast:
        raise ValueError(
            f"--retain_corpora gives {len(retain_specs)} corpora for {len(forget_specs)} forget corpora: give one "
            "retain corpus per forget corpus, or one retain corpus with --retain_broadcast."
        )
    if data_args.retain_broadcast and len(retain_specs) > 1:
        raise ValueError("--retain_broadcast reuses ONE retain corpus; --retain_corpora names several")

    forget_docs = _load_docs(forget_specs, data_args.text_column, "--forget_corpora")
    if sum(len(d) for d in forget_docs) == 0:
        raise ValueError(f"--forget_corpora: {data_args.forget_corpora!r} holds no text: nothing to forget")
    retain_docs = _load_docs(retain_specs, data_args.text_column, "--retain_corpora")
    warn_if_corpora_overlap([d for docs in forget_docs for d in docs], [d for docs in retain_docs for d in docs])

    paired = len(retain_specs) > 1  # corpus-aligned pairing (forget k with retain k)

    def blocks(groups: list[list[str]], flag: str) -> tuple[Any, Any]:
        train_parts, eval_parts = [], []
        for k, docs in enumerate(groups):
            if len(docs) < 2:
                raise ValueError(
                    f"{flag}: corpus {k + 1} has {len(docs)} document(s); need at least 2 "
                    "(one to train on and one held out)"
                )
            train, held = split_documents(docs, data_args.eval_fraction, seed)
            cid = k if paired else None
            train_parts.append(tokenize_and_block(train, tokenizer, data_args.block_size, corpus_id=cid))
            eval_parts.append(tokenize_and_block(held, tokenizer, data_args.block_size, corpus_id=cid))
        return datasets.concatenate_datasets(train_parts), datasets.concatenate_datasets(eval_parts)

    forget_train, forget_eval = blocks(forget_docs, "--forget_corpora")
    retain_train = retain_eval = None
    if retain_docs:
        retain_train, retain_eval = blocks(retain_docs, "--retain_corpora")
    return {
        "forget_train": forget_train,
        "forget_eval": forget_eval,
        "retain_train": retain_train,
        "retain_eval": retain_eval,
    }


def trainable_setup(model: Any, model_args: ModelArguments) -> Any:
    """The ``peft_config`` to train (LoRA/DoRA/QLoRA), or ``None`` after restricting the model's own
    trainable parameters to ``--layer_ids``/``--name_keywords``/``--param_ids`` when given."""
    from etu_hf.adapters import lora_config, parse_ids, select_trainable

    layer_ids = parse_ids(model_args.layer_ids, "--layer_ids")
    if model_args.adapter:
        return lora_config(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            use_dora=model_args.use_dora,
            layer_ids=layer_ids,
        )
    keywords = (
        [k.strip() for k in model_args.name_keywords.split(",") if k.strip()] if model_args.name_keywords else None
    )
    if layer_ids is not None or keywords or model_args.param_ids:
        select_trainable(model, layer_ids, keywords, parse_ids(model_args.param_ids, "--param_ids"))
    return None


def run_unlearning(
    model_args: ModelArguments, data_args: DataArguments, training_args: ETUTrainingArguments
) -> UnlearnResult:
    """Run ETU end to end and write the artifacts to ``training_args.output_dir``."""
    from transformers import default_data_collator

    from etu_hf.trainer import ETUTrainer, split_heldout

    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, training_args.resume_from_checkpoint)
    # Before the model loads: an incomplete or missing checkpoint fails now (ETUTrainer.train resolves it again).
    resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    # The corpora before the weights: a bad corpus fails in seconds, not after loading a large model.
    tokenizer = load_tokenizer(model_args)
    data = prepare_corpora(data_args, tokenizer, training_args.seed)
    _init_deepspeed_for_zero3(training_args)
    model = load_model(model_args, training_args.gradient_checkpointing, data_args.block_size)
    peft_config = trainable_setup(model, model_args)
    forget_train = data["forget_train"]
    heldout = None
    if training_args.adaptive_lambda:  # the controller's slice comes out of the forget data before any cap
        forget_train, heldout = split_heldout(forget_train, training_args)
    if data_args.max_num_batches is not None:
        n = data_args.max_num_batches * training_args.per_device_train_batch_size * max(1, training_args.world_size)
        if n < len(forget_train):
            forget_train = forget_train.shuffle(seed=training_args.seed).select(range(n))
    logger.info(
        "forget: %d training blocks, %d held-out blocks; retain: %s training blocks",
        len(forget_train),
        len(data["forget_eval"]),
        len(data["retain_train"]) if data["retain_train"] is not None else 0,
    )

    trainer = ETUTrainer(
        model=model,
        args=training_args,
        train_dataset=forget_train,
        eval_dataset=data["forget_eval"],
        retain_dataset=data["retain_train"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        peft_config=peft_config,
        heldout_dataset=heldout,
    )
    trainer.extra_run_arguments = {**asdict(model_args), **asdict(data_args)}
    fs = trainer.forbidden_set
    logger.info("V_S: %d tokens (%.2f%% of the vocabulary), method %s", len(fs), 100 * (fs.fraction or 0), fs.method)

    # Everything below writes to output_dir: a failure leaves it as it was found (see RunFolder).
    with RunFolder(
        training_args.output_dir,
        overwrite=training_args.overwrite_output_dir,
        resume=bool(training_args.resume_from_checkpoint),
        main_process=trainer.is_world_process_zero(),
    ):
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        # The audit of the result, on held-out documents the training (and the controller) never saw.
        report = trainer.audit(
            forget_data=data["forget_eval"],
            retain_data=data["retain_eval"],
            output_dir=training_args.output_dir,
            overwrite=True,  # the run owns output_dir: the previous-run check passed before training
            max_sequences=data_args.audit_max_sequences or None,
            sources={
                "model": model_args.model_name_or_path or "etu-hf demo model",
                "forget_corpora": data_args.forget_corpora,
                "retain_corpora": data_args.retain_corpora,
                "heldout": f"{data_args.eval_fraction:.0%} of the documents, held out of training",
            },
        )
        audit_summary = {
            "definition": "see suppression_report.json: held-out forget documents (never trained on) and held-out "
            "retain documents",
            "report": REPORT_FILE,
            "epsilon": report.epsilon,
            "base_p_S": report.base_p_S,
            "updated_p_S": report.updated_p_S,
            "updated_p_S_upper": report.updated_p_S_upper,
            "updated_p_S_token_wilson_upper": report.updated_p_S_token_wilson_upper,
            "suppression_ratio": report.suppression_ratio,
            "share_above_epsilon_before": report.share_above_epsilon_base,
            "share_above_epsilon_after": report.share_above_epsilon_updated,
            "positions": report.forget_positions,
            "sequences": report.forget_sequences,
            "delta": report.delta,
            "base_perplexity": report.base_perplexity,
            "updated_perplexity": report.updated_perplexity,
            "perplexity_ratio": report.perplexity_ratio,
            "target_achieved": report.target_achieved,
            "target_achieved_upper": report.target_achieved_upper,
        }
        counts = {
            "forget_train_blocks": len(forget_train),
            "controller_heldout_blocks": len(heldout) if heldout is not None else 0,
            "forget_heldout_blocks": len(data["forget_eval"]),
            "retain_train_blocks": len(data["retain_train"]) if data["retain_train"] is not None else 0,
            "retain_heldout_blocks": len(data["retain_eval"]) if data["retain_eval"] is not None else 0,
            "block_size": data_args.block_size,
        }
        metrics = {**getattr(trainer, "training_metrics", {}), "data": counts, "heldout": audit_summary}
        if trainer.is_world_process_zero():
            write_json(os.path.join(training_args.output_dir, METRICS_FILE), metrics)
    return UnlearnResult(output_dir=training_args.output_dir, metrics=metrics, trainer=trainer, report=report)
