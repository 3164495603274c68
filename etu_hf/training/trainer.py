r"""``ETUTrainer``: a drop-in ``transformers.Trainer`` that trains toward the exponential tilt.

Swap ``Trainer``/``TrainingArguments`` for ``ETUTrainer``/``ETUTrainingArguments``; the
``train_dataset`` is then the forget data. The objective (docs/method.md, "The loss") is

.. math::
    L = \frac{1}{N_f}\sum_{i \in \text{forget}} KL\big(q_{\lambda_i}(\cdot|x_i) \,\|\, \pi_\theta(\cdot|x_i)\big)
      + w_R \frac{1}{N_r}\sum_{j \in \text{retain}} \ell_j

where :math:`q_\lambda \propto \pi_b e^{-\lambda 1_S}` is the base model tilted away from V_S and
:math:`\ell_j` the retain :math:`KL(\pi_b\|\pi_\theta)` (or NLL). :math:`N_f, N_r` count the scored
positions of the *whole accumulated batch* over all processes, so gradient accumulation and data
parallelism give the gradient of one large batch.

The trainer glues the parts: :mod:`~etu_hf.training.tilt_state` (V_S, p_S, lambda, the offset),
:mod:`~etu_hf.training.loss_terms` (the terms), :mod:`~etu_hf.training.probe` (held-out measurements),
:mod:`~etu_hf.training.controller` (the adaptive lambda), :mod:`~etu_hf.training.statistics` (metrics)
and :mod:`~etu_hf.training.records` (``train``, ``audit``, saving: the run's files).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from etu_hf.data.blocks import pad_token_id, scored_positions
from etu_hf.data.pairing import (
    CORPUS_ID_COLUMN,
    PREF_CHOSEN_COLUMN,
    RETAIN_PREFIX,
    ForgetRetainCollator,
    ForgetRetainDataset,
    split_forget_retain,
)
from etu_hf.evaluation.measures import TiltStatistics
from etu_hf.forbidden_set import ForbiddenSet
from etu_hf.modeling.head import output_head, output_vocab_size, unwrap_model
from etu_hf.ops.preference import completion_mask
from etu_hf.ops.tilt import TiltSpec
from etu_hf.training.config import ETUTrainingArguments
from etu_hf.training.controller import CLAMP_WARN_SHARE, AdaptiveLambdaCallback
from etu_hf.training.loss_terms import LossContext, count_scored, forget_term, preference_term, refusal_ids, retain_term
from etu_hf.training.probe import HeldoutProbe, estimate_base_mass, split_heldout
from etu_hf.training.records import RunRecords, removes_created_output_dir
from etu_hf.training.setup import check_arguments, check_datasets, check_token_ids, choose_base, prepare_model
from etu_hf.training.statistics import ETUMetrics, ScoredCounts, stat_values
from etu_hf.training.tilt_state import TiltState, forbidden_set_for_run

__all__ = ["ETUTrainer", "ScoredCounts", "split_heldout"]

logger = logging.getLogger(__name__)


#: Below this many optimiser steps a run warns: on SmolLM2, 6 steps (3 epochs of a 40-document forget set in 8
#: blocks of 512 tokens, etu-hf unlearn's shape before it defaulted to 4 blocks of 128) kept 0.64x of the
#: neighbouring knowledge where 33-40 steps of 4 blocks of 128 tokens kept 0.90-0.93x for about the same
#: forgetting (BENCHMARKS.md).
FEW_STEPS = 20


class _SetupCallback(TrainerCallback):
    """Sets up the target at the start of training, once the model is in place (after any wrapping), and warns
    when the run has fewer than :data:`FEW_STEPS` optimiser steps."""

    def __init__(self, setup: Any):
        self.setup = setup

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.setup()
        if 0 < state.max_steps < FEW_STEPS:
            logger.warning(
                "this run trains %d optimiser steps. On SmolLM2, 6 steps on 40 documents (3 epochs of 14 blocks of "
                "512 tokens at batch 8) kept 0.64x of the base model's knowledge next to the topic, where 33 steps "
                "of 4 blocks of 128 tokens kept 0.90x for about the same forgetting (BENCHMARKS.md). On a small "
                "forget set train more steps on smaller batches and shorter blocks: max_steps (or num_train_epochs) "
                "and per_device_train_batch_size (etu-hf unlearn: --max_steps 40, --per_device_train_batch_size, "
                "--block_size; its defaults are 4 blocks of 128 tokens).",
                state.max_steps,
            )


class ETUTrainer(RunRecords, Trainer):
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
            Default: ``heldout_batches`` batches, at most ``heldout_max_share`` of the examples (or
            ``heldout_fraction``), of ``train_dataset``, taken out of training with a seeded draw
            (:func:`split_heldout`), whenever a controller is active.
        run_arguments: further settings of the run (e.g. the command line's model and data arguments),
            recorded in args.json beside the training arguments, secrets redacted.
        benchmark_evaluator: optional ``evaluator(model, accelerator) -> dict[str, float]`` run at every
            ``evaluate()`` (e.g. :class:`etu_hf.evaluation.unlearning.BenchmarkEvaluator`): its aggregates join
            the eval metrics under the Trainer's prefix, so they can pick the best checkpoint
            (``metric_for_best_model``); each process scores a shard and the values are gathered.

    Logged every ``logging_steps`` through the Trainer's log (so ``report_to`` backends see them): the
    ``etu/...`` metrics of :mod:`etu_hf.training.statistics` (``etu/loss``, ``etu/lambda``, ``etu/pi_s``,
    ``etu/q_s``, ``etu/base_p_s``, ``etu/clamped_share``, ``etu/retain_loss``, ...) and, with a controller,
    its last update (:class:`~etu_hf.AdaptiveLambdaCallback`). ``evaluate()`` adds the same metrics as
    ``eval_etu/...``. :attr:`training_metrics` holds what metrics.json holds (``None`` before ``train()``).
    """

    # compute_loss divides by the scored positions of the whole accumulated batch (see ScoredCounts),
    # so the Trainer must not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True
    #: Trains toward ETU's tilted target (False for the baselines): decides the frozen-head warning.
    fits_tilted_target: ClassVar[bool] = True
    _tag_names: ClassVar[list[str]] = ["etu-hf", "unlearning"]
    #: Whether the method has a retain term: without one, retain data only sets V_S's PMI background and is
    #: not paired with the forget data (a baseline such as gradient ascent sets it False).
    has_retain_term: ClassVar[bool] = True

    @removes_created_output_dir
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
        run_arguments: dict[str, Any] | None = None,
        benchmark_evaluator: Callable[..., dict[str, float]] | None = None,
        **kwargs: Any,
    ):
        args = check_arguments(args)
        model = prepare_model(model, args, peft_config, processing_class)
        check_datasets(train_dataset, retain_dataset, heldout_dataset, eval_dataset)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        controllers = [c for c in callbacks if c is AdaptiveLambdaCallback or isinstance(c, AdaptiveLambdaCallback)]
        if (args.adaptive_lambda or controllers) and heldout_dataset is None and train_dataset is not None:
            train_dataset, heldout_dataset = split_heldout(train_dataset, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=[c for c in callbacks if not any(c is k for k in controllers)] or None,
            **kwargs,
        )
        if self.args.n_gpu > 1:
            raise ValueError(
                "ETUTrainer does not support torch.nn.DataParallel (several GPUs in one process). Launch one "
                "process per GPU with `torchrun` or `accelerate launch` (DDP) instead."
            )
        a = self.args
        self.vocab_size = output_vocab_size(self.model)
        check_token_ids(
            self.vocab_size,
            **{"train_dataset (the forget data)": train_dataset, "retain_dataset": retain_dataset},
            heldout_dataset=heldout_dataset,
        )
        self.forget_dataset, self.retain_dataset, self.heldout_dataset = train_dataset, retain_dataset, heldout_dataset
        self.run_arguments: dict[str, Any] = dict(run_arguments or {})
        self.benchmark_evaluator = benchmark_evaluator
        #: The content of metrics.json: set by train(), completed by audit() into the run's output_dir.
        self.training_metrics: dict[str, Any] | None = None
        self._user_collator = self.data_collator
        self.pairs_retain = self.has_retain_term and retain_dataset is not None and a.retain_weight > 0
        if self.pairs_retain:
            if train_dataset is None:
                raise ValueError("retain_dataset needs a train_dataset (the forget data) to pair with")
            self.train_dataset = ForgetRetainDataset(train_dataset, retain_dataset, seed=a.data_seed or a.seed)
        self.data_collator = ForgetRetainCollator(self.data_collator)
        self._refusal_ids = refusal_ids(a, processing_class, self.pairs_retain, train_dataset)
        self.base = choose_base(self.model, ref_model, a, tilted_target=self.fits_tilted_target)
        # the tokenizer finds words and informative tokens: processing_class, else the collator's (a script that
        # gives its tokenizer only to DataCollatorForLanguageModeling keeps working)
        tokenizer = (
            processing_class if processing_class is not None else getattr(self._user_collator, "tokenizer", None)
        )
        fs = forbidden_set_for_run(
            forbidden_set, a, self.vocab_size, train_dataset, retain_dataset, self._user_collator, tokenizer
        )
        self.tilt_state = TiltState(a, fs)
        self._metrics = ETUMetrics()
        self.heldout_probe: HeldoutProbe | None = None
        if heldout_dataset is not None:
            self.heldout_probe = HeldoutProbe(
                lambda: unwrap_model(self.model),
                self.base,
                heldout_dataset,
                self._user_collator,
                a.per_device_eval_batch_size,
                self.tilt_state,
                self.accelerator,
                a.loss_chunk_size,
            )
        super().add_callback(_SetupCallback(self._setup_target))
        for controller in controllers:
            self.add_callback(controller)
        if a.adaptive_lambda and self.lambda_controller is None:
            self.add_callback(AdaptiveLambdaCallback())
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------ the target (see TiltState)
    forbidden_set = property(lambda self: self.tilt_state.forbidden_set, doc="V_S (a ForbiddenSet).")
    base_p_s = property(lambda self: self.tilt_state.base_p_s, doc="Base mass on V_S (set at train start).")
    base_p_s_positions = property(lambda self: self.tilt_state.base_p_s_positions)
    global_lambda = property(lambda self: self.tilt_state.global_lambda, doc="Closed-form lambda at p_S.")
    lambda_offset = property(lambda self: self.tilt_state.offset, doc="The controller's offset (read-only).")

    def tilt_spec(self) -> TiltSpec:
        """The current target: mode, epsilon, clamps, closed-form global lambda and the offset."""
        return self.tilt_state.tilt_spec()

    def offset_bounds(self) -> tuple[float, float]:
        """Range of :attr:`lambda_offset` (see :meth:`TiltState.offset_bounds`)."""
        return self.tilt_state.offset_bounds()

    def measure_heldout(self) -> TiltStatistics:
        """The model against its target on the held-out forget slice (:class:`HeldoutProbe`)."""
        if self.heldout_probe is None:
            raise ValueError("no held-out forget data: pass heldout_dataset= or set adaptive_lambda=True")
        return self.heldout_probe.measure()

    def _setup_target(self) -> None:
        """At the start of training: estimate p_S over a sample of forget sequences and decide, on the
        first of its batches, whether the loss feeds hidden states or full logits."""
        ids = self.tilt_state.forbidden_ids(self.args.device)
        p_s, n, first = estimate_base_mass(
            self.base, self.forget_dataset, self._user_collator, self.args, ids, self.tilt_state.extra_ids
        )
        self.tilt_state.decide_head(self.model, first)
        self.tilt_state.set_base_mass(p_s, n)

    # ------------------------------------------------------------------ callbacks
    def add_callback(self, callback: Any) -> None:
        """``Trainer.add_callback``; an :class:`AdaptiveLambdaCallback` is bound to this run's held-out
        probe and tilt state (the one place controllers are bound)."""
        super().add_callback(callback)
        added = self.callback_handler.callbacks[-1]
        if isinstance(added, AdaptiveLambdaCallback) and not added.bound:
            added.bind(self.args, self.heldout_probe, self.tilt_state)

    @property
    def lambda_controller(self) -> AdaptiveLambdaCallback | None:
        """The bound adaptive-lambda controller, if any."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, AdaptiveLambdaCallback)), None)

    # ------------------------------------------------------------------ batching and the loss
    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer drops batch keys that model.forward does not take; keep the retain half too
        # (the same pattern as TRL's trainers, which override this to keep their own columns).
        super()._set_signature_columns_if_needed()
        if self.pairs_retain and not any(c.startswith(RETAIN_PREFIX) for c in self._signature_columns):
            self._signature_columns += [RETAIN_PREFIX + c for c in self._signature_columns if c != CORPUS_ID_COLUMN]
        if self.args.preference_weight > 0 and PREF_CHOSEN_COLUMN not in self._signature_columns:
            self._signature_columns.append(PREF_CHOSEN_COLUMN)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Collect the micro-batches of one optimiser step and count their scored positions: the
        :class:`ScoredCounts` (summed over processes) replace ``num_items_in_batch``, so accumulated
        gradients equal those of one large batch whatever the padding."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        counts = torch.zeros(3, dtype=torch.float32, device=device)
        for batch in batch_samples:
            forget, retain = split_forget_retain(batch)
            counts[0] += count_scored(forget, device)
            if retain is not None:
                counts[1] += count_scored(retain, device)
            counts[2] += self.count_sequences(forget, device)
        world = self.args.world_size
        if world > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return batch_samples, ScoredCounts(forget=counts[0], retain=counts[1], world_size=world, sequences=counts[2])

    def count_sequences(self, forget: dict[str, Any], device: torch.device) -> torch.Tensor:
        """Forget sequences of a micro-batch that a per-sequence term divides by (:attr:`ScoredCounts.sequences`):
        with ``preference_weight > 0`` the rows with a completion, else 0. A method with its own
        per-sequence forget term overrides it."""
        if self.args.preference_weight <= 0:
            return torch.zeros((), device=device)
        mask, _ = scored_positions(forget["input_ids"], forget.get("attention_mask"), forget.get("labels"))
        comp = completion_mask(mask, forget.get("attention_mask"), self.args.pref_prompt_tokens)
        return comp.any(1).sum().to(device=device, dtype=torch.float32)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Loss of one micro-batch: the method's forget term (:meth:`forget_loss`) plus ``retain_weight``
        times the retain term, each over its own count of the whole accumulated batch (see the module
        docstring for ETU's formula)."""
        if self.forbidden_set is None:
            raise ValueError("no forbidden set: pass a train_dataset to build V_S from, or forbidden_set=")
        counts = num_items_in_batch if isinstance(num_items_in_batch, ScoredCounts) else None
        forget, retain = split_forget_retain(inputs)
        a, tilt = self.args, self.tilt_state
        if tilt.needs_base_mass:  # global mode, compute_loss outside train()
            self._setup_target()
        elif tilt.use_hidden is None:
            tilt.decide_head(model, forget)
        ctx = LossContext(model, output_head(model), self.base, tilt, a.loss_chunk_size, self.accelerator.autocast)
        loss, outputs, forget_stats = self.forget_loss(ctx, forget, retain, counts, keep_logits=return_outputs)
        zero = torch.zeros((), device=forget["input_ids"].device)
        kept = (zero, zero)
        if retain is not None and self.has_retain_term and a.retain_weight > 0 and model.training:
            z = counts.retain.clamp_min(1.0) if counts is not None else None
            r_loss, *kept = retain_term(ctx, retain, a.retain_loss_type, z)
            loss = loss + a.retain_weight * r_loss
        self.add_metrics("train" if model.training else "eval", forget_stats, kept)
        if counts is not None and counts.world_size > 1:
            # DDP/DeepSpeed average gradients over processes; the normaliser already counts all of them.
            loss = loss * counts.world_size
        return (loss, outputs) if return_outputs else loss

    def forget_loss(
        self,
        ctx: LossContext,
        forget: dict[str, Any],
        retain: dict[str, Any] | None,
        counts: ScoredCounts | None,
        keep_logits: bool = False,
    ) -> tuple[torch.Tensor, Any, Any]:
        """The forget part of the loss of one micro-batch: ``(loss, model outputs, statistics)``, the
        statistics going to :meth:`add_metrics`. ETU: the tilted KL over the forget positions plus, with
        ``preference_weight > 0``, the preference term (whose DPO chosen completions may come from
        ``retain``). The baselines (:mod:`etu_hf.training.baselines`) override this one method."""
        a, model = self.args, ctx.model
        pref_on = a.preference_weight > 0 and model.training and self.state.global_step % a.pref_every == 0
        z = counts.forget.clamp_min(1.0) if counts is not None else None
        kl, outputs, mask = forget_term(ctx, forget, z, keep_logits=keep_logits, with_targets=pref_on)
        loss = kl.loss
        zero = torch.zeros((), device=forget["input_ids"].device)
        pref = (zero, zero)
        if pref_on:
            z = counts.sequences.clamp_min(1.0) if counts is not None and counts.sequences is not None else None
            pad = pad_token_id(self.processing_class)
            p_loss, *pref = preference_term(ctx, a, forget, retain, mask, kl, z, self._refusal_ids, pad)
            loss = loss + a.preference_weight * p_loss
        return loss, outputs, (kl, pref)

    def add_metrics(self, mode: str, forget_stats: Any, retain_sums: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Accumulate one micro-batch's statistics (:meth:`forget_loss`'s, then the retain term's sum and
        weight) for the ``mode`` (``"train"``/``"eval"``) log."""
        kl, pref = forget_stats
        self._metrics.add(mode, stat_values(kl, retain_sums, pref), kl.lambda_min, kl.lambda_max)

    # ------------------------------------------------------------------ logging and evaluation
    def _reduce(self) -> Any:
        return self.accelerator.reduce if self.args.world_size > 1 else None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the ETU metrics of the training window, and the controller's last update, to training logs."""
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            stats = self._metrics.pop("train", self._reduce())
            if stats is not None:
                logs.update(stats)
                if stats.get("etu/clamped_share", 0.0) > CLAMP_WARN_SHARE:
                    logger.warning(
                        "the lambda clamp binds at %.1f%% of the training positions: the target misses epsilon "
                        "there. Raise --lambda_max (now %s).",
                        100 * stats["etu/clamped_share"],
                        self.args.lambda_max,
                    )
            if self.lambda_controller is not None:
                logs.update(self.lambda_controller.pop_logs())
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """The Trainer's evaluation loop plus the ETU metrics, with the same names as in training and
        the Trainer's prefix: ``{metric_key_prefix}_etu/pi_s``, ``..._etu/q_s``, ``..._etu/lambda``, ...; with a
        ``benchmark_evaluator`` also its aggregates (``eval_forget_quality``, ``eval_model_utility``, ...), so
        ``metric_for_best_model="forget_quality"`` with ``load_best_model_at_end`` keeps the best checkpoint."""
        self._metrics.window["eval"].reset()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        stats = self._metrics.pop("eval", self._reduce()) or {}
        if self.benchmark_evaluator is not None:
            # every process scores its shard; the aggregates are the same on every rank
            stats.update(self.benchmark_evaluator(unwrap_model(self.model), self.accelerator))
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in stats.items()})
        return output
