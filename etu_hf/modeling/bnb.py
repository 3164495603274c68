"""4-bit loading through bitsandbytes (an optional extra: ``pip install 'etu-hf[bnb]'``).

bitsandbytes is imported only when a 4-bit model is asked for, and its absence is an error that names
the flag and the fix.
"""

from __future__ import annotations

from typing import Any


def require_bitsandbytes(flag: str = "--load_in_4bit") -> Any:
    """Import bitsandbytes or raise ``ImportError`` naming ``flag`` and the install command."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"{flag} needs bitsandbytes, which is not installed: pip install 'etu-hf[bnb]' (or drop {flag})."
        ) from err
    return bitsandbytes


def four_bit_config(compute_dtype: Any = None, flag: str = "--load_in_4bit") -> Any:
    """``BitsAndBytesConfig`` for nf4 4-bit weights with double quantisation (the QLoRA recipe).

    ``compute_dtype`` defaults to bfloat16 on a GPU and float32 on CPU.
    """
    import torch
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(flag)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def disable_cpu_repacking(model: Any) -> int:
    """Keep bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16/AMX an eval-mode, no-grad forward of a ``Linear4bit`` repacks its weight
    in place into a layout without autograd: LoRA gradients through that layer are then silently
    wrong, and layers whose width is not a multiple of the quantisation block fail outright.
    Setting ``support_avx512bf16_for_cpu = False`` on every such layer before any forward avoids
    both. Returns the number of layers changed. A no-op for models without 4-bit layers.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def has_4bit_layers(model: Any) -> bool:
    """True when the model holds bitsandbytes 4-bit linear layers (checked without importing bitsandbytes)."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def prepare_4bit_model(model: Any) -> Any:
    """What every 4-bit model needs before its first forward here: no CPU repacking (see
    :func:`disable_cpu_repacking`), and on CPU a warning when OpenMP is left at its spinning default."""
    import logging
    import os

    import torch

    if not has_4bit_layers(model):
        return model
    disable_cpu_repacking(model)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not (os.environ.get("OMP_WAIT_POLICY") or os.environ.get("OMP_NUM_THREADS")):
        logging.getLogger(__name__).warning(
            "4-bit model on CPU: torch and bitsandbytes each bring an OpenMP runtime, which can make training much "
            "slower; start Python with OMP_WAIT_POLICY=PASSIVE or OMP_NUM_THREADS=1 (the etu-hf command does this "
            "itself). torch uses %d threads.",
            torch.get_num_threads(),
        )
    return model
