"""A plain `transformers` causal-LM fine-tuning script, turned into an unlearning script.

The only change from the usual Trainer script is the import and the two class names:

    -from transformers import Trainer, TrainingArguments
    +from etu_hf import ETUTrainer, ETUTrainingArguments

The training data is then the *forget* data. Everything else (tokenization, `group_texts`, the
collator, `train()`, `save_model()`, `evaluate()`) is untouched. Two optional ETU additions are
marked below: a target mass `epsilon` and retain data, which makes the forbidden set V_S contrast
forget text against ordinary text (PMI) and keeps the model fluent.

    python examples/drop_in_trainer.py --forget_file etu-demo-output/demo_data/forget.txt \\
        --retain_file etu-demo-output/demo_data/retain.txt --output_dir drop-in-output

(`etu-hf demo` writes those two files.)
"""

import argparse
from itertools import chain

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

from etu_hf import ETUTrainer, ETUTrainingArguments
from etu_hf.demo import DEMO_MODEL_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=DEMO_MODEL_DIR)
    parser.add_argument("--forget_file", required=True, help="text file; documents separated by blank lines")
    parser.add_argument("--retain_file", default=None, help="optional retain text (ETU addition)")
    parser.add_argument("--output_dir", default="drop-in-output")
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--block_size", type=int, default=128)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)

    raw = load_dataset("text", data_files={"train": args.forget_file}, sample_by="paragraph")
    raw = raw["train"].train_test_split(test_size=0.1, seed=0)  # held-out forget documents for evaluate()
    if args.retain_file:  # ETU addition (optional)
        raw["retain"] = load_dataset("text", data_files=args.retain_file, sample_by="paragraph", split="train")

    def tokenize(batch):
        return tokenizer([t + tokenizer.eos_token for t in batch["text"]])

    def group_texts(examples):  # the classic run_clm.py preprocessing
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // args.block_size) * args.block_size
        result = {
            k: [t[i : i + args.block_size] for i in range(0, total, args.block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    lm = raw.map(tokenize, batched=True, remove_columns=["text"]).map(group_texts, batched=True)

    training_args = ETUTrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=8,
        max_steps=args.max_steps,
        learning_rate=3e-3,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        epsilon=0.05,  # ETU addition (optional): the target mass on V_S
    )
    trainer = ETUTrainer(
        model=model,
        args=training_args,
        train_dataset=lm["train"],
        eval_dataset=lm["test"],
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        retain_dataset=lm.get("retain"),  # ETU addition (optional): retain data
    )
    trainer.train()
    trainer.save_model()
    metrics = trainer.evaluate()
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


if __name__ == "__main__":
    main()
