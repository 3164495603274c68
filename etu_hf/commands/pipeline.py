"""The unlearning run behind ``etu-hf unlearn`` and ``etu-hf demo`` (both import it from here).

Load tokenizer -> load corpora, hold out documents -> token blocks -> model -> ETUTrainer (or, with
``--method``, a baseline trainer of :mod:`etu_hf.training.baselines` on the same data, adapters and launch
options) -> audit on held-out text -> artifacts. Everything goes through the same public API a user calls
from Python (:class:`~etu_hf.ETUTrainer`, :func:`~etu_hf.audit`, ...). :func:`run_and_print` is what
both commands run once their flags are parsed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from etu_hf.artifacts.record import RunRecord
from etu_hf.artifacts.run_folder import RunFolder, check_output_dir, resolve_resume_checkpoint
from etu_hf.commands.arguments import (
    DataArguments,
    ModelArguments,
    training_arguments_class,
)
from etu_hf.commands.cli import setup_logging
from etu_hf.commands.loader import (
    check_before_weights,
    init_deepspeed_for_zero3,
    load_tokenizer,
    load_training_model,
)
from etu_hf.data.blocks import tokenize_and_block
from etu_hf.data.corpus import load_corpora, parse_corpus_specs, split_documents, warn_if_corpora_overlap
from etu_hf.modeling.paths import check_model_path
from etu_hf.training.config import ETUTrainingArguments
from etu_hf.training.setup import check_report_to

logger = logging.getLogger(__name__)


@dataclass
class UnlearnResult:
    """What a pipeline run produced: the trainer, the measurements and where the artifacts are."""

    output_dir: str
    metrics: dict[str, Any]
    trainer: Any = field(repr=False, default=None)
    report: Any = None


def prepare_corpora(data_args: DataArguments, tokenizer: Any, seed: int) -> dict[str, Any]:
    """Load, split and block the corpora. Returns datasets ``forget_train``, ``forget_eval``,
    ``retain_train`` and ``retain_eval`` (the retain ones may be ``None``)."""
    import datasets

    forget_specs = parse_corpus_specs(data_args.forget_corpora, "--forget_corpora")
    if not forget_specs:
        raise ValueError("--forget_corpora: no corpus given; name at least one file, folder or hub dataset")
    retain_specs = parse_corpus_specs(data_args.retain_corpora, "--retain_corpora")
    if retain_specs and len(retain_specs) != len(forget_specs) and not data_args.retain_broadcast:
        raise ValueError(
            f"--retain_corpora gives {len(retain_specs)} corpora for {len(forget_specs)} forget corpora: give one "
            "retain corpus per forget corpus, or one retain corpus with --retain_broadcast."
        )
    if data_args.retain_broadcast and len(retain_specs) > 1:
        raise ValueError("--retain_broadcast reuses ONE retain corpus; --retain_corpora names several")

    forget_docs = load_corpora(forget_specs, data_args.text_column, "--forget_corpora")
    if sum(len(d) for d in forget_docs) == 0:
        raise ValueError(f"--forget_corpora: {data_args.forget_corpora!r} holds no text: nothing to forget")
    retain_docs = load_corpora(retain_specs, data_args.text_column, "--retain_corpora")
    warn_if_corpora_overlap([d for docs in forget_docs for d in docs], [d for docs in retain_docs for d in docs])

    paired = len(retain_specs) > 1  # corpus-aligned pairing (forget k with retain k)

    def blocks(groups: list[list[str]], flag: str) -> tuple[Any, Any]:
        train_parts, eval_parts = [], []
        for k, docs in enumerate(groups):
            if len(docs) < 2:
                raise ValueError(
                    f"{flag}: corpus {k + 1} has {len(docs)} document(s); need at least 2 "
                    "(one to train on and one held out)"
                )
            train, held = split_documents(docs, data_args.eval_fraction, seed)
            cid = k if paired else None
            train_parts.append(tokenize_and_block(train, tokenizer, data_args.block_size, corpus_id=cid))
            eval_parts.append(tokenize_and_block(held, tokenizer, data_args.block_size, corpus_id=cid))
        return datasets.concatenate_datasets(train_parts), datasets.concatenate_datasets(eval_parts)

    forget_train, forget_eval = blocks(forget_docs, "--forget_corpora")
    retain_train = retain_eval = None
    if retain_docs:
        retain_train, retain_eval = blocks(retain_docs, "--retain_corpora")
    return {
        "forget_train": forget_train,
        "forget_eval": forget_eval,
        "retain_train": retain_train,
        "retain_eval": retain_eval,
    }


def trainable_setup(model: Any, model_args: ModelArguments) -> Any:
    """The ``peft_config`` to train (LoRA/DoRA/QLoRA), or ``None`` after restricting the model's own
    trainable parameters to ``--layer_ids``/``--name_keywords``/``--param_ids`` when given.

    The ``LoraConfig`` comes from :func:`etu_hf.modeling.adapters.lora_config`, not TRL's
    ``get_peft_config``: TRL's passes ``--lora_target_modules`` to PEFT as given and has no
    ``layers_to_transform``, so it cannot express what ETU adds here: ``all-linear,lm_head``
    (PEFT's linear layers plus the output head, which the tilt needs), target names checked against
    the model before loading, and ``--layer_ids``. Those are two of the five settings it fills, so
    building on top of it would rebuild its result.
    """
    from etu_hf.modeling.adapters import lora_config, parse_ids, select_trainable

    layer_ids = parse_ids(model_args.layer_ids, "--layer_ids")
    if model_args.adapter:
        return lora_config(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            use_dora=model_args.use_dora,
            layer_ids=layer_ids,
        )
    keywords = (
        [k.strip() for k in model_args.name_keywords.split(",") if k.strip()] if model_args.name_keywords else None
    )
    if layer_ids is not None or keywords or model_args.param_ids:
        select_trainable(model, layer_ids, keywords, parse_ids(model_args.param_ids, "--param_ids"))
    return None


def hub_repo_before_training(training_args: ETUTrainingArguments) -> str | None:
    """With ``--push_to_hub``: the repo to push to once the run is audited, checked now (repo id, online,
    a token from ``--hub_token``, ``HF_TOKEN`` or the login) so that a run that cannot be pushed fails
    before training. The Trainer's own pushes (repo creation at start, checkpoints, ``save_model``) are
    turned off: the run is pushed once, complete, by :func:`etu_hf.hub.push.push_run`."""
    if not training_args.push_to_hub:
        return None
    from pathlib import Path

    from etu_hf.hub.push import check_hub_access, check_repo_id

    repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    check_repo_id(repo_id)
    check_hub_access(training_args.output_dir, training_args.hub_token)
    training_args.push_to_hub = False
    return repo_id


def push_finished_run(training_args: ETUTrainingArguments, repo_id: str, base_model: str | None) -> str:
    """Publish the audited run in ``output_dir`` (:func:`etu_hf.hub.push.push_run`); an upload that fails
    says the run itself is complete and how to push it again."""
    from etu_hf.hub.push import PushError, push_run

    out = training_args.output_dir
    try:
        url = push_run(
            out,
            repo_id,
            private=bool(training_args.hub_private_repo),
            revision=training_args.hub_revision,
            commit_message="etu-hf unlearn: unlearned model, V_S and audit",
            token=training_args.hub_token,
            base_model=base_model,
        )
    except PushError:
        raise
    except Exception as err:  # HTTP and network errors: the run is complete, only the upload failed
        raise PushError(
            f"the upload to {repo_id} failed ({type(err).__name__}: {err}); the run itself is complete in "
            f"{os.path.abspath(out)}: push it with `etu-hf push --output_dir {out} --repo_id {repo_id}`"
        ) from err
    logger.info("pushed %s to %s: %s", out, repo_id, url)
    return url


def run_unlearning(
    model_args: ModelArguments, data_args: DataArguments, training_args: ETUTrainingArguments
) -> UnlearnResult:
    """Run ETU (or the baseline ``model_args.method``) end to end and write the artifacts to
    ``training_args.output_dir``."""
    from transformers import default_data_collator

    from etu_hf.training.baselines import trainer_class
    from etu_hf.training.trainer import split_heldout

    trainer_cls = trainer_class(model_args.method)
    expected = training_arguments_class(model_args.method)
    if not isinstance(training_args, expected):
        raise TypeError(
            f"--method {model_args.method} needs {expected.__name__}, got {type(training_args).__name__} "
            "(parse_unlearn_args picks the right one)"
        )
    # ETUTrainer.train checks output_dir and the checkpoint too, but only after the model is loaded and V_S
    # built: checked here first, a previous run, an unwritable folder or an incomplete checkpoint is refused
    # in a second instead of after loading a large model.
    existed = os.path.isdir(training_args.output_dir)  # Trainer.__init__ creates it; a failed run removes it again
    inputs = {
        "--model_name_or_path": model_args.model_name_or_path,
        "--tokenizer_name_or_path": model_args.tokenizer_name_or_path,
    }
    check_output_dir(
        training_args.output_dir, training_args.overwrite_output_dir, training_args.resume_from_checkpoint, inputs
    )
    resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_report_to(training_args)
    push_repo = hub_repo_before_training(training_args)
    # The corpora before the weights: a bad corpus fails in seconds, not after loading a large model.
    check_model_path(model_args.model_name_or_path, "--model_name_or_path")  # before the tokenizer it also holds
    tok_flag = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
    tokenizer = load_tokenizer(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path, model_args.trust_remote_code, tok_flag
    )
    check_before_weights(
        model_args.model_name_or_path,
        tokenizer,
        tok_flag,
        training_args.forbidden_ids_path,
        model_args.trust_remote_code,
        model_args.layer_ids,
    )
    if training_args.forbidden_words:  # words the tokenizer cannot encode: refused before the weights load
        from etu_hf.data.words import read_forbidden_words

        read_forbidden_words(training_args.forbidden_words, tokenizer)
    data = prepare_corpora(data_args, tokenizer, training_args.seed)
    init_deepspeed_for_zero3(training_args)
    model = load_training_model(model_args, training_args.gradient_checkpointing, data_args.block_size)
    peft_config = trainable_setup(model, model_args)
    forget_train = data["forget_train"]
    heldout = None
    if training_args.adaptive_lambda:  # the controller's slice comes out of the forget data before any cap
        forget_train, heldout = split_heldout(forget_train, training_args)
    if data_args.max_num_batches is not None:
        n = data_args.max_num_batches * training_args.per_device_train_batch_size * max(1, training_args.world_size)
        if n < len(forget_train):
            forget_train = forget_train.shuffle(seed=training_args.seed).select(range(n))
    logger.info(
        "forget: %d training blocks, %d held-out blocks; retain: %s training blocks",
        len(forget_train),
        len(data["forget_eval"]),
        len(data["retain_train"]) if data["retain_train"] is not None else 0,
    )

    logger.info("method: %s (%s)", model_args.method, trainer_cls.__name__)
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=forget_train,
        eval_dataset=data["forget_eval"],
        retain_dataset=data["retain_train"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        peft_config=peft_config,
        heldout_dataset=heldout,
        run_arguments={**asdict(model_args), **asdict(data_args), **({"push_to_hub": True} if push_repo else {})},
    )
    fs = trainer.forbidden_set
    logger.info("V_S: %d tokens (%.2f%% of the vocabulary), method %s", len(fs), 100 * (fs.fraction or 0), fs.method)

    # Everything below writes to output_dir: a failure leaves it as it was found (see RunFolder).
    with RunFolder(
        training_args.output_dir,
        overwrite=training_args.overwrite_output_dir,
        resume=bool(training_args.resume_from_checkpoint),
        main_process=trainer.is_world_process_zero(),
        existed=existed,
    ):
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        # The audit of the result, on held-out documents the training (and the controller) never saw.
        report = trainer.audit(
            forget_data=data["forget_eval"],
            retain_data=data["retain_eval"],
            output_dir=training_args.output_dir,
            overwrite=True,  # the run owns output_dir: the previous-run check passed before training
            max_sequences=data_args.audit_max_sequences or None,
            sources={
                "model": model_args.model_name_or_path or "etu-hf demo model",
                "forget_corpora": data_args.forget_corpora,
                "retain_corpora": data_args.retain_corpora,
                "heldout": f"{data_args.eval_fraction:.0%} of the documents, held out of training",
            },
        )
    # The trainer wrote metrics.json (training, then the audit's "heldout" and "data" sections); the main
    # process reads it back from the run folder. Other processes did not write it (and may not share the
    # folder's file system): they keep what their trainer holds.
    main = trainer.is_world_process_zero()
    if push_repo and main:  # after the RunFolder: a failed upload never undoes the finished run
        push_finished_run(training_args, push_repo, model_args.model_name_or_path)
    metrics = RunRecord.read(training_args.output_dir).metrics if main else trainer.training_metrics
    return UnlearnResult(output_dir=training_args.output_dir, metrics=metrics, trainer=trainer, report=report)


def run_and_print(model_args: ModelArguments, data_args: DataArguments, training_args: ETUTrainingArguments) -> int:
    """Run :func:`run_unlearning` and print the report's summary and where the artifacts are."""
    setup_logging(training_args.should_log, training_args.log_level == "info")
    result = run_unlearning(model_args, data_args, training_args)
    if training_args.should_log:
        print()
        print(result.report.summary())
        print(f"\nartifacts: {os.path.abspath(result.output_dir)}")
    return 0
