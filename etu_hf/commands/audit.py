"""``etu-hf audit``: its arguments, and loading a base model plus an adapter or a merged model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from etu_hf.artifacts.files import ARGS_FILE, METRICS_FILE
from etu_hf.evaluation.audit import DEFAULT_AUDIT_MAX_SEQUENCES
from etu_hf.forbidden_set import FORBIDDEN_SET_FILE
from etu_hf.ops.tilt import DEFAULT_LAMBDA_MAX


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
    block_size: int = field(default=512, metadata={"help": "Tokens per block of held-out text (alias --max_length)."})
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
        if not self.forget_corpora:
            raise ValueError("--forget_corpora: the audit needs held-out forget text (files or hub specs)")
        if self.batch_size < 1 or self.block_size < 2:
            raise ValueError("--batch_size must be >= 1 and --block_size >= 2")
        if self.max_sequences is not None and self.max_sequences < 0:
            raise ValueError(f"--max_sequences: must be >= 0 (0: no cap), got {self.max_sequences}")


def read_run(folder: str | None) -> dict[str, Any]:
    """The settings of an ETU run folder (args.json, metrics.json), or {} when it is not one."""
    run: dict[str, Any] = {}
    if not folder:
        return run
    for name in (ARGS_FILE, METRICS_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                run[name] = json.load(f)
    return run


def read_run_of(args: AuditArguments) -> dict[str, Any]:
    """The run whose settings the audit uses: ``--adapter`` when it is an ETU run folder, else the
    folder of ``--forbidden`` when that is one (a merged model audited with its run's V_S.ids.json gets
    that run's epsilon and tilt, offset included). Explicit flags still win."""
    run = read_run(args.adapter)
    if not run and args.forbidden:
        run = read_run(os.path.dirname(os.path.abspath(args.forbidden)))
    return run


def load_models(args: AuditArguments) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Load ``(model, base, tokenizer, sources)``: the unlearned model, the base model to compare
    with (``None`` for a PEFT adapter, whose base is the same model with adapters disabled), the
    tokenizer and a description of what was loaded."""
    import torch
    from transformers import AutoTokenizer

    from etu_hf.commands.loader import load_causal_lm
    from etu_hf.demo import DEMO_MODEL_DIR
    from etu_hf.modeling.checks import check_weight_files

    base_path = args.model_name_or_path or DEMO_MODEL_DIR
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.dtype != "auto":
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.load_in_4bit:
        from etu_hf.modeling.bnb import four_bit_config

        kwargs["quantization_config"] = four_bit_config()
        kwargs["device_map"] = {"": device}
    adapter = args.adapter
    tok_dir = adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_model = load_causal_lm(
        base_path, "--model_name_or_path", max_length=args.block_size, length_flag="--block_size", **kwargs
    )
    if args.load_in_4bit:
        from etu_hf.modeling.bnb import disable_cpu_repacking

        disable_cpu_repacking(base_model)
    else:
        base_model.to(device)
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
        model = load_causal_lm(adapter, "--adapter", **kwargs)
        if not args.load_in_4bit:
            model.to(device)
        if model.get_output_embeddings().weight.shape != base_model.get_output_embeddings().weight.shape:
            raise ValueError(
                f"--adapter {adapter!r} (a full model) does not match --model_name_or_path {base_path!r}: their output "
                "layers differ in shape."
            )
        return model, base_model, tokenizer, {**sources, "kind": "merged model"}
    raise FileNotFoundError(
        f"--adapter {adapter!r} holds neither adapter_config.json (a PEFT adapter) nor config.json (a full model)"
    )


def resolve_settings(args: AuditArguments, run: dict[str, Any]) -> dict[str, Any]:
    """Epsilon, V_S path and tilt: explicit flags first, then the run's files, then the defaults."""
    run_args = run.get(ARGS_FILE, {})
    run_metrics = run.get(METRICS_FILE, {})
    lam = run_metrics.get("lambda") or {}

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else run_args.get(key, default)

    forbidden = args.forbidden
    if forbidden is None and args.adapter and os.path.isfile(os.path.join(args.adapter, FORBIDDEN_SET_FILE)):
        forbidden = os.path.join(args.adapter, FORBIDDEN_SET_FILE)
    if forbidden is None:
        raise ValueError("--forbidden: no V_S given and --adapter holds no V_S.ids.json; pass --forbidden V_S.ids.json")
    mode = pick(args.lambda_mode, "lambda_mode", "per_position")
    return {
        "epsilon": pick(args.epsilon, "epsilon", 0.05),
        "forbidden": forbidden,
        "mode": mode,
        "lambda_max": pick(args.lambda_max, "lambda_max", DEFAULT_LAMBDA_MAX),
        "allow_negative": bool(pick(args.allow_negative_lambda, "allow_negative_lambda", False)),
        "global_lambda": lam.get("closed_form_global"),
        "offset": float(lam.get("offset") or 0.0),
    }
