"""etu-hf: Exponential-Tilted Unlearning for the Hugging Face training stack.

Swap ``Trainer``/``TrainingArguments`` for :class:`ETUTrainer`/:class:`ETUTrainingArguments`, give
forget data (and optionally retain data) and a target mass ``epsilon``; the trained model puts at most
``epsilon`` probability on the forbidden token set V_S while staying as close as possible to the base
model: the base model exponentially tilted away from V_S.

Names are imported on first use, so ``import etu_hf`` (and the ``etu-hf`` command) stays light until
torch is really needed; the command sets process-wide settings (OpenMP for 4-bit CPU runs) first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdaptiveLambdaCallback": "etu_hf.controller",
    "AuditReport": "etu_hf.auditing",
    "ETUTrainer": "etu_hf.trainer",
    "ETUTrainingArguments": "etu_hf.config",
    "ForbiddenSet": "etu_hf.forbidden_set",
    "MassResult": "etu_hf.evaluation",
    "NPOConfig": "etu_hf.preference.npo",
    "NPOTrainer": "etu_hf.preference.npo",
    "PerplexityResult": "etu_hf.evaluation",
    "TiltSpec": "etu_hf.tilt",
    "TiltedKLOutput": "etu_hf.losses",
    "adapters_disabled": "etu_hf.evaluation",
    "audit": "etu_hf.auditing",
    "build_forbidden_set": "etu_hf.forbidden_set",
    "chunked_nll": "etu_hf.losses",
    "closed_form_lambda": "etu_hf.tilt",
    "evaluate_mass": "etu_hf.evaluation",
    "evaluate_perplexity": "etu_hf.evaluation",
    "forbidden_mass": "etu_hf.tilt",
    "per_position_lambda": "etu_hf.tilt",
    "tilted_kl_loss": "etu_hf.losses",
    "tilted_log_probs": "etu_hf.tilt",
    "tilted_mass": "etu_hf.tilt",
}

__all__ = [
    "AdaptiveLambdaCallback",
    "AuditReport",
    "ETUTrainer",
    "ETUTrainingArguments",
    "ForbiddenSet",
    "MassResult",
    "NPOConfig",
    "NPOTrainer",
    "PerplexityResult",
    "TiltSpec",
    "TiltedKLOutput",
    "adapters_disabled",
    "audit",
    "build_forbidden_set",
    "chunked_nll",
    "closed_form_lambda",
    "evaluate_mass",
    "evaluate_perplexity",
    "forbidden_mass",
    "per_position_lambda",
    "tilted_kl_loss",
    "tilted_log_probs",
    "tilted_mass",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'etu_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs
    from etu_hf.auditing import AuditReport, audit
    from etu_hf.config import ETUTrainingArguments
    from etu_hf.controller import AdaptiveLambdaCallback
    from etu_hf.evaluation import MassResult, PerplexityResult, adapters_disabled, evaluate_mass, evaluate_perplexity
    from etu_hf.forbidden_set import ForbiddenSet, build_forbidden_set
    from etu_hf.losses import TiltedKLOutput, chunked_nll, tilted_kl_loss
    from etu_hf.preference.npo import NPOConfig, NPOTrainer
    from etu_hf.tilt import (
        TiltSpec,
        closed_form_lambda,
        forbidden_mass,
        per_position_lambda,
        tilted_log_probs,
        tilted_mass,
    )
    from etu_hf.trainer import ETUTrainer
