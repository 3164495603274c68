"""etu-hf: Exponential-Tilted Unlearning for the Hugging Face training stack.

Swap ``Trainer``/``TrainingArguments`` for :class:`ETUTrainer`/:class:`ETUTrainingArguments`, give
forget data (and optionally retain data) and a target mass ``epsilon``; the trained model puts at most
``epsilon`` probability on the forbidden token set V_S while staying as close as possible to the base
model: the base model exponentially tilted away from V_S.

Names are imported on first use, so ``import etu_hf`` (and the ``etu-hf`` command) stays light until
torch is really needed; the command sets process-wide settings (OpenMP for 4-bit CPU runs) first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from etu_hf._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "AdaptiveLambdaCallback": "etu_hf.training.controller",
    "AuditReport": "etu_hf.evaluation.report",
    "BaselineTrainingArguments": "etu_hf.training.baselines",
    "BenchmarkEvaluator": "etu_hf.evaluation.unlearning",
    "ETUTrainer": "etu_hf.training.trainer",
    "ETUTrainingArguments": "etu_hf.training.config",
    "ForbiddenSet": "etu_hf.forbidden_set",
    "GradAscentTrainer": "etu_hf.training.baselines",
    "GradDiffTrainer": "etu_hf.training.baselines",
    "MassResult": "etu_hf.evaluation.measures",
    "NPOBaselineTrainer": "etu_hf.training.baselines",
    "NPOConfig": "etu_hf.training.npo",
    "NPOTrainer": "etu_hf.training.npo",
    "PerplexityResult": "etu_hf.evaluation.measures",
    "SimNPOBaselineTrainer": "etu_hf.training.baselines",
    "TiltSpec": "etu_hf.ops.tilt",
    "TiltedKLOutput": "etu_hf.ops.chunked",
    "UNDIALTrainer": "etu_hf.training.baselines",
    "UNLEARNING_METHODS": "etu_hf.training.baselines",
    "UnlearningEval": "etu_hf.evaluation.unlearning",
    "adapters_disabled": "etu_hf.modeling.base",
    "audit": "etu_hf.evaluation.audit",
    "build_forbidden_set": "etu_hf.forbidden_set",
    "evaluate_benchmark": "etu_hf.evaluation.unlearning",
    "load_benchmark": "etu_hf.benchmark",
    "chunked_nll": "etu_hf.ops.chunked",
    "closed_form_lambda": "etu_hf.ops.tilt",
    "evaluate_mass": "etu_hf.evaluation.measures",
    "evaluate_perplexity": "etu_hf.evaluation.measures",
    "forbidden_mass": "etu_hf.ops.tilt",
    "load_unlearned": "etu_hf.hub.load",
    "merge_adapter": "etu_hf.modeling.merge",
    "per_position_lambda": "etu_hf.ops.tilt",
    "tilted_kl_loss": "etu_hf.ops.chunked",
    "tilted_log_probs": "etu_hf.ops.tilt",
    "tilted_mass": "etu_hf.ops.tilt",
    "trainer_class": "etu_hf.training.baselines",
}

__all__ = [
    "UNLEARNING_METHODS",
    "AdaptiveLambdaCallback",
    "AuditReport",
    "BaselineTrainingArguments",
    "BenchmarkEvaluator",
    "ETUTrainer",
    "ETUTrainingArguments",
    "ForbiddenSet",
    "GradAscentTrainer",
    "GradDiffTrainer",
    "MassResult",
    "NPOBaselineTrainer",
    "NPOConfig",
    "NPOTrainer",
    "PerplexityResult",
    "SimNPOBaselineTrainer",
    "TiltSpec",
    "TiltedKLOutput",
    "UNDIALTrainer",
    "UnlearningEval",
    "adapters_disabled",
    "audit",
    "build_forbidden_set",
    "chunked_nll",
    "closed_form_lambda",
    "evaluate_benchmark",
    "evaluate_mass",
    "evaluate_perplexity",
    "forbidden_mass",
    "load_benchmark",
    "load_unlearned",
    "merge_adapter",
    "per_position_lambda",
    "tilted_kl_loss",
    "tilted_log_probs",
    "tilted_mass",
    "trainer_class",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # for type checkers and IDEs
    from etu_hf.benchmark import load_benchmark
    from etu_hf.evaluation.audit import audit
    from etu_hf.evaluation.measures import MassResult, PerplexityResult, evaluate_mass, evaluate_perplexity
    from etu_hf.evaluation.report import AuditReport
    from etu_hf.evaluation.unlearning import BenchmarkEvaluator, UnlearningEval, evaluate_benchmark
    from etu_hf.forbidden_set import ForbiddenSet, build_forbidden_set
    from etu_hf.hub.load import load_unlearned
    from etu_hf.modeling.base import adapters_disabled
    from etu_hf.modeling.merge import merge_adapter
    from etu_hf.ops.chunked import TiltedKLOutput, chunked_nll, tilted_kl_loss
    from etu_hf.ops.tilt import (
        TiltSpec,
        closed_form_lambda,
        forbidden_mass,
        per_position_lambda,
        tilted_log_probs,
        tilted_mass,
    )
    from etu_hf.training.baselines import (
        UNLEARNING_METHODS,
        BaselineTrainingArguments,
        GradAscentTrainer,
        GradDiffTrainer,
        NPOBaselineTrainer,
        SimNPOBaselineTrainer,
        UNDIALTrainer,
        trainer_class,
    )
    from etu_hf.training.config import ETUTrainingArguments
    from etu_hf.training.controller import AdaptiveLambdaCallback
    from etu_hf.training.npo import NPOConfig, NPOTrainer
    from etu_hf.training.trainer import ETUTrainer
