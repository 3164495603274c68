"""Pool one-seed comparisons into the over-seeds table that ``etu-hf compare --seeds`` prints.

Runs split over processes (to share a machine's cores) or made at different times give one COMPARE.json per seed.
This script reads several COMPARE.json of a knowledge benchmark, checks that they share the benchmark, targets,
model, base model scores (to 1e-4: evaluations made at different times differ in the 6th digit) and budget
(steps, batch, block size, LoRA, retain term), pools their runs by setting (method and label; for ETU runs also
``--etu_learning_rate`` and ``--etu_args``) and prints, per setting with more than one seed, each metric's mean
[min, max] over the seeds (``etu_hf.compare.seeds.over_seeds``), as ratios to the base model. A run at seed s
is the run ``etu-hf compare --seeds ...,s,...`` makes at s (tests/test_knowledge_benchmark.py checks it on the
demo model), so the table is the one ``--seeds`` would print, up to the last digits.

    python benchmarks/pool_seeds.py a/COMPARE.json b/COMPARE.json ... [--output pooled.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_io import write_json

from etu_hf.compare.knowledge import COLUMNS
from etu_hf.compare.seeds import over_seeds

#: Settings every pooled comparison must share.
BUDGET = (
    "max_steps",
    "per_device_train_batch_size",
    "block_size",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "retain_weight",
    "retain_loss_type",
)
#: Columns of the printed table, as ratios to the base model.
RATIO_COLUMNS = ("forget_answer_prob", "neighbour_answer_prob", "utility_answer_prob", "retain_ppl")


def _setting(run: dict, settings: dict) -> str:
    """A run's setting: its label without a seed, and for an ETU run the ETU flags that shape it."""
    label = run.get("setting") or run["label"]
    if run["method"] == "etu" or run["method"].startswith("etu-"):
        extra = f" lr={settings['etu_learning_rate']:g}"
        if settings.get("etu_args"):
            extra += f" {settings['etu_args']}"
        label += extra
    return label


def pool(paths: list[str]) -> dict:
    """The pooled runs, the base model's scores and ``over_seeds`` of the COMPARE.json files at ``paths``."""
    first: dict | None = None
    runs: list[dict] = []
    seen: set[tuple[str, str, int]] = set()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if result.get("kind") != "knowledge":
            raise SystemExit(f"{path}: not a knowledge-benchmark comparison")
        s = result["settings"]
        if first is None:
            first = result
        else:
            f0 = first["settings"]
            same = [result["benchmark"] == first["benchmark"], result["models"] == first["models"]]
            same += [s.get(k) == f0.get(k) for k in BUDGET]
            base, base0 = result["references"]["base"], first["references"]["base"]
            same += [math.isclose(base[k], base0[k], rel_tol=1e-4) for k in RATIO_COLUMNS]
            if not all(same):
                raise SystemExit(f"{path}: another benchmark, model, base or budget than {paths[0]}; not pooled")
        for r in result["runs"]:
            seed = int(r.get("seed", s["seed"]))
            setting = _setting(r, s)
            if (r["method"], setting, seed) in seen:
                raise SystemExit(f"{path}: {r['method']} {setting} at seed {seed} is in two files")
            seen.add((r["method"], setting, seed))
            runs.append({**r, "setting": setting, "seed": seed, "source": path})
    assert first is not None
    keys = [k for k, _ in COLUMNS] + ["forgetting", "kept"]
    return {
        "benchmark": first["benchmark"],
        "models": first["models"],
        "budget": {k: first["settings"].get(k) for k in BUDGET},
        "base": first["references"]["base"],
        "runs": runs,
        "over_seeds": over_seeds(runs, keys),
    }


def table(pooled: dict) -> str:
    """Per pooled setting: seeds, then each ratio column as ``mean [min, max]`` of run / base."""
    base = pooled["base"]
    head = ["method", "setting", "seeds", *[f"{k} / base" for k in RATIO_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in pooled["over_seeds"]:
        cells = [g["method"], g["setting"], ",".join(str(s) for s in g["seeds"])]
        for k in RATIO_COLUMNS:
            b = base[k]
            cells.append(f"{g['mean'][k] / b:.2f}x [{g['min'][k] / b:.2f}, {g['max'][k] / b:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="COMPARE.json files (or folders holding one)")
    parser.add_argument("--output", help="also write the pooled runs and over_seeds here (JSON)")
    args = parser.parse_args()
    paths = [os.path.join(p, "COMPARE.json") if os.path.isdir(p) else p for p in args.paths]
    pooled = pool(paths)
    print(table(pooled))
    if args.output:
        write_json(args.output, pooled)
        print(f"written: {args.output}")


if __name__ == "__main__":
    main()
