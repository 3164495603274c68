"""Peak memory and time of the ETU loss (forward + backward), chunked against the naive computation.

Each configuration runs in a fresh process; the figure is the growth of the process's peak resident set
(CPU) or the peak CUDA allocation (GPU) over the inputs already in memory, so it counts what the loss
itself allocates. Inputs: N positions of hidden size H, a vocabulary of V tokens, the student and base
heads applied to hidden states (``tilted_kl_loss(..., student_head=, base_head=)``), LoRA-free.

``--loss_chunk_size 0`` is the naive computation (plain autograd through the whole ``[N, V]`` loss); a
chunk size > 0 is the fused chunked loss (etu_hf/ops/fused.py). The naive loss needs about 7 float32
``[N, V]`` tensors (58 GB at V = 128k, N = 16k): where its estimate exceeds ``--max_naive_gb`` it runs at
N / 2, N / 4, ... until it fits, and its memory and time are extrapolated linearly in N from the largest N
that ran (both grow linearly in N; the row says ``extrapolated_from``).

    python benchmarks/loss_memory.py --output benchmarks/results/loss_memory.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_io import cpu_model, write_json

#: float32 [N, V] tensors the naive loss holds at its peak (measured: 3509 MB at N = 4096, V = 32000).
NAIVE_TENSORS = 7.2


def peak_bytes(on_gpu):
    import torch

    if on_gpu:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(n, h, v, chunk, out):
    import torch

    from etu_hf.ops.chunked import tilted_kl_loss
    from etu_hf.ops.tilt import TiltSpec

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False).to(device)
    hs = torch.randn(n, h, device=device, requires_grad=True)
    hb = torch.randn(n, h, device=device)
    ids = torch.arange(0, v, 97, device=device)

    def loss(rows):
        return tilted_kl_loss(
            hs[:rows], hb[:rows], ids, TiltSpec(epsilon=0.05), student_head=head, base_head=head, chunk_size=chunk
        )

    loss(8).loss.backward()  # warm-up on a small slice, so that one-time allocations do not count
    hs.grad = head.weight.grad = None
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(on_gpu)
    start = time.perf_counter()
    result = loss(n)
    result.loss.backward()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grow = peak_bytes(on_gpu) - (0 if on_gpu else before)
    row = {"positions": n, "hidden": h, "vocab": v, "chunk_size": chunk, "seconds": seconds}
    row.update(peak_growth_mb=grow / 2**20, device=device, loss=float(result.loss.detach()))
    with open(out, "w") as f:
        json.dump(row, f)


def run_worker(n, h, v, chunk):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), str(h), str(v), str(chunk), out]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def naive_row(n, h, v, max_gb):
    """The naive loss at N = n, or at the largest n / 2^k under ``max_gb`` with N-linear extrapolation."""
    m = n
    while m > 256 and NAIVE_TENSORS * m * v * 4 / 2**30 > max_gb:
        m //= 2
    row = run_worker(m, h, v, 0)
    if m != n:
        scale = n / m
        row.update(
            positions=n,
            extrapolated_from=m,
            seconds=row["seconds"] * scale,
            peak_growth_mb=row["peak_growth_mb"] * scale,
            loss=None,
        )
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    p.add_argument("--positions", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 256], help="chunk sizes besides the naive 0")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--max_naive_gb", type=float, default=8.0, help="largest estimated naive peak that is run")
    p.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        n, h, v, chunk, out = opts.worker
        return worker(int(n), int(h), int(v), int(chunk), out)
    rows = []
    for v in opts.vocab:
        for n in opts.positions:
            base = naive_row(n, opts.hidden, v, opts.max_naive_gb)
            group = [base] + [run_worker(n, opts.hidden, v, c) for c in opts.chunks]
            for r in group:  # (a peak growth of 0: below what the resident set size can show)
                r["memory_vs_naive"] = r["peak_growth_mb"] / base["peak_growth_mb"] if base["peak_growth_mb"] else None
                r["time_vs_naive"] = r["seconds"] / base["seconds"]
                if base.get("loss") is not None and abs(r["loss"] - base["loss"]) > 1e-4 * max(1.0, abs(base["loss"])):
                    raise RuntimeError(f"chunked and naive losses differ: {r['loss']} vs {base['loss']} ({r})")
                label = "naive" if not r["chunk_size"] else f"chunk {r['chunk_size']}"
                if r.get("extrapolated_from"):
                    label += f" (from N={r['extrapolated_from']})"
                mem = f"{r['memory_vs_naive']:.3f}x" if r["memory_vs_naive"] is not None else "n/a"
                print(
                    f"V={v:>6} N={n:>6} {label:<22} {r['peak_growth_mb']:9.0f} MB ({mem})  "
                    f"{r['seconds']:8.2f} s ({r['time_vs_naive']:.2f}x)",
                    flush=True,
                )
            rows.extend(group)
    if opts.output:
        import torch

        out = {
            "command": " ".join(["python benchmarks/loss_memory.py", *(sys.argv[1:] if argv is None else argv)]),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__},
            "rows": rows,
        }
        write_json(opts.output, out)
    return rows


if __name__ == "__main__":
    main()
