"""The part of ``ETUTrainer`` that records the run (docs/artifacts.md): ``train()`` with etu-hf's rules
for ``output_dir`` (V_S.ids.json and args.json first, metrics.json at the end), the run state in
every checkpoint, ``audit()`` (which completes metrics.json) and saving the model.

:class:`RunRecords` is a mixin of :class:`~etu_hf.training.trainer.ETUTrainer` (before
``transformers.Trainer`` in its bases); it uses the trainer's ``tilt_state``, ``base``, ``_metrics``,
``lambda_controller``, the datasets and ``run_arguments``. The numbers and files themselves are
assembled in :mod:`etu_hf.training.run_state`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from etu_hf.artifacts.files import ARGS_FILE, FORBIDDEN_SET_FILE, write_json
from etu_hf.artifacts.run_folder import (
    PREVIOUS_RUN_PREFIX,
    RunFolder,
    check_writable,
    previous_run_files,
    replaced_entries,
    resolve_resume_checkpoint,
)
from etu_hf.modeling.head import is_peft_model, output_head_adapted_without_resize, unwrap_model
from etu_hf.training import run_state

logger = logging.getLogger(__name__)


def removes_created_output_dir(init: Any) -> Any:
    """Decorate a trainer's ``__init__`` (``model, args, ...``): when it fails, an ``output_dir`` that
    ``Trainer.__init__`` created and left empty is removed, so a refused run leaves nothing behind."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        given = kwargs["args"] if "args" in kwargs else (args[1] if len(args) > 1 else None)
        out = getattr(given, "output_dir", None)
        existed = out is None or os.path.isdir(out)
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if not existed and os.path.isdir(out) and not os.listdir(out):
                os.rmdir(out)
            raise
        self._created_output_dir = not existed  # a first train() that fails removes it again

    return wrapper


class RunRecords:
    """``train``/``audit``/saving of ``ETUTrainer``: what a run writes besides the Trainer's own files."""

    #: Tags added to model cards and hub commits.
    _tag_names: list[str]

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train`` with etu-hf's rules for ``output_dir``; writes V_S.ids.json and args.json
        first and metrics.json at the end.

        Before anything is written, ``output_dir`` is checked (writable) and ``resume_from_checkpoint``
        (``True``/``"true"`` for the last complete checkpoint, or a path) is resolved to a complete
        checkpoint whose V_S is this run's. As with ``Trainer``, an unchanged script can run again into
        the same ``output_dir``: a previous run there is replaced, with a warning naming its files
        (``overwrite_output_dir=True`` asks for it and silences the warning; the ``etu-hf`` command line
        refuses without it). The writes happen inside a :class:`~etu_hf.artifacts.run_folder.RunFolder`:
        the previous run's files are moved aside and deleted only when this run succeeds, and a failure
        leaves ``output_dir`` as it was found, complete checkpoints excepted. After a resume, metrics.json
        still covers the whole run (the loss and statistic sums so far are saved in every checkpoint).
        """
        a = self.args
        check_writable(a.output_dir)
        replaced = [] if resume_from_checkpoint else replaced_entries(a.output_dir)
        if replaced and previous_run_files(a.output_dir):
            if not a.overwrite_output_dir and self.is_world_process_zero():
                shown = ", ".join(replaced[:8]) + (f", ... ({len(replaced)} entries)" if len(replaced) > 8 else "")
                logger.warning(
                    "output_dir %s holds a previous run; this run replaces it: %s are moved into %s<time>/, deleted "
                    "when this run succeeds and put back if it fails (other files stay). `etu-hf unlearn` refuses "
                    "this without --overwrite_output_dir.",
                    a.output_dir,
                    shown,
                    PREVIOUS_RUN_PREFIX,
                )
        # Every process looks before any writes: otherwise a slower process sees the main one's
        # V_S.ids.json and takes this run for a previous one.
        self.accelerator.wait_for_everyone()
        if self.forget_dataset is None:
            raise ValueError("ETUTrainer.train needs a train_dataset (the forget data)")
        if self.forbidden_set is None:
            raise ValueError("no forbidden set V_S: pass forbidden_set= or a train_dataset to build it from")
        resume = resolve_resume_checkpoint(resume_from_checkpoint, a.output_dir)
        if resume is not None:
            run_state.check_checkpoint_forbidden_set(resume, self.forbidden_set)
        self._metrics.reset()
        main = self.is_world_process_zero()
        self._run_before = run_state.restore_run_state(resume, self._metrics.total, main, a.device)
        if self._run_before["epsilon"] is not None:
            self.tilt_state.restore_epsilon(self._run_before["epsilon"], resume)
        elif resume is not None and a.epsilon_ratio is not None:
            logger.warning(
                "%s records no resolved epsilon (saved by an older etu-hf): epsilon_ratio is resolved again", resume
            )
        controller = self.lambda_controller
        if controller is not None and resume is not None and not controller.load_from_checkpoint(resume):
            logger.warning("%s holds no lambda controller state (etu_controller.json); the controller restarts", resume)
        # overwrite=True: like Trainer, a rerun into the same output_dir replaces the previous run (warned
        # above); inside `etu-hf unlearn`, whose stricter check already ran, the outer RunFolder decides.
        created, self._created_output_dir = getattr(self, "_created_output_dir", False), False
        with RunFolder(a.output_dir, True, resume is not None, main, existed=not created):
            if main:
                self.forbidden_set.save(os.path.join(a.output_dir, FORBIDDEN_SET_FILE))
                write_json(os.path.join(a.output_dir, ARGS_FILE), {**a.to_dict(), **self.run_arguments})
            self._train_start = time.time()
            try:
                output = super().train(
                    resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
                )
            except RuntimeError as err:
                if resume is None or "size mismatch" not in str(err):
                    raise
                raise ValueError(
                    f"--resume_from_checkpoint {resume}: the checkpoint's weights do not fit this run's model "
                    f"({str(err).strip().splitlines()[-1].strip()}); resume with the settings it was trained with "
                    f"(see {os.path.join(a.output_dir, ARGS_FILE)}: --lora_r, --lora_target_modules, ...), or start "
                    "afresh in another --output_dir. Nothing of the previous run was changed."
                ) from err
            if self.state.global_step == 0:
                raise ValueError(
                    "the run trained 0 optimizer steps (--max_steps, --num_train_epochs and the data size give none); "
                    "nothing was saved. Give --max_steps N >= 1 or --num_train_epochs > 0."
                )
            self.check_finite()
            self.training_metrics = self._training_metrics(output, time.time() - self._train_start)
            if main:
                run_state.write_metrics(a.output_dir, self.training_metrics)
        return output

    def check_finite(self, loss: float | None = None) -> None:
        """Raise ``ValueError`` when ``loss`` or a trainable weight is NaN or infinite: a diverged run stops
        there, and the run folder is rolled back (nothing is saved as if it had succeeded).

        Called at every log (with the logged loss), before every checkpoint and at the end of training.
        One device synchronisation: the per-tensor ``isfinite(p).all()`` flags are stacked first.
        """
        bad = None if loss is None or math.isfinite(loss) else f"the training loss became {loss}"
        if bad is None:
            params = [p for p in unwrap_model(self.model).parameters() if p.requires_grad and p.numel() > 0]
            if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
                bad = "the trainable weights hold NaN or inf"
        if bad is not None:
            raise ValueError(
                f"training diverged at step {self.state.global_step}: {bad}; the run was stopped and nothing was "
                f"saved as a result. Lower --learning_rate (now {self.args.learning_rate:g}) or set --max_grad_norm."
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log``, after :meth:`check_finite` on a training log."""
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            self.check_finite(float(logs["loss"]))
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _loss_sum(self) -> float:
        """The training loss summed over every step of the run so far (a collective under DDP)."""
        unlogged = getattr(self, "_tr_loss", None)  # the Trainer's loss sum since the last log
        unlogged = unlogged.detach().clone() if unlogged is not None else torch.zeros((), device=self.args.device)
        if self.args.world_size > 1:
            unlogged = self.accelerator.reduce(unlogged, reduction="mean")
        before = getattr(self, "_run_before", None) or {"loss_sum": 0.0}
        return before["loss_sum"] + getattr(self, "_total_loss_scalar", 0.0) + float(unlogged)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``Trainer._save_checkpoint``, with :data:`~etu_hf.training.run_state.RUN_STATE_FILE` written first
        (after :meth:`check_finite`: a diverged model is never saved as a checkpoint to resume)."""
        self.check_finite()
        before = getattr(self, "_run_before", None) or {"training_seconds": 0.0}
        seconds = before["training_seconds"] + time.time() - getattr(self, "_train_start", time.time())
        stats = self._metrics.total.snapshot(self._reduce(), self.args.device)
        tilt = self.tilt_state
        epsilon = tilt.epsilon_record() if tilt.epsilon_resolved else None
        state = run_state.run_state(self.state.global_step, self._loss_sum(), seconds, stats, epsilon)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            write_json(os.path.join(folder, run_state.RUN_STATE_FILE), state)
        super()._save_checkpoint(model, trial)

    def _training_metrics(self, output: Any, duration: float) -> dict[str, Any]:
        before = self._run_before
        self._metrics.pop("train", self._reduce())  # the unlogged tail, if any, is the final window
        if before["complete"]:  # the mean loss per step over the whole run, steps before a resume included
            train_loss = (before["loss_sum"] + getattr(self, "_total_loss_scalar", 0.0)) / max(
                self.state.global_step, 1
            )
        else:
            train_loss = getattr(output, "training_loss", None)
        return run_state.training_metrics(
            tilt=self.tilt_state,
            vocab_size=self.vocab_size,
            state=self.state,
            controller=self.lambda_controller,
            final=self._metrics.last_train,
            total=self._metrics.total.read(self._reduce()) or {},
            train_loss=train_loss,
            before=before,
            duration=duration,
        )

    def audit(
        self, forget_data: Any = None, retain_data: Any = None, output_dir: str | None = None, **kwargs: Any
    ) -> Any:
        """Audit the trained model with :func:`etu_hf.audit` against this trainer's base distribution,
        V_S and current tilt (including the controller's offset).

        ``forget_data`` defaults to ``eval_dataset`` when given, else the controller's held-out slice;
        it must not be training data. ``kwargs`` go to :func:`etu_hf.audit` (``overwrite``,
        ``num_samples``, ``analyze_activations``, ...). Files are written by the main process only.
        Audited into the run's own ``output_dir``, the report's summary (``heldout``) and the data's
        block counts (``data``) are added to its metrics.json and to :attr:`training_metrics`.
        """
        from etu_hf.evaluation.audit import audit

        if forget_data is None:
            forget_data = self.eval_dataset if self.eval_dataset is not None else self.heldout_dataset
        if forget_data is None:
            raise ValueError("audit: no held-out forget data; pass forget_data= (never the training data)")
        if self.tilt_state.needs_base_mass:
            self._setup_target()
        a, main = self.args, self.is_world_process_zero()
        options = dict(
            base=self.base,
            retain_data=retain_data,
            tokenizer=self.processing_class,
            collator=self._user_collator,
            batch_size=a.per_device_eval_batch_size,
            chunk_size=a.loss_chunk_size,
            wilson_max_n=a.wilson_max_n,
            seed=a.seed,
            progress=not a.disable_tqdm and main,
        )
        options.update(kwargs)
        target = output_dir if main else None
        report = audit(self.model, forget_data, self.forbidden_set, tilt=self.tilt_spec(), output_dir=target, **options)
        if target is not None and os.path.abspath(target) == os.path.abspath(a.output_dir):
            data = run_state.data_counts(
                self.forget_dataset,
                self.heldout_dataset,
                self.retain_dataset,
                forget_data,
                retain_data,
                self.run_arguments.get("block_size"),
            )
            heldout = run_state.audit_summary(report)
            self.training_metrics = run_state.update_metrics(target, self.training_metrics, data=data, heldout=heldout)
        return report

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
        if not (is_peft_model(model) and output_head_adapted_without_resize(model)):
            return super()._save(output_dir, state_dict)
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained  # back to the class's method

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write etu-hf's model card (:func:`etu_hf.hub.card.write_model_card`) as ``README.md`` in
        ``output_dir``: what was unlearned, the ETU settings, the held-out audit and its verdict, the
        plots and a loading snippet. ``Trainer.push_to_hub`` calls this before uploading the folder.

        Takes ``Trainer.create_model_card``'s arguments: ``finetuned_from`` is the base model,
        ``dataset`` the data names, ``tags`` are added after ``etu-hf`` and ``unlearning``,
        ``model_name`` is the title, ``language`` and ``license`` go into the metadata. ``tasks``,
        ``dataset_tags`` and ``dataset_args`` are accepted for compatibility (the card is a causal-LM
        ``text-generation`` card). Only the main process writes.
        """
        if not self.is_world_process_zero():
            return
        from etu_hf.hub.card import write_model_card
        from etu_hf.hub.run_files import NotARunError  # etu_hf.hub reads run folders; it never imports training

        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in self._tag_names if t not in tags]
        try:
            write_model_card(
                self.args.output_dir,
                base_model=finetuned_from,
                tags=tags,
                dataset=dataset if dataset is not None else dataset_tags,
                model_name=model_name,
                license=license,
                language=language,
                repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            )
        except NotARunError as err:  # not trained into output_dir yet: nothing of the run to report
            logger.warning("the model card is Trainer's generic one: %s", err)
            super().create_model_card(  # type: ignore[misc]
                language=language,
                license=license,
                tags=tags,
                model_name=model_name,
                finetuned_from=finetuned_from,
                tasks=tasks,
                dataset_tags=dataset_tags,
                dataset=dataset,
                dataset_args=dataset_args,
            )
