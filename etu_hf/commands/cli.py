"""The ``etu-hf`` command line (also ``python -m etu_hf``).

One ``argparse`` parser picks the command (``add_subparsers``); ``parse_known_args`` hands the rest
of the line to the command's module, whose ``cmd(argv)`` parses it with
``transformers.HfArgumentParser`` over the same dataclasses a Python user fills in (the way TRL's
``trl`` command hands its flags to each script's ``TrlParser``). ``etu-hf <command> --help`` is
therefore the command's own parser's help.

The command modules are imported only once the command is known, after :func:`prepare_process`:
this module imports nothing heavy, so process-wide settings still precede torch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence

#: ``etu-hf <name>`` runs ``etu_hf.commands.<name>.cmd(argv)``.
COMMANDS = {
    "demo": "run the whole pipeline offline on the embedded tiny model and generated corpora",
    "unlearn": "unlearn your corpora from your model (`etu-hf unlearn --help` lists every flag)",
    "audit": "suppression report of a base model plus an unlearned adapter (or merged model)",
    "eval": "unlearning metrics of the field (TOFU/MUSE) and the mass on V_S on a question/answer benchmark",
    "refine": "continue an ETU adapter with DPO (TRL) or NPO/SimNPO, then audit it",
    "compare": "ETU against GA, GradDiff, NPO, SimNPO and UNDIAL on one benchmark (Pareto front, relearning)",
    "push": "publish a finished run to the Hugging Face Hub with its model card (the audit included)",
    "env": "versions, hardware, installed extras and suggested settings",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``etu-hf [--version] <command> ...``. Each command's parser has
    ``add_help=False``, so ``-h`` reaches the command's own parser with the rest of the line."""
    from etu_hf import __version__

    parser = argparse.ArgumentParser(
        prog="etu-hf",
        description="Exponential-Tilted Unlearning for the Hugging Face training stack.",
        epilog="Run `etu-hf <command> --help` for the flags of a command.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"etu-hf {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="<command>")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def setup_logging(progress: bool = True, verbose: bool = False) -> None:
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


def prepare_process(argv: Sequence[str]) -> None:
    """Process-wide settings that must precede importing torch and bitsandbytes.

    4-bit runs on a CPU load two OpenMP runtimes (torch's and bitsandbytes'); with both spinning,
    training was measured up to ~40x slower. Unless the user chose otherwise, their threads wait
    passively.
    """
    four_bit = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    four_bit.add_argument("--use_qlora", "--load_in_4bit", nargs="?", const="true", default="false")
    asked = four_bit.parse_known_args(list(argv))[0].use_qlora.lower() in ("true", "1", "yes", "y", "t")
    no_gpu = shutil.which("nvidia-smi") is None
    if asked and no_gpu and "OMP_WAIT_POLICY" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``etu-hf``; returns the exit status (0 done, 2 bad input or usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prepare_process(argv)
    parser = build_parser()
    try:
        known, rest = parser.parse_known_args(argv)
    except SystemExit as stop:  # --help, --version, or an unknown command (argparse printed why)
        return stop.code if isinstance(stop.code, int) else 0
    if known.command is None:
        parser.print_help()
        return 2

    def fail(err: BaseException, status: int) -> int:
        print(f"etu-hf {known.command}: error: {hide_secrets(str(err), argv)}", file=sys.stderr)
        return status

    debug = bool(os.environ.get("ETU_HF_DEBUG"))
    try:
        with one_line_usage_errors(known.command), quiet_library_warnings():
            return importlib.import_module(f"etu_hf.commands.{known.command}").cmd(rest)
    except SystemExit as stop:  # the command's parser: --help (0)
        return stop.code if isinstance(stop.code, int) else 0
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        # Bad input: one clear line naming the flag, not a traceback (set ETU_HF_DEBUG=1 to see it).
        if debug:
            raise
        return fail(err, 2)
    except OSError as err:  # the machine, not the input: a full disk (ENOSPC), a lost mount, ...
        if debug:
            raise
        if err.errno == errno.ENOSPC:
            where = f" writing {err.filename}" if err.filename else ""
            err = OSError(
                f"no space left on the device{where}; the run's folder was put back as it was found (complete "
                "checkpoints kept). Free some space or choose another --output_dir, and run again."
            )
        return fail(err, 1)
    except KeyboardInterrupt:
        # The run folder was already put back as it was found (complete checkpoints kept; see the log).
        print(f"etu-hf {known.command}: interrupted", file=sys.stderr)
        return 130


class UsageError(ValueError):
    """An argparse usage error, raised instead of printing the usage and exiting (see :func:`one_line_usage_errors`)."""


@contextlib.contextmanager
def one_line_usage_errors(command: str) -> Iterator[None]:
    """While a command runs, an argparse error (an unknown flag, a value that does not parse) raises
    :class:`UsageError` with argparse's message and a pointer to ``--help``, instead of printing the
    whole usage (160 lines for ``unlearn``) before it."""

    def error(self: argparse.ArgumentParser, message: str) -> None:
        raise UsageError(f"{message} (see `etu-hf {command} --help`)")

    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """While a command runs, bitsandbytes' import-time messages (CUDA library and kernel lookups) are
    not shown, so an error stays one line; nothing is changed on disk, and the levels are restored."""
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "bitsandbytes.cextension")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"bitsandbytes(\..*)?")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def hide_secrets(message: str, argv: Sequence[str]) -> str:
    """``message`` with the value of every secret flag of ``argv`` (``--hub_token T``, ``--token=T``) and
    anything shaped like a hub token replaced by ``<redacted>``."""
    from etu_hf.artifacts.files import REDACTED, is_secret_key, redact_secrets

    secrets = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name.startswith("--") and is_secret_key(name.lstrip("-").replace("-", "_")):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value:
                secrets.append(value)
    for value in sorted(secrets, key=len, reverse=True):
        message = message.replace(value, REDACTED)
    return redact_secrets(message)


if __name__ == "__main__":
    sys.exit(main())
