"""``etu-hf compare``: ETU and the field's baselines on one benchmark, with one budget, evaluated the
same way, with the Pareto front of forget quality against model utility (and the relearning attack).

Flags: ``etu-hf compare --help`` (:class:`~etu_hf.compare.settings.CompareArguments`). Writes
COMPARE.json (every run's aggregates, settings and the goal checks), COMPARE.md (the table) and
pareto.png into ``--output_dir``, one folder per run under ``runs/`` (adapter, EVAL.json).
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def cmd(argv: Sequence[str]) -> int:
    """Parse the flags, refuse to overwrite a previous comparison, run it and print the table."""
    from transformers import HfArgumentParser

    from etu_hf.artifacts.run_folder import check_writable
    from etu_hf.commands.cli import setup_logging
    from etu_hf.compare.report import COLUMNS, markdown_table, table_cell
    from etu_hf.compare.runner import run_compare
    from etu_hf.compare.settings import CompareArguments

    parser = HfArgumentParser(CompareArguments, prog="etu-hf compare")
    (args,) = parser.parse_args_into_dataclasses(args=list(argv))
    setup_logging()
    check_writable(args.output_dir)
    if os.path.exists(os.path.join(args.output_dir, "COMPARE.json")) and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {args.output_dir!r} already holds COMPARE.json; nothing was written. Pass "
            "--overwrite_output_dir or choose another --output_dir."
        )
    from etu_hf.benchmark.knowledge import BUILTIN_NAME as KNOWLEDGE_NAME

    if args.benchmark not in ("builtin", KNOWLEDGE_NAME) and not os.path.isdir(args.benchmark):
        raise FileNotFoundError(
            f"--benchmark {args.benchmark!r}: not 'builtin', not '{KNOWLEDGE_NAME}' and not a folder"
        )
    result = run_compare(args)
    print()
    from etu_hf.compare.seeds import seeds_text

    if result.get("kind") == "knowledge":
        from etu_hf.compare import knowledge

        print(knowledge.knowledge_table(result) + seeds_text(result, knowledge.COLUMNS, knowledge.table_cell))
    else:
        print(markdown_table(result) + seeds_text(result, COLUMNS, table_cell))
    print(f"\nwritten: {os.path.abspath(os.path.join(args.output_dir, 'COMPARE.md'))} (and COMPARE.json, pareto.png)")
    return 0
