"""Drop-in: a plain Trainer script keeps working with the two class names swapped: run_clm-style
evaluation (``compute_metrics`` with ``preprocess_logits_for_metrics``) included, and run twice into the
same output_dir as an unchanged script would be."""

import os
import subprocess
import sys

import pytest

from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import write_demo_corpora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A typical user script, as written for transformers.Trainer. {IMPORT}, {TRAINER} and {ARGS} are the
# only things that change between the two runs below.
SCRIPT = """
from itertools import chain
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling
{IMPORT}

tokenizer = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL)
raw = load_dataset("text", data_files={{"train": TRAIN, "validation": VALID}}, sample_by="paragraph")
tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])

def group_texts(examples, block_size=64):
    concatenated = {{k: list(chain(*examples[k])) for k in examples}}
    total = (len(concatenated["input_ids"]) // block_size) * block_size
    result = {{k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}}
    result["labels"] = result["input_ids"].copy()
    return result

lm = tokenized.map(group_texts, batched=True)

def preprocess_logits_for_metrics(logits, labels):  # as in transformers' run_clm.py
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)

def compute_metrics(eval_preds):  # run_clm.py's accuracy, without the `evaluate` package
    preds, labels = eval_preds
    labels = labels[:, 1:].reshape(-1)
    preds = preds[:, :-1].reshape(-1)
    keep = labels != -100
    return {{"accuracy": float((preds[keep] == labels[keep]).mean())}}

args = {ARGS}(output_dir=OUT, per_device_train_batch_size=4, max_steps=3, logging_steps=1, report_to="none",
              save_strategy="no", use_cpu=True)
trainer = {TRAINER}(model=model, args=args, train_dataset=lm["train"], eval_dataset=lm["validation"],
                    processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                    compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics)
trainer.train()
trainer.save_model()
METRICS = trainer.evaluate()
"""


@pytest.mark.filterwarnings("ignore:vs_method='pmi' without retain data")
@pytest.mark.parametrize("variant", ["transformers", "etu_hf"])
def test_plain_trainer_script_runs_with_names_swapped(tmp_path, variant):
    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    names = {
        "transformers": dict(
            IMPORT="from transformers import Trainer, TrainingArguments", TRAINER="Trainer", ARGS="TrainingArguments"
        ),
        "etu_hf": dict(
            IMPORT="from etu_hf import ETUTrainer, ETUTrainingArguments",
            TRAINER="ETUTrainer",
            ARGS="ETUTrainingArguments",
        ),
    }[variant]
    code = compile(SCRIPT.format(**names), "user_script.py", "exec")
    out = tmp_path / "out"
    for run in (1, 2):  # the unchanged script run again into the same output_dir
        scope = {"MODEL": DEMO_MODEL_DIR, "TRAIN": forget, "VALID": retain, "OUT": str(out)}
        exec(code, scope)
        metrics = scope["METRICS"]
        assert "eval_loss" in metrics, run
        assert 0.0 <= metrics["eval_accuracy"] <= 1.0, run  # compute_metrics on the preprocessed logits
        assert os.path.exists(out / "model.safetensors")
        if variant == "etu_hf":
            for name in ("pi_s", "q_s", "base_p_s", "lambda", "loss"):
                assert f"eval_etu/{name}" in metrics, (run, sorted(metrics))
            assert 0.0 <= metrics["eval_etu/pi_s"] <= 1.0
            assert os.path.exists(out / "V_S.ids.json")
            assert os.path.exists(out / "metrics.json")
    assert not any(name.startswith("_previous_run_") for name in os.listdir(out))  # the first run was replaced


def test_example_script_runs(tmp_path):
    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    cmd = [
        sys.executable,
        os.path.join(ROOT, "examples", "drop_in_trainer.py"),
        "--forget_file",
        forget,
        "--retain_file",
        retain,
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "3",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eval_etu/pi_s" in done.stdout
    assert os.path.exists(tmp_path / "out" / "adapter_model.safetensors") or os.path.exists(
        tmp_path / "out" / "model.safetensors"
    )
