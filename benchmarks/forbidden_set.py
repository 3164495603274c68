"""Tokens per second of building V_S (frequency and PMI counting) from already tokenized ids.

The input is token ids in memory, Zipf-distributed over a vocabulary of ``--vocab`` tokens, cut into blocks
of ``--block_size`` tokens, in three forms:

- ``batches``: collated batches (``input_ids``/``attention_mask`` tensors of ``--batch_size`` blocks), what
  ``ETUTrainer`` counts (it collates the training data 64 blocks at a time);
- ``arrays``: one numpy array of ids per block;
- ``lists``: one Python list of ids per block.

A figure is the number of tokens counted (forget, plus retain for PMI) divided by the wall time of
``build_forbidden_set`` (counting, scoring and selection; the frequency rule keeps its 2000 most frequent
tokens, PMI its default ``pmi_top_k = 2000``), the median of ``--repeats`` runs. The
``dataset`` row adds what the trainer does before counting: reading a ``datasets.Dataset`` of blocks and
collating it (:func:`etu_hf.data.blocks.iter_batches`), on a tenth of the tokens.

    python benchmarks/forbidden_set.py --output benchmarks/results/forbidden_set.json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_io import cpu_model, write_json


def zipf_blocks(n_tokens: int, vocab: int, block_size: int, seed: int) -> np.ndarray:
    """``[n_tokens // block_size, block_size]`` int64 ids with ``P(rank r) ~ 1/r`` over a random rank order."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    cdf = np.cumsum(p / p.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n_tokens)), vocab - 1)
    ids = rng.permutation(vocab)[ranks].astype(np.int64)
    n_blocks = n_tokens // block_size
    return ids[: n_blocks * block_size].reshape(n_blocks, block_size)


def as_form(blocks: np.ndarray, form: str, batch_size: int) -> list:
    """The blocks as a list of collated batches, of arrays or of lists (see the module docstring)."""
    if form == "batches":
        t = torch.from_numpy(blocks)
        return [
            {"input_ids": t[i : i + batch_size], "attention_mask": torch.ones_like(t[i : i + batch_size])}
            for i in range(0, len(t), batch_size)
        ]
    if form == "arrays":
        return list(blocks)
    return blocks.tolist()


def timed(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run(opts: argparse.Namespace) -> list[dict]:
    from etu_hf.forbidden_set import build_forbidden_set

    forget = zipf_blocks(opts.tokens, opts.vocab, opts.block_size, opts.seed)
    retain = zipf_blocks(opts.tokens, opts.vocab, opts.block_size, opts.seed + 1)
    rows = []
    forms = {"batches": 1, "arrays": 1, "lists": 1, "dataset": 10}
    for form, fraction in forms.items():
        n = max(len(forget) // fraction, 1)
        if form == "dataset":
            import datasets

            from etu_hf.data.blocks import iter_batches

            def data(x, n=n):
                ds = datasets.Dataset.from_dict({"input_ids": x[:n].tolist(), "attention_mask": np.ones_like(x[:n])})
                return lambda: iter_batches(ds, None, opts.batch_size)

            f_src, r_src = data(forget), data(retain)
        else:
            f_data, r_data = as_form(forget[:n], form, opts.batch_size), as_form(retain[:n], form, opts.batch_size)
            f_src, r_src = (lambda d=f_data: d), (lambda d=r_data: d)
        tokens = n * opts.block_size
        for method in ("frequency", "pmi"):
            with_retain = method == "pmi"

            def build(method=method, with_retain=with_retain, f_src=f_src, r_src=r_src):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    build_forbidden_set(f_src(), r_src() if with_retain else None, vocab_size=opts.vocab, method=method)

            seconds = timed(build, opts.repeats)
            counted = tokens * (2 if with_retain else 1)
            rows.append(
                {
                    "form": form,
                    "method": method,
                    "tokens": counted,
                    "seconds": seconds,
                    "tokens_per_second": counted / seconds,
                    "goal_met": counted / seconds >= 10e6 if form == "batches" else None,
                }
            )
            rate = counted / seconds / 1e6
            print(f"{form:<8} {method:<9} {counted:>10,} tokens  {seconds:7.3f} s  {rate:6.1f}M tokens/s")
    return rows


def main(argv: list[str] | None = None) -> dict:
    logging.getLogger("etu_hf.forbidden_set").setLevel(logging.ERROR)  # the size and background warnings
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8_000_000, help="tokens of forget (and as many of retain) text")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    opts = p.parse_args(argv)
    rows = run(opts)
    out = {
        "command": " ".join(["python benchmarks/forbidden_set.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "rows": rows,
    }
    if opts.output:
        write_json(opts.output, out)
    return out


if __name__ == "__main__":
    main()
