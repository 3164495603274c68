"""Helpers shared by test modules (fixtures live in conftest.py)."""

import os

import pytest

#: A test that starts two processes (torch.distributed on its default port 29500): under ``pytest -n auto`` two
#: of them never run at once (conftest.py's lock), so they never share the cores or the port.
TWO_PROCESSES = pytest.mark.two_processes

#: A test that times a whole run (the demo's 180 s): under ``pytest -n auto`` it runs while no other test runs
#: (conftest.py's lock), with the machine's threads (:func:`environment_as_given`).
WHOLE_MACHINE = pytest.mark.whole_machine

#: Set in os.environ by conftest.py when it set OMP_NUM_THREADS to a worker's share of the cores.
WORKER_OMP_FLAG = "ETU_HF_TESTS_WORKER_OMP_NUM_THREADS"


def environment_as_given() -> dict[str, str]:
    """``os.environ`` without the per-worker OMP_NUM_THREADS that conftest.py sets under ``pytest -n``: the
    environment of a process that has the machine to itself, as the user's shell gives it."""
    env = dict(os.environ)
    if env.pop(WORKER_OMP_FLAG, None):
        env.pop("OMP_NUM_THREADS", None)
    return env


def fast_args(output_dir, **kwargs):
    """ETUTrainingArguments for fast CPU tests: no saving, no reporting, no progress bar, no controller
    unless asked (it holds data out of training)."""
    from etu_hf import ETUTrainingArguments

    defaults = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=10,
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        # the piece-level set these tests' naive references are written for (one set everywhere); the
        # per-context defaults (words, continuations) have their own references in test_forbidden_context.py
        vs_method="pmi",
        forbid_continuations=False,
        pmi_top_k=64,
        pmi_min_count=5,
        p_s_sample_size=32,
        seed=0,
        dataloader_pin_memory=False,
        adaptive_lambda=False,
    )
    defaults.update(kwargs)
    return ETUTrainingArguments(**defaults)


LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def lora_trainer(model, tokenizer, corpora, args, **kwargs):
    """An ETUTrainer with a LoRA adapter (LORA) on the forget corpus, with retain data."""
    from peft import LoraConfig

    from etu_hf import ETUTrainer

    return ETUTrainer(
        model=model,
        args=args,
        train_dataset=corpora["forget"],
        retain_dataset=corpora["retain"],
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        **kwargs,
    )


def cli_flags(tmp_path, forget, retain, *extra, steps=2):
    """`etu-hf unlearn` flags for a tiny CPU run of the demo model on the given corpora (``extra`` last)."""
    from etu_hf.demo import DEMO_MODEL_DIR

    return [
        "--model_name_or_path",
        DEMO_MODEL_DIR,
        "--forget_corpora",
        forget,
        "--retain_corpora",
        retain,
        "--output_dir",
        str(tmp_path / "run"),
        "--max_steps",
        str(steps),
        "--batch_size",
        "4",
        "--max_length",
        "64",
        *extra,
    ]


def make_read_only(path, monkeypatch):
    """chmod 555 ``path``; as root (which ignores permission bits) make etu-hf's write probe there fail as
    a read-only mount would."""
    import os
    import tempfile

    path.chmod(0o555)
    if os.access(path, os.W_OK):
        real = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and os.path.realpath(dir) == os.path.realpath(path):
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr("etu_hf.artifacts.output_dir.tempfile.mkstemp", refuse)


def audit_table(text: str) -> dict[str, list[str]]:
    """The rows of the card's audit table, by measure: ``{measure: [base, unlearned, notes]}``."""
    section = text.split("## Audit on held-out data", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| measure") and "---" not in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows
