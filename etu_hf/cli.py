"""The ``etu-hf`` command line (also ``python -m etu_hf``).

Commands:
    etu-hf demo      the whole pipeline offline on the embedded tiny model and generated corpora
    etu-hf unlearn   ETU on your model and corpora (every TrainingArguments flag works)

Each command parses its flags with ``transformers.HfArgumentParser`` over the same dataclasses a
Python user fills in (:class:`~etu_hf.pipeline.ModelArguments`, :class:`~etu_hf.pipeline.DataArguments`,
:class:`~etu_hf.ETUTrainingArguments`), then calls the public API.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

#: The original tool's flag names, rewritten to their transformers/etu-hf equivalents before parsing.
FLAG_ALIASES = {
    "--batch_size": "--per_device_train_batch_size",
    "--log_every": "--logging_steps",
    "--max_length": "--block_size",
    "--deterministic": "--full_determinism",
}

ALIAS_HELP = """
aliases (the original ETU tool's flags):
  --batch_size N        = --per_device_train_batch_size N
  --log_every N         = --logging_steps N
  --max_length N        = --block_size N
  --verbose             = --log_level info (transformers and etu-hf log at INFO)
  --deterministic       = --full_determinism (deterministic algorithms; may be slower)
  --use_pmi_vs [BOOL]   = --vs_method pmi (false: --vs_method frequency)
"""

USAGE = """usage: etu-hf <command> [flags]

Exponential-Tilted Unlearning for the Hugging Face training stack.

commands:
  demo      run the whole pipeline offline on the embedded tiny model and generated corpora
  unlearn   unlearn your corpora from your model (`etu-hf unlearn --help` lists every flag)

Run `etu-hf <command> --help` for the flags of a command.
"""

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


def rewrite_aliases(argv: Sequence[str]) -> list[str]:
    """Replace the original tool's flag names by the canonical ones (see :data:`FLAG_ALIASES`)."""
    out: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in FLAG_ALIASES:
            out.append(FLAG_ALIASES[name] + (eq + value if eq else ""))
        elif name == "--verbose":
            out += ["--log_level", "info"]
        elif name == "--use_pmi_vs":
            flag_value = value if eq else None
            if flag_value is None and i + 1 < len(argv) and argv[i + 1].lower() in _TRUE | _FALSE:
                flag_value = argv[i + 1]
                i += 1
            use_pmi = flag_value is None or flag_value.lower() in _TRUE
            out += ["--vs_method", "pmi" if use_pmi else "frequency"]
        else:
            out.append(arg)
        i += 1
    return out


def _parser():
    from transformers import HfArgumentParser

    from etu_hf.config import ETUTrainingArguments
    from etu_hf.pipeline import DataArguments, ModelArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, ETUTrainingArguments))
    parser.epilog = ALIAS_HELP
    return parser


def _setup_logging(training_args) -> None:
    import transformers

    level = logging.INFO
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.WARNING,
        stream=sys.stdout,
    )
    if training_args.should_log:
        logging.getLogger("etu_hf").setLevel(level)
    if training_args.log_level == "info":
        transformers.utils.logging.set_verbosity_info()


def parse_unlearn_args(argv: Sequence[str]):
    """Parse ``etu-hf unlearn`` flags into ``(ModelArguments, DataArguments, ETUTrainingArguments)``."""
    parser = _parser()
    parser.prog = "etu-hf unlearn"
    return parser.parse_args_into_dataclasses(args=rewrite_aliases(argv))


def _run(model_args, data_args, training_args) -> int:
    from etu_hf.pipeline import format_table, run_unlearning

    _setup_logging(training_args)
    result = run_unlearning(model_args, data_args, training_args)
    if training_args.should_log:
        print()
        print(format_table(result.metrics))
        print(f"\nartifacts: {os.path.abspath(result.output_dir)}")
    return 0


def cmd_unlearn(argv: Sequence[str]) -> int:
    """``etu-hf unlearn``: with no --forget_corpora it runs the demo pipeline."""
    if not any(a == "--forget_corpora" or a.startswith("--forget_corpora=") for a in argv):
        if any(a in ("-h", "--help") for a in argv):
            return _print_help("etu-hf unlearn")
        print("etu-hf unlearn: no --forget_corpora given, running the embedded demo (see `etu-hf demo --help`).")
        return cmd_demo(argv)
    if any(a in ("-h", "--help") for a in argv):
        return _print_help("etu-hf unlearn")
    return _run(*parse_unlearn_args(argv))


def _print_help(prog: str) -> int:
    parser = _parser()
    parser.prog = prog
    parser.print_help()
    return 0


def cmd_demo(argv: Sequence[str]) -> int:
    """``etu-hf demo``: generated corpora + the embedded tiny Llama, demo defaults, user flags on top."""
    from etu_hf.demo.run import demo_argv

    if any(a in ("-h", "--help") for a in argv):
        from etu_hf.demo.run import DEMO_HELP

        print(DEMO_HELP)
        return 0
    return _run(*parse_unlearn_args(demo_argv(argv)))


COMMANDS = {"unlearn": cmd_unlearn, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from etu_hf import __version__

        print(f"etu-hf {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"etu-hf: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except (ValueError, TypeError, FileNotFoundError) as err:
        # Bad input: one clear line naming the flag, not a traceback (set ETU_HF_DEBUG=1 to see it).
        if os.environ.get("ETU_HF_DEBUG"):
            raise
        print(f"etu-hf {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
