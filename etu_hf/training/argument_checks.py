"""Checks shared by every etu-hf config class (ETUTrainingArguments, NPOConfig, the DPO config of
``etu-hf refine``): run in ``__post_init__``, before anything is loaded or written, each error naming
the flag and the fix (docs/bad_inputs.md)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from typing import Any


def require_deepspeed_if_asked(deepspeed_arg: object) -> None:
    """A DeepSpeed run (``--deepspeed config.json`` or an accelerate DeepSpeed config) without the
    package is an error that names the fix, raised before anything is loaded."""
    import importlib.util

    asked = deepspeed_arg is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if asked and importlib.util.find_spec("deepspeed") is None:
        source = "--deepspeed" if deepspeed_arg is not None else "the accelerate config (distributed_type DEEPSPEED)"
        raise ValueError(f"{source} asks for DeepSpeed, which is not installed: pip install 'etu-hf[deepspeed]'.")


_AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")


def _declared_kind(hint: Any) -> type | None:
    """``float``, ``int`` or ``bool`` for a field declared as one of them (or ``X | None``), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    return hint if hint in (float, int, bool) else None


def check_training_arguments(args: Any) -> None:
    """Checks that every config class of etu-hf runs first in ``__post_init__`` (ETUTrainingArguments,
    NPOConfig and the DPO config of ``etu-hf refine``), so bad values fail before anything is loaded.

    - A field declared ``float``/``int`` holds a number of that kind: a string (``epsilon="0.05"``), a
      bool, or ``1.5`` for an integer is a ``TypeError`` naming the field; a string for a ``bool`` field
      too (``"false"`` would be true).
    - Every float is finite: nan or inf in ``lambda_max``, ``retain_weight``, ``learning_rate``, ...
      would silently turn a clamp or a loss term off.
    - ``learning_rate >= 0``; batch sizes and ``gradient_accumulation_steps`` >= 1.
    """
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if value is None:
            continue
        kind = _declared_kind(hints.get(f.name))
        if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"{f.name}: must be a number, got {value!r} ({type(value).__name__}); pass e.g. 0.05")
        if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{f.name}: must be an integer, got {value!r} ({type(value).__name__})")
        if kind is bool and isinstance(value, str):
            raise TypeError(f"{f.name}: must be True or False, got the string {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}: must be a finite number, got {value!r}")
    if args.learning_rate < 0:
        raise ValueError(f"learning_rate: must be >= 0, e.g. 1e-4 (got {args.learning_rate!r})")
    for name in _AT_LEAST_ONE:
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1 (got {getattr(args, name)!r})")
