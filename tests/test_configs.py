"""The shipped launch configurations and example scripts: they parse and say how to use them."""

import glob
import json
import os
import subprocess

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.yaml"))))
def test_accelerate_configs_parse_and_document_their_command(path):
    text = open(path).read()
    assert text.startswith("#") and "accelerate launch --config_file ds_configs/" in text
    config = yaml.safe_load(text)
    assert config["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")
    if config["distributed_type"] == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] in (2, 3)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))))
def test_deepspeed_json_configs(path):
    config = json.load(open(path))
    assert "--deepspeed ds_configs/" in config["_comment"]
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"
    stage = config["zero_optimization"]["stage"]
    assert os.path.basename(path).startswith(f"ds_zero{stage}")
    assert ("offload" in path) == ("offload_optimizer" in config["zero_optimization"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "**", "*.sh"), recursive=True)))
def test_example_scripts_are_valid_bash(path):
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
