"""``etu-hf eval --benchmark smollm2-knowledge`` (or a knowledge folder): what a model still knows.

Scores the probes of ``--target`` (forget, neighbours, utility) and the held-out retain perplexity
(:func:`etu_hf.evaluation.knowledge.evaluate_knowledge`). With ``--adapter``, the base model (the same
model with the adapter disabled) is scored too and kept as ``<output_dir>/reference/EVAL.json``, and the
table shows before and after. Writes ``<output_dir>/EVAL.json``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def knowledge_eval(args: Any) -> int:
    """Run the evaluation for :class:`etu_hf.commands.eval.EvalArguments` ``args`` on a knowledge benchmark."""
    from etu_hf.artifacts.record import RunRecord
    from etu_hf.benchmark.knowledge import load_knowledge_benchmark
    from etu_hf.commands.eval import REFERENCE_DIR, load_eval_model
    from etu_hf.commands.loader import load_tokenizer, local_device
    from etu_hf.compare.knowledge import default_model_for
    from etu_hf.evaluation.knowledge import evaluate_knowledge

    for flag, value in (("--retain_model", args.retain_model), ("--reference_eval", args.reference_eval)):
        if value:
            raise ValueError(f"{flag}: a knowledge benchmark has no retain model; leave it out")
    if args.adapter and not os.path.isdir(args.adapter):
        raise FileNotFoundError(f"--adapter {args.adapter!r} is not a folder")
    bench = load_knowledge_benchmark(args.benchmark)
    targets = bench.resolve_targets(args.target)
    run = RunRecord.read(args.adapter) if args.adapter else RunRecord(folder="")
    recorded = run.args.get("model_name_or_path") if run else None
    base = args.model_name_or_path or recorded or default_model_for(bench.name)
    if base is None:
        raise ValueError(
            "--model_name_or_path: required with this knowledge benchmark (for smollm2-knowledge, fetch the model "
            "first: python -m etu_hf.modeling.smollm2)"
        )
    tokenizer = load_tokenizer(args.adapter if _has_tokenizer(args.adapter) else base, args.trust_remote_code)
    device = args.device or local_device()
    model = load_eval_model(base, args.adapter, args, device, "--model_name_or_path")
    name = base if not args.adapter else f"{base} + {args.adapter}"
    result = evaluate_knowledge(model, tokenizer, bench, targets, batch_size=args.batch_size, model_name=name)
    columns = {"model": result}
    if args.adapter and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            before = evaluate_knowledge(model, tokenizer, bench, targets, batch_size=args.batch_size, model_name=base)
        before.save(os.path.join(args.output_dir, REFERENCE_DIR, "EVAL.json"))
        columns = {"base": before, "model": result}
    out_file = result.save(os.path.join(args.output_dir, "EVAL.json"))
    print()
    print(knowledge_columns_table(columns))
    print(f"\nEVAL.json: {os.path.abspath(out_file)}")
    return 0


def _has_tokenizer(folder: str | None) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "tokenizer_config.json"))


def knowledge_columns_table(columns: dict[str, Any]) -> str:
    """A markdown table: one row per aggregate, one column per evaluated model."""
    from etu_hf.benchmark.knowledge import GROUPS
    from etu_hf.evaluation.knowledge import METRICS

    keys = [f"{g}_{m}" for g in GROUPS for m in METRICS] + ["retain_ppl"]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for k in keys:
        vals = [c.aggregates.get(k) for c in columns.values()]
        lines.append(f"| {k} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)
