"""``etu-hf demo``: the whole pipeline offline, on the embedded tiny Llama and generated corpora.

The demo writes its forget and retain corpora as text files under ``<output_dir>/demo_data/`` and
then runs exactly what ``etu-hf unlearn`` runs on them, so every number it prints can be reproduced
with the command it logs. Any ``etu-hf unlearn`` flag given to ``etu-hf demo`` overrides the demo's
default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from etu_hf.artifacts.run_folder import check_output_dir, previous_run_files
from etu_hf.demo.corpus import DEMO_SEED, forget_documents, retain_documents

DEFAULT_OUTPUT_DIR = "etu-demo-output"
FORGET_DOCS = 450
RETAIN_DOCS = 450

#: Settings of the demo (flags of `etu-hf unlearn`); user flags given after them win.
DEMO_DEFAULTS = [
    "--epsilon",
    "0.05",
    "--use_lora",
    "--lora_r",
    "16",
    "--lora_alpha",
    "32",
    "--lora_dropout",
    "0.0",
    "--block_size",
    "128",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "32",
    "--learning_rate",
    "3e-3",
    "--max_steps",
    "150",
    "--warmup_steps",
    "0",
    "--pmi_top_k",
    "64",
    "--p_s_sample_size",
    "64",
    "--logging_steps",
    "25",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--seed",
    "42",
    "--dataloader_pin_memory",
    "false",
]

DEMO_HELP = f"""usage: etu-hf demo [etu-hf unlearn flags]

Runs ETU end to end, offline, in about a minute on a CPU: the embedded 1.3M-parameter Llama
(pretrained on a generated corpus) forgets a fictional chemistry topic ("vexium synthesis") while
keeping five other topics. It prints held-out forget mass on V_S and retain perplexity before and
after, and writes V_S.ids.json, args.json, metrics.json and the LoRA adapter to --output_dir
(default ./{DEFAULT_OUTPUT_DIR}, or a numbered sibling if that folder holds a previous run).

Demo settings (any `etu-hf unlearn` flag overrides them):
  {" ".join(DEMO_DEFAULTS)}
"""


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _flag_set(argv: Sequence[str], name: str) -> bool:
    for i, arg in enumerate(argv):
        if arg == name:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            return nxt.lower() not in ("false", "0", "no")
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1].lower() not in ("false", "0", "no")
    return False


def _free_output_dir(base: str) -> str:
    if not previous_run_files(base):
        return base
    k = 2
    while previous_run_files(f"{base}-{k}"):
        k += 1
    return f"{base}-{k}"


def write_demo_corpora(folder: str) -> tuple[str, str]:
    """Write the generated forget and retain documents (blank-line separated) to ``folder``."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, docs in (
        ("forget.txt", forget_documents(FORGET_DOCS, DEMO_SEED)),
        ("retain.txt", retain_documents(RETAIN_DOCS, DEMO_SEED)),
    ):
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def demo_argv(user_argv: Sequence[str]) -> list[str]:
    """The ``etu-hf unlearn`` arguments of the demo: defaults, generated corpora, then the user's flags."""
    user_argv = list(user_argv)
    output_dir = _flag_value(user_argv, "--output_dir")
    if output_dir is None:
        output_dir = _free_output_dir(DEFAULT_OUTPUT_DIR)
        user_argv += ["--output_dir", output_dir]
    check_output_dir(
        output_dir, _flag_set(user_argv, "--overwrite_output_dir"), _flag_value(user_argv, "--resume_from_checkpoint")
    )
    argv = list(DEMO_DEFAULTS)
    if _flag_value(user_argv, "--forget_corpora") is None:
        forget, retain = write_demo_corpora(os.path.join(output_dir, "demo_data"))
        argv += ["--forget_corpora", forget]
        if _flag_value(user_argv, "--retain_corpora") is None:
            argv += ["--retain_corpora", retain]
    print(f"etu-hf demo: writing to {os.path.abspath(output_dir)}")
    return argv + user_argv
