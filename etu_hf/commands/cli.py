"""The ``etu-hf`` command line (also ``python -m etu_hf``).

Commands:
    etu-hf demo      the whole pipeline offline on the embedded tiny model and generated corpora
    etu-hf unlearn   ETU on your model and corpora (every TrainingArguments flag works)
    etu-hf audit     suppression report of a base model plus an unlearned adapter or merged model
    etu-hf refine    DPO (TRL) or NPO/SimNPO after ETU, with the base model as reference
    etu-hf env       versions, hardware, installed extras and suggested settings

Each command parses its flags with ``transformers.HfArgumentParser`` over the same dataclasses a
Python user fills in (:class:`~etu_hf.commands.arguments.ModelArguments`,
:class:`~etu_hf.commands.arguments.DataArguments`,
:class:`~etu_hf.ETUTrainingArguments`), then calls the public API.
"""

from __future__ import annotations

import logging
import os
import shutil
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
  audit     suppression report of a base model plus an unlearned adapter (or merged model)
  refine    continue an ETU adapter with DPO (TRL) or NPO/SimNPO, then audit it
  env       versions, hardware, installed extras and suggested settings

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

    from etu_hf.commands.arguments import DataArguments, ModelArguments
    from etu_hf.training.config import ETUTrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, ETUTrainingArguments))
    parser.epilog = ALIAS_HELP
    return parser


def _setup_logging(progress: bool = True, verbose: bool = False) -> None:
    """Log to stdout; etu-hf's own progress at INFO (on the main process), everything else at WARNING
    (transformers at INFO too with ``verbose``)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.WARNING,
        stream=sys.stdout,
    )
    if progress:
        logging.getLogger("etu_hf").setLevel(logging.INFO)
    if verbose:
        import transformers

        transformers.utils.logging.set_verbosity_info()


def parse_unlearn_args(argv: Sequence[str]):
    """Parse ``etu-hf unlearn`` flags into ``(ModelArguments, DataArguments, ETUTrainingArguments)``."""
    from etu_hf.commands.arguments import ADAPTER_LEARNING_RATE

    parser = _parser()
    parser.prog = "etu-hf unlearn"
    argv = rewrite_aliases(argv)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.adapter and not any(a == "--learning_rate" or a.startswith("--learning_rate=") for a in argv):
        training_args.learning_rate = ADAPTER_LEARNING_RATE  # an adapter's default, not full fine-tuning's 5e-5
    return model_args, data_args, training_args


def _run(model_args, data_args, training_args) -> int:
    from etu_hf.commands.unlearn import run_unlearning

    _setup_logging(training_args.should_log, training_args.log_level == "info")
    result = run_unlearning(model_args, data_args, training_args)
    if training_args.should_log:
        print()
        print(result.report.summary())
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
    user_dir = _flag(argv, "--output_dir", "")
    had_data = bool(user_dir) and os.path.isdir(os.path.join(user_dir, "demo_data"))
    full_argv = demo_argv(argv)  # writes the generated corpora into <output_dir>/demo_data
    try:
        return _run(*parse_unlearn_args(full_argv))
    except BaseException:
        if not had_data and not _flag(argv, "--forget_corpora", ""):
            _remove_demo_data(_flag(full_argv, "--output_dir", ""))
        raise


def _remove_demo_data(output_dir: str) -> None:
    """After a failed demo, remove the corpora it generated (and the output folder if that leaves it
    empty), so the folder is as it was found."""
    data_dir = os.path.join(output_dir, "demo_data")
    if output_dir and os.path.isdir(data_dir):
        shutil.rmtree(data_dir)
        if not os.listdir(output_dir):
            os.rmdir(output_dir)


def cmd_audit(argv: Sequence[str]) -> int:
    """``etu-hf audit``: suppression report of a base model plus adapter (or merged model)."""
    from transformers import HfArgumentParser

    from etu_hf.artifacts.run_folder import check_writable
    from etu_hf.commands.audit import AuditArguments, load_models, read_run_of, resolve_settings
    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.data.corpus import load_documents
    from etu_hf.evaluation.audit import audit
    from etu_hf.evaluation.report import REPORT_FILE
    from etu_hf.ops.tilt import TiltSpec

    parser = HfArgumentParser(AuditArguments)
    parser.prog = "etu-hf audit"
    (args,) = parser.parse_args_into_dataclasses(args=["--block_size" if a == "--max_length" else a for a in argv])
    _setup_logging()
    check_writable(args.output_dir)
    if os.path.exists(os.path.join(args.output_dir, REPORT_FILE)) and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {args.output_dir!r} already holds {REPORT_FILE}; nothing was written. Pass "
            "--overwrite_output_dir or choose another --output_dir."
        )
    settings = resolve_settings(args, read_run_of(args))
    model, base, tokenizer, sources = load_models(args)

    def blocks(value: str | None, flag: str):
        if not value:
            return None
        docs = load_documents(value, args.text_column, flag)
        if not docs:
            raise ValueError(f"{flag}: {value!r} holds no text; the audit needs held-out text")
        return tokenize_and_block(docs, tokenizer, args.block_size)  # audit() samples max_sequences of the blocks

    tilt = TiltSpec(
        epsilon=settings["epsilon"],
        mode=settings["mode"],
        lambda_max=settings["lambda_max"],
        allow_negative=settings["allow_negative"],
        global_lambda=settings["global_lambda"],
        offset=settings["offset"],
    )
    report = audit(
        model,
        blocks(args.forget_corpora, "--forget_corpora"),
        settings["forbidden"],
        epsilon=settings["epsilon"],
        base=base,
        retain_data=blocks(args.retain_corpora, "--retain_corpora"),
        tokenizer=tokenizer,
        tilt=tilt,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        wilson_max_n=args.wilson_max_n,
        bootstrap_samples=args.bootstrap_samples,
        seed=args.seed,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        analyze_activations=args.analyze_activations,
        output_dir=args.output_dir,
        overwrite=args.overwrite_output_dir,
        progress=not args.disable_tqdm,
        max_sequences=args.max_sequences or None,
        sources={
            **sources,
            "forget_corpora": args.forget_corpora,
            "retain_corpora": args.retain_corpora,
            "forbidden": settings["forbidden"],
        },
    )
    print()
    print(report.summary())
    print(f"\nreport: {os.path.abspath(os.path.join(args.output_dir, REPORT_FILE))}")
    return 0


def _flag(argv: Sequence[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def cmd_refine(argv: Sequence[str]) -> int:
    """``etu-hf refine``: DPO (TRL's DPOTrainer) or NPO/SimNPO after ETU, then an audit."""
    from transformers import HfArgumentParser

    from etu_hf.commands.refine import RefineArguments, run_refine
    from etu_hf.training.npo import NPOConfig

    method = _flag(argv, "--method", "dpo")
    if method == "dpo":
        from etu_hf.training.dpo import RefineDPOConfig as Config
    else:
        Config = NPOConfig
    parser = HfArgumentParser((RefineArguments, Config))
    parser.prog = "etu-hf refine"
    argv = list(argv)
    if method == "simnpo" and not any(a.startswith("--loss_type") for a in argv):
        argv += ["--loss_type", "simnpo"]
    args, config = parser.parse_args_into_dataclasses(args=argv)
    _setup_logging(config.should_log)
    report = run_refine(args, config)
    if config.should_log:
        print()
        print(report.summary())
        print(f"\nartifacts: {os.path.abspath(config.output_dir)}")
    return 0


def cmd_env(argv: Sequence[str]) -> int:
    """``etu-hf env [--model_name_or_path M] [--json]``: versions, hardware and suggested settings."""
    import argparse
    import json

    from etu_hf.commands.env import format_report, report

    parser = argparse.ArgumentParser(prog="etu-hf env", description="Versions, hardware and suggested settings.")
    parser.add_argument("--model_name_or_path", default=None, help="size-aware suggestions for this model")
    parser.add_argument("--json", action="store_true", help="print JSON")
    opts = parser.parse_args(list(argv))
    data = report(opts.model_name_or_path)
    print(json.dumps(data, indent=2) if opts.json else format_report(data))
    return 0


COMMANDS = {"unlearn": cmd_unlearn, "demo": cmd_demo, "audit": cmd_audit, "refine": cmd_refine, "env": cmd_env}


def _prepare_process(argv: Sequence[str]) -> None:
    """Process-wide settings that must precede importing torch and bitsandbytes.

    4-bit runs on a CPU load two OpenMP runtimes (torch's and bitsandbytes'); with both spinning,
    training was measured up to ~40x slower. Unless the user chose otherwise, their threads wait
    passively. (This module imports nothing heavy, so this still happens before torch loads.)
    """
    four_bit = any(a.split("=")[0] in ("--use_qlora", "--load_in_4bit") for a in argv)
    no_gpu = shutil.which("nvidia-smi") is None
    if four_bit and no_gpu and "OMP_WAIT_POLICY" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _prepare_process(argv)
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
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        # Bad input: one clear line naming the flag, not a traceback (set ETU_HF_DEBUG=1 to see it).
        if os.environ.get("ETU_HF_DEBUG"):
            raise
        print(f"etu-hf {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The run folder was already put back as it was found (complete checkpoints kept; see the log).
        print(f"etu-hf {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
