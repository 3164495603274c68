"""One benchmark run: ETU on the demo model under one configuration; writes its measurements.

Launched by scale_matrix.py (plain python, or accelerate launch for the DeepSpeed configurations).
Time per optimiser step is measured between steps --warmup and --steps (excluding start-up and
compilation); peak memory is this process's peak resident set (CPU) or peak CUDA allocation (GPU).
"""

import argparse
import json
import os
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from etu_hf import ETUTrainer, ETUTrainingArguments
from etu_hf.data.blocks import tokenize_and_block
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import forget_documents, retain_documents
from etu_hf.modeling.adapters import lora_config


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("output_json")
    p.add_argument("--name", required=True)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--lora_r", type=int, default=16)
    opts = p.parse_args()

    on_gpu = torch.cuda.is_available()
    args = ETUTrainingArguments(
        output_dir=os.path.dirname(os.path.abspath(opts.output_json)) + f"/run-{opts.name}",
        overwrite_output_dir=True,
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch_size,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=not on_gpu,
        disable_tqdm=True,
        logging_steps=10**6,
        gradient_checkpointing=opts.gradient_checkpointing,
        pmi_top_k=64,
        p_s_sample_size=16,
        adaptive_lambda=False,
        seed=0,
        dataloader_pin_memory=False,
    )
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    kwargs = {}
    if opts.qlora:
        from peft import prepare_model_for_kbit_training

        from etu_hf.modeling.bnb import four_bit_config

        kwargs = {"quantization_config": four_bit_config(), "device_map": {"": args.device}}
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, **kwargs)
    if opts.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=opts.gradient_checkpointing)
    forget = tokenize_and_block(forget_documents(400, seed=5), tok, opts.block_size)
    retain = tokenize_and_block(retain_documents(400, seed=5), tok, opts.block_size)
    timer = StepTimer()
    trainer = ETUTrainer(
        model=model,
        args=args,
        train_dataset=forget,
        retain_dataset=retain,
        processing_class=tok,
        peft_config=lora_config(model, r=opts.lora_r, alpha=2 * opts.lora_r, dropout=0.0),
        callbacks=[timer],
    )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    t = timer.times
    step_s = (t[-1] - t[opts.warmup - 1]) / (len(t) - opts.warmup)
    peak_mb = (
        torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) / 2**20
    result = {
        "name": opts.name,
        "rank": args.process_index,
        "world_size": args.world_size,
        "device": str(args.device),
        "seconds_per_step": step_s,
        "peak_memory_mb": peak_mb,
        "memory_kind": "cuda_allocated" if on_gpu else "process_peak_rss",
        "tokens_per_second": opts.batch_size * opts.block_size * args.world_size / step_s,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "batch_size": opts.batch_size,
        "block_size": opts.block_size,
        "final_training_pi_s": trainer.training_metrics["final_training_pi_s"],
    }
    path = opts.output_json.replace(".json", f".rank{args.process_index}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
