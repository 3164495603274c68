"""Time per optimiser step of ETUTrainer against transformers' Trainer, alternating in one process.

Both trainers get the same model (two copies of the same weights), the same LoRA configuration, the same
blocks of tokens, batch size and precision. They run in two threads that hand the machine to each other at
the end of every optimiser step (only one computes at a time), so slow and fast phases of a shared machine
hit both alike. The step time of a trainer is the time from getting the machine back to the end of its next
step (``on_step_end``): data loading, forward, backward, optimiser, callbacks (the adaptive-lambda
controller) and logging included. The figure is the ratio of the median step times after ``--warmup``
steps; the mean ratio is written too (the controller runs every ``--lambda_update_freq`` steps, which the
median leaves out).

The plain Trainer trains the causal-LM loss on the forget blocks; with ``--retain`` ETU adds the retain
term (KL to the base on a paired retain block), and the plain Trainer then trains on the same forget and
retain blocks together (twice the batch), so that both steps see the same tokens.

A breakdown per region (``--profile_steps`` steps of each trainer, after the timed ones, under
``torch.profiler``): trained forward, base forward (no grad), loss (ETU: the fused chunk passes, including
the gradient through the output head that they compute in the forward), backward, optimiser, controller,
logging, other; the regions' exclusive CPU time from the profiler's ``record_function`` events, and the
top operators of each trainer.

    python benchmarks/step_overhead.py --config demo --config 32k --output benchmarks/results/step_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import threading
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_io import cpu_model, write_json
from step_regions import REGIONS, Regions, breakdown, instrument

#: Model configurations: ``None`` is the demo model (etu_hf/demo/assets/tiny-llama, |V| = 2048); a number is the
#: demo architecture (4 layers, hidden 128) with that vocabulary and random weights, reshaped by :data:`SHAPES`.
CONFIGS = {"demo": None, "32k": 32000, "128k": 128256, "tiny": 256, "0.5b": 128256, "smollm2": "smollm2"}
#: "smollm2": the real SmolLM2-135M-Instruct (30 layers, hidden 576, |V| 49,152, tied head), from the cache
#: of ``python -m etu_hf.modeling.smollm2`` (fetched there if missing), on real text: the smollm2-knowledge
#: benchmark's first target (forget) and its retain text; V_S is built by ETUTrainer (PMI defaults).

#: Architectures other than the demo's: "tiny" for the tests; "0.5b" a Llama-3-shaped model of 0.57B parameters
#: (24 layers, hidden 1024, untied 128k-token head) for the GPU goal (ETU within 1.4x on a model >= 0.5B).
SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8),
    "0.5b": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=4096,
    ),
}


#: ``lambda_update_freq`` of ETUTrainingArguments: the controller's cost is also given amortised over it.
DEFAULT_UPDATE_FREQ = 25

__all__ = ["REGIONS", "main"]


class Turns:
    """Two threads that take turns: ``wait(name)`` blocks until it is ``name``'s turn; ``pass_on(name)``
    gives the turn to the other one (unless it finished)."""

    def __init__(self, names: list[str]):
        self.names, self.current, self.done = names, names[0], set()
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)

    def pass_on(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(name)
            others = [n for n in self.names if n != name and n not in self.done]
            if others:
                self.current = others[0]
            self.cond.notify_all()


class Baton(TrainerCallback):
    """Records step times, hands the machine over at the end of every step and runs the profiler window."""

    def __init__(self, name: str, turns: Turns, regions: Regions, profile_window: tuple[int, int] | None):
        self.name, self.turns, self.regions, self.window = name, turns, regions, profile_window
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.start: float | None = None
        self.cpu_start = 0.0
        self.prof = None
        self.breakdown: dict | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
            self.regions.enter("step")

    def on_step_end(self, args, state, control, **kwargs):
        self.regions.exit("step")
        self.times.append(time.perf_counter() - self.start)
        self.cpu_times.append(time.process_time() - self.cpu_start)
        step = len(self.times)
        if self.window and step == self.window[0]:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.start()
        elif self.window and step == self.window[1] and self.prof is not None:
            self.prof.stop()
            self.breakdown = breakdown(self.prof, self.window[1] - self.window[0])
            self.prof = None
        self.turns.pass_on(self.name)
        self.turns.wait(self.name)
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.regions.enter("step")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.regions.enter("optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.regions.exit("optimizer")

    def on_train_end(self, args, state, control, **kwargs):
        self.regions.exit("step")


def build_model(config: str, seed: int) -> torch.nn.Module:
    from etu_hf.demo import DEMO_MODEL_DIR

    if CONFIGS[config] is None:
        return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    if config == "smollm2":
        from etu_hf.modeling.smollm2 import get_smollm2

        return AutoModelForCausalLM.from_pretrained(get_smollm2(), dtype=torch.float32)
    cfg = LlamaConfig.from_pretrained(DEMO_MODEL_DIR)
    cfg.vocab_size = CONFIGS[config]
    for key, value in SHAPES.get(config, {}).items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def blocks(config: str, n_blocks: int, seq_len: int, seed: int, retain: bool):
    """Token blocks (``input_ids``/``attention_mask``/``labels``): the demo corpus for the demo model, random
    ids otherwise (the timing does not depend on the text)."""
    import datasets

    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.demo import DEMO_MODEL_DIR
    from etu_hf.demo.corpus import forget_documents, retain_documents

    if CONFIGS[config] is None:
        tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
        docs = (retain_documents if retain else forget_documents)(4 * n_blocks, seed=seed)
        ds = tokenize_and_block(docs, tok, seq_len)
        return ds.select(range(min(n_blocks, len(ds)))), tok
    if config == "smollm2":
        from etu_hf.benchmark.knowledge import BUILTIN_NAME, load_knowledge_benchmark
        from etu_hf.modeling.smollm2 import get_smollm2

        tok = AutoTokenizer.from_pretrained(get_smollm2())
        bench = load_knowledge_benchmark(BUILTIN_NAME)
        docs = bench.retain if retain else bench.forget_texts(bench.targets)
        ds = tokenize_and_block(docs, tok, seq_len)
        if len(ds) < n_blocks:
            raise ValueError(f"--config smollm2: {len(ds)} blocks of {seq_len} tokens, {n_blocks} needed")
        return ds.select(range(n_blocks)), tok
    g = torch.Generator().manual_seed(seed + (1 if retain else 0))
    ids = torch.randint(0, CONFIGS[config], (n_blocks, seq_len), generator=g).tolist()
    mask = [[1] * seq_len for _ in range(n_blocks)]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "labels": ids}), None


def make_trainers(opts, out_dir: str):
    from peft import get_peft_model

    from etu_hf import ETUTrainer, ETUTrainingArguments
    from etu_hf.modeling.adapters import lora_config

    model = build_model(opts.config, opts.seed)
    cfg = lora_config(model, r=opts.lora_r, alpha=2 * opts.lora_r, dropout=0.0, target_modules=opts.lora_target_modules)
    n_blocks = opts.batch_size * (opts.steps + 8)
    forget, tok = blocks(opts.config, n_blocks, opts.seq_len, opts.seed, retain=False)
    retain, _ = blocks(opts.config, n_blocks, opts.seq_len, opts.seed, retain=True)
    common = dict(
        max_steps=opts.steps,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        logging_steps=opts.logging_steps,
        seed=opts.seed,
        dataloader_pin_memory=False,
        bf16=opts.bf16,
    )
    plain_data = forget
    if opts.retain:
        import datasets

        plain_data = datasets.concatenate_datasets([forget, retain])
    plain = Trainer(
        model=get_peft_model(copy.deepcopy(model), cfg),
        args=TrainingArguments(
            output_dir=os.path.join(out_dir, "plain"),
            per_device_train_batch_size=opts.batch_size * (2 if opts.retain else 1),
            **common,
        ),
        train_dataset=plain_data,
    )
    vocab = model.config.vocab_size
    synthetic = isinstance(CONFIGS[opts.config], int)
    forbidden = list(range(7, vocab, max(vocab // 300, 1))) if synthetic else None
    etu = ETUTrainer(
        model=get_peft_model(copy.deepcopy(model), cfg),
        args=ETUTrainingArguments(
            output_dir=os.path.join(out_dir, "etu"),
            per_device_train_batch_size=opts.batch_size,
            retain_weight=1.0 if opts.retain else 0.0,
            lambda_update_freq=opts.lambda_update_freq,
            p_s_sample_size=min(64, n_blocks),
            loss_chunk_size=opts.loss_chunk_size,
            pmi_top_k=300,
            **common,
        ),
        train_dataset=forget,
        retain_dataset=retain,  # with retain_weight 0: the PMI background of V_S only
        processing_class=tok,
        forbidden_set=forbidden,
    )
    return plain, etu


def run(opts) -> dict:
    """Alternate the two trainers and return the step times, ratios and breakdowns."""
    with tempfile.TemporaryDirectory() as out_dir:
        plain, etu = make_trainers(opts, out_dir)
        turns = Turns(["plain", "etu"])
        timed_end = opts.warmup + opts.timed
        windows = {
            "plain": (timed_end, timed_end + opts.profile_steps),
            "etu": (timed_end + opts.profile_steps, timed_end + 2 * opts.profile_steps),
        }
        batons, errors, threads, undo = {}, {}, [], []
        for name, trainer in (("plain", plain), ("etu", etu)):
            regions = Regions()
            undo.append(instrument(trainer, regions, etu=name == "etu"))
            batons[name] = Baton(name, turns, regions, windows[name] if opts.profile_steps else None)
            trainer.add_callback(batons[name])
            trainer.remove_callback(PrinterCallback)

            def target(name=name, trainer=trainer):
                try:
                    turns.wait(name)
                    trainer.train()
                except BaseException as err:  # reported by the main thread
                    errors[name] = err
                finally:
                    turns.pass_on(name, finished=True)

            threads.append(threading.Thread(target=target, name=name))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for restore in undo:
            restore()
        if errors:
            raise RuntimeError(f"a trainer failed: {errors}") from next(iter(errors.values()))
        vs = len(etu.forbidden_set)
    result = {"vocab_size": etu.vocab_size, "forbidden_set_size": vs}
    for name, b in batons.items():
        timed = b.times[opts.warmup : timed_end]
        result[name] = {
            "step_seconds": b.times,
            "step_cpu_seconds": b.cpu_times,
            "median_s": statistics.median(timed),
            "mean_s": statistics.fmean(timed),
            "median_cpu_s": statistics.median(b.cpu_times[opts.warmup : timed_end]),
            "breakdown": b.breakdown,
            "calls": {k: {"calls": n, "seconds": sec} for k, (n, sec) in b.regions.calls.items()},
        }
    result["ratio_median"] = result["etu"]["median_s"] / result["plain"]["median_s"]
    result["ratio_mean"] = result["etu"]["mean_s"] / result["plain"]["mean_s"]
    result["ratio_median_cpu"] = result["etu"]["median_cpu_s"] / result["plain"]["median_cpu_s"]
    ctrl = result["etu"]["calls"].get("controller")
    if ctrl:  # the controller's cost per step at ETUTrainingArguments' default period, on top of the median
        per_step = ctrl["seconds"] / ctrl["calls"] / DEFAULT_UPDATE_FREQ
        result["controller_seconds_per_step_at_default_freq"] = per_step
        result["ratio_with_controller_at_default_freq"] = (result["etu"]["median_s"] + per_step) / result["plain"][
            "median_s"
        ]
    return result


def machine() -> dict:
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_start": os.getloadavg(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="model (repeatable; default demo)")
    p.add_argument("--retain", choices=["no", "yes", "both"], default="both", help="with the retain term")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--timed", type=int, default=8, help="timed steps per trainer")
    p.add_argument("--profile_steps", type=int, default=3, help="steps per trainer under the profiler (0: none)")
    p.add_argument("--lambda_update_freq", type=int, default=5, help="controller period (ETU default 25)")
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--loss_chunk_size", type=int, default=1024)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_target_modules", default="all-linear,lm_head")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--malloc_thresholds",
        action="store_true",
        help="re-run under MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_=4 GiB (glibc keeps freed tensors; "
        "PLATFORM_NOTES); default: the environment as it is, as `etu-hf unlearn` runs",
    )
    p.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    opts = p.parse_args(argv)
    opts.configs = opts.config or ["demo"]
    opts.steps = opts.warmup + opts.timed + 2 * opts.profile_steps + 1
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = parse(argv)
    if opts.malloc_thresholds and "MALLOC_MMAP_THRESHOLD_" not in os.environ and argv is None:
        os.environ.update(MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="4294967296")
        os.execv(
            sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        )  # malloc reads them at start
    rows: list[dict] = []
    command = " ".join(["python benchmarks/step_overhead.py", *(sys.argv[1:] if argv is None else argv)])
    out = {"command": command, "machine": machine(), "rows": rows}
    for config in opts.configs:
        for retain in {"no": [False], "yes": [True], "both": [False, True]}[opts.retain]:
            run_opts = argparse.Namespace(**{**vars(opts), "config": config, "retain": retain})
            res = run(run_opts)
            row = {"config": config, "retain": retain, "batch_size": opts.batch_size, "seq_len": opts.seq_len, **res}
            rows.append(row)
            print(
                f"{config:>5} retain={'yes' if retain else 'no ':<3} |V|={res['vocab_size']:>6}  plain "
                f"{res['plain']['median_s']:.3f} s  etu {res['etu']['median_s']:.3f} s  ratio "
                f"{res['ratio_median']:.2f}x (mean {res['ratio_mean']:.2f}x, CPU time {res['ratio_median_cpu']:.2f}x)",
                flush=True,
            )
            ctrl = res["etu"]["calls"].get("controller")
            if ctrl:
                print(
                    f"      controller: {ctrl['seconds'] / ctrl['calls']:.3f} s per update ({ctrl['calls']} updates); "
                    f"every {DEFAULT_UPDATE_FREQ} steps: {res['ratio_with_controller_at_default_freq']:.2f}x"
                )
            for name in ("plain", "etu"):
                if res[name]["breakdown"]:
                    shares = ", ".join(f"{k} {v:.3f}" for k, v in res[name]["breakdown"]["seconds_per_step"].items())
                    print(f"      {name} per step: {shares}", flush=True)
            out["machine"]["load_average_end"] = os.getloadavg()
            if opts.output:  # after every row: a long run that is stopped keeps what it measured
                write_json(opts.output, out)
    return out


if __name__ == "__main__":
    main()
