"""A small ETU run with the adaptive controller, for tests that need fresh processes.

    python controller_run.py OUTPUT_DIR [--stop_at N] [--resume CHECKPOINT]     # one process
    torchrun --nproc_per_node 2 controller_run.py OUTPUT_DIR                    # DDP on CPU (gloo)

Writes history_rank{R}.json (this process's controller history) and, on rank 0, the adapter.
"""

import argparse
import json
import os

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from etu_hf import ETUTrainer, ETUTrainingArguments
from etu_hf.data.blocks import tokenize_and_block
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import forget_documents, retain_documents


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def heldout_blocks(tok):
    """Forget text the run never trains on (another seed), for the audit."""
    return tokenize_and_block(forget_documents(12, seed=77), tok, 64)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--max_steps", type=int, default=12)
    parser.add_argument("--stop_at", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--loss_chunk_size", type=int, default=1024)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--audit", action="store_true", help="audit the held-out slice in-process (all ranks)")
    opts = parser.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    forget = tokenize_and_block(forget_documents(120, seed=3), tok, 64)
    retain = tokenize_and_block(retain_documents(120, seed=3), tok, 64)
    args = ETUTrainingArguments(
        output_dir=opts.output_dir,
        max_steps=opts.max_steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lambda_mode="global",
        lambda_update_freq=2,
        lambda_eta=0.5,
        heldout_batches=3,
        per_device_eval_batch_size=4,
        save_strategy="steps",
        save_steps=opts.max_steps // 2,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        pmi_min_count=5,
        pmi_top_k=64,
        p_s_sample_size=16,
        seed=0,
        full_determinism=True,
        dataloader_pin_memory=False,
    )
    trainer = ETUTrainer(
        model=model,
        args=args,
        train_dataset=forget,
        retain_dataset=retain,
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
        callbacks=[StopAt(opts.stop_at)] if opts.stop_at else None,
    )
    trainer.train(resume_from_checkpoint=opts.resume)
    rank = args.process_index
    audit_mass = None
    if opts.audit:
        report = trainer.audit(forget_data=heldout_blocks(tok), num_samples=0, bootstrap_samples=10)
        audit_mass = report.updated_p_S
    with open(os.path.join(opts.output_dir, f"history_rank{rank}.json"), "w") as f:
        partitioned = any(hasattr(p, "ds_id") and p.numel() == 0 for p in trainer.model.parameters())
        json.dump(
            {
                "history": trainer.lambda_controller.history,
                "world_size": args.world_size,
                "zero3_partitioned": partitioned,
                "audit_updated_p_S": audit_mass,
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            },
            f,
        )
    trainer.save_model(os.path.join(opts.output_dir, "final"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
