"""``etu-hf eval``: the unlearning metrics of the field (TOFU, MUSE, open-unlearning) and ETU's mass on V_S, of a
model (a base plus an adapter, a run folder, or a full model) on a question/answer benchmark.

The benchmark is the built-in one (its target model is the default model, its retain model the default
reference) or a folder (:func:`etu_hf.benchmark.folder.load_benchmark`). Forget quality and PrivLeak compare
with the retain model: its evaluation is computed (and kept as ``<output_dir>/reference/EVAL.json``, reused while
it matches) or read from ``--reference_eval``. Writes ``<output_dir>/EVAL.json`` and prints the table.
Every flag is checked before a model is loaded. Definitions: docs/evaluation.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from etu_hf.artifacts.record import RunRecord
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.evaluation.unlearning.registry import resolve_metrics

logger = logging.getLogger(__name__)

#: Where the retain model's evaluation is kept, under ``--output_dir``.
REFERENCE_DIR = "reference"


@dataclass
class EvalArguments:
    """Flags of ``etu-hf eval``."""

    output_dir: str = field(metadata={"help": "Where EVAL.json goes (and reference/EVAL.json, the retain model's)."})
    benchmark: str = field(
        default="builtin",
        metadata={
            "help": "'builtin' (the built-in benchmark and its models), 'smollm2-knowledge' (real knowledge of "
            "SmolLM2: probes and retain perplexity), or a folder (question/answer splits, or a knowledge benchmark)."
        },
    )
    target: str | None = field(
        default=None,
        metadata={
            "help": "Knowledge benchmarks: the target(s) whose probes are scored (a name, a comma list or 'all'; "
            "default: the benchmark's first target)."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The model (the BASE when --adapter is an adapter). Default: the run's base when --adapter is an "
            "etu-hf run folder, else the built-in benchmark's target model; required with a benchmark folder."
        },
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "A PEFT adapter folder or an etu-hf run folder (loaded on the base), or a full model folder."
        },
    )
    retain_model: str | None = field(
        default=None,
        metadata={
            "help": "The retain model (trained without the forget split), for forget_quality and privleak. Default: "
            "the built-in benchmark's; none with a benchmark folder."
        },
    )
    reference_eval: str | None = field(
        default=None, metadata={"help": "The retain model's EVAL.json (instead of evaluating --retain_model)."}
    )
    metrics: str = field(default="all", metadata={"help": "Comma-separated metric names, or 'all'."})
    forbidden_ids_path: str | None = field(
        default=None, metadata={"help": "V_S.ids.json for vs_mass (default: the one in --adapter's run folder)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass and per generate call."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens of a greedy answer (default: the answer's token count + 16)."}
    )
    dtype: str = field(default="auto", metadata={"choices": ["auto", "float32", "bfloat16", "float16"]})
    trust_remote_code: bool = field(default=False)
    device: str | None = field(default=None, metadata={"help": "Default: this process's accelerator, else cpu."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing EVAL.json."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size: must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.retain_model and self.reference_eval:
            raise ValueError("--retain_model and --reference_eval: give one (the EVAL.json replaces evaluating it)")
        resolve_metrics(self.metrics, "--metrics")


@dataclass(frozen=True)
class Sources:
    """What is evaluated: the benchmark, the model (base path, adapter, tokenizer folder), the retain model or
    its EVAL.json, and V_S."""

    benchmark: Any
    base: str
    adapter: str | None
    tokenizer: str
    retain: str | None
    reference_eval: str | None
    forbidden: str | None

    @property
    def model_name(self) -> str:
        return self.base if not self.adapter else f"{self.base} + {self.adapter}"


def _tokenizer_dir(model: str, adapter: str | None) -> str:
    if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        return adapter
    if adapter and os.path.isfile(os.path.join(adapter, "config.json")):
        return adapter  # a full model: its own tokenizer, else (no tokenizer there) AutoTokenizer fails clearly
    return model


def resolve_sources(args: EvalArguments) -> Sources:
    """The benchmark (loaded; a bad folder raises ``ValueError`` naming it) and the paths to evaluate."""
    if args.adapter and not os.path.isdir(args.adapter):
        raise FileNotFoundError(f"--adapter {args.adapter!r} is not a folder")
    if args.adapter and not any(
        os.path.isfile(os.path.join(args.adapter, n)) for n in ("adapter_config.json", "config.json")
    ):
        compare = os.path.isfile(os.path.join(args.adapter, "COMPARE.json"))
        raise FileNotFoundError(
            f"--adapter {args.adapter!r} holds neither adapter_config.json (a PEFT adapter) nor config.json (a full "
            "model)"
            + (
                "; it is an `etu-hf compare` folder: give one of the runs it trained, with --model_name_or_path"
                if compare
                else ""
            )
        )
    run = RunRecord.read(args.adapter) if args.adapter else RunRecord(folder="")
    if run.args and not args.model_name_or_path and "model_name_or_path" not in run.args:
        raise ValueError(
            f"--model_name_or_path: required, as the run in --adapter {args.adapter!r} does not record the model it "
            "was trained from (an `etu-hf compare` run); give that model."
        )
    target = retain = None
    from etu_hf.benchmark.folder import load_benchmark

    if args.benchmark == "builtin":
        from etu_hf.benchmark.models import benchmark_models

        built = benchmark_models()
        benchmark = load_benchmark(str(built.benchmark))
        target, retain = str(built.target), str(built.retain)
    else:
        if not os.path.isdir(args.benchmark):
            raise FileNotFoundError(
                f"--benchmark {args.benchmark!r}: not 'builtin', not 'smollm2-knowledge' and not a folder"
            )
        benchmark = load_benchmark(args.benchmark)
    # An etu-hf run records its base (None: the demo model it then defaulted to).
    recorded = (run.args.get("model_name_or_path") or DEMO_MODEL_DIR) if run else None
    base = args.model_name_or_path or recorded or target
    if base is None:
        raise ValueError(
            f"--model_name_or_path: required with the benchmark folder {args.benchmark!r} (the model to evaluate, or "
            "the base of --adapter)"
        )
    forbidden = args.forbidden_ids_path or run.forbidden_path
    if forbidden and not os.path.isfile(forbidden):
        raise FileNotFoundError(f"--forbidden_ids_path {forbidden!r} does not exist")
    if args.reference_eval and not os.path.exists(args.reference_eval):
        raise FileNotFoundError(f"--reference_eval {args.reference_eval!r} does not exist")
    return Sources(
        benchmark=benchmark,
        base=base,
        adapter=args.adapter,
        tokenizer=_tokenizer_dir(base, args.adapter),
        retain=None if args.reference_eval else (args.retain_model or retain),
        reference_eval=args.reference_eval,
        forbidden=forbidden,
    )


def check_same_tokenizer(tokenizer: Any, other: Any, path: str, other_path: str) -> None:
    """``ValueError`` naming both folders when two tokenizers' vocabularies (``get_vocab()``) differ: the retain
    model must read the benchmark with the same token ids as the model for its numbers to compare."""
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    if mine != theirs:
        differ = len(set(mine.items()) ^ set(theirs.items()))
        raise ValueError(
            f"--retain_model {other_path!r}: its tokenizer differs from the model's ({path!r}): {len(theirs)} vs "
            f"{len(mine)} tokens, {differ} (token, id) pairs not shared. The retain model must use the model's "
            "tokenizer."
        )


def load_eval_model(base: str, adapter: str | None, args: EvalArguments, device: Any, flag: str) -> Any:
    """The model to evaluate: ``base`` alone, ``base`` plus the PEFT adapter ``adapter``, or the full model in
    ``adapter`` (then ``base`` is not loaded)."""
    from etu_hf.commands.loader import load_model

    settings = {"dtype": args.dtype, "trust_remote_code": args.trust_remote_code, "device": device}
    if adapter is None:
        return load_model(base, flag=flag, **settings)
    if os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        from peft import PeftModel

        from etu_hf.modeling.checks import check_weight_files

        check_weight_files(adapter, "--adapter")
        model = load_model(base, flag=flag, **settings)
        try:
            return PeftModel.from_pretrained(model, adapter).to(device)
        except (ValueError, RuntimeError, KeyError) as err:
            raise ValueError(
                f"--adapter {adapter!r} does not match --model_name_or_path {base!r}: {err}. Give the base model the "
                "adapter was trained on."
            ) from err
    if os.path.isfile(os.path.join(adapter, "config.json")):
        return load_model(adapter, flag="--adapter", **settings)
    raise FileNotFoundError(
        f"--adapter {adapter!r} holds neither adapter_config.json (a PEFT adapter) nor config.json (a full model)"
    )


def _cached_reference(path: str, retain: str, evaluator: Any, metric_names: list[str]) -> Any:
    """The kept evaluation of ``retain`` at ``path`` when it is of this model, benchmark, k, metrics and V_S."""
    from etu_hf.evaluation.unlearning import UnlearningEval
    from etu_hf.evaluation.unlearning.evaluate import forbidden_info

    if not os.path.isfile(path):
        return None
    try:
        cached = UnlearningEval.load(path)
    except ValueError:
        return None
    s = cached.settings
    same = (
        s.get("model") == retain
        and (s.get("benchmark") or {}).get("fingerprint") == evaluator.fingerprint
        and s.get("k") == evaluator.options.k
        and set(metric_names) <= set(s.get("metrics") or [])
        and s.get("forbidden_set") == forbidden_info(evaluator.forbidden)
    )
    return cached if same else None


def reference_eval(args: EvalArguments, src: Sources, tokenizer: Any, device: Any, state: Any) -> Any:
    """The retain model's :class:`UnlearningEval`: read from ``--reference_eval``, reused from
    ``<output_dir>/reference/EVAL.json`` when it matches, else computed (and kept there); ``None`` without one."""
    from etu_hf.evaluation.unlearning import EVAL_FILE, BenchmarkEvaluator, UnlearningEval

    if src.reference_eval:
        return UnlearningEval.load(src.reference_eval)
    if not src.retain:
        return None
    evaluator = BenchmarkEvaluator(
        src.benchmark,
        tokenizer,
        metrics=args.metrics,
        forbidden_set=src.forbidden,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    kept = os.path.join(args.output_dir, REFERENCE_DIR, EVAL_FILE)
    cached = _cached_reference(kept, src.retain, evaluator, [m.name for m in evaluator.metrics])
    if cached is not None:
        logger.info("retain model: reusing %s", kept)
        return cached
    logger.info("retain model: evaluating %s", src.retain)
    model = load_eval_model(src.retain, None, args, device, "--retain_model")
    result = evaluator.evaluate(model, state, model_name=src.retain)
    if state is None or state.is_main_process:
        result.save(kept)
    del model
    return result


def cmd(argv: Sequence[str]) -> int:
    """``etu-hf eval``: evaluate a model on a question/answer unlearning benchmark."""
    import torch
    from accelerate import PartialState
    from transformers import HfArgumentParser

    from etu_hf.artifacts.run_folder import check_writable
    from etu_hf.commands.cli import setup_logging
    from etu_hf.commands.loader import load_tokenizer, local_device
    from etu_hf.evaluation.unlearning import EVAL_FILE, BenchmarkEvaluator, format_table

    parser = HfArgumentParser(EvalArguments, prog="etu-hf eval")
    (args,) = parser.parse_args_into_dataclasses(args=list(argv))
    setup_logging()
    check_writable(args.output_dir)
    out_file = os.path.join(args.output_dir, EVAL_FILE)
    if os.path.exists(out_file) and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {args.output_dir!r} already holds {EVAL_FILE}; nothing was written. Pass "
            "--overwrite_output_dir or choose another --output_dir."
        )
    from etu_hf.benchmark.knowledge import is_knowledge_spec

    if is_knowledge_spec(args.benchmark):
        from etu_hf.commands.eval_knowledge import knowledge_eval

        return knowledge_eval(args)
    if args.target is not None:
        raise ValueError("--target: only for knowledge benchmarks (e.g. --benchmark smollm2-knowledge)")
    src = resolve_sources(args)
    tokenizer = load_tokenizer(src.tokenizer, args.trust_remote_code)
    if src.retain:
        check_same_tokenizer(tokenizer, load_tokenizer(src.retain, args.trust_remote_code), src.tokenizer, src.retain)
    # Under torchrun on CPUs accelerate must be told to use the CPU processes (`accelerate launch --cpu` tells it).
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    state = PartialState(cpu=True) if multi_cpu else PartialState()
    state = state if state.num_processes > 1 else None
    device = args.device or local_device()
    reference = reference_eval(args, src, tokenizer, device, state)
    evaluator = BenchmarkEvaluator(
        src.benchmark,
        tokenizer,
        reference,
        args.metrics,
        forbidden_set=src.forbidden,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    model = load_eval_model(src.base, src.adapter, args, device, "--model_name_or_path")
    result = evaluator.evaluate(model, state, model_name=src.model_name)
    if state is not None and not state.is_main_process:
        return 0
    result.save(out_file)
    columns = {"model": result} if reference is None else {"model": result, "retain model": reference}
    print()
    print(format_table(columns))
    print(f"\nEVAL.json: {os.path.abspath(out_file)}")
    return 0
