"""Two CPU processes (gloo) under the shipped launch configs: DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Each run trains a few ETU steps with the adaptive controller; every rank must hold the same lambda
trajectory, ZeRO-3 must really partition the parameters, and the saved adapter, reloaded in this
(fresh) process, must give the audit mass measured in-process by the launched run. Each config is
launched once per module (``launched``): the DDP and ZeRO-3 runs that the launch test checks are the
ones whose trajectories are compared (the audit runs after training, so it leaves them unchanged).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import TWO_PROCESSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "controller_run.py")
sys.path.insert(0, os.path.dirname(SCRIPT))

pytestmark = TWO_PROCESSES


def cpu_config(name, tmp_path):
    """The shipped accelerate YAML, adapted for CPU as its header says (use_cpu: true)."""
    text = open(os.path.join(ROOT, "ds_configs", name)).read()
    assert "use_cpu: false" in text
    path = tmp_path / name
    path.write_text(text.replace("use_cpu: false", "use_cpu: true"))
    return str(path)


def launch(config, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [shutil.which("accelerate") or "accelerate", "launch", "--config_file", config, SCRIPT, str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    return [json.loads((out / f"history_rank{r}.json").read_text()) for r in (0, 1)]


def reload_and_audit(adapter_dir):
    from controller_run import heldout_blocks
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etu_hf import audit
    from etu_hf.demo import DEMO_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR), str(adapter_dir))
    report = audit(
        model,
        heldout_blocks(tok),
        os.path.join(adapter_dir, "V_S.ids.json"),
        epsilon=0.05,
        num_samples=0,
        bootstrap_samples=10,
        progress=False,
    )
    return report.updated_p_S


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``launched(config) -> (ranks, out)``: the shipped ``config`` launched once for this module (audited,
    loss chunks of 50 positions; ZeRO-3 also with gradient checkpointing), then served from the cache."""
    runs = {}

    def get(config):
        if config not in runs:
            if "zero" in config:
                pytest.importorskip("deepspeed")
            tmp = tmp_path_factory.mktemp(config.replace(".", "_"))
            extra = ["--audit", "--loss_chunk_size", "50"] + (["--gradient_checkpointing"] if "zero3" in config else [])
            runs[config] = (launch(cpu_config(config, tmp), tmp / "run", *extra), tmp / "run")
        return runs[config]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("config", ["accelerate_ddp.yaml", "accelerate_zero2.yaml", "accelerate_zero3.yaml"])
def test_two_process_launch(launched, config):
    ranks, out = launched(config)
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) == 6
    assert ranks[0]["zero3_partitioned"] is ("zero3" in config)
    assert ranks[0]["audit_updated_p_S"] == ranks[1]["audit_updated_p_S"]
    torch.manual_seed(0)
    fresh = reload_and_audit(out / "final")
    assert fresh == pytest.approx(ranks[0]["audit_updated_p_S"], abs=1e-6)


@pytest.mark.slow
def test_all_launchers_follow_the_same_trajectory(launched):
    """Same data, same seed: DDP and ZeRO-3 (gradient checkpointing, checkpointed loss chunks) agree."""
    pytest.importorskip("deepspeed")
    ddp, _ = launched("accelerate_ddp.yaml")
    z3, _ = launched("accelerate_zero3.yaml")
    assert z3[0]["zero3_partitioned"]
    assert z3[0]["losses"] == pytest.approx(ddp[0]["losses"], rel=1e-4)
    assert [h["heldout_mass"] for h in z3[0]["history"]] == pytest.approx(
        [h["heldout_mass"] for h in ddp[0]["history"]], abs=1e-5
    )


@pytest.mark.slow
def test_cli_with_a_deepspeed_json_under_torchrun(tmp_path):
    """`--deepspeed ds_configs/ds_zero3.json` with torchrun: DeepSpeed's process group is set up
    before the model loads (zero.Init partitions it while loading)."""
    pytest.importorskip("deepspeed")
    from etu_hf.demo.corpus import write_demo_corpora

    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    out = tmp_path / "z3json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        shutil.which("torchrun") or "torchrun",
        "--nproc_per_node",
        "2",
        shutil.which("etu-hf"),
        "unlearn",
        "--forget_corpora",
        forget,
        "--retain_corpora",
        retain,
        "--use_lora",
        "--lora_r",
        "8",
        "--max_steps",
        "3",
        "--max_length",
        "64",
        "--batch_size",
        "4",
        "--use_cpu",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--p_s_sample_size",  # the base p_S and the audit on a few sequences: what is checked is the setup
        "16",
        "--audit_max_sequences",
        "8",
        "--deepspeed",
        os.path.join(ROOT, "ds_configs", "ds_zero3.json"),
        "--output_dir",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and (out / "suppression_report.json").exists()
