r"""``ETUTrainer``: a drop-in ``transformers.Trainer`` that trains toward the exponential tilt.

Swap ``Trainer``/``TrainingArguments`` for ``ETUTrainer``/``ETUTrainingArguments``; the
``train_dataset`` is then the forget data. The objective (docs/method.md, "The loss") is

.. math::
    L = \frac{1}{N_f}\sum_{i \in \text{forget}} KL\big(q_{\lambda_i}(\cdot|x_i) \,\|\, \pi_\theta(\cdot|x_i)\big)
      + w_R \frac{1}{N_r}\sum_{j \in \text{retain}} \ell_j

where :math:`q_\lambda \propto \pi_b e^{-\lambda 1_S}` is the base model tilted away from V_S and
:math:`\ell_j` the retain NLL (or :math:`KL(\pi_b\|\pi_\theta)`). :math:`N_f, N_r` count the scored
positions of the *whole accumulated batch* over all processes, so gradient accumulation and data
parallelism give the gradient of one large batch.
"""

from __future__ import annotations

import functools
import json
import logging as _logging_for_logger
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, enable_full_determinism, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from etu_hf.artifacts.files import ARGS_FILE, METRICS_FILE, write_json
from etu_hf.artifacts.run_folder import RunFolder, check_output_dir, resolve_resume_checkpoint
from etu_hf.data.blocks import check_token_dataset, iter_batches, scored_positions
from etu_hf.data.pairing import (
    CORPUS_ID_COLUMN,
    PREF_CHOSEN_COLUMN,
    RETAIN_PREFIX,
    ForgetRetainCollator,
    ForgetRetainDataset,
    chosen_batch,
    split_forget_retain,
)
from etu_hf.evaluation.measures import TiltStatistics, evaluate_mass, tilt_statistic_sums, tilt_statistics
from etu_hf.forbidden_set import FORBIDDEN_SET_FILE, ForbiddenSet, build_forbidden_set, resolve_forbidden_set
from etu_hf.modeling.base import AdapterDisabledBase, BaseDistribution, FrozenCopyBase
from etu_hf.modeling.bnb import prepare_4bit_model
from etu_hf.modeling.checks import check_causal_lm, check_tokenizer_matches
from etu_hf.modeling.head import (
    _output_head_adapted_without_resize,
    _output_head_trainable,
    forward_hidden,
    head_fn,
    head_matches_logits,
    is_peft_model,
    output_head,
    output_head_name,
    output_vocab_size,
    unwrap_model,
)
from etu_hf.ops.chunked import chunked_nll, tilted_kl_loss
from etu_hf.ops.preference import completion_mask, preference_losses, prompts_of
from etu_hf.ops.tilt import TiltSpec, closed_form_lambda, lambda_bounds
from etu_hf.training.config import ETUTrainingArguments
from etu_hf.training.controller import CLAMP_WARN_SHARE, AdaptiveLambdaCallback
from etu_hf.training.preference import chosen_logps

logger = _logging_for_logger.getLogger(__name__)

#: Written into every checkpoint (before transformers' own files, so a complete trainer_state.json
#: implies a complete one): what metrics.json needs to cover the whole run after a resume.
RUN_STATE_FILE = "etu_trainer_state.json"

# Layout of the on-device statistics accumulators (sums over scored positions).
_STATS = ("kl", "w_forget", "lambda", "pi_s", "q_s", "base_p_s", "clamped", "retain", "w_retain", "pref", "w_pref")


@dataclass
class ScoredCounts:
    """Scored forget/retain positions in one optimiser step's micro-batches, summed over processes.

    Returned by :meth:`ETUTrainer.get_batch_samples` in place of the Trainer's ``num_items_in_batch``
    and used as the loss normaliser.
    """

    forget: torch.Tensor
    retain: torch.Tensor
    world_size: int = 1
    #: Forget sequences with a completion (for the preference term), over the step and all processes.
    sequences: torch.Tensor | None = None


class _StatsAccumulator:
    """Device-side sums of the ETU statistics; read back (one sync) only when logging."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.lam_min: torch.Tensor | None = None
        self.lam_max: torch.Tensor | None = None

    def add(self, values: torch.Tensor, lam_min: torch.Tensor, lam_max: torch.Tensor) -> None:
        if self.sums is None:
            self.sums, self.lam_min, self.lam_max = values.clone(), lam_min.clone(), lam_max.clone()
        else:
            self.sums += values
            self.lam_min = torch.minimum(self.lam_min, lam_min)
            self.lam_max = torch.maximum(self.lam_max, lam_max)

    def reset(self) -> None:
        self.sums = self.lam_min = self.lam_max = None

    def snapshot(self, reduce: Any, device: torch.device) -> dict[str, Any] | None:
        """The sums so far as JSON-able values, reduced over processes (a collective under DDP: every
        process must call it); ``None`` when nothing was accumulated anywhere."""
        n = len(_STATS)
        sums = self.sums if self.sums is not None else torch.zeros(n, device=device)
        lo = self.lam_min if self.lam_min is not None else torch.tensor(float("inf"), device=device)
        hi = self.lam_max if self.lam_max is not None else torch.tensor(float("-inf"), device=device)
        if reduce is not None:
            sums, lo, hi = reduce(sums, "sum"), -reduce(-lo, "max"), reduce(hi, "max")
        if float(sums[_STATS.index("w_forget")]) == 0:
            return None
        return {"names": list(_STATS), "sums": sums.double().tolist(), "lambda_min": float(lo), "lambda_max": float(hi)}

    def restore(self, snapshot: dict[str, Any], device: torch.device) -> None:
        """Start from a :meth:`snapshot` (on one process only: :meth:`read` sums over processes). Sums are
        matched by name; one the snapshot lacks (saved by an older etu-hf) starts at 0."""
        saved = dict(zip(snapshot["names"], snapshot["sums"], strict=True))
        self.sums = torch.tensor([saved.get(k, 0.0) for k in _STATS], dtype=torch.float32, device=device)
        self.lam_min = torch.tensor(snapshot["lambda_min"], dtype=torch.float32, device=device)
        self.lam_max = torch.tensor(snapshot["lambda_max"], dtype=torch.float32, device=device)

    def read(self, reduce: Any = None) -> dict[str, float] | None:
        """Means over the accumulated positions (``reduce`` sums/min/max across processes)."""
        if self.sums is None:
            return None
        sums, lo, hi = self.sums, self.lam_min, self.lam_max
        if reduce is not None:
            sums, lo, hi = reduce(sums, "sum"), -reduce(-lo, "max"), reduce(hi, "max")
        s = dict(zip(_STATS, sums.double().tolist(), strict=True))
        wf, wr = max(s["w_forget"], 1.0), max(s["w_retain"], 1.0)
        out = {
            "etu/loss": s["kl"] / wf,
            "etu/lambda": s["lambda"] / wf,
            "etu/pi_s": s["pi_s"] / wf,
            "etu/q_s": s["q_s"] / wf,
            "etu/base_p_s": s["base_p_s"] / wf,
            "etu/lambda_min": float(lo),
            "etu/lambda_max": float(hi),
            "etu/clamped_share": s["clamped"] / wf,
            "etu/forget_positions": s["w_forget"],
        }
        if s["w_retain"] > 0:
            out["etu/retain_loss"] = s["retain"] / wr
        if s["w_pref"] > 0:
            out["etu/pref_loss"] = s["pref"] / s["w_pref"]
        return out


class _ETUSetupCallback(TrainerCallback):
    """Estimates the base mass p_S once the model is in place (after any wrapping)."""

    def __init__(self, trainer: ETUTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._setup_target()


class ETUTrainer(Trainer):
    r"""Trainer for Exponential-Tilted Unlearning.

    Args:
        model: a causal LM (``AutoModelForCausalLM``), optionally a ``peft.PeftModel``.
        args: :class:`~etu_hf.ETUTrainingArguments`.
        data_collator, eval_dataset, processing_class, ...: as for ``transformers.Trainer``.
        train_dataset: the **forget** data: tokenized blocks with ``labels == input_ids`` or padded
            examples with ``-100`` labels.
        retain_dataset: optional retain data in the same format. It sets the PMI background of V_S
            and, when ``args.retain_weight > 0``, each forget example is paired with a retain example
            for the retain term.
        ref_model: optional base model :math:`\pi_b` for non-PEFT models (default: a frozen copy of
            ``model`` taken now; ``args.frozen_on_cpu`` keeps it on CPU). PEFT models use themselves
            with adapters disabled and need no copy.
        forbidden_set: V_S as a :class:`~etu_hf.ForbiddenSet`, a list of ids or a path to
            V_S.ids.json (default: ``args.forbidden_ids_path``, else built from ``train_dataset``).
        peft_config: optional ``peft.PeftConfig``; the model is wrapped with ``get_peft_model``.
        heldout_dataset: forget data for the adaptive-lambda controller to measure, never trained on.
            Default: ``heldout_batches`` batches (or ``heldout_fraction``) of ``train_dataset``, taken out
            of training with a seeded draw, whenever a controller is active.

    Logged every ``logging_steps`` through the Trainer's log (so ``report_to`` backends see them),
    as means over the scored forget positions since the previous log: ``etu/loss`` (KL to the target),
    ``etu/retain_loss``, ``etu/lambda`` (mean tilt), ``etu/pi_s`` (model mass on V_S on the training
    batches), ``etu/q_s`` (target mass), ``etu/base_p_s`` (base mass).
    """

    # compute_loss divides by the scored positions of the whole accumulated batch (see ScoredCounts),
    # so the Trainer must not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True
    _tag_names: ClassVar[list[str]] = ["etu-hf", "unlearning"]

    def __init__(
        self,
        model: nn.Module | None = None,
        args: ETUTrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        retain_dataset: Any = None,
        ref_model: nn.Module | None = None,
        forbidden_set: ForbiddenSet | str | list[int] | None = None,
        peft_config: Any = None,
        heldout_dataset: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            args = ETUTrainingArguments(output_dir="tmp_trainer")
        elif not isinstance(args, ETUTrainingArguments):
            raise TypeError(
                f"ETUTrainer needs ETUTrainingArguments, got {type(args).__name__}: replace "
                "TrainingArguments(...) with etu_hf.ETUTrainingArguments(...) (same fields plus the ETU ones)."
            )
        if model is None:
            raise ValueError("ETUTrainer needs a model (model_init is not supported)")
        check_causal_lm(model)
        if peft_config is not None:
            if is_peft_model(model):
                raise ValueError("peft_config was given but the model is already a PeftModel; pass one or the other")
            from peft import get_peft_model

            # Seed as Trainer.__init__ would, but before the adapter weights are drawn (reproducible runs).
            if args.full_determinism:
                enable_full_determinism(args.seed)
            else:
                set_seed(args.seed)
            model = get_peft_model(model, peft_config)
        prepare_4bit_model(model)  # bitsandbytes' CPU repacking would corrupt LoRA gradients (and crash)
        check_tokenizer_matches(model, processing_class)
        if retain_dataset is not None and len(retain_dataset) == 0:
            raise ValueError("retain_dataset is empty; pass None for suppression-only training")
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("train_dataset (the forget data) is empty: there is nothing to forget")
        for name, dataset in (
            ("train_dataset (the forget data)", train_dataset),
            ("retain_dataset", retain_dataset),
            ("heldout_dataset", heldout_dataset),
            ("eval_dataset", eval_dataset if not isinstance(eval_dataset, dict) else None),
        ):
            check_token_dataset(dataset, name)
        controllers = [cb for cb in kwargs.get("callbacks") or [] if isinstance(cb, AdaptiveLambdaCallback)]
        if (args.adaptive_lambda or controllers) and heldout_dataset is None and train_dataset is not None:
            train_dataset, heldout_dataset = split_heldout(train_dataset, args)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.args.n_gpu > 1:
            raise ValueError(
                "ETUTrainer does not support torch.nn.DataParallel (several GPUs in one process). Launch one "
                "process per GPU with `torchrun` or `accelerate launch` (DDP) instead."
            )
        self.vocab_size = output_vocab_size(self.model)
        self.forget_dataset = train_dataset
        self.retain_dataset = retain_dataset
        self.heldout_dataset = heldout_dataset
        self._user_collator = self.data_collator
        self.pairs_retain = retain_dataset is not None and self.args.retain_weight > 0
        if self.pairs_retain:
            if train_dataset is None:
                raise ValueError("retain_dataset needs a train_dataset (the forget data) to pair with")
            self.train_dataset = ForgetRetainDataset(
                train_dataset, retain_dataset, seed=self.args.data_seed or self.args.seed
            )
        self.data_collator = ForgetRetainCollator(self.data_collator)
        self._refusal_ids = self._check_preference_settings()

        # The base distribution pi_b.
        if ref_model is not None:
            check_causal_lm(ref_model)
            if output_vocab_size(ref_model) != self.vocab_size:
                raise ValueError("ref_model has a different vocabulary size than model")
            self.base: BaseDistribution = FrozenCopyBase(
                ref_model, device="cpu" if self.args.frozen_on_cpu else self.args.device, copy_model=False
            )
        elif is_peft_model(self.model):
            self.base = AdapterDisabledBase(self.model)
            if not _output_head_trainable(unwrap_model(self.model)):
                logger.warning(
                    "the adapter leaves the output head (%s) frozen: the tilted target lowers the logits of V_S by a "
                    "context-dependent amount, which adapters on the transformer layers alone generally cannot fit "
                    "(held-out mass then stays above epsilon). Add it to the LoRA target_modules (e.g. "
                    "target_modules=['q_proj', ..., 'lm_head'], or --lora_target_modules all-linear,lm_head).",
                    output_head_name(unwrap_model(self.model)),
                )
        else:
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise ValueError(
                    "full fine-tuning under DeepSpeed ZeRO-3 needs the base model as ref_model= (its parameters are "
                    "partitioned, so the trainer cannot copy them): pass ref_model=, train LoRA (--use_lora), or use "
                    "ZeRO-2."
                )
            logger.info("model has no PEFT adapters: keeping a frozen copy as the base distribution")
            self.base = FrozenCopyBase(self.model, device="cpu" if self.args.frozen_on_cpu else self.args.device)

        self.forbidden_set = self._resolve_forbidden_set(forbidden_set)
        self._forbidden_ids: dict[torch.device, torch.Tensor] = {}
        self.base_p_s: float | None = None
        self.base_p_s_positions = 0
        self.global_lambda: float | None = None
        #: Added to every lambda (moved by the adaptive controller; 0 without one).
        self.lambda_offset: float = 0.0
        self._controller_logs: dict[str, float] = {}
        self._use_hidden = True
        self._window = _StatsAccumulator()
        self._total = _StatsAccumulator()
        self._eval_stats = _StatsAccumulator()
        self._last_window: dict[str, float] | None = None
        self.extra_run_arguments: dict[str, Any] = {}
        self.add_callback(_ETUSetupCallback(self))
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, AdaptiveLambdaCallback):
                cb.bind(self)
        if self.args.adaptive_lambda and self.lambda_controller is None:
            self.add_callback(AdaptiveLambdaCallback())
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------ set-up
    def _resolve_forbidden_set(self, forbidden_set: Any) -> ForbiddenSet | None:
        source = "forbidden_set"
        if forbidden_set is None and self.args.forbidden_ids_path:
            forbidden_set, source = self.args.forbidden_ids_path, "--forbidden_ids_path"
        fs = resolve_forbidden_set(forbidden_set)
        if fs is not None:
            fs.check_vocab(self.vocab_size, source)
            fs.vocab_size = fs.vocab_size or self.vocab_size
            return fs
        if self.forget_dataset is None:
            return None
        a = self.args
        fs = build_forbidden_set(
            iter_batches(self.forget_dataset, self._user_collator, 64),
            iter_batches(self.retain_dataset, self._user_collator, 64) if self.retain_dataset is not None else None,
            vocab_size=self.vocab_size,
            tokenizer=self.processing_class if hasattr(self.processing_class, "convert_ids_to_tokens") else None,
            method=a.vs_method,
            vs_freq_rate=a.vs_freq_rate,
            vs_abs_cap=a.vs_abs_cap,
            vocab_top_k=a.vocab_top_k,
            pmi_top_k=a.pmi_top_k,
            pmi_min_count=a.pmi_min_count,
            pmi_min_score=a.pmi_min_score,
            pmi_smoothing=a.pmi_smoothing,
            span_masking=a.span_masking,
            span_ngram_max=a.span_ngram_max,
        )
        logger.info("built V_S (%s): %d tokens, %.2f%% of the vocabulary", fs.method, len(fs), 100 * (fs.fraction or 0))
        return fs

    def forbidden_ids(self, device: torch.device) -> torch.Tensor:
        """V_S as a long tensor on ``device`` (cached)."""
        if device not in self._forbidden_ids:
            self._forbidden_ids[device] = self.forbidden_set.tensor(device)
        return self._forbidden_ids[device]

    def add_callback(self, callback: Any) -> None:
        """``Trainer.add_callback``; an :class:`AdaptiveLambdaCallback` is bound to this trainer."""
        super().add_callback(callback)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, AdaptiveLambdaCallback) and cb.trainer is None:
                cb.bind(self)

    @property
    def lambda_controller(self) -> AdaptiveLambdaCallback | None:
        """The bound adaptive-lambda controller, if any."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, AdaptiveLambdaCallback)), None)

    def tilt_spec(self) -> TiltSpec:
        """The current target: mode, epsilon, clamps, closed-form global lambda and the offset."""
        a = self.args
        return TiltSpec(
            epsilon=a.epsilon,
            mode=a.lambda_mode,
            lambda_max=a.lambda_max,
            allow_negative=a.allow_negative_lambda,
            global_lambda=self.global_lambda,
            offset=self.lambda_offset,
        )

    def offset_bounds(self) -> tuple[float, float]:
        """Range of :attr:`lambda_offset`. Global mode keeps ``lam0 + offset`` inside the lambda clamps;
        per-position mode allows ``[0, lambda_max]`` (``[-lambda_max, lambda_max]`` with
        ``allow_negative_lambda``): at 0 every context's target is ``min(p(x), epsilon)``."""
        a = self.args
        lower, upper = lambda_bounds(a.lambda_max, a.allow_negative_lambda)
        if a.lambda_mode == "global":
            return lower - self.global_lambda, upper - self.global_lambda
        return lower, upper

    def measure_heldout(self) -> TiltStatistics:
        """Mass on V_S (point estimate, per-sequence sums for the sequence-level bound), delta = mean
        per-token KL(pi_theta || q_lam) and the clamped share on the held-out forget slice.

        Held-out batches are split across processes; totals are summed and per-sequence sums gathered,
        so every process gets the same numbers. A process with fewer batches runs a weight-0 batch so
        all run as many forwards (sharded models need that); its sequences count 0 and are dropped.
        """
        if self.heldout_dataset is None:
            raise ValueError("no held-out forget data: pass heldout_dataset= or set adaptive_lambda=True")
        batches = list(iter_batches(self.heldout_dataset, self._user_collator, self.args.per_device_eval_batch_size))
        world, rank = max(1, self.args.world_size), self.args.process_index
        mine = batches[rank::world]
        per_process = -(-len(batches) // world)
        weights = [1.0] * len(mine) + [0.0] * (per_process - len(mine))
        mine = mine + [batches[0]] * (per_process - len(mine))
        device = self.args.device
        sums, per_seq = tilt_statistic_sums(
            unwrap_model(self.model),
            self.base,
            mine,
            self.forbidden_ids(device),
            self.tilt_spec(),
            chunk_size=self.args.loss_chunk_size or 1024,
            use_hidden=self._use_hidden,
            weights=weights,
        )
        if world > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
            per_seq = self.accelerator.gather(self.accelerator.pad_across_processes(per_seq, dim=0))
        return tilt_statistics(sums, per_seq)

    def record_controller_log(self, values: dict[str, float]) -> None:
        """Values to add to the next training log (used by the controller; no device sync)."""
        self._controller_logs.update(values)

    def _setup_target(self) -> None:
        """At the start of training: check the head and estimate p_S over a sample of forget sequences."""
        p_s, n = self.estimate_base_mass()
        self.base_p_s, self.base_p_s_positions = p_s, n
        a = self.args
        # Unclamped (the floor at 0 aside): TiltSpec.global_value applies lambda_max, so a binding clamp is counted.
        self.global_lambda = float(closed_form_lambda(p_s, a.epsilon, None, a.allow_negative_lambda))
        logger.info("base p_S = %.4f over %d forget positions; closed-form lambda = %.3f", p_s, n, self.global_lambda)

    @torch.no_grad()
    def estimate_base_mass(self) -> tuple[float, int]:
        """Mean base mass on V_S over the scored positions of ``p_s_sample_size`` forget sequences
        (a seeded sample of the training data). Returns ``(p_S, positions)``."""
        data = self.forget_dataset
        rng = np.random.default_rng(self.args.seed)
        k = min(self.args.p_s_sample_size, len(data))
        idx = np.sort(rng.choice(len(data), size=k, replace=False))
        device = self.args.device
        batches = list(iter_batches(data, self._user_collator, self.args.per_device_eval_batch_size, idx))
        first = {key: v.to(device) for key, v in batches[0].items()}
        self._use_hidden = head_matches_logits(unwrap_model(self.model), output_head(self.model), first)
        if not self._use_hidden:
            logger.warning(
                "the model post-processes its output head (e.g. logit soft-capping): the loss uses "
                "full logits, so memory grows with batch x length x |V|"
            )
        with self.base.as_model() as base_model:
            mass = evaluate_mass(
                base_model, batches, self.forbidden_ids(device), chunk_size=self.args.loss_chunk_size or 1024
            )
        if mass.n_positions == 0:
            raise ValueError("the forget data has no scored position (every label is -100 or padding)")
        return mass.mean, mass.n_positions

    # ------------------------------------------------------------------ batching
    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer drops batch keys that model.forward does not take; keep the retain half too
        # (the same pattern as TRL's trainers, which override this to keep their own columns).
        super()._set_signature_columns_if_needed()
        if self.pairs_retain and not any(c.startswith(RETAIN_PREFIX) for c in self._signature_columns):
            self._signature_columns += [RETAIN_PREFIX + c for c in self._signature_columns if c != CORPUS_ID_COLUMN]
        if self.args.preference_weight > 0 and PREF_CHOSEN_COLUMN not in self._signature_columns:
            self._signature_columns.append(PREF_CHOSEN_COLUMN)

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, ScoredCounts]:
        """Collect the micro-batches of one optimiser step and count their scored positions.

        The counts (summed over processes) replace ``num_items_in_batch``: the loss of each micro-batch
        is its sum over positions divided by the step's total, so accumulated gradients equal those
        of one large batch whatever the padding.
        """
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        counts = torch.zeros(3, dtype=torch.float32, device=device)
        for batch in batch_samples:
            forget, retain = split_forget_retain(batch)
            counts[0] += _count_scored(forget, device)
            if retain is not None:
                counts[1] += _count_scored(retain, device)
            if self.args.preference_weight > 0:
                mask, _ = scored_positions(forget["input_ids"], forget.get("attention_mask"), forget.get("labels"))
                comp = completion_mask(mask, forget.get("attention_mask"), self.args.pref_prompt_tokens)
                counts[2] += comp.any(1).sum().to(device=device, dtype=torch.float32)
        world = self.args.world_size
        if world > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return batch_samples, ScoredCounts(forget=counts[0], retain=counts[1], world_size=world, sequences=counts[2])

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """ETU loss of one micro-batch; see the module docstring for the formula."""
        if self.forbidden_set is None:
            raise ValueError("no forbidden set: pass a train_dataset to build V_S from, or forbidden_set=")
        counts = num_items_in_batch if isinstance(num_items_in_batch, ScoredCounts) else None
        forget, retain = split_forget_retain(inputs)
        head = output_head(model)
        device = forget["input_ids"].device
        S = self.forbidden_ids(device)
        a = self.args

        student, outputs, mask, targets = self._student_positions(model, head, forget, keep_logits=return_outputs)
        base = self._base_positions(forget, mask)
        if a.lambda_mode == "global" and self.global_lambda is None:  # compute_loss outside train()
            self._setup_target()
        pref_on = a.preference_weight > 0 and model.training and self.state.global_step % a.pref_every == 0
        kl = tilted_kl_loss(
            student,
            base,
            S,
            weights=mask.reshape(-1).float(),
            student_head=head_fn(head, device) if self._use_hidden else None,
            base_head=self.base.head(device) if self._use_hidden else None,
            chunk_size=a.loss_chunk_size or None,
            normalizer=counts.forget.clamp_min(1.0) if counts is not None else None,
            targets=targets.reshape(-1) if pref_on else None,  # for the preference term: same forward
            tilt=self.tilt_spec(),
        )
        loss = kl.loss
        pref_sum = torch.zeros((), device=device)
        pref_n = torch.zeros((), device=device)
        if pref_on:
            p_loss, pref_sum, pref_n = self._preference_term(model, forget, retain, mask, kl, counts)
            loss = loss + a.preference_weight * p_loss
        retain_sum = torch.zeros((), device=device)
        retain_w = torch.zeros((), device=device)
        if retain is not None and a.retain_weight > 0 and model.training:
            r_loss, retain_sum, retain_w = self._retain_term(model, head, retain, counts)
            loss = loss + a.retain_weight * r_loss

        values = torch.stack(
            [
                kl.kl_sum,
                kl.weight_sum,
                kl.lambda_sum,
                kl.student_mass_sum,
                kl.target_mass_sum,
                kl.base_mass_sum,
                kl.clamped_sum,
                retain_sum,
                retain_w,
                pref_sum,
                pref_n,
            ]
        ).float()
        if model.training:
            self._window.add(values, kl.lambda_min, kl.lambda_max)
            self._total.add(values, kl.lambda_min, kl.lambda_max)
        else:
            self._eval_stats.add(values, kl.lambda_min, kl.lambda_max)
        if counts is not None and counts.world_size > 1:
            # DDP/DeepSpeed average gradients over processes; the normaliser already counts all of them.
            loss = loss * counts.world_size
        return (loss, outputs) if return_outputs else loss

    def _preference_term(
        self,
        model: nn.Module,
        forget: dict[str, Any],
        retain: dict[str, Any] | None,
        mask: torch.Tensor,
        kl: Any,
        counts: ScoredCounts | None,
    ):
        """NPO / SimNPO / DPO on the forget completions of this micro-batch (see etu_hf.ops.preference).

        Returns ``(loss, detached sum of per-sequence losses, number of sequences)``; the loss is
        normalised by the sequences of the whole accumulated batch, like the ETU term by its positions.
        """
        a = self.args
        b = mask.shape[0]
        comp = completion_mask(mask, forget.get("attention_mask"), a.pref_prompt_tokens)
        w = comp.to(kl.student_target_logps.dtype)
        policy = (kl.student_target_logps.view(b, -1) * w).sum(1)
        ref = (kl.base_target_logps.view(b, -1) * w).sum(1)
        lengths = comp.sum(1)
        valid = (lengths > 0).to(policy.dtype)
        chosen = None
        if a.pref_format == "dpo":
            prompts = prompts_of(forget["input_ids"], forget.get("attention_mask"), a.pref_prompt_tokens)
            batch = chosen_batch(
                prompts, self._chosen_ids(forget, retain, lengths.tolist()), self._pad_id(), forget["input_ids"].device
            )
            with self.accelerator.autocast():
                chosen = chosen_logps(model, self.base, batch)
        per_seq = preference_losses(a.pref_format, a.pref_beta, a.pref_margin, policy, ref, lengths, chosen)
        total = (per_seq * valid).sum()
        normalizer = (
            counts.sequences.clamp_min(1.0)
            if counts is not None and counts.sequences is not None
            else valid.sum().clamp_min(1.0)
        )
        return total / normalizer, total.detach(), valid.sum().detach()

    def _chosen_ids(self, forget: dict[str, Any], retain: dict[str, Any] | None, lengths: list[int]) -> list[list[int]]:
        """DPO's chosen completion for each forget row, from ``pref_chosen``."""
        a = self.args
        if a.pref_chosen == "data":
            return [list(ids) for ids in forget[PREF_CHOSEN_COLUMN]]
        if a.pref_chosen == "retain":
            rows = prompts_of(retain["input_ids"], retain.get("attention_mask"), max([*lengths, 1]))
            return [row[: max(n, 1)] for row, n in zip(rows, lengths, strict=True)]
        return [self._refusal_ids[i % len(self._refusal_ids)] for i in range(len(lengths))]

    def _pad_id(self) -> int:
        tok = self.processing_class
        pad = getattr(tok, "pad_token_id", None)
        return pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0)

    def _check_preference_settings(self) -> list[list[int]]:
        """Fail early on preference settings without a source of chosen completions; tokenize refusals."""
        a = self.args
        if a.preference_weight <= 0 or a.pref_format != "dpo":
            return []
        if a.pref_chosen == "retain" and not self.pairs_retain:
            raise ValueError(
                "pref_format='dpo' with pref_chosen='retain' needs retain data paired with the forget data: pass "
                "retain_dataset= (and retain_weight > 0), or use --pref_chosen refusal (or data)."
            )
        if a.pref_chosen == "data":
            names = getattr(self.forget_dataset, "column_names", None) or list(self.forget_dataset[0])
            if PREF_CHOSEN_COLUMN not in names:
                raise ValueError(
                    f"pref_chosen='data' needs a '{PREF_CHOSEN_COLUMN}' column (token ids of an alternate answer) in "
                    "the forget data; add it, or use --pref_chosen refusal or retain."
                )
            return []
        if not callable(self.processing_class):
            raise ValueError("pref_chosen='refusal' needs processing_class (a tokenizer) to tokenize pref_refusals")
        ids = [self.processing_class(r, add_special_tokens=False)["input_ids"] for r in a.pref_refusals if r.strip()]
        return [x for x in ids if x]

    def _student_positions(self, model: nn.Module, head: nn.Module, batch: dict[str, Any], keep_logits: bool):
        mask, targets = scored_positions(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
        h, outputs = forward_hidden(model, head, batch, truncate=self._use_hidden and not keep_logits)
        if not self._use_hidden:
            h = outputs.logits
        return _flatten_positions(h, mask), outputs, mask, targets

    def _base_positions(self, batch: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        # Same precision as the model's own forward: accelerate wraps only the trained model in autocast.
        with self.accelerator.autocast():
            h = self.base.hidden(batch) if self._use_hidden else self.base.logits(batch)
        return _flatten_positions(h, mask.to(h.device))

    def _retain_term(self, model: nn.Module, head: nn.Module, retain: dict[str, Any], counts: ScoredCounts | None):
        a = self.args
        device = retain["input_ids"].device
        student, _, mask, targets = self._student_positions(model, head, retain, keep_logits=False)
        weights = mask.reshape(-1).float()
        normalizer = counts.retain.clamp_min(1.0) if counts is not None else None
        student_head = head_fn(head, device) if self._use_hidden else None
        if a.retain_loss_type == "kl":
            out = tilted_kl_loss(
                student,
                self._base_positions(retain, mask),
                self.forbidden_ids(device),
                lam=0.0,
                weights=weights,
                student_head=student_head,
                base_head=self.base.head(device) if self._use_hidden else None,
                chunk_size=a.loss_chunk_size or None,
                normalizer=normalizer,
            )
            return out.loss, out.kl_sum, out.weight_sum
        out = chunked_nll(
            student,
            targets.reshape(-1),
            weights=weights,
            student_head=student_head,
            chunk_size=a.loss_chunk_size or None,
            normalizer=normalizer,
        )
        return out.loss, out.nll_sum, out.weight_sum

    # ------------------------------------------------------------------ logging and evaluation
    def _reduce(self):
        return self.accelerator.reduce if self.args.world_size > 1 else None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the ETU statistics of the logging window to the Trainer's training logs."""
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            stats = self._window.read(self._reduce())
            self._window.reset()
            if stats is not None:
                self._last_window = stats
                logs.update(stats)
                if stats["etu/clamped_share"] > CLAMP_WARN_SHARE:
                    logger.warning(
                        "the lambda clamp binds at %.1f%% of the training positions: the target misses epsilon "
                        "there. Raise --lambda_max (now %s).",
                        100 * stats["etu/clamped_share"],
                        self.args.lambda_max,
                    )
            logs.update(self._controller_logs)
            self._controller_logs = {}
        super().log(logs, start_time)

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        """The Trainer's evaluation loop, plus ETU metrics: ``{prefix}_pi_s`` (mass on V_S),
        ``{prefix}_q_s`` (target mass), ``{prefix}_base_p_s`` and ``{prefix}_lambda``."""
        self._eval_stats.reset()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        stats = self._eval_stats.read(self._reduce())
        self._eval_stats.reset()
        if stats is not None:
            for key in ("pi_s", "q_s", "base_p_s", "lambda"):
                output.metrics[f"{prefix}_{key}"] = stats[f"etu/{key}"]
        return output

    # ------------------------------------------------------------------ train, save, artifacts
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ):
        """``Trainer.train`` with etu-hf's rules for ``output_dir``; writes V_S.ids.json and args.json
        first and metrics.json at the end.

        Before anything is written, ``output_dir`` is checked (writable; no previous run unless
        ``overwrite_output_dir`` or a resume) and ``resume_from_checkpoint`` (``True``/``"true"`` for
        the last complete checkpoint, or a path) is resolved to a complete checkpoint whose V_S is this
        run's. The writes happen inside a :class:`~etu_hf.artifacts.run_folder.RunFolder`: a failure leaves
        ``output_dir`` as it was found, complete checkpoints excepted. After a resume, metrics.json
        still covers the whole run (the loss and statistic sums so far are saved in every checkpoint).
        """
        a = self.args
        check_output_dir(a.output_dir, a.overwrite_output_dir, resume_from_checkpoint)
        # Every process checks before any writes: otherwise a slower process sees the main one's
        # V_S.ids.json and takes this run for a previous one.
        self.accelerator.wait_for_everyone()
        if self.forget_dataset is None:
            raise ValueError("ETUTrainer.train needs a train_dataset (the forget data)")
        if self.forbidden_set is None:
            raise ValueError("no forbidden set V_S: pass forbidden_set= or a train_dataset to build it from")
        resume = resolve_resume_checkpoint(resume_from_checkpoint, a.output_dir)
        if resume is not None:
            self._check_checkpoint_forbidden_set(resume)
        self._window.reset()
        self._total.reset()
        self._last_window = None
        self._run_before = self._restore_run_state(resume)
        self._restore_controller(resume)
        with RunFolder(a.output_dir, a.overwrite_output_dir, resume is not None, self.is_world_process_zero()):
            if self.is_world_process_zero():
                self.forbidden_set.save(os.path.join(a.output_dir, FORBIDDEN_SET_FILE))
                write_json(os.path.join(a.output_dir, ARGS_FILE), {**a.to_dict(), **self.extra_run_arguments})
            self._train_start = time.time()
            output = super().train(
                resume_from_checkpoint=resume,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
            self.training_metrics = self._training_metrics(output, time.time() - self._train_start)
            if self.is_world_process_zero():
                write_json(os.path.join(a.output_dir, METRICS_FILE), self.training_metrics)
        return output

    def _check_checkpoint_forbidden_set(self, checkpoint: str) -> None:
        """Refuse to resume a checkpoint trained against another V_S (other data or V_S settings)."""
        path = os.path.join(checkpoint, FORBIDDEN_SET_FILE)
        if not os.path.isfile(path):
            return
        saved = ForbiddenSet.load(path)
        if saved.ids != self.forbidden_set.ids:
            raise ValueError(
                f"--resume_from_checkpoint: {checkpoint} was trained with another V_S ({len(saved)} tokens; this run "
                f"built {len(self.forbidden_set)}). Resume with the same data and V_S settings, or pass "
                f"--forbidden_ids_path {path}."
            )

    def _restore_run_state(self, checkpoint: str | None) -> dict[str, Any]:
        """Read :data:`RUN_STATE_FILE` of the checkpoint: the loss sum and training time before it (returned)
        and the ETU statistic sums (loaded into the whole-run accumulator on the main process)."""
        before = {"checkpoint": checkpoint, "loss_sum": 0.0, "training_seconds": 0.0, "complete": True}
        if checkpoint is None:
            return before
        path = os.path.join(checkpoint, RUN_STATE_FILE)
        if not os.path.isfile(path):
            logger.warning(
                "%s holds no %s (saved by an older etu-hf): metrics.json will cover only the resumed steps",
                checkpoint,
                RUN_STATE_FILE,
            )
            return {**before, "complete": False}
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("stats") and self.is_world_process_zero():
            self._total.restore(state["stats"], self.args.device)
        return {**before, "loss_sum": float(state["loss_sum"]), "training_seconds": float(state["training_seconds"])}

    def _run_state(self) -> dict[str, Any]:
        """What :data:`RUN_STATE_FILE` holds at this step (collective under DDP: every process calls it)."""
        unlogged = getattr(self, "_tr_loss", None)  # the Trainer's loss sum since the last log
        unlogged = unlogged.detach().clone() if unlogged is not None else torch.zeros((), device=self.args.device)
        if self.args.world_size > 1:
            unlogged = self.accelerator.reduce(unlogged, reduction="mean")
        before = getattr(self, "_run_before", None) or {"loss_sum": 0.0, "training_seconds": 0.0}
        return {
            "format": "etu-hf/trainer-state",
            "version": 1,
            "global_step": self.state.global_step,
            "loss_sum": before["loss_sum"] + getattr(self, "_total_loss_scalar", 0.0) + float(unlogged),
            "training_seconds": before["training_seconds"] + time.time() - getattr(self, "_train_start", time.time()),
            "stats": self._total.snapshot(self._reduce(), self.args.device),
        }

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``Trainer._save_checkpoint``, with :data:`RUN_STATE_FILE` written first (see there)."""
        state = self._run_state()
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            write_json(os.path.join(folder, RUN_STATE_FILE), state)
        super()._save_checkpoint(model, trial)

    def _restore_controller(self, checkpoint: str | None) -> None:
        controller = self.lambda_controller
        if controller is None or checkpoint is None:
            return
        if controller.load_from_checkpoint(checkpoint):
            logger.info("restored the lambda controller state from %s", checkpoint)
        else:
            logger.warning(
                "%s holds no lambda controller state (etu_controller.json); the controller restarts", checkpoint
            )

    def _whole_run_loss(self, output: Any) -> float | None:
        """Mean training loss over every step of the run, those before a resume included (the Trainer's
        own ``training_loss`` covers the steps of this ``train()`` call only)."""
        if not self._run_before["complete"]:
            return getattr(output, "training_loss", None)
        total = self._run_before["loss_sum"] + getattr(self, "_total_loss_scalar", 0.0)
        return total / max(self.state.global_step, 1)

    def _training_metrics(self, output: Any, duration: float) -> dict[str, Any]:
        tail = self._window.read(self._reduce())
        final = tail if tail is not None else self._last_window
        total = self._total.read(self._reduce()) or {}
        a = self.args
        fs = self.forbidden_set
        tilt = self.tilt_spec()
        controller = self.lambda_controller
        last_update = controller.history[-1] if controller and controller.history else None
        return {
            "format": "etu-hf/metrics",
            "version": 1,
            "training_success": True,
            "epsilon": a.epsilon,
            "base_p_S": self.base_p_s,
            "base_p_S_positions": self.base_p_s_positions,
            "lambda": {
                "mode": a.lambda_mode,
                "closed_form_global": self.global_lambda,
                "offset": self.lambda_offset,
                "adaptive": self.lambda_controller is not None,
                "controller_updates": len(controller.history) if controller else 0,
                "effective_epsilon": tilt.effective_epsilon if tilt.mode == "per_position" else None,
                "global_value": (
                    tilt.global_value() if tilt.mode == "global" and self.global_lambda is not None else None
                ),
                "last_update": last_update,
                "mean": total.get("etu/lambda"),
                "min": total.get("etu/lambda_min"),
                "max": total.get("etu/lambda_max"),
                "final_mean": final.get("etu/lambda") if final else None,
            },
            "V_S_size": len(fs),
            "V_S_fraction": fs.fraction if fs.fraction is not None else len(fs) / self.vocab_size,
            "vocab_size": self.vocab_size,
            "steps": self.state.global_step,
            "epochs": self.state.epoch,
            "training_duration_seconds": self._run_before["training_seconds"] + duration,
            "train_loss": self._whole_run_loss(output),
            "resumed_from_checkpoint": self._run_before["checkpoint"],
            "final_training_pi_s": final.get("etu/pi_s") if final else None,
            "final_training_q_s": final.get("etu/q_s") if final else None,
            "final_training_kl": final.get("etu/loss") if final else None,
            "mean_training_pi_s": total.get("etu/pi_s"),
            "training_clamped_share": total.get("etu/clamped_share"),
            "training_forget_positions": total.get("etu/forget_positions"),
        }

    def audit(
        self, forget_data: Any = None, retain_data: Any = None, output_dir: str | None = None, **kwargs: Any
    ) -> Any:
        """Audit the trained model with :func:`etu_hf.audit` against this trainer's base distribution,
        V_S and current tilt (including the controller's offset).

        ``forget_data`` defaults to ``eval_dataset`` when given, else the controller's held-out slice;
        it must not be training data. ``kwargs`` go to :func:`etu_hf.audit` (``overwrite``,
        ``num_samples``, ``analyze_activations``, ...). Files are written by the main process only.
        """
        from etu_hf.evaluation.audit import audit

        if forget_data is None:
            forget_data = self.eval_dataset if self.eval_dataset is not None else self.heldout_dataset
        if forget_data is None:
            raise ValueError("audit: no held-out forget data; pass forget_data= (never the training data)")
        if self.global_lambda is None and self.args.lambda_mode == "global":
            self._setup_target()
        a = self.args
        options = dict(
            epsilon=a.epsilon,
            base=self.base,
            retain_data=retain_data,
            tokenizer=self.processing_class,
            tilt=self.tilt_spec(),
            collator=self._user_collator,
            batch_size=a.per_device_eval_batch_size,
            chunk_size=a.loss_chunk_size or 1024,
            wilson_max_n=a.wilson_max_n,
            seed=a.seed,
            progress=not a.disable_tqdm and self.is_world_process_zero(),
        )
        options.update(kwargs)
        return audit(
            self.model,
            forget_data,
            self.forbidden_set,
            output_dir=output_dir if self.is_world_process_zero() else None,
            **options,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` plus V_S.ids.json beside the weights (checkpoints included), so any
        saved folder can be audited on its own."""
        super().save_model(output_dir, _internal_call=_internal_call)
        target = output_dir or self.args.output_dir
        if self.forbidden_set is not None and self.args.should_save and os.path.isdir(target):
            self.forbidden_set.save(os.path.join(target, FORBIDDEN_SET_FILE))

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """``Trainer._save``; for a LoRA on the output head, the adapter without a copy of the head.

        PEFT's ``save_embedding_layers="auto"`` stores the full base weights of a targeted output head
        (``|V| x hidden``, hundreds of MB on a real model) in case the vocabulary was resized. When it
        was not, those weights are the base model's own and the LoRA factors are all the adapter needs.
        """
        model = unwrap_model(self.model)
        if not (is_peft_model(model) and _output_head_adapted_without_resize(model)):
            return super()._save(output_dir, state_dict)
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained  # back to the class's method

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """``Trainer.create_model_card`` with the ``etu-hf`` and ``unlearning`` tags added."""
        tags = kwargs.get("tags") or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        kwargs["tags"] = tags + [t for t in self._tag_names if t not in tags]
        return super().create_model_card(*args, **kwargs)


def _count_scored(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    mask, _ = scored_positions(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
    return mask.sum().to(device=device, dtype=torch.float32)


def _flatten_positions(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, D] -> [B*(T-1), D]`` for the predictions at positions ``0..T-2``, unscored rows zeroed
    (finite inputs, so no NaN from padding reaches the gradient)."""
    flat = h[:, :-1].reshape(-1, h.shape[-1])
    return torch.where(mask.reshape(-1, 1), flat, flat.new_zeros(()))


def split_heldout(dataset: Any, args: ETUTrainingArguments) -> tuple[Any, Any]:
    """Take the controller's held-out slice out of the forget data (a seeded draw).

    Its size is ``heldout_fraction`` of the data when set, else ``heldout_batches`` batches of
    ``per_device_train_batch_size`` examples. Raises ``ValueError`` naming the settings when that
    leaves no training data or no held-out data.
    """
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            "the adaptive lambda controller needs a map-style train_dataset to hold data out of; pass "
            "heldout_dataset= or set adaptive_lambda=False"
        )
    n = len(dataset)
    if args.heldout_fraction is not None:
        k = round(args.heldout_fraction * n)
        setting = f"heldout_fraction={args.heldout_fraction}"
    else:
        k = args.heldout_batches * args.per_device_train_batch_size
        setting = f"heldout_batches={args.heldout_batches} (x batch size {args.per_device_train_batch_size})"
    if k < 1:
        raise ValueError(f"{setting} holds out no forget example (of {n}); raise it, or set adaptive_lambda=False")
    if k >= n:
        raise ValueError(
            f"{setting} holds out {k} of the {n} forget examples and leaves no training data: lower heldout_batches "
            "or heldout_fraction, give more forget data, pass heldout_dataset=, or set adaptive_lambda=False"
        )
    order = np.random.default_rng(args.seed).permutation(n)
    held, train = np.sort(order[:k]), np.sort(order[k:])
    if hasattr(dataset, "select"):
        return dataset.select(train.tolist()), dataset.select(held.tolist())
    return torch.utils.data.Subset(dataset, train.tolist()), torch.utils.data.Subset(dataset, held.tolist())
