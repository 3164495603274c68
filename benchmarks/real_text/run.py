"""Run ETU on the real-text case (see build.py) at the package defaults plus ``--use_lora`` and a step budget.

    python benchmarks/real_text/run.py                       # build if needed, then 300 steps
    python benchmarks/real_text/run.py --max_steps 120
    python benchmarks/real_text/run.py -- --learning_rate 3e-3 --lora_target_modules all-linear,lm_head

Flags after ``--`` go to ``etu-hf unlearn`` unchanged, after the benchmark's own flags (so they override
them). The command is::

    python -m etu_hf unlearn --model_name_or_path <cache>/model --forget_corpora <cache>/forget.txt
        --retain_corpora <cache>/retain.txt --output_dir <output_dir> --overwrite_output_dir
        --use_lora --block_size 128 --max_steps <N> [extra flags]

Afterwards it reads ``metrics.json`` and ``suppression_report.json`` from the output folder, recomputes
the retain perplexity of the base and the unlearned model itself on the held-out retain documents (the
documents ``etu-hf unlearn`` held out: same split rule, seed and ``--eval_fraction``, read back from
``args.json``), with a plain loop over 128-token blocks (no etu_hf code), prints one JSON record and
appends it to ``benchmarks/results/real_text.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import build  # noqa: E402  (the sibling module, not an installed package)

DEFAULT_RESULTS = os.path.join(REPO, "benchmarks", "results", "real_text.jsonl")
BOUND_KEY = re.compile(r"upper|bound|_95|interval|_ci\b|_ci_|lower", re.IGNORECASE)


def log(msg: str) -> None:
    print(f"[run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_commit() -> dict:
    """HEAD, whether tracked files differ from it, and a sha256 of ``git diff HEAD -- etu_hf`` (so that runs
    on the same uncommitted package code can be matched)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout

    diff = git("diff", "HEAD", "--", "etu_hf")
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
        "etu_hf_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


#: Settings copied from the run's args.json into the record (the package defaults move; this says what ran).
RUN_SETTINGS = re.compile(
    r"^(learning_rate|per_device_train_batch_size|gradient_accumulation_steps|max_steps|num_train_epochs|"
    r"lr_scheduler_type|warmup_steps|warmup_ratio|weight_decay|seed|eval_fraction|block_size|epsilon|"
    r"stop_when_certified|use_lora|use_dora|lora_.*|lambda_.*|adaptive_lambda|retain_.*|vs_method|pmi_.*|"
    r"span_.*|loss_chunk_size|heldout_.*)$"
)


def flatten(obj, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = obj
    return out


def bounds(report: dict) -> dict:
    """Every upper bound / interval on the mass that the report holds (keys named upper, bound, ..._95,
    interval, ci, lower, and the fields of a nested bound record), whatever the report's version; verdicts
    (booleans) and the ``definitions`` text are left out."""
    flat = flatten({k: v for k, v in report.items() if k not in ("definitions", "samples")})
    return {k: v for k, v in flat.items() if BOUND_KEY.search(k) and not isinstance(v, (bool, str))}


def heldout_documents(docs: list[str], fraction: float, seed: int) -> list[str]:
    """The documents ``etu-hf unlearn`` holds out (the rule of etu_hf.data.split_documents, restated here so
    that the check does not run the package's code): a seeded permutation, the first round(f*n) of it."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(docs))
    n_held = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    return [docs[i] for i in sorted(order[:n_held])]


def independent_perplexity(cache: str, output_dir: str, run_args: dict, block_size: int, model_dir: str) -> dict:
    """Retain perplexity of the base and of the unlearned model on the held-out retain documents, each
    with its own loss on ``block_size``-token blocks (build.block_perplexity), and their ratio."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    fraction = float(run_args.get("eval_fraction", 0.1))
    seed = int(run_args.get("seed", 42))
    docs = heldout_documents(build.read_docs(os.path.join(cache, "retain.txt")), fraction, seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = build.block_perplexity(base, tokenizer, docs, block_size)
    if os.path.exists(os.path.join(output_dir, "adapter_config.json")):
        from peft import PeftModel

        unlearned = PeftModel.from_pretrained(base, output_dir)
        kind = "base + LoRA adapter (peft)"
    else:
        unlearned = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
        kind = "full model"
    after = build.block_perplexity(unlearned, tokenizer, docs, block_size)
    return {
        "definition": f"exp(mean next-token NLL) of the model's own logits on {block_size}-token blocks of the "
        "held-out retain documents (concatenated, EOS after each; last block shorter, not padded), computed "
        "without etu_hf",
        "documents": len(docs),
        "tokens": before["tokens"],
        "blocks": before["blocks"],
        "eval_fraction": fraction,
        "seed": seed,
        "unlearned_model": kind,
        "base_perplexity": before["perplexity"],
        "unlearned_perplexity": after["perplexity"],
        "perplexity_ratio": after["perplexity"] / before["perplexity"],
    }


def run_measured(cmd: list[str], env: dict) -> tuple[int, float]:
    """Run ``cmd`` and return its exit status and its peak resident memory in MiB (``ru_maxrss`` of that one
    process, from ``os.wait4``; Linux reports KiB)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default=build.DEFAULT_CACHE)
    parser.add_argument("--output_dir", default=None, help="default: <cache_dir>/unlearned")
    parser.add_argument("--max_steps", type=int, default=300, help="step budget (default %(default)s)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="JSON-lines file to append to")
    parser.add_argument("--note", default="", help="free text stored with the record")
    parser.add_argument(
        "--model_name_or_path",
        default=None,
        help="unlearn from this model instead of the case's own pretrained toy Llama ('smollm2': the cached "
        "SmolLM2-135M-Instruct of `python -m etu_hf.modeling.smollm2`, fetched if missing); only the corpora "
        "are built then",
    )
    args = parser.parse_args(argv)

    build.set_cpu_env()
    cache = os.path.abspath(args.cache_dir)
    if args.model_name_or_path:
        block_size = build.write_corpora(cache)["block_size"]
        manifest = {"settings": {"block_size": block_size}}
        model_dir = args.model_name_or_path
        if model_dir == "smollm2":
            sys.path.insert(0, REPO)
            from etu_hf.modeling.smollm2 import get_smollm2

            model_dir = get_smollm2()
    else:
        manifest = build.build(args.cache_dir)
        block_size = manifest["settings"]["block_size"]
        model_dir = os.path.join(cache, "model")
    output_dir = os.path.abspath(args.output_dir or os.path.join(cache, "unlearned"))
    cmd = [
        sys.executable, "-m", "etu_hf", "unlearn",
        "--model_name_or_path", model_dir,
        "--forget_corpora", os.path.join(cache, "forget.txt"),
        "--retain_corpora", os.path.join(cache, "retain.txt"),
        "--output_dir", output_dir,
        "--overwrite_output_dir",
        "--use_lora",
        "--block_size", str(block_size),
        "--max_steps", str(args.max_steps),
        *extra,
    ]  # fmt: skip
    shown = shlex.join(cmd)
    log(f"running: {shown}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    git = git_commit()  # before the run: the package may change while it runs
    t0 = time.time()
    returncode, peak_rss_mb = run_measured(cmd, env)
    wall = time.time() - t0
    if returncode != 0:
        log(f"etu-hf unlearn failed with exit status {returncode} after {wall:.0f}s")
        return returncode

    def read(name: str) -> dict:
        path = os.path.join(output_dir, name)
        if not os.path.exists(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    metrics, report, run_args = read("metrics.json"), read("suppression_report.json"), read("args.json")
    flat_metrics = flatten(metrics)
    steps = next((flat_metrics[k] for k in ("global_step", "steps", "train.global_step") if k in flat_metrics), None)
    if steps is None:
        steps = next((v for k, v in flat_metrics.items() if k.endswith("global_step")), None)
    train_seconds = next(
        (v for k, v in flat_metrics.items() if k.endswith(("duration_seconds", "training_seconds", "train_runtime"))),
        None,
    )
    batch = int(run_args.get("per_device_train_batch_size", 8)) * int(run_args.get("gradient_accumulation_steps", 1))
    tokens_trained = steps * batch * block_size if steps else None  # forget blocks; retain blocks come on top
    log("independent retain perplexity check (base vs unlearned, held-out retain documents)")
    check = independent_perplexity(cache, output_dir, run_args, block_size, model_dir)
    tool_blocks = flat_metrics.get("data.retain_heldout_blocks")
    check["same_blocks_as_tool"] = tool_blocks == check["blocks"] if tool_blocks is not None else None
    if check["same_blocks_as_tool"] is False:
        log(f"warning: {check['blocks']} held-out retain blocks here, {tool_blocks} in metrics.json (split differs?)")

    record = {
        "benchmark": "real_text",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shown,
        "extra_flags": extra,
        "note": args.note,
        "git": git,
        "settings": {k: v for k, v in sorted(run_args.items()) if RUN_SETTINGS.match(k)},
        "model": model_dir if args.model_name_or_path else "the case's pretrained toy Llama",
        "case": {
            k: manifest.get(src)
            for k, src in (
                ("documents", "documents"),
                ("tokens", "tokens"),
                ("pretrain_perplexity", "perplexity"),
                ("corpus_sha256", "corpus_sha256"),
                ("versions", "versions"),
            )
        },
        "epsilon": report.get("epsilon", run_args.get("epsilon")),
        "heldout_forget_mass": {
            "before": report.get("base_p_S"),
            "after": report.get("updated_p_S"),
            "bounds": bounds(report),
            "positions": report.get("forget_positions"),
            "sequences": report.get("forget_sequences"),
            "target_achieved": report.get("target_achieved"),
            "target_achieved_upper": report.get("target_achieved_upper"),
            "share_above_epsilon_after": report.get("share_above_epsilon_updated"),
        },
        "retain_perplexity": {
            "tool": {
                "base": report.get("base_perplexity"),
                "unlearned": report.get("updated_perplexity"),
                "ratio": report.get("perplexity_ratio"),
            },
            "independent": check,
        },
        "steps": steps,
        "wall_seconds": round(wall, 1),
        "train_seconds": train_seconds,
        "forget_tokens_per_second": round(tokens_trained / train_seconds, 1)
        if tokens_trained and train_seconds
        else None,
        "tokens_per_second_definition": "optimiser steps x per-device batch x gradient accumulation x block size "
        "(forget blocks; each is paired with a retain block) / training seconds from metrics.json",
        "peak_rss_mb": round(peak_rss_mb, 1),
        "peak_rss_definition": "peak resident set size of the `etu-hf unlearn` process (ru_maxrss from os.wait4), "
        "MiB: model, data, training and audit",
        "metrics": {k: v for k, v in flat_metrics.items() if not isinstance(v, (list, dict))},
        "output_dir": output_dir,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
    summary = {
        "heldout_forget_mass": record["heldout_forget_mass"],
        "retain_perplexity_ratio": {"tool": report.get("perplexity_ratio"), "independent": check["perplexity_ratio"]},
        "steps": steps,
        "wall_seconds": record["wall_seconds"],
        "forget_tokens_per_second": record["forget_tokens_per_second"],
        "peak_rss_mb": record["peak_rss_mb"],
    }
    print(json.dumps(summary, indent=1))
    log(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
