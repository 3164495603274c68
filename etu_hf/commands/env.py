"""``etu-hf env``: what is installed, what hardware there is, and settings that fit it.

The suggestions are rules of thumb, not measurements: a model of ``P`` parameters needs about
``2P`` bytes of weights in bf16 and ``~0.55P`` in 4-bit nf4; LoRA adds little besides activations,
which scale with batch size x length. They are printed with the numbers they come from.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
from collections.abc import Sequence
from typing import Any

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes", "matplotlib")

EXTRAS = {"deepspeed": "deepspeed", "bnb": "bitsandbytes"}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def hardware() -> dict[str, Any]:
    """Device, memory and bf16 support."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "ram_gb": round((_ram_bytes() or 0) / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        info.update(
            device="cuda",
            gpus=[p.name for p in props],
            gpu_memory_gb=[round(p.total_memory / 2**30, 1) for p in props],
            bf16=torch.cuda.is_bf16_supported(),
        )
    else:
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.ones(2, 2) @ torch.ones(2, 2)
            bf16 = True
        except RuntimeError:
            bf16 = False
        info.update(device="cpu", gpus=[], gpu_memory_gb=[], bf16=bf16)
    return info


def model_parameters(model_name_or_path: str) -> int:
    """Parameter count of a model from its config alone (built on the meta device, no weights loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from etu_hf.modeling.paths import check_model_path, load_failure

    check_model_path(model_name_or_path, "--model_name_or_path", weights=False, config=True)
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        raise load_failure(model_name_or_path, "--model_name_or_path", "config.json", err) from err
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


#: The measured LoRA rank: ``etu-hf env`` suggests it whatever the memory, and it is the default of
#: ``etu-hf unlearn --lora_r`` and ``etu-hf compare --lora_r``. On SmolLM2's knowledge benchmark r=4 forgot less
#: than r=16 and r=64 forgot the same while losing 8% of the general knowledge (BENCHMARKS.md, "Learning rate,
#: adapter layers, rank and seed"). Kept here because this module imports nothing heavy.
SUGGESTED_LORA_R = 16


def suggest(hw: dict[str, Any], params: int | None) -> dict[str, Any]:
    """Rules of thumb for this hardware (and model size, when known)."""
    memory = (min(hw["gpu_memory_gb"]) if hw["gpu_memory_gb"] else hw["ram_gb"]) * 2**30
    size = ""
    if params:
        size = f", {params / 1e9:.2f}B parameters" if params >= 1e9 else f", {params / 1e6:.1f}M parameters"
    out: dict[str, Any] = {"based_on": f"{memory / 2**30:.0f} GB per device{size}"}
    if params is None:
        out.update(
            use_lora=True,
            lora_r=SUGGESTED_LORA_R,
            per_device_train_batch_size=8 if memory > 40 * 2**30 else 4,
            note="give --model_name_or_path for size-aware suggestions",
        )
        return out
    bf16_weights, nf4_weights = 2 * params, 0.55 * params
    headroom = 0.6 * memory  # leave room for activations, LoRA states and the chunked loss
    if bf16_weights < headroom:
        out.update(use_qlora=False, use_lora=True, frozen_on_cpu=False)
    elif nf4_weights < headroom:
        out.update(use_qlora=True, use_lora=True, frozen_on_cpu=False)
    else:
        out.update(
            use_qlora=True,
            use_lora=True,
            deepspeed="ds_configs/accelerate_zero3.yaml with CPU offload",
            note="the model does not fit one device even in 4-bit: shard it (ZeRO-3) or use a bigger device",
        )
    spare = headroom - (nf4_weights if out["use_qlora"] else bf16_weights)
    out["per_device_train_batch_size"] = max(1, min(16, int(spare / max(params * 0.25, 1))))
    out["lora_r"] = SUGGESTED_LORA_R
    out["gradient_checkpointing"] = out["per_device_train_batch_size"] < 4
    out["bf16"] = bool(hw["bf16"]) and hw["device"] == "cuda"
    out["frozen_on_cpu_if_full_finetune"] = 2 * bf16_weights > headroom
    return out


def report(model_name_or_path: str | None = None) -> dict[str, Any]:
    """Everything ``etu-hf env`` prints, as a dict."""
    import etu_hf

    hw = hardware()
    params = model_parameters(model_name_or_path) if model_name_or_path else None
    return {
        "etu_hf": etu_hf.__version__,
        "versions": {name: _version(name) for name in PACKAGES},
        "extras": {extra: importlib.util.find_spec(mod) is not None for extra, mod in EXTRAS.items()},
        "hardware": hw,
        "model_parameters": params,
        "suggested": suggest(hw, params),
    }


def format_report(data: dict[str, Any]) -> str:
    """The text ``etu-hf env`` prints for :func:`report`'s dict."""
    lines = [f"etu-hf {data['etu_hf']}", "", "packages:"]
    lines += [f"  {k:<13} {v or 'not installed'}" for k, v in data["versions"].items()]
    lines += [
        "",
        "extras: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in data["extras"].items()),
        "",
        "hardware:",
    ]
    lines += [f"  {k:<13} {v}" for k, v in data["hardware"].items()]
    if data["model_parameters"]:
        lines += ["", f"model: {data['model_parameters']:,} parameters"]
    lines += ["", "suggested settings (rules of thumb):"]
    lines += [f"  {k:<31} {v}" for k, v in data["suggested"].items()]
    return "\n".join(lines)


def cmd(argv: Sequence[str]) -> int:
    """``etu-hf env [--model_name_or_path M] [--json]``: versions, hardware and suggested settings."""
    parser = argparse.ArgumentParser(prog="etu-hf env", description="Versions, hardware and suggested settings.")
    parser.add_argument("--model_name_or_path", default=None, help="size-aware suggestions for this model")
    parser.add_argument("--json", action="store_true", help="print JSON")
    opts = parser.parse_args(list(argv))
    data = report(opts.model_name_or_path)
    print(json.dumps(data, indent=2) if opts.json else format_report(data))
    return 0
