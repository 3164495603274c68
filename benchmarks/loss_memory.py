"""Peak memory and time of the ETU loss (forward + backward), chunked vs unchunked.

Each configuration runs in a fresh process; the figure is the growth of the process's peak resident
set (CPU) or the peak CUDA allocation (GPU) over the inputs already in memory, so it counts what the
loss itself allocates. Inputs: N positions of hidden size H, a vocabulary of V tokens.

    python benchmarks/loss_memory.py --output benchmarks/results/loss_memory.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


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
    # warm-up on a small slice so that one-time allocations do not count
    tilted_kl_loss(
        hs[:8], hb[:8], ids, TiltSpec(epsilon=0.05), student_head=head, base_head=head, chunk_size=chunk or None
    ).loss.backward()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(on_gpu)
    start = time.perf_counter()
    out_ = tilted_kl_loss(
        hs, hb, ids, TiltSpec(epsilon=0.05), student_head=head, base_head=head, chunk_size=chunk or None
    )
    out_.loss.backward()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grow = peak_bytes(on_gpu) - (0 if on_gpu else before)
    json.dump(
        {
            "positions": n,
            "hidden": h,
            "vocab": v,
            "chunk_size": chunk,
            "seconds": seconds,
            "peak_growth_mb": grow / 2**20,
            "device": device,
            "loss": float(out_.loss),
        },
        open(out, "w"),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "loss_memory.json"))
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        n, h, v, chunk, out = opts.worker
        return worker(int(n), int(h), int(v), int(chunk), out)
    rows = []
    for chunk in (0, 2048, 1024, 256):
        tmp = opts.output + f".{chunk}.tmp"
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                str(opts.positions),
                str(opts.hidden),
                str(opts.vocab),
                str(chunk),
                tmp,
            ],
            check=True,
        )
        rows.append(json.load(open(tmp)))
        os.remove(tmp)
    base = rows[0]
    for r in rows:
        r["memory_vs_unchunked"] = r["peak_growth_mb"] / base["peak_growth_mb"]
        r["time_vs_unchunked"] = r["seconds"] / base["seconds"]
        assert abs(r["loss"] - base["loss"]) < 1e-4 * max(1.0, abs(base["loss"]))  # same value, chunked or not
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    json.dump({"rows": rows}, open(opts.output, "w"), indent=2)
    for r in rows:
        label = "unchunked" if not r["chunk_size"] else f"chunk {r['chunk_size']}"
        print(
            f"{label:<11} {r['peak_growth_mb']:8.0f} MB ({r['memory_vs_unchunked']:.2f}x)  "
            f"{r['seconds']:.2f} s ({r['time_vs_unchunked']:.2f}x)"
        )


if __name__ == "__main__":
    main()
