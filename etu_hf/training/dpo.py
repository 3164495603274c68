"""The DPO configuration of ``etu-hf refine``: TRL's ``DPOConfig`` with etu-hf's argument checks and
secret-free pickling."""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig

from etu_hf.artifacts.files import SecretFreeArguments
from etu_hf.training.argument_checks import check_training_arguments


@dataclass
class RefineDPOConfig(SecretFreeArguments, DPOConfig):
    """``trl.DPOConfig`` (every field and flag unchanged) that pickles without secrets, so the
    ``training_args.bin`` that DPOTrainer saves (in the output folder and every checkpoint) carries no
    hub token, and whose numbers are checked like ``ETUTrainingArguments``' before anything runs."""

    def __post_init__(self) -> None:
        check_training_arguments(self)
        super().__post_init__()
