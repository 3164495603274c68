"""``etu-hf refine``: a preference stage after ETU, on TRL's DPOTrainer or on :class:`NPOTrainer`.

It continues training the ETU adapter with DPO (TRL) or NPO/SimNPO, the reference being the *base*
model, and audits the result. Preference data (documented format, one row per forget document):

- DPO: ``prompt`` (the first ``prompt_words`` words of a forget document), ``rejected`` (the next
  words, up to ``max_completion_words``: what should be forgotten) and ``chosen`` (a refusal from
  ``refusals``, or the start of a paired retain document);
- NPO / SimNPO: ``prompt`` and ``completion`` (the forget continuation).

The reference trap: given an already wrapped ``PeftModel``, TRL's DPOTrainer copies its adapter
into a "ref" adapter, so the reference would be the ETU adapter. Here DPOTrainer gets the base model
plus the ETU adapter's ``LoraConfig`` (so TRL creates the "default" adapter and no "ref" copy) and
the ETU weights are then loaded into that adapter: the reference is the base model with adapters
disabled, and no second copy of the weights exists. :func:`check_reference_is_base` verifies it.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from etu_hf.artifacts.files import ARGS_FILE, FORBIDDEN_SET_FILE, METRICS_FILE, atomic_write, write_json
from etu_hf.artifacts.record import RunRecord
from etu_hf.artifacts.run_folder import RunFolder, check_output_dir, resolve_resume_checkpoint
from etu_hf.evaluation.audit import DEFAULT_AUDIT_MAX_SEQUENCES

logger = logging.getLogger(__name__)

DEFAULT_REFUSALS = ["I can't help with that.", "Sorry, I won't share that.", "I don't know."]


@dataclass
class RefineArguments:
    """What ``etu-hf refine`` refines and on which data (training flags come from DPOConfig/NPOConfig)."""

    adapter: str = field(metadata={"help": "An `etu-hf unlearn` output_dir (LoRA adapter + V_S.ids.json)."})
    method: str = field(
        default="dpo", metadata={"help": "'dpo' (TRL), 'npo' or 'simnpo'.", "choices": ["dpo", "npo", "simnpo"]}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model (default: the one recorded in the ETU run, else the demo model)."}
    )
    forget_corpora: list[str] | None = field(
        default=None, metadata={"help": "Forget corpus specs, as in `etu-hf unlearn` (required).", "action": "extend"}
    )
    retain_corpora: list[str] | None = field(
        default=None, metadata={"help": "Retain corpus specs (chosen texts, audit).", "action": "extend"}
    )
    chosen: str = field(
        default="refusal",
        metadata={"help": "DPO chosen completions: 'refusal' or 'retain'.", "choices": ["refusal", "retain"]},
    )
    refusals: list[str] = field(
        default_factory=lambda: list(DEFAULT_REFUSALS),
        metadata={"help": "Refusals used as chosen completions (cycled)."},
    )
    prompt_words: int = field(default=8, metadata={"help": "Leading words of a forget document used as prompt."})
    max_completion_words: int = field(default=48, metadata={"help": "Longest completion, in words."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Documents held out for the final audit."})
    text_column: str = field(default="text", metadata={"help": "Text column of structured files and hub datasets."})
    audit_block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per block in the final audit. Default: the ETU run's --block_size (args.json of "
            "--adapter), else 512."
        },
    )
    audit_max_sequences: int | None = field(
        default=DEFAULT_AUDIT_MAX_SEQUENCES,
        metadata={"help": "The final audit measures at most this many held-out blocks (a seeded sample); 0: all."},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing over a previous run."})

    def __post_init__(self) -> None:
        if not self.forget_corpora:
            raise ValueError("--forget_corpora: refine needs forget text to build preference pairs from")
        if self.audit_block_size is not None and self.audit_block_size < 2:
            raise ValueError(f"--audit_block_size: must be >= 2 (got {self.audit_block_size})")
        if self.prompt_words < 1 or self.max_completion_words < 1:
            raise ValueError("--prompt_words and --max_completion_words must be >= 1")
        if self.method == "dpo" and self.chosen == "refusal" and not any(r.strip() for r in self.refusals):
            raise ValueError("--refusals is empty: DPO needs chosen completions (give refusals or --chosen retain)")
        if self.method == "dpo" and self.chosen == "retain" and not self.retain_corpora:
            raise ValueError(
                "--chosen retain needs --retain_corpora: DPO needs a source of chosen completions "
                "(or use --chosen refusal)"
            )


def check_etu_output(folder: str) -> RunRecord:
    """Raise ``ValueError`` unless ``folder`` is an ETU output with a LoRA adapter; return its record."""
    needed = ("adapter_config.json", FORBIDDEN_SET_FILE, ARGS_FILE)
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ValueError(
            f"--adapter {folder!r} is not an etu-hf output with a PEFT adapter (missing {', '.join(missing)}). Give "
            "the output_dir of `etu-hf unlearn --use_lora ...`."
        )
    return RunRecord.read(folder)


def preference_rows(forget_docs: list[str], retain_docs: list[str], args: RefineArguments) -> list[dict[str, str]]:
    """Rows of the preference dataset (see the module docstring for the format)."""
    rows = []
    for i, doc in enumerate(forget_docs):
        words = doc.split()
        if len(words) <= args.prompt_words:
            continue
        prompt = " ".join(words[: args.prompt_words])
        rejected = " " + " ".join(words[args.prompt_words : args.prompt_words + args.max_completion_words])
        if args.method != "dpo":
            rows.append({"prompt": prompt, "completion": rejected})
            continue
        if args.chosen == "retain":
            chosen = " " + " ".join(retain_docs[i % len(retain_docs)].split()[: args.max_completion_words])
        else:
            refusals = [r for r in args.refusals if r.strip()]
            chosen = " " + refusals[i % len(refusals)].strip()
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not rows:
        raise ValueError(f"--forget_corpora: no document has more than --prompt_words={args.prompt_words} words")
    return rows


def build_dpo_trainer(base_model: Any, adapter: str, config: Any, dataset: Any, tokenizer: Any) -> Any:
    """TRL DPOTrainer that continues the ETU adapter with the base model as reference (no copy)."""
    from peft import PeftConfig, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from trl import DPOTrainer

    peft_config = PeftConfig.from_pretrained(adapter)
    peft_config.inference_mode = False
    from etu_hf.modeling.head import output_head_name

    head_name = output_head_name(base_model)
    targets = peft_config.target_modules or []
    if head_name in ({targets} if isinstance(targets, str) else set(targets)):
        raise ValueError(
            f"--method dpo: the adapter {adapter!r} adapts the output head ({head_name}), and TRL's DPOTrainer "
            f"computes log-probabilities from {head_name}.weight directly, so it cannot train or apply that part. "
            "Use --method npo or --method simnpo (etu-hf's trainer, which supports it), or unlearn with "
            "--lora_target_modules all-linear for a DPO stage (the ETU fit is then weaker: docs/method.md)."
        )
    trainer = DPOTrainer(
        model=base_model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    result = set_peft_model_state_dict(trainer.model, load_peft_weights(adapter))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise ValueError(f"--adapter {adapter!r} does not fit the base model: unexpected weights {unexpected[:3]}")
    check_reference_is_base(trainer)
    return trainer


def check_reference_is_base(trainer: Any) -> None:
    """Fail loudly if TRL would use an adapter copy ("ref") instead of the base model as reference."""
    peft_config = getattr(trainer.model, "peft_config", {})
    if trainer.ref_model is not None or "ref" in peft_config:
        raise RuntimeError(
            "TRL's DPOTrainer set up a reference other than the base model (a 'ref' adapter or a ref_model); "
            "etu-hf refine needs the base model as reference. Please report this with your trl version."
        )


def run_refine(args: RefineArguments, config: Any) -> Any:
    """Run the refinement and the final audit; returns the :class:`~etu_hf.AuditReport`."""
    import datasets

    from etu_hf.commands.loader import load_model, load_tokenizer
    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.data.corpus import load_documents, split_documents
    from etu_hf.demo import DEMO_MODEL_DIR
    from etu_hf.evaluation.audit import audit
    from etu_hf.modeling.checks import check_weight_files

    if getattr(config, "beta", 1.0) <= 0:
        raise ValueError(f"--beta: must be > 0 (got {config.beta})")
    run = check_etu_output(args.adapter)
    block = run.audit_block_size(args.audit_block_size)  # as the run's own audit cut it
    existed = os.path.isdir(config.output_dir)  # the Trainer creates it; a failed run removes it again
    inputs = {"--adapter": args.adapter, "--model_name_or_path": args.model_name_or_path}
    check_output_dir(
        config.output_dir, args.overwrite_output_dir, getattr(config, "resume_from_checkpoint", None), inputs
    )
    check_weight_files(args.adapter, "--adapter")
    resume = resolve_resume_checkpoint(getattr(config, "resume_from_checkpoint", None), config.output_dir)
    base_path = args.model_name_or_path or run.args.get("model_name_or_path") or DEMO_MODEL_DIR
    tokenizer = load_tokenizer(args.adapter)
    forget_train, forget_held = split_documents(
        load_documents(args.forget_corpora, args.text_column, "--forget_corpora"), args.eval_fraction, config.seed
    )
    retain_train = retain_held = []
    if args.retain_corpora:
        retain_train, retain_held = split_documents(
            load_documents(args.retain_corpora, args.text_column, "--retain_corpora"), args.eval_fraction, config.seed
        )

    dataset = datasets.Dataset.from_list(preference_rows(forget_train, retain_train, args))
    logger.info(
        "refine (%s): %d preference rows from %d forget documents", args.method, len(dataset), len(forget_train)
    )
    base_model = load_model(base_path, max_length=block, length_flag="--audit_block_size")
    if args.method == "dpo":
        trainer = build_dpo_trainer(base_model, args.adapter, config, dataset, tokenizer)
    else:
        from peft import PeftModel

        from etu_hf.training.npo import NPOTrainer

        model = PeftModel.from_pretrained(base_model, args.adapter, is_trainable=True)
        trainer = NPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    # Everything below writes to output_dir: a failure leaves it as it was found (see RunFolder).
    with RunFolder(
        config.output_dir,
        overwrite=args.overwrite_output_dir,
        resume=resume is not None,
        main_process=trainer.is_world_process_zero(),
        existed=existed,
    ):
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(config.output_dir)
        if trainer.is_world_process_zero():
            with open(run.forbidden_path, encoding="utf-8") as f:
                vs_text = f.read()
            atomic_write(os.path.join(config.output_dir, FORBIDDEN_SET_FILE), lambda f: f.write(vs_text))
            write_json(
                os.path.join(config.output_dir, ARGS_FILE),
                {**run.args, "refine": asdict(args), "refine_config": config.to_dict()},
            )
        # The refined adapter is audited against the tilt the ETU run ended with (its offset included).
        tilt = run.tilt
        report = audit(
            trainer.model,
            tokenize_and_block(forget_held, tokenizer, block),
            run.forbidden_path,
            tilt,
            retain_data=tokenize_and_block(retain_held, tokenizer, block) if retain_held else None,
            tokenizer=tokenizer,
            output_dir=config.output_dir if trainer.is_world_process_zero() else None,
            overwrite=True,
            progress=not config.disable_tqdm,
            max_sequences=args.audit_max_sequences or None,
            sources={"base": base_path, "adapter": args.adapter, "kind": f"etu adapter refined with {args.method}"},
        )
        if trainer.is_world_process_zero():
            write_json(
                os.path.join(config.output_dir, METRICS_FILE),
                {
                    "format": "etu-hf/metrics",
                    "version": 1,
                    "refine_method": args.method,
                    "epsilon": tilt.epsilon,
                    "lambda": run.lambda_record,
                    "steps": trainer.state.global_step,
                    "train_loss": result.training_loss,
                    "preference_rows": len(dataset),
                    "etu_run": run.metrics,
                    "heldout": {
                        "base_p_S": report.base_p_S,
                        "updated_p_S": report.updated_p_S,
                        "perplexity_ratio": report.perplexity_ratio,
                        "target_achieved": report.target_achieved,
                        "target_achieved_upper": report.target_achieved_upper,
                        "verdict": report.verdict,
                    },
                },
            )
    return report


def refine_parser(method: str) -> Any:
    """``HfArgumentParser`` over ``(RefineArguments, <the method's config>)``: TRL's DPO config for
    ``dpo``, :class:`~etu_hf.NPOConfig` (``loss_type`` defaulting to ``simnpo`` for ``simnpo``) otherwise."""
    from transformers import HfArgumentParser

    from etu_hf.training.npo import NPOConfig

    if method == "dpo":
        from etu_hf.training.dpo import RefineDPOConfig as Config
    else:
        Config = NPOConfig
    parser = HfArgumentParser((RefineArguments, Config), prog="etu-hf refine")
    if method == "simnpo":
        parser.set_defaults(loss_type="simnpo")
    return parser


def cmd(argv: Sequence[str]) -> int:
    """``etu-hf refine``: DPO (TRL's DPOTrainer) or NPO/SimNPO after ETU, then an audit."""
    from etu_hf.commands.cli import setup_logging

    # --method decides which config's flags the command takes, so it is read first.
    front = argparse.ArgumentParser(add_help=False)
    front.add_argument("--method", default="dpo")
    method = front.parse_known_args(list(argv))[0].method
    args, config = refine_parser(method).parse_args_into_dataclasses(args=list(argv))
    setup_logging(config.should_log)
    report = run_refine(args, config)
    if config.should_log:
        print()
        print(report.summary())
        print(f"\nartifacts: {os.path.abspath(config.output_dir)}")
    return 0
