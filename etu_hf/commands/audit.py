"""``etu-hf audit``: the suppression report of a base model plus an unlearned adapter (or a merged model).

Unset tilt settings come from the run that produced ``--adapter`` (:class:`~etu_hf.artifacts.record.RunRecord`);
the models come from the command line's one loader (:mod:`etu_hf.commands.loader`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from etu_hf.artifacts.record import DEFAULT_AUDIT_BLOCK_SIZE, RunRecord
from etu_hf.evaluation.audit import DEFAULT_AUDIT_MAX_SEQUENCES
from etu_hf.ops.tilt import DEFAULT_LAMBDA_MAX, TiltSpec, check_lambda_floor


@dataclass
class AuditArguments:
    """Flags of ``etu-hf audit``. Unset tilt settings and epsilon are read from the ETU run in
    ``--adapter`` (its args.json and metrics.json) when there is one."""

    output_dir: str = field(metadata={"help": "Where suppression_report.json/.md and the plots go."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The BASE model (before unlearning). Default: the embedded demo model."}
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "The unlearned model: a PEFT adapter folder (an `etu-hf unlearn` output_dir) loaded on top "
            "of the base, or a folder with a full (merged) model. None: audit the base model itself."
        },
    )
    forget_corpora: list[str] | None = field(
        default=None,
        metadata={"help": "Held-out forget text (corpus specs as in `etu-hf unlearn`). Required.", "action": "extend"},
    )
    retain_corpora: list[str] | None = field(
        default=None, metadata={"help": "Held-out retain text for perplexity.", "action": "extend"}
    )
    forbidden: str | None = field(default=None, metadata={"help": "V_S.ids.json (default: the one in --adapter)."})
    epsilon: float | None = field(default=None, metadata={"help": "Target mass (default: the run's, else 0.05)."})
    lambda_mode: str | None = field(
        default=None,
        metadata={
            "help": "Tilt for delta: per_position or global (default: the run's).",
            "choices": ["per_position", "global", None],
        },
    )
    lambda_max: float | None = field(default=None, metadata={"help": f"Default: the run's, else {DEFAULT_LAMBDA_MAX}."})
    allow_negative_lambda: bool | None = field(default=None, metadata={"help": "Default: the run's, else false."})
    lambda_floor: float | None = field(default=None, metadata={"help": "Floor of lambda. Default: the run's, else 0."})
    block_size: int | None = field(
        default=None,
        metadata={
            "help": f"Tokens per block of held-out text. Default: the run's --block_size (args.json of --adapter), "
            f"else {DEFAULT_AUDIT_BLOCK_SIZE}.",
            "aliases": ["--max_length"],
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_sequences: int | None = field(
        default=DEFAULT_AUDIT_MAX_SEQUENCES,
        metadata={
            "help": "Audit at most this many held-out blocks of each corpus (a seeded sample; long documents are "
            "cut into --block_size blocks first); 0: all."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Text column of structured files and hub datasets."})
    chunk_size: int = field(default=1024, metadata={"help": "Positions per chunk of the output head."})
    wilson_max_n: int = field(default=2048, metadata={"help": "Cap on n in the Wilson bounds."})
    bootstrap_samples: int = field(default=1000, metadata={"help": "Resamples of sequences for the bootstrap."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})
    num_samples: int = field(default=3, metadata={"help": "Greedy continuations shown as illustration (0: none)."})
    max_new_tokens: int = field(default=24, metadata={"help": "Length of those continuations."})
    analyze_activations: bool = field(
        default=False, metadata={"help": "Per-layer hidden-state statistics vs the base model (and a plot)."}
    )
    dtype: str = field(default="auto", metadata={"choices": ["auto", "float32", "bfloat16", "float16"]})
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base in 4-bit nf4 (bitsandbytes), as for a QLoRA adapter."}
    )
    trust_remote_code: bool = field(default=False)
    device: str | None = field(default=None, metadata={"help": "Default: cuda if available, else cpu."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing report."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})

    def __post_init__(self) -> None:
        if self.epsilon is not None and not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon: must be strictly between 0 and 1 (got {self.epsilon})")
        if self.lambda_max is not None and self.lambda_max <= 0:
            raise ValueError(f"lambda_max: must be > 0 (got {self.lambda_max})")
        if self.lambda_floor is not None:
            check_lambda_floor(self.lambda_floor, bool(self.allow_negative_lambda))
        if not self.forget_corpora:
            raise ValueError("--forget_corpora: the audit needs held-out forget text (files or hub specs)")
        if self.batch_size < 1 or (self.block_size is not None and self.block_size < 2):
            raise ValueError("--batch_size must be >= 1 and --block_size >= 2")
        if self.max_sequences is not None and self.max_sequences < 0:
            raise ValueError(f"--max_sequences: must be >= 0 (0: no cap), got {self.max_sequences}")


def run_of(args: AuditArguments) -> RunRecord:
    """The run whose settings the audit uses: ``--adapter`` when it is an ETU run folder, else the
    folder of ``--forbidden`` when that is one (a merged model audited with its run's V_S.ids.json gets
    that run's epsilon and tilt, offset included); an empty record otherwise."""
    record = RunRecord.read(args.adapter) if args.adapter else RunRecord(folder="")
    if not record and args.forbidden:
        record = RunRecord.read(os.path.dirname(os.path.abspath(args.forbidden)))
    return record


def resolve_tilt(args: AuditArguments, run: RunRecord) -> TiltSpec:
    """The tilt to audit against: the run's (:attr:`RunRecord.tilt`, defaults when there is no run),
    with the flags given on the command line in place of its settings."""
    flags = {
        "epsilon": args.epsilon,
        "mode": args.lambda_mode,
        "lambda_max": args.lambda_max,
        "allow_negative": args.allow_negative_lambda,
        "lambda_floor": args.lambda_floor,
    }
    return dataclasses.replace(run.tilt, **{k: v for k, v in flags.items() if v is not None})


def resolve_block_size(args: AuditArguments, run: RunRecord) -> int:
    """``--block_size`` when given, else the run's (:meth:`RunRecord.audit_block_size`), so that this audit
    cuts the held-out text as the run's own audit did."""
    return run.audit_block_size(args.block_size)


def resolve_forbidden(args: AuditArguments) -> str:
    """``--forbidden``, else the V_S.ids.json in ``--adapter``; ``ValueError`` naming the flag otherwise."""
    forbidden = args.forbidden or (RunRecord.read(args.adapter).forbidden_path if args.adapter else None)
    if forbidden is None:
        raise ValueError("--forbidden: no V_S given and --adapter holds no V_S.ids.json; pass --forbidden V_S.ids.json")
    return forbidden


def load_models(args: AuditArguments) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Load ``(model, base, tokenizer, sources)``: the unlearned model, the base model to compare
    with (``None`` for a PEFT adapter, whose base is the same model with adapters disabled), the
    tokenizer (the adapter folder's when it has one) and a description of what was loaded."""
    from etu_hf.commands.loader import load_model, load_tokenizer, local_device
    from etu_hf.demo import DEMO_MODEL_DIR
    from etu_hf.modeling.checks import check_weight_files

    base_path = args.model_name_or_path or DEMO_MODEL_DIR
    device = args.device or local_device()
    settings = dict(dtype=args.dtype, trust_remote_code=args.trust_remote_code, load_in_4bit=args.load_in_4bit)
    adapter = args.adapter
    tok_dir = adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base_path
    tokenizer = load_tokenizer(tok_dir, args.trust_remote_code)
    base_model = load_model(base_path, device=device, max_length=args.block_size, **settings)
    sources = {"base": base_path, "adapter": adapter, "load_in_4bit": args.load_in_4bit}
    if adapter is None:
        return base_model, base_model, tokenizer, {**sources, "kind": "base model audited against itself"}
    if os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        from peft import PeftModel

        check_weight_files(adapter, "--adapter")
        try:
            model = PeftModel.from_pretrained(base_model, adapter)
        except (ValueError, RuntimeError, KeyError) as err:
            raise ValueError(
                f"--adapter {adapter!r} does not match --model_name_or_path {base_path!r}: {err}. Give the base model "
                "the adapter was trained on."
            ) from err
        return (
            model.to(device) if not args.load_in_4bit else model,
            None,
            tokenizer,
            {**sources, "kind": "peft adapter"},
        )
    if os.path.isfile(os.path.join(adapter, "config.json")):
        model = load_model(adapter, device=device, flag="--adapter", **settings)
        if model.get_output_embeddings().weight.shape != base_model.get_output_embeddings().weight.shape:
            raise ValueError(
                f"--adapter {adapter!r} (a full model) does not match --model_name_or_path {base_path!r}: their output "
                "layers differ in shape."
            )
        return model, base_model, tokenizer, {**sources, "kind": "merged model"}
    raise FileNotFoundError(
        f"--adapter {adapter!r} holds neither adapter_config.json (a PEFT adapter) nor config.json (a full model)"
    )


def cmd(argv: Sequence[str]) -> int:
    """``etu-hf audit``: suppression report of a base model plus adapter (or merged model)."""
    from transformers import HfArgumentParser

    from etu_hf.artifacts.files import REPORT_FILE
    from etu_hf.artifacts.run_folder import check_writable
    from etu_hf.commands.cli import setup_logging
    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.data.corpus import load_documents
    from etu_hf.evaluation.audit import AuditOptions, audit

    parser = HfArgumentParser(AuditArguments, prog="etu-hf audit")
    (args,) = parser.parse_args_into_dataclasses(args=list(argv))
    setup_logging()
    check_writable(args.output_dir)
    if os.path.exists(os.path.join(args.output_dir, REPORT_FILE)) and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {args.output_dir!r} already holds {REPORT_FILE}; nothing was written. Pass "
            "--overwrite_output_dir or choose another --output_dir."
        )
    run = run_of(args)
    tilt = resolve_tilt(args, run)
    args = dataclasses.replace(args, block_size=resolve_block_size(args, run))
    forbidden = resolve_forbidden(args)
    model, base, tokenizer, sources = load_models(args)

    def blocks(value: Any, flag: str) -> Any:
        if not value:
            return None
        docs = load_documents(value, args.text_column, flag)
        if not docs:
            raise ValueError(f"{flag}: {value!r} holds no text; the audit needs held-out text")
        return tokenize_and_block(docs, tokenizer, args.block_size)  # audit() samples max_sequences of the blocks

    report = audit(
        model,
        blocks(args.forget_corpora, "--forget_corpora"),
        forbidden,
        tilt,
        base=base,
        retain_data=blocks(args.retain_corpora, "--retain_corpora"),
        tokenizer=tokenizer,
        output_dir=args.output_dir,
        overwrite=args.overwrite_output_dir,
        sources={
            **sources,
            "forget_corpora": args.forget_corpora,
            "retain_corpora": args.retain_corpora,
            "forbidden": forbidden,
        },
        options=AuditOptions.from_object(
            args, progress=not args.disable_tqdm, max_sequences=args.max_sequences or None
        ),
    )
    print()
    print(report.summary())
    print(f"\nreport: {os.path.abspath(os.path.join(args.output_dir, REPORT_FILE))}")
    return 0
