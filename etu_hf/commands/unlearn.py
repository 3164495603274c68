"""``etu-hf unlearn``: parse the flags, then run the pipeline (:mod:`etu_hf.commands.pipeline`, which
``etu-hf demo`` runs too); with no ``--forget_corpora`` it runs the demo instead.

The pipeline: load tokenizer -> load corpora, hold out documents -> token blocks -> model -> ETUTrainer
(or, with ``--method``, a baseline trainer of :mod:`etu_hf.training.baselines`) -> audit on held-out
text -> artifacts. Flags: ``etu-hf unlearn --help``, a baseline's with ``etu-hf unlearn --method <name>
--help`` (:mod:`etu_hf.commands.arguments`).
"""

from __future__ import annotations

from collections.abc import Sequence

from etu_hf.commands.arguments import parse_unlearn_args, unlearn_method, unlearn_parser
from etu_hf.commands.demo import cmd as run_demo
from etu_hf.commands.pipeline import (  # the pipeline's names, where scripts and tests import them from
    UnlearnResult,
    prepare_corpora,
    run_and_print,
    run_unlearning,
    trainable_setup,
)

__all__ = ["UnlearnResult", "cmd", "prepare_corpora", "run_and_print", "run_unlearning", "trainable_setup"]


def cmd(argv: Sequence[str]) -> int:
    """``etu-hf unlearn``: with nothing of the user's (no ``--forget_corpora``, model, tokenizer, retain
    corpora or V_S) it runs the demo (:mod:`etu_hf.commands.demo`); without ``--forget_corpora`` but with
    any of those it refuses."""
    parser = unlearn_parser(method=unlearn_method(argv))  # --method decides which training flags exist
    given, _ = parser.parse_known_args(list(argv))  # -h/--help prints the flags and exits here
    if given.forget_corpora is None:
        yours = [
            f"--{name}"
            for name in ("model_name_or_path", "tokenizer_name_or_path", "retain_corpora", "forbidden_ids_path")
            if getattr(given, name, None) is not None
        ]
        if yours:  # the demo's generated forget text is not the user's data: never mix it with theirs
            raise ValueError(
                f"--forget_corpora: required with {', '.join(yours)} (the embedded demo runs only when none of your "
                "model, data or V_S is given); name the text to forget, e.g. --forget_corpora forget.txt."
            )
        print("etu-hf unlearn: no --forget_corpora given, running the embedded demo (see `etu-hf demo --help`).")
        return run_demo(argv)
    return run_and_print(*parse_unlearn_args(argv, parser))
