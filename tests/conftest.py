"""Shared fixtures: the shipped tiny Llama, its tokenizer, and small generated corpora.

Tests never touch the network: the hub libraries are put in offline mode before anything imports them.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from etu_hf.demo import DEMO_MODEL_DIR

#: pytest-xdist workers in this run (1 without xdist): the cores are shared among them.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
#: torch threads of this test process: its share of the cores, at most 2 (the tiny model gains nothing from more).
TORCH_THREADS = max(1, min(2, (os.cpu_count() or 1) // XDIST_WORKERS))
torch.set_num_threads(TORCH_THREADS)
if XDIST_WORKERS > 1:  # processes the tests start get the same share (a test's own env setting wins)
    os.environ.setdefault("OMP_NUM_THREADS", str(TORCH_THREADS))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


@pytest.fixture
def model():
    """A fresh copy of the shipped tiny Llama (1.3M parameters, |V| = 2048)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)


@pytest.fixture(scope="session")
def corpora(tokenizer):
    """Token blocks of generated text: forget/retain for training, and held-out ones (other seeds)."""
    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.demo.corpus import forget_documents, retain_documents

    return {
        "forget": tokenize_and_block(forget_documents(300, seed=11), tokenizer, 64),
        "retain": tokenize_and_block(retain_documents(300, seed=11), tokenizer, 64),
        "forget_heldout": tokenize_and_block(forget_documents(40, seed=999), tokenizer, 64),
        "retain_heldout": tokenize_and_block(retain_documents(40, seed=999), tokenizer, 64),
    }


@pytest.fixture
def make_args(tmp_path):
    """Factory of ETUTrainingArguments for fast CPU tests (see helpers.fast_args), in this test's tmp_path."""
    from helpers import fast_args

    def make(**kwargs):
        kwargs.setdefault("output_dir", str(tmp_path / "out"))
        return fast_args(**kwargs)

    return make


METRICS_KEYS = (
    "epsilon",
    "base_p_S",
    "lambda",
    "V_S_size",
    "V_S_fraction",
    "steps",
    "training_duration_seconds",
    "final_training_pi_s",
)
HELDOUT_KEYS = (
    "base_p_S",
    "updated_p_S",
    "base_perplexity",
    "updated_perplexity",
    "perplexity_ratio",
    "target_achieved",
    "positions",
    "sequences",
)


@pytest.fixture
def check_metrics_schema():
    """Assert the documented keys of metrics.json (and of its CLI-only ``heldout`` section)."""

    def check(metrics, heldout=False):
        for key in METRICS_KEYS:
            assert key in metrics, key
        if heldout:
            for key in HELDOUT_KEYS:
                assert key in metrics["heldout"], key

    return check


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpora, tokenizer):
    """A LoRA adapter trained for a few steps on the tiny model, saved as an ETU output folder."""
    from helpers import fast_args
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from etu_hf import ETUTrainer

    out = tmp_path_factory.mktemp("trained")
    args = fast_args(
        str(out), max_steps=30, p_s_sample_size=16, logging_steps=10, adaptive_lambda=True, lambda_update_freq=10
    )
    trainer = ETUTrainer(
        model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
        args=args,
        train_dataset=corpora["forget"],
        retain_dataset=corpora["retain"],
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    trainer.train()
    trainer.save_model()
    return trainer, out


@pytest.fixture(autouse=True)
def _restore_transformers_verbosity():
    """`etu-hf ... --log_level info` run in-process sets transformers' verbosity for the whole process
    (as a command should); put it back so later tests do not log to a stream pytest has closed."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(level)
