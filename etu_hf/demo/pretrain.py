"""Build the demo's tiny causal LM: a byte-level BPE tokenizer and a ~1.3M-parameter Llama.

This is how ``etu_hf/demo/assets/tiny-llama`` was made; the checkpoint is shipped so that nobody has
to rerun it (about three minutes on two CPU cores)::

    python -m etu_hf.demo.pretrain --output_dir etu_hf/demo/assets/tiny-llama

The model is pretrained with the plain ``transformers.Trainer`` on documents of every topic of
:mod:`etu_hf.demo.corpus` (seed :data:`~etu_hf.demo.corpus.PRETRAIN_SEED`), so it "knows" the forget
topic that the demo then removes.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from etu_hf.demo.corpus import FORGET_TOPIC, PRETRAIN_SEED, RETAIN_TOPICS, generate_documents

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=512,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="etu_hf/demo/assets/tiny-llama")
    parser.add_argument("--forget_docs", type=int, default=6000)
    parser.add_argument("--retain_docs_per_topic", type=int, default=3000)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=PRETRAIN_SEED)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

    from etu_hf.data.blocks import tokenize_and_block

    texts = generate_documents(FORGET_TOPIC, args.forget_docs, args.seed)
    for topic in RETAIN_TOPICS:
        texts += generate_documents(topic, args.retain_docs_per_topic, args.seed)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    blocks = tokenize_and_block(texts, tokenizer, block_size=args.block_size)
    print(f"{len(texts)} documents -> {len(blocks)} blocks of {args.block_size} tokens, |V|={len(tokenizer)}")

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"parameters: {model.num_parameters():,}")
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=32,
            num_train_epochs=args.epochs,
            learning_rate=3e-3,
            warmup_steps=50,
            lr_scheduler_type="cosine",
            weight_decay=0.01,
            logging_steps=50,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=args.seed,
        )
        Trainer(model=model, args=targs, train_dataset=blocks, data_collator=default_data_collator).train()
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
