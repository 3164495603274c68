"""A GGUF file as an ordinary transformers model folder.

transformers reads GGUF checkpoints (``from_pretrained(folder, gguf_file=NAME)``, with the ``gguf``
package) and dequantizes them to floating point, but such a model refuses ``save_pretrained`` ("quantized
with gguf and is not serializable"). :func:`convert_gguf` loads the file that way, builds a fresh model of
the same class from the config with ``quantization_config`` removed, gives it the dequantized state dict
(every key must match: nothing is initialised at random) and saves model, tokenizer (with its chat
template) and generation config as a normal folder that ``from_pretrained(folder)`` and etu-hf read.

The values are those of the dequantized GGUF (for a Q4_1 file: ``d * q + m`` per block), saved in
``dtype`` (float32 keeps them exactly; bfloat16 halves the size and rounds them).
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Any

logger = logging.getLogger(__name__)

#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "bfloat16", "float16")


def check_gguf_file(path: str, flag: str = "--gguf_file") -> None:
    """``ValueError`` naming ``flag`` unless ``path`` is a readable file that starts like a GGUF file
    (magic ``GGUF`` and a version number); checked before anything is loaded or written."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: {path!r} is not a file; give the path of a .gguf file")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ValueError(
            f"{flag}: {path!r} is not a GGUF file (it does not start with the GGUF magic bytes); the download may be "
            "corrupted: fetch it again"
        )
    version = struct.unpack("<I", head[4:8])[0]
    if not 1 <= version <= 3:
        raise ValueError(f"{flag}: {path!r} has GGUF version {version}; transformers reads versions 1-3")


def require_gguf_package() -> None:
    """``ImportError`` with the install command when the ``gguf`` package (transformers' GGUF reader) is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError("reading a GGUF file needs the 'gguf' package: pip install gguf") from err


def convert_gguf(gguf_path: str, output_dir: str, dtype: str = "float32", overwrite: bool = False) -> str:
    """Convert the GGUF checkpoint ``gguf_path`` into a transformers folder ``output_dir`` (model weights in
    ``dtype``, config without ``quantization_config``, tokenizer, generation config). Returns ``output_dir``.

    Refuses, before writing anything, a missing or non-GGUF file, a missing ``gguf`` package, an unknown
    ``dtype`` and an existing non-empty ``output_dir`` unless ``overwrite``. The folder is written under a
    temporary name and renamed when complete, so a failure leaves no half-written model behind.
    """
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    check_gguf_file(gguf_path)
    require_gguf_package()
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(
            f"--output_dir: {output_dir!r} exists and is not empty; remove it or pass --overwrite to replace it"
        )
    folder, name = os.path.split(os.path.abspath(gguf_path))
    logger.info("reading %s (dequantized by transformers)", gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # the gguf reader raises many types on a damaged file
        raise ValueError(f"--gguf_file: transformers could not read {gguf_path!r} ({err}); fetch it again") from err
    model = _plain_copy(loaded, getattr(torch, dtype))
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a model folder is not
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %s (%s, %d parameters)", output_dir, dtype, sum(p.numel() for p in model.parameters()))
    return output_dir


def _plain_copy(loaded: Any, dtype: Any) -> Any:
    """A model of ``loaded``'s class built from its config without ``quantization_config``, holding exactly
    its (dequantized) weights in ``dtype``; ``RuntimeError`` if any key is missing or unexpected."""
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = type(loaded)(config)
    state = loaded.state_dict()
    result = model.load_state_dict(state, strict=False)
    # a tied head appears in neither list when the tie holds; anything else means a layout mismatch
    missing = [k for k in result.missing_keys if not _is_tied(model, k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the GGUF weights do not match {type(loaded).__name__}: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.to(dtype)


def _is_tied(model: Any, key: str) -> bool:
    head = model.get_output_embeddings()
    return (
        getattr(model.config, "tie_word_embeddings", False)
        and head is not None
        and key.endswith("weight")
        and key.rsplit(".", 1)[0] in {n for n, m in model.named_modules() if m is head}
    )
