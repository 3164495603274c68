"""Shared fixtures: the shipped tiny Llama, its tokenizer, and small generated corpora.

Tests never touch the network: the hub libraries are put in offline mode before anything imports them.
"""

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from helpers import WORKER_OMP_FLAG

from etu_hf.demo import DEMO_MODEL_DIR

#: pytest-xdist workers in this run (1 without xdist): the cores are shared among them.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
#: torch threads of this test process: its share of the cores, at most 2 (the tiny model gains nothing from more).
TORCH_THREADS = max(1, min(2, (os.cpu_count() or 1) // XDIST_WORKERS))
torch.set_num_threads(TORCH_THREADS)
if XDIST_WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    # processes the tests start get the same share (a test's own env setting wins); WHOLE_MACHINE tests
    # start theirs without it (helpers.environment_as_given)
    os.environ["OMP_NUM_THREADS"] = str(TORCH_THREADS)
    os.environ[WORKER_OMP_FLAG] = "1"


def _run_lock_path(config) -> str | None:
    """The prefix of this ``-n`` run's lock files (None without workers)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or XDIST_WORKERS < 2:
        return None
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"etu-hf-tests-{workerinput['testrunuid']}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under ``-n``, while a test runs (setup, call, teardown) it holds this run's lock files:

    - ``.lock``: shared; exclusive for a ``whole_machine`` test, which so runs while no other test runs. The
      ``.gate`` in front of it keeps a waiting exclusive test from being starved: a test takes the gate only to
      take the lock, an exclusive one keeps it until it is done, so the tests after it wait at the gate.
    - ``.two_processes``: exclusive, for a ``two_processes`` test only, so two of them never share the cores
      or torch.distributed's default port 29500.
    """
    prefix = _run_lock_path(item.config)
    if prefix is None:
        yield
        return
    import fcntl

    exclusive = item.get_closest_marker("whole_machine") is not None
    with contextlib.ExitStack() as held:
        gate, lock = (held.enter_context(open(prefix + suffix, "a")) for suffix in (".gate", ".lock"))
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        if item.get_closest_marker("two_processes") is not None:
            fcntl.flock(held.enter_context(open(prefix + ".two_processes", "a")), fcntl.LOCK_EX)
        yield  # closing the files releases the locks


def pytest_sessionfinish(session):
    """A worker done with its tests removes the run's lock files (a worker still running needs no lock now)."""
    prefix = _run_lock_path(session.config)
    if prefix is not None:
        for suffix in (".gate", ".lock", ".two_processes"):
            with contextlib.suppress(OSError):
                os.remove(prefix + suffix)


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
