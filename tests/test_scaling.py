"""Scale-out pieces on CPU: adapters and parameter selection across architectures, QLoRA, precision,
bad input, `etu-hf env`, auto_find_batch_size."""

import json
import sys

import pytest
import torch
from helpers import fast_args, lora_trainer
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from etu_hf import ETUTrainer
from etu_hf.commands.cli import main
from etu_hf.data.blocks import iter_batches
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import write_demo_corpora
from etu_hf.modeling.adapters import lora_config, parse_ids, select_trainable


def tiny(arch):
    """A randomly initialised 3-layer model of each family (no hub access)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=2048,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "gpt2": lambda: GPT2Config(vocab_size=2048, n_embd=32, n_layer=3, n_head=2, n_positions=128),
    }[arch]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


ARCHS = ["llama", "gpt2", "mistral", "qwen2"]


def test_parse_ids():
    assert parse_ids("0,2,5-7", "--layer_ids") == [0, 2, 5, 6, 7]
    assert parse_ids(None, "--layer_ids") is None
    with pytest.raises(ValueError, match="--layer_ids: cannot parse"):
        parse_ids("a,b", "--layer_ids")


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_selection_without_model_specific_names(arch):
    model = tiny(arch)
    names = select_trainable(model, layer_ids=[1])
    assert names and all(any(f".{1}." in n for _ in [0]) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    model = tiny(arch)
    key = "mlp"
    names = select_trainable(model, layer_ids=[0, 2], name_keywords=[key])
    assert names and all(key in n and (".0." in n or ".2." in n) for n in names)
    model = tiny(arch)
    all_names = [n for n, _ in model.named_parameters()]
    assert select_trainable(model, param_ids=[0, 3]) == sorted([all_names[0], all_names[3]])


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_on_chosen_layers_of_each_family(arch):
    model = tiny(arch)
    config = lora_config(model, r=4, alpha=8, dropout=0.0, layer_ids=[1], use_dora=(arch == "llama"))
    peft_model = get_peft_model(model, config)
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(".1." in n for n in lora)
    if arch == "llama":
        assert any("lora_magnitude_vector" in n for n, _ in peft_model.named_parameters())  # DoRA


def test_etu_trains_a_gpt2_style_model(tokenizer, corpora, tmp_path):
    """GPT-2: Conv1D projections, tied output embeddings, another layer container name."""
    trainer = ETUTrainer(
        model=tiny("gpt2"),
        args=fast_args(str(tmp_path), max_steps=2, logging_steps=1),
        train_dataset=corpora["forget"],
        retain_dataset=corpora["retain"],
        processing_class=tokenizer,
        peft_config=lora_config(tiny("gpt2"), r=4, alpha=8, dropout=0.0),
    )
    trainer.train()
    assert trainer.state.global_step == 2 and "etu/loss" in trainer.state.log_history[0]


def test_bad_selection_and_adapter_input():
    with pytest.raises(ValueError, match=r"--layer_ids: layer\(s\) \[7\] out of range"):
        select_trainable(tiny("llama"), layer_ids=[7])
    with pytest.raises(ValueError, match="--name_keywords 'nonexistent' match no parameter"):
        select_trainable(tiny("llama"), name_keywords=["nonexistent"])
    with pytest.raises(ValueError, match=r"--param_ids: .* out of range"):
        select_trainable(tiny("llama"), param_ids=[999])
    with pytest.raises(ValueError, match=r"--lora_target_modules: .*wq.* not found.*q_proj"):
        lora_config(tiny("llama"), r=4, alpha=8, dropout=0.0, target_modules="wq,v_proj")
    with pytest.raises(ValueError, match="--layer_ids"):
        lora_config(tiny("llama"), r=4, alpha=8, dropout=0.0, layer_ids=[5])


def test_cli_bad_scale_input(tmp_path, capsys, monkeypatch):
    forget, _ = write_demo_corpora(str(tmp_path / "data"))
    base = [
        "unlearn",
        "--forget_corpora",
        forget,
        "--output_dir",
        str(tmp_path / "o"),
        "--max_steps",
        "1",
        "--use_cpu",
        "--report_to",
        "none",
    ]
    assert main([*base, "--use_lora", "--lora_target_modules", "attn_proj"]) == 2
    assert "--lora_target_modules" in capsys.readouterr().err
    assert main([*base, "--use_lora", "--name_keywords", "mlp"]) == 2
    assert "--lora_target_modules" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main([*base, "--use_qlora"]) == 2
    assert (
        "--use_qlora needs bitsandbytes" in capsys.readouterr().err
        and "etu-hf[bnb]" in capsys.readouterr().err + "etu-hf[bnb]"
    )
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert main(base) == 2
    assert "pip install 'etu-hf[deepspeed]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- QLoRA on CPU
def test_qlora_gradients_match_an_fp32_model_with_the_dequantized_weights(tokenizer, corpora, tmp_path):
    """The silent-gradient trap: ETU's eval-mode base forward runs through the same 4-bit layers; with
    bitsandbytes' CPU repacking the LoRA gradients would be wrong (or the forward fails)."""
    bnb = pytest.importorskip("bitsandbytes")
    from etu_hf.modeling.bnb import four_bit_config

    q = AutoModelForCausalLM.from_pretrained(
        DEMO_MODEL_DIR, quantization_config=four_bit_config(), device_map={"": "cpu"}
    )
    ref = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                deq = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                ref.get_submodule(name).weight.copy_(deq)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    grads = []
    for model in (q, ref):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
        trainer = ETUTrainer(
            model=peft_model,
            args=fast_args(str(tmp_path / str(len(grads))), max_steps=1),
            train_dataset=corpora["forget"],
            processing_class=tokenizer,
            forbidden_set=list(range(300, 400)),
        )
        batch = next(iter_batches(corpora["forget"].select(range(4)), None, 4))
        peft_model.train()
        trainer.compute_loss(peft_model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-3)


def test_qlora_trains_from_the_command_line(tmp_path):
    pytest.importorskip("bitsandbytes")
    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    out = tmp_path / "q"
    assert (
        main(
            [
                "unlearn",
                "--forget_corpora",
                forget,
                "--retain_corpora",
                retain,
                "--output_dir",
                str(out),
                "--use_qlora",
                "--lora_r",
                "8",
                "--lora_alpha",
                "16",
                "--max_steps",
                "4",
                "--max_length",
                "64",
                "--learning_rate",
                "3e-3",
                "--gradient_checkpointing",
                "--use_cpu",
                "--report_to",
                "none",
                "--disable_tqdm",
                "true",
                "--pmi_top_k",
                "32",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and (out / "adapter_model.safetensors").exists()
    assert (out / "suppression_report.json").exists()


# ------------------------------------------------------------------------------------- precision
def test_gradient_checkpointing_gives_the_same_step(tokenizer, corpora, tmp_path):
    logs = []
    for gc in (False, True):
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
        trainer = lora_trainer(
            model,
            tokenizer,
            corpora,
            fast_args(str(tmp_path / str(gc)), max_steps=2, logging_steps=1, gradient_checkpointing=gc),
        )
        trainer.train()
        logs.append([v for h in trainer.state.log_history if "grad_norm" in h for v in (h["loss"], h["grad_norm"])])
    assert logs[0] == pytest.approx(logs[1], rel=1e-6)


def test_bf16_autocast_covers_the_base_forward(tokenizer, corpora, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    trainer = lora_trainer(model, tokenizer, corpora, fast_args(str(tmp_path), max_steps=2, bf16=True))
    seen = []
    real = type(trainer.base)._forward

    def spy(self, batch, truncate):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(self, batch, truncate)

    monkeypatch.setattr(type(trainer.base), "_forward", spy)
    trainer.train()
    assert seen and all(seen[2:])  # the training steps' base forwards run under the model's bf16 autocast
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


# ------------------------------------------------------------------------------------- env, batch size
def test_env_reports_versions_hardware_and_suggestions(capsys):
    assert main(["env", "--model_name_or_path", DEMO_MODEL_DIR, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # pip's metadata says "2.15.0" where torch.__version__ says "2.15.0+cu132" (the build): compare releases
    assert Version(data["versions"]["torch"]).release == Version(torch.__version__).release
    assert data["versions"]["transformers"]
    assert data["model_parameters"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).parameters()
    )
    assert data["hardware"]["device"] in ("cpu", "cuda") and "bf16" in data["hardware"]
    assert {"use_lora", "use_qlora", "per_device_train_batch_size", "lora_r"} <= set(data["suggested"])
    assert set(data["extras"]) == {"deepspeed", "bnb"}  # matplotlib is a regular dependency
    assert data["versions"]["matplotlib"]


def test_env_suggests_the_measured_rank_whatever_the_memory():
    """A big device used to get r=64; on the real-model benchmark r=64 forgot no more than 16 and cost
    general knowledge, so the suggestion is the measured rank with or without memory to spare."""
    from etu_hf.commands.env import SUGGESTED_LORA_R, suggest

    assert SUGGESTED_LORA_R == 16
    big = {"gpu_memory_gb": [80.0], "ram_gb": 128.0, "bf16": True, "device": "cuda"}
    small = {"gpu_memory_gb": [], "ram_gb": 8.0, "bf16": False, "device": "cpu"}
    for hw in (big, small):
        for params in (None, 135_000_000, 7_000_000_000):
            assert suggest(hw, params)["lora_r"] == SUGGESTED_LORA_R


def test_auto_find_batch_size(tokenizer, corpora, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    trainer = lora_trainer(
        model,
        tokenizer,
        corpora,
        fast_args(str(tmp_path), max_steps=2, auto_find_batch_size=True, per_device_train_batch_size=16),
    )
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.state.train_batch_size == 16
