"""The launch matrix: the same unlearning run under LoRA, LoRA + gradient checkpointing,
QLoRA, QLoRA + gradient checkpointing, DeepSpeed ZeRO-2 and ZeRO-3 (both with LoRA), measuring time
per optimiser step and peak memory. Each configuration runs in its own fresh process(es).

    python benchmarks/scale_matrix.py --output benchmarks/results/scale_matrix.json

Writes the JSON (one entry per configuration, the per-rank maxima for multi-process runs, plus
ratios to the LoRA run of the same invocation) and a PNG bar chart next to it. On a CPU-only
machine the DeepSpeed configurations run two gloo processes on the same cores, so their step time
is not comparable to the single-process rows; the memory is per process.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "scale_worker.py")

CONFIGS = [
    ("lora", []),
    ("lora+gc", ["--gradient_checkpointing"]),
    ("qlora", ["--qlora"]),
    ("qlora+gc", ["--qlora", "--gradient_checkpointing"]),
    ("zero2", ["@accelerate_zero2.yaml"]),
    ("zero3", ["@accelerate_zero3.yaml"]),
]


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run(name, extra, out_dir, steps, env):
    target = os.path.join(out_dir, f"{name}.json")
    launcher = [sys.executable]
    flags = [a for a in extra if not a.startswith("@")]
    configs = [a[1:] for a in extra if a.startswith("@")]
    if configs:
        text = open(os.path.join(ROOT, "ds_configs", configs[0])).read()
        if not has_gpu():
            text = text.replace("use_cpu: false", "use_cpu: true")
        cfg = os.path.join(out_dir, configs[0])
        with open(cfg, "w") as f:
            f.write(text)
        launcher = [shutil.which("accelerate") or "accelerate", "launch", "--config_file", cfg]
    cmd = [*launcher, WORKER, target, "--name", name, "--steps", str(steps), *flags]
    print("running", name, flush=True)
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    ranks = [json.load(open(p)) for p in sorted(glob.glob(target.replace(".json", ".rank*.json")))]
    row = dict(ranks[0])
    row["seconds_per_step"] = max(r["seconds_per_step"] for r in ranks)
    row["peak_memory_mb"] = max(r["peak_memory_mb"] for r in ranks)
    return row


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [r["seconds_per_step"] * 1000 for r in rows])
    a.set_ylabel("ms per optimiser step")
    b.bar(names, [r["peak_memory_mb"] for r in rows], color="tab:orange")
    b.set_ylabel("peak memory per process (MB)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"ETU on the demo model, {rows[0]['device']}, batch {rows[0]['batch_size']} x {rows[0]['block_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=os.path.join(HERE, "results", "scale_matrix.json"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(n for n, _ in CONFIGS))
    opts = p.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MALLOC_MMAP_THRESHOLD_": "4294967296",
        "MALLOC_TRIM_THRESHOLD_": "4294967296",
    }
    if not has_gpu():
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # QLoRA on CPU: two OpenMP runtimes
    wanted = set(opts.only.split(",")) if opts.only else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CONFIGS:
            if wanted is None or name in wanted:
                rows.append(run(name, extra, tmp, opts.steps, env))
    base = next((r for r in rows if r["name"] == "lora"), rows[0])
    for r in rows:
        r["time_vs_lora"] = r["seconds_per_step"] / base["seconds_per_step"]
        r["memory_vs_lora"] = r["peak_memory_mb"] / base["peak_memory_mb"]
    with open(opts.output, "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    plot(rows, opts.output.replace(".json", ".png"))
    for r in rows:
        print(
            f"{r['name']:<10} {r['seconds_per_step'] * 1000:8.1f} ms/step ({r['time_vs_lora']:.2f}x)  "
            f"{r['peak_memory_mb']:8.0f} MB ({r['memory_vs_lora']:.2f}x)  world {r['world_size']}"
        )


if __name__ == "__main__":
    main()
