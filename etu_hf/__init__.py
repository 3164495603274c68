"""etu-hf: Exponential-Tilted Unlearning for the Hugging Face training stack.

Swap ``Trainer``/``TrainingArguments`` for :class:`ETUTrainer`/:class:`ETUTrainingArguments`, give
forget data (and optionally retain data) and a target mass ``epsilon``; the trained model puts at most
``epsilon`` probability on the forbidden token set V_S while staying as close as possible to the base
model: the base model exponentially tilted away from V_S.
"""

from etu_hf.config import ETUTrainingArguments
from etu_hf.controller import AdaptiveLambdaCallback
from etu_hf.evaluation import MassResult, PerplexityResult, adapters_disabled, evaluate_mass, evaluate_perplexity
from etu_hf.forbidden_set import ForbiddenSet, build_forbidden_set
from etu_hf.losses import TiltedKLOutput, chunked_nll, tilted_kl_loss
from etu_hf.tilt import closed_form_lambda, forbidden_mass, per_position_lambda, tilted_log_probs, tilted_mass
from etu_hf.trainer import ETUTrainer

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLambdaCallback",
    "ETUTrainer",
    "ETUTrainingArguments",
    "ForbiddenSet",
    "MassResult",
    "PerplexityResult",
    "TiltedKLOutput",
    "adapters_disabled",
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
