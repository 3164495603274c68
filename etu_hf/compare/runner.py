"""``run_compare``: every method on the same benchmark, LoRA, data and step budget, then evaluated the
same way (and attacked the same way with ``relearn_steps``).

For each run of :meth:`CompareArguments.grid` the target model is loaded afresh, wrapped in the same
LoRA adapter (same seed), trained by the method's trainer class on the forget questions (answers
scored, :func:`etu_hf.benchmark.qa.tokenize_qa`) paired with retain questions, evaluated with
:func:`etu_hf.evaluation.unlearning.evaluate_benchmark` against the retain model's evaluation, and,
with ``relearn_steps``, attacked (:func:`relearn`) and evaluated again. V_S is built once (PMI of the
forget answers against the retain answers) and shared by every run, so the ETU mass column measures
every method on the same token set. Each run's folder keeps its adapter and its EVAL.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from etu_hf.compare.pareto import pareto_front
from etu_hf.compare.settings import CompareArguments, setting_of

logger = logging.getLogger(__name__)

#: The two axes of the comparison (both: higher is better).
X_METRIC, Y_METRIC = "forget_quality", "model_utility"


class CompareInputs:
    """What every run shares: the benchmark, the tokenizer, the tokenized splits, the model paths."""

    def __init__(self, cfg: CompareArguments):
        from transformers import AutoTokenizer

        from etu_hf.benchmark.folder import load_benchmark
        from etu_hf.benchmark.qa import tokenize_qa
        from etu_hf.data.blocks import ensure_pad_token

        target, retain = cfg.model_name_or_path, cfg.retain_model
        if cfg.benchmark == "builtin":
            from etu_hf.benchmark.models import benchmark_models

            built = benchmark_models()
            target, retain = target or built.target, retain or built.retain
            self.benchmark = load_benchmark(built.benchmark)
        else:
            self.benchmark = load_benchmark(cfg.benchmark)
            if target is None or retain is None:
                raise ValueError(
                    "--model_name_or_path and --retain_model are required with a benchmark folder (the model "
                    "trained on forget + retain, and the one trained on retain only)"
                )
        self.target_path, self.retain_path = str(target), str(retain)
        self.tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(self.target_path))
        check_same_tokenizer(self.tokenizer, self.retain_path)
        self.forget = tokenize_qa(self.benchmark.forget, self.tokenizer)
        self.retain = tokenize_qa(self.benchmark.retain, self.tokenizer)


def check_same_tokenizer(tokenizer: Any, other_path: str, flag: str = "--retain_model") -> None:
    """``ValueError`` naming ``flag`` when the tokenizer at ``other_path`` has another vocabulary."""
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(other_path)
    if other.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"{flag}: {other_path} has another tokenizer ({len(other)} tokens) than the model being unlearned "
            f"({len(tokenizer)} tokens, {tokenizer.name_or_path}); both models must share one tokenizer"
        )


def lora_for(model: Any, cfg: CompareArguments) -> Any:
    """The one LoRA configuration of every run."""
    from etu_hf.modeling.adapters import lora_config

    return lora_config(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0, target_modules=cfg.lora_target_modules)


def load_model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32")


def collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def train_run(
    method: str, hyper: dict[str, float], cfg: CompareArguments, inputs: CompareInputs, run_dir: str, forbidden_set: Any
) -> Any:
    """Train one method from the target model; returns the trainer (its model holds the adapter). The seed (LoRA
    init, data order) is ``hyper["seed"]``, else ``cfg.seed``."""
    from etu_hf.compare.settings import ETU_VARIANTS
    from etu_hf.training.baselines import BaselineTrainingArguments, trainer_class
    from etu_hf.training.config import ETUTrainingArguments

    is_etu = method in ETU_VARIANTS
    args_cls = ETUTrainingArguments if is_etu else BaselineTrainingArguments
    kwargs: dict[str, Any] = dict(
        output_dir=run_dir,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        learning_rate=hyper["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=max(1, cfg.max_steps // 4),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed_of(hyper, cfg),
        data_seed=seed_of(hyper, cfg),
        retain_weight=0.0 if method == "ga" else cfg.retain_weight,
        retain_loss_type=cfg.retain_loss_type,
        adaptive_lambda=False,
        overwrite_output_dir=True,
        dataloader_pin_memory=False,
    )
    if is_etu:
        kwargs["epsilon"] = hyper["epsilon"]
        kwargs.update(ETU_VARIANTS[method])
        kwargs.update(cfg.etu_overrides)
        if method != "etu-pmi":  # every other ETU run builds its own V_S from the same data
            forbidden_set = None
    model = load_model(inputs.target_path)
    trainer = trainer_class("etu" if is_etu else method)(
        model=model,
        args=args_cls(**kwargs),
        train_dataset=inputs.forget,
        retain_dataset=inputs.retain,
        data_collator=collator(inputs.tokenizer),
        processing_class=inputs.tokenizer,
        peft_config=lora_for(model, cfg),
        forbidden_set=forbidden_set,
    )
    trainer.train()
    return trainer


def seed_of(hyper: dict[str, float], cfg: CompareArguments) -> int:
    """The seed of a grid run: its ``hyperparameters["seed"]`` (:meth:`CompareArguments.grid`), else ``--seed``."""
    return int(hyper.get("seed", cfg.seed))


def unlearn_and_evaluate(
    run: tuple[str, str, dict[str, float]], cfg: CompareArguments, inputs: Any, forbidden_set: Any, evaluate: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """One grid run ``(method, label, hyperparameters)``: train it into ``<output_dir>/runs/<method>_<label>``
    (:func:`train_run`; ``"eps=0.05 seed=1"`` becomes ``eps0.05_seed1``), save the adapter, evaluate the model
    with ``evaluate(model)`` and keep its EVAL.json. Returns the model, the evaluation and the row fields every
    comparison records (method, label, setting (the label without its seed), seed, hyperparameters,
    train_seconds, run_dir relative to the output folder)."""
    method, label, hyper = run
    run_dir = os.path.join(cfg.output_dir, "runs", f"{method}_{label.replace('=', '').replace(' ', '_')}")
    t0 = time.perf_counter()
    trainer = train_run(method, hyper, cfg, inputs, run_dir, forbidden_set)
    train_s = time.perf_counter() - t0
    trainer.save_model(run_dir)
    ev = evaluate(trainer.model)
    ev.save(os.path.join(run_dir, "EVAL.json"))
    row = {
        "method": method,
        "label": label,
        "setting": setting_of(label),
        "seed": seed_of(hyper, cfg),
        "hyperparameters": hyper,
        "train_seconds": round(train_s, 2),
        "run_dir": os.path.relpath(run_dir, cfg.output_dir),
    }
    return trainer.model, ev, row


def relearn(
    model: Any, inputs: CompareInputs, cfg: CompareArguments, run_dir: str, seed: int | None = None
) -> dict[str, Any]:
    r"""The relearning attack: fine-tune the unlearned model's adapter for ``relearn_steps`` steps with the
    plain next-token loss (``transformers.Trainer``) on a ``relearn_fraction`` sample of the forget questions
    drawn with ``seed`` (default ``cfg.seed``; the run's own seed in a comparison), in place. Returns what was
    done (rows, steps, learning rate)."""
    from transformers import Trainer, TrainingArguments

    seed = cfg.seed if seed is None else seed
    n = max(1, round(cfg.relearn_fraction * len(inputs.forget)))
    rows = inputs.forget.shuffle(seed=seed).select(range(n))
    args = TrainingArguments(
        output_dir=os.path.join(run_dir, "relearn"),
        max_steps=cfg.relearn_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        learning_rate=cfg.relearn_learning_rate,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        logging_steps=max(1, cfg.relearn_steps),
        dataloader_pin_memory=False,
    )
    model.train()
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collator(inputs.tokenizer)).train()
    return {"rows": n, "steps": cfg.relearn_steps, "learning_rate": cfg.relearn_learning_rate}


def _evaluate(model: Any, inputs: CompareInputs, cfg: CompareArguments, reference: Any, forbidden_set: Any) -> Any:
    from etu_hf.evaluation.unlearning import evaluate_benchmark

    return evaluate_benchmark(
        model,
        inputs.tokenizer,
        inputs.benchmark,
        reference=reference,
        forbidden_set=forbidden_set,
        batch_size=cfg.eval_batch_size,
    )


def build_forbidden(cfg: CompareArguments, inputs: CompareInputs) -> Any:
    """V_S shared by every run: PMI of the forget answers against the retain answers (the settings
    ETU's defaults use, with the minimum count lowered to the benchmark's size: see docs/compare.md)."""
    from etu_hf.data.blocks import iter_batches
    from etu_hf.forbidden_set import build_forbidden_set

    col = collator(inputs.tokenizer)
    vocab = load_model(inputs.target_path).get_output_embeddings().weight.shape[0]
    return build_forbidden_set(
        iter_batches(inputs.forget, col, 64),
        iter_batches(inputs.retain, col, 64),
        vocab_size=vocab,
        tokenizer=inputs.tokenizer,
        method="pmi",
        pmi_min_count=cfg.pmi_min_count,
    )


def run_compare(cfg: CompareArguments) -> dict[str, Any]:
    """Run the grid, evaluate every run, mark the Pareto front; writes COMPARE.json, COMPARE.md and
    pareto.png into ``cfg.output_dir`` and returns the COMPARE.json content."""
    from etu_hf.benchmark.knowledge import is_knowledge_spec
    from etu_hf.compare.report import COLUMNS, goal_checks, write_outputs
    from etu_hf.compare.seeds import over_seeds

    if is_knowledge_spec(cfg.benchmark):
        from etu_hf.compare.knowledge import run_knowledge_compare

        return run_knowledge_compare(cfg)
    inputs = CompareInputs(cfg)  # every refusal comes before anything is written
    os.makedirs(cfg.output_dir, exist_ok=True)
    forbidden_set = build_forbidden(cfg, inputs)
    forbidden_set.save(os.path.join(cfg.output_dir, "V_S.ids.json"))
    logger.info(
        "shared V_S: %d tokens (PMI of forget vs retain answers: etu-pmi and the V_S mass column)", len(forbidden_set)
    )

    ref_path = os.path.join(cfg.output_dir, "reference", "EVAL.json")
    logger.info("evaluating the retain model %s (the reference)", inputs.retain_path)
    reference = _evaluate(load_model(inputs.retain_path), inputs, cfg, None, forbidden_set)
    reference.save(ref_path)
    logger.info("evaluating the target model %s (before unlearning)", inputs.target_path)
    target_eval = _evaluate(load_model(inputs.target_path), inputs, cfg, reference, forbidden_set)
    target_eval.save(os.path.join(cfg.output_dir, "target", "EVAL.json"))

    grid = cfg.grid()
    runs: list[dict[str, Any]] = []
    for k, (method, label, hyper) in enumerate(grid, 1):
        logger.info("[%d/%d] %s %s: %d steps", k, len(grid), method, label, cfg.max_steps)
        model, ev, row = unlearn_and_evaluate(
            (method, label, hyper),
            cfg,
            inputs,
            forbidden_set,
            lambda m: _evaluate(m, inputs, cfg, reference, forbidden_set),
        )
        run_dir = os.path.join(cfg.output_dir, row["run_dir"])
        row.update({"eval": ev.aggregates, "relearned": None})
        logger.info(
            "[%d/%d] %s %s: forget quality %s, model utility %s",
            k,
            len(grid),
            method,
            label,
            _fmt(ev.aggregates.get(X_METRIC)),
            _fmt(ev.aggregates.get(Y_METRIC)),
        )
        if cfg.relearn_steps > 0:
            attack = relearn(model, inputs, cfg, run_dir, row["seed"])
            ev2 = _evaluate(model, inputs, cfg, reference, forbidden_set)
            ev2.save(os.path.join(run_dir, "EVAL_relearned.json"))
            row["relearned"] = {"attack": attack, "eval": ev2.aggregates}
            logger.info(
                "[%d/%d] after %d relearning steps: forget prob %s -> %s",
                k,
                len(grid),
                cfg.relearn_steps,
                _fmt(ev.aggregates.get("forget_prob")),
                _fmt(ev2.aggregates.get("forget_prob")),
            )
        runs.append(row)
        del model

    front = pareto_front([(r["eval"].get(X_METRIC), r["eval"].get(Y_METRIC)) for r in runs])
    for r, on in zip(runs, front, strict=True):
        r["pareto"] = on
    result = {
        "settings": {**asdict(cfg), "grid": [list(g[:2]) for g in grid], "axes": [X_METRIC, Y_METRIC]},
        "models": {"target": inputs.target_path, "retain": inputs.retain_path},
        "benchmark": {"name": inputs.benchmark.name, "settings": inputs.benchmark.settings},
        "vs_size": len(forbidden_set),
        "references": {"target": target_eval.aggregates, "retain": reference.aggregates},
        "runs": runs,
    }
    result["over_seeds"] = over_seeds(runs, [k for k, _ in COLUMNS])
    result["goals"] = goal_checks(result)
    write_outputs(result, cfg.output_dir)
    return result


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def read_compare(path: str) -> dict[str, Any]:
    """The content of a COMPARE.json."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
