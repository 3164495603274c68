"""The unlearning pipeline behind ``etu-hf unlearn`` and ``etu-hf demo``.

Load model and tokenizer -> load corpora, hold out documents -> token blocks -> ETUTrainer ->
before/after measurements on held-out text -> artifacts. Everything goes through the same public
API a user calls from Python (:class:`~etu_hf.ETUTrainer`, :func:`~etu_hf.evaluate_mass`, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from etu_hf.artifacts import METRICS_FILE, check_output_dir, write_json
from etu_hf.config import ETUTrainingArguments
from etu_hf.data import CorpusSpec, load_corpus, parse_corpus_specs, split_documents, tokenize_and_block
from etu_hf.evaluation import adapters_disabled, evaluate_mass, evaluate_perplexity

logger = logging.getLogger(__name__)

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
        default="all-linear", metadata={"help": "Comma-separated module names, or 'all-linear'."}
    )


@dataclass
class DataArguments:
    """Forget and retain corpora, and how they are cut into blocks."""

    forget_corpora: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated corpus specs: local .txt/.json/.jsonl/.parquet/.csv files or folders, "
            "or hub datasets 'repo:config[:split]'. None: the embedded demo corpora."
        },
    )
    retain_corpora: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated retain specs, one per forget spec (or one with --retain_broadcast); '' for none."
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

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"block_size (--max_length): must be >= 2, got {self.block_size}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: must be in (0, 1), got {self.eval_fraction}")
        if self.max_num_batches is not None and self.max_num_batches < 1:
            raise ValueError(f"max_num_batches: must be >= 1, got {self.max_num_batches}")


@dataclass
class UnlearnResult:
    """What a pipeline run produced: the trainer, the measurements and where the artifacts are."""

    output_dir: str
    metrics: dict[str, Any]
    trainer: Any = field(repr=False, default=None)


def load_model_and_tokenizer(model_args: ModelArguments):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from ``model_name_or_path`` (the demo model by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_args.model_name_or_path or DEMO_MODEL_DIR
    tok_path = model_args.tokenizer_name_or_path or path
    tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=model_args.trust_remote_code)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise TypeError(
                f"--model_name_or_path {path!r} is not a causal language model (AutoModelForCausalLM cannot load it)."
            ) from err
        raise
    return model, tokenizer


def _load_docs(specs: list[CorpusSpec], text_column: str, flag: str) -> list[list[str]]:
    out = []
    for spec in specs:
        docs = load_corpus(spec, text_column, flag)
        logger.info("%s: %s -> %d documents", flag, spec.describe(), len(docs))
        out.append(docs)
    return out


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


def _lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    targets: str | list[str] = model_args.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def measure(
    model: Any,
    data: dict[str, Any],
    forbidden_ids: list[int],
    epsilon: float,
    batch_size: int,
    chunk_size: int,
    base: bool,
) -> dict[str, Any]:
    """Held-out forget mass on V_S and retain perplexity (of the base distribution when ``base``)."""
    from etu_hf.data import iter_batches

    chunk = chunk_size or 1024
    with adapters_disabled(model) if base else contextlib.nullcontext():
        mass = evaluate_mass(
            model,
            iter_batches(data["forget_eval"], None, batch_size),
            forbidden_ids,
            chunk_size=chunk,
            keep_positions=True,
        )
        ppl = (
            evaluate_perplexity(model, iter_batches(data["retain_eval"], None, batch_size), chunk_size=chunk)
            if data["retain_eval"] is not None
            else None
        )
    return {
        "p_S": mass.mean,
        "positions": mass.n_positions,
        "sequences": mass.n_sequences,
        "share_above_epsilon": mass.share_above(epsilon),
        "retain_perplexity": ppl.perplexity if ppl else None,
    }


def run_unlearning(
    model_args: ModelArguments, data_args: DataArguments, training_args: ETUTrainingArguments
) -> UnlearnResult:
    """Run ETU end to end and write the artifacts to ``training_args.output_dir``."""
    from transformers import default_data_collator

    from etu_hf.trainer import ETUTrainer, split_heldout

    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, training_args.resume_from_checkpoint)
    model, tokenizer = load_model_and_tokenizer(model_args)
    data = prepare_corpora(data_args, tokenizer, training_args.seed)
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
        peft_config=_lora_config(model_args) if model_args.use_lora else None,
        heldout_dataset=heldout,
    )
    trainer.extra_run_arguments = {**asdict(model_args), **asdict(data_args)}
    fs = trainer.forbidden_set
    logger.info("V_S: %d tokens (%.2f%% of the vocabulary), method %s", len(fs), 100 * (fs.fraction or 0), fs.method)

    eps = training_args.epsilon
    bs, chunk = training_args.per_device_eval_batch_size, training_args.loss_chunk_size
    base_model = trainer.model if trainer.base.shares_weights else trainer.base.model
    before = measure(base_model, data, fs.ids, eps, bs, chunk, base=trainer.base.shares_weights)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    after = measure(trainer.model, data, fs.ids, eps, bs, chunk, base=False)
    ratio = (
        after["retain_perplexity"] / before["retain_perplexity"]
        if after["retain_perplexity"] and before["retain_perplexity"]
        else None
    )
    heldout = {
        "definition": "mean mass on V_S over scored positions of held-out forget documents (never trained on); "
        "perplexity = exp(mean NLL) on held-out retain documents",
        "epsilon": eps,
        "base_p_S": before["p_S"],
        "updated_p_S": after["p_S"],
        "suppression_ratio": after["p_S"] / before["p_S"] if before["p_S"] else None,
        "share_above_epsilon_before": before["share_above_epsilon"],
        "share_above_epsilon_after": after["share_above_epsilon"],
        "positions": after["positions"],
        "sequences": after["sequences"],
        "base_perplexity": before["retain_perplexity"],
        "updated_perplexity": after["retain_perplexity"],
        "perplexity_ratio": ratio,
        "target_achieved": after["p_S"] <= eps,
    }
    counts = {
        "forget_train_blocks": len(forget_train),
        "controller_heldout_blocks": len(heldout) if heldout is not None else 0,
        "forget_heldout_blocks": len(data["forget_eval"]),
        "retain_train_blocks": len(data["retain_train"]) if data["retain_train"] is not None else 0,
        "retain_heldout_blocks": len(data["retain_eval"]) if data["retain_eval"] is not None else 0,
        "block_size": data_args.block_size,
    }
    metrics = {**getattr(trainer, "training_metrics", {}), "data": counts, "heldout": heldout}
    if trainer.is_world_process_zero():
        write_json(os.path.join(training_args.output_dir, METRICS_FILE), metrics)
    return UnlearnResult(output_dir=training_args.output_dir, metrics=metrics, trainer=trainer)


def format_table(metrics: dict[str, Any]) -> str:
    """The before/after table printed at the end of a run."""
    h = metrics["heldout"]

    def f(x: Any, spec: str = ".4f") -> str:
        return "n/a" if x is None else format(x, spec)

    rows = [
        ("held-out forget mass on V_S", f(h["base_p_S"]), f(h["updated_p_S"]), f"<= {h['epsilon']}"),
        (
            "  positions above epsilon",
            f(h["share_above_epsilon_before"], ".1%"),
            f(h["share_above_epsilon_after"], ".1%"),
            "",
        ),
        (
            "held-out retain perplexity",
            f(h["base_perplexity"], ".3f"),
            f(h["updated_perplexity"], ".3f"),
            f"ratio {f(h['perplexity_ratio'], '.3f')}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'base':>10}  {'unlearned':>10}  target", "-" * (width + 36)]
    lines += [f"{a:{width}}  {b:>10}  {c:>10}  {d}" for a, b, c, d in rows]
    verdict = "reached" if h["target_achieved"] else "NOT reached"
    lines.append(
        f"target pi_theta(S) <= {h['epsilon']}: {verdict} "
        f"({h['positions']} positions in {h['sequences']} held-out sequences)"
    )
    return "\n".join(lines)


def load_metrics(output_dir: str) -> dict[str, Any]:
    with open(os.path.join(output_dir, METRICS_FILE), encoding="utf-8") as f:
        return json.load(f)
