"""``etu-hf demo``: the whole pipeline offline, on the embedded tiny Llama and generated corpora.

The demo writes its forget and retain corpora as text files under ``<output_dir>/demo_data/`` and
then runs exactly what ``etu-hf unlearn`` runs on them, so every number it prints can be reproduced
with the command it logs. Any ``etu-hf unlearn`` flag given to ``etu-hf demo`` overrides the demo's
default.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from etu_hf.artifacts.run_folder import check_output_dir, previous_run_files
from etu_hf.commands.arguments import parse_unlearn_args, unlearn_parser
from etu_hf.commands.pipeline import run_and_print
from etu_hf.demo.corpus import write_demo_corpora

DEFAULT_OUTPUT_DIR = "etu-demo-output"

#: Settings of the demo (flags of `etu-hf unlearn`); user flags given after them win.
DEMO_DEFAULTS = [
    *("--epsilon", "0.05", "--use_lora", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.0"),
    *("--block_size", "128", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32"),
    *("--learning_rate", "3e-3", "--max_steps", "150", "--warmup_steps", "0"),
    *("--pmi_top_k", "64", "--p_s_sample_size", "64", "--logging_steps", "25", "--save_strategy", "no"),
    *("--report_to", "none", "--seed", "42", "--dataloader_pin_memory", "false"),
]

DEMO_DESCRIPTION = f"""\
Runs ETU end to end, offline, in about a minute on a CPU: the embedded 1.3M-parameter Llama
(pretrained on a generated corpus) forgets a fictional chemistry topic ("vexium synthesis") while
keeping five other topics. It prints held-out forget mass on V_S and retain perplexity before and
after, and writes V_S.ids.json, args.json, metrics.json and the LoRA adapter to --output_dir
(default ./{DEFAULT_OUTPUT_DIR}, or a numbered sibling if that folder holds a previous run).
Every `etu-hf unlearn` flag below works and overrides the demo's settings."""

DEMO_EPILOG = f"demo settings:\n  {' '.join(DEMO_DEFAULTS)}"


def demo_parser() -> Any:
    """The ``etu-hf unlearn`` parser, with the demo's description, and its settings (:data:`DEMO_DEFAULTS`) as
    the defaults ``--help`` shows."""
    parser = unlearn_parser("etu-hf demo", description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG)
    settings, _ = parser.parse_known_args(DEMO_DEFAULTS)
    dests = {parser._option_string_actions[flag].dest for flag in DEMO_DEFAULTS if flag.startswith("--")}
    parser.set_defaults(**{dest: getattr(settings, dest) for dest in dests})
    return parser


def _free_output_dir(base: str) -> str:
    if not previous_run_files(base):
        return base
    k = 2
    while previous_run_files(f"{base}-{k}"):
        k += 1
    return f"{base}-{k}"


def _plan(user_argv: Sequence[str]) -> tuple[list[str], str, bool]:
    """``(argv, output_dir, wrote_corpora)``: the ``etu-hf unlearn`` arguments of the demo (its defaults,
    the generated corpora, then the user's flags), where it writes, and whether corpora were written."""
    user_argv = list(user_argv)
    given, _ = demo_parser().parse_known_args(user_argv)  # the flags the demo decides on; -h prints the help
    output_dir = given.output_dir
    if output_dir is None:
        output_dir = _free_output_dir(DEFAULT_OUTPUT_DIR)
        user_argv += ["--output_dir", output_dir]
    inputs = {
        "--model_name_or_path": given.model_name_or_path,
        "--tokenizer_name_or_path": given.tokenizer_name_or_path,
    }
    check_output_dir(output_dir, given.overwrite_output_dir, given.resume_from_checkpoint, inputs)
    argv = list(DEMO_DEFAULTS)
    if given.epsilon_ratio is not None:  # the user's relative target replaces the demo's absolute one
        del argv[argv.index("--epsilon") : argv.index("--epsilon") + 2]
    wrote = given.forget_corpora is None
    if wrote:
        data_dir = os.path.join(output_dir, "demo_data")
        wrote = not os.path.isdir(data_dir)  # corpora of an earlier demo in this folder are the user's to keep
        forget, retain = write_demo_corpora(data_dir)
        argv += ["--forget_corpora", forget]
        if given.retain_corpora is None:
            argv += ["--retain_corpora", retain]
    print(f"etu-hf demo: writing to {os.path.abspath(output_dir)}")
    return argv + user_argv, output_dir, wrote


def demo_argv(user_argv: Sequence[str]) -> list[str]:
    """The ``etu-hf unlearn`` arguments of the demo: defaults, generated corpora, then the user's flags
    (``--output_dir`` added when not given). Writes the corpora into ``<output_dir>/demo_data``."""
    return _plan(user_argv)[0]


def _remove_demo_data(output_dir: str) -> None:
    """After a failed demo, remove the corpora it generated (and the output folder if that leaves it
    empty), so the folder is as it was found."""
    data_dir = os.path.join(output_dir, "demo_data")
    if os.path.isdir(data_dir):
        shutil.rmtree(data_dir)
        if not os.listdir(output_dir):
            os.rmdir(output_dir)


def cmd(argv: Sequence[str]) -> int:
    """``etu-hf demo``: generated corpora + the embedded tiny Llama, demo defaults, user flags on top."""
    full_argv, output_dir, wrote = _plan(argv)
    try:
        return run_and_print(*parse_unlearn_args(full_argv))
    except BaseException:
        if wrote:
            _remove_demo_data(output_dir)
        raise
