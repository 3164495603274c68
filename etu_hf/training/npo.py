"""``NPOConfig`` and ``NPOTrainer``: Negative Preference Optimization in TRL's trainer/config shape.

TRL has no NPO trainer, so this is a small one that follows TRL's conventions: a ``TrainingArguments``
subclass documenting its fields, a ``Trainer`` subclass that tokenizes ``prompt``/``completion``
string columns itself, pads with TRL's ``pad`` and computes per-token log-probabilities with TRL's
``selective_log_softmax``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from etu_hf.artifacts.files import SecretFreeArguments
from etu_hf.data.blocks import pad_token_id
from etu_hf.modeling.head import eval_mode, is_peft_model, unwrap_model
from etu_hf.ops.preference import npo_loss, sequence_logps, simnpo_loss
from etu_hf.training.argument_checks import check_training_arguments


@dataclass
class NPOConfig(SecretFreeArguments, TrainingArguments):
    r"""
    Configuration of [`NPOTrainer`]: `transformers.TrainingArguments` plus the fields below. Like
    `ETUTrainingArguments` it pickles without secrets (`training_args.bin` carries no hub token).

    Parameters:
        beta (`float`, *optional*, defaults to `0.1`):
            Inverse temperature of the NPO loss. Must be > 0.
        loss_type (`str`, *optional*, defaults to `"npo"`):
            `"npo"`: :math:`-\\frac{2}{\\beta}\\log\\sigma(-\\beta(\\log\\pi_\\theta(y|x) - \\log\\pi_{ref}(y|x)))`;
            `"simnpo"`: reference-free,
            :math:`-\\frac{2}{\\beta}\\log\\sigma(-\\frac{\\beta}{|y|}\\log\\pi_\\theta(y|x) - \\gamma)`.
        gamma (`float`, *optional*, defaults to `0.0`):
            SimNPO margin.
        max_length (`int` or `None`, *optional*, defaults to `512`):
            Prompt plus completion are truncated to this many tokens (keeping the start).
    """

    beta: float = field(default=0.1, metadata={"help": "Inverse temperature of the NPO loss (> 0)."})
    loss_type: str = field(default="npo", metadata={"help": "'npo' or 'simnpo'.", "choices": ["npo", "simnpo"]})
    gamma: float = field(default=0.0, metadata={"help": "SimNPO margin gamma."})
    max_length: int | None = field(default=512, metadata={"help": "Truncate prompt+completion to this length."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the prompt/completion columns."})

    def __post_init__(self) -> None:
        check_training_arguments(self)
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0 (got {self.beta})")
        if self.loss_type not in ("npo", "simnpo"):
            raise ValueError(f"loss_type: must be 'npo' or 'simnpo' (got {self.loss_type!r})")
        super().__post_init__()


@dataclass
class DataCollatorForNPO:
    """Pads ``prompt_ids + completion_ids`` on the right (TRL's ``pad``) with a ``completion_mask``."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from trl.trainer.utils import pad

        ids, masks = [], []
        for ex in examples:
            seq = list(ex["prompt_ids"]) + list(ex["completion_ids"])
            mask = [0] * len(ex["prompt_ids"]) + [1] * len(ex["completion_ids"])
            if self.max_length is not None:
                seq, mask = seq[: self.max_length], mask[: self.max_length]
            ids.append(torch.tensor(seq))
            masks.append(torch.tensor(mask))
        return {
            "input_ids": pad(ids, padding_value=self.pad_token_id),
            "attention_mask": pad([torch.ones_like(m) for m in masks], padding_value=0),
            "completion_mask": pad(masks, padding_value=0),
        }


class NPOTrainer(Trainer):
    """Trainer for NPO / SimNPO on ``prompt``/``completion`` data (completions to be forgotten).

    The reference is the base model: for a PEFT model (or with ``peft_config``) the same model with
    adapters disabled, so no copy; otherwise ``ref_model`` or a frozen copy of ``model``.
    """

    _tag_names = ("etu-hf", "npo", "unlearning")

    def __init__(
        self,
        model: Any,
        args: NPOConfig,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        ref_model: Any = None,
        **kwargs: Any,
    ):
        if not isinstance(args, NPOConfig):
            raise TypeError(f"NPOTrainer needs NPOConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("NPOTrainer needs processing_class (the tokenizer) to tokenize prompt/completion")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if ref_model is None and not is_peft_model(model) and args.loss_type == "npo":
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.ref_model = ref_model
        pad_id = pad_token_id(processing_class)
        super().__init__(
            model=model,
            args=args,
            processing_class=processing_class,
            train_dataset=self._tokenize(train_dataset, processing_class),
            eval_dataset=self._tokenize(eval_dataset, processing_class),
            data_collator=DataCollatorForNPO(pad_token_id=pad_id, max_length=args.max_length),
            **kwargs,
        )
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        self._metrics: dict[str, list[torch.Tensor]] = {"policy_logps": [], "ref_logps": []}
        if hasattr(self.model, "add_model_tags"):  # as TRL's trainers: the tags go to model cards and hub commits
            self.model.add_model_tags(list(self._tag_names))

    @staticmethod
    def _tokenize(dataset: Any, tokenizer: Any) -> Any:
        if dataset is None:
            return None
        missing = {"prompt", "completion"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"NPO data needs 'prompt' and 'completion' columns; missing {sorted(missing)}")

        def tok(ex: dict[str, Any]) -> dict[str, Any]:
            completion = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion = [*completion, tokenizer.eos_token_id]
            return {
                "prompt_ids": tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"],
                "completion_ids": completion,
            }

        return dataset.map(tok, remove_columns=dataset.column_names)

    def reference_logps(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sequence log-probabilities of the completions under the base (reference) model."""
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
        with torch.no_grad():
            if self.ref_model is not None:
                logits = self.ref_model(**kwargs).logits
            else:
                peft_model = unwrap_model(model)
                with peft_model.disable_adapter(), eval_mode(peft_model):
                    logits = peft_model(**kwargs).logits
        return sequence_logps(logits, inputs["input_ids"], inputs["completion_mask"])

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Mean per-sequence NPO (or SimNPO) loss of the micro-batch."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        policy = sequence_logps(outputs.logits, inputs["input_ids"], inputs["completion_mask"])
        a = self.args
        if a.loss_type == "simnpo":
            losses = simnpo_loss(policy, inputs["completion_mask"][:, 1:].sum(-1), a.beta, a.gamma)
        else:
            ref = self.reference_logps(model, inputs)
            losses = npo_loss(policy, ref, a.beta)
            self._metrics["ref_logps"].append(ref.mean())
        self._metrics["policy_logps"].append(policy.detach().mean())  # read back only when logging
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    # The loss is a mean over the micro-batch's sequences: let the Trainer divide by accumulation steps.
    loss_is_scaled_for_ga = False

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``npo/policy_logps`` and ``npo/ref_logps`` (means since the last log)."""
        for key, values in self._metrics.items():
            if values and "loss" in logs:
                logs[f"npo/{key}"] = float(torch.stack(values).mean())
                values.clear()
        super().log(logs, start_time)
