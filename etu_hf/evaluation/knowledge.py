r"""What a model still knows on a knowledge benchmark (:mod:`etu_hf.benchmark.knowledge`).

For each probe group g (``forget``, ``neighbour``, ``utility``) of the unlearned targets:

- ``{g}_answer_prob``: mean over the group's probes of the answer probability, teacher-forced,
  :math:`\exp(\frac{1}{|y|}\sum_t \log \pi(y_t | x, y_{<t}))` (the geometric mean of the answer's token
  probabilities, as :func:`etu_hf.evaluation.unlearning.metrics.answer_probability`);
- ``{g}_first_token_top1``: share of probes whose answer's first token is the model's argmax;
- ``{g}_keyword_acc``: share of probes whose greedy answer (at most :data:`ANSWER_TOKENS` new tokens for a
  completion, :data:`QUESTION_TOKENS` for a question) contains one of the probe's keywords, case-insensitively;

and ``retain_ppl``: :math:`\exp` of the mean next-token NLL over every scored position of the held-out retain
text (blocks of ``block_size`` tokens). ``generations`` holds a few greedy continuations (fluency check).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from etu_hf.benchmark.knowledge import GROUPS, KnowledgeBenchmark, encode_probe, question_prompt
from etu_hf.data.blocks import pad_token_id
from etu_hf.evaluation.unlearning.metrics import answer_probability
from etu_hf.evaluation.unlearning.scores import greedy_answers, teacher_forced_stats

logger = logging.getLogger(__name__)

FORMAT_NAME = "etu-hf/knowledge-eval"
FORMAT_VERSION = 1
ANSWER_TOKENS = 12
QUESTION_TOKENS = 32
#: Greedy continuations recorded for the report (tokens each).
GENERATION_TOKENS = 48
METRICS: tuple[str, ...] = ("answer_prob", "first_token_top1", "keyword_acc")


@dataclass
class KnowledgeEval:
    """Aggregates (``{group}_{metric}``, ``retain_ppl``), per-probe rows and generations of one model."""

    aggregates: dict[str, float | None]
    probes: list[dict[str, Any]]
    generations: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "info": self.info,
            "aggregates": self.aggregates,
            "generations": self.generations,
            "probes": self.probes,
        }

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
        return path

    def table(self, name: str = "model") -> str:
        rows = [f"| {name} | " + " | ".join(METRICS) + " |", "| --- |" + " ---: |" * len(METRICS)]
        for g in GROUPS:
            vals = [self.aggregates.get(f"{g}_{m}") for m in METRICS]
            rows.append(f"| {g} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in vals) + " |")
        ppl = self.aggregates.get("retain_ppl")
        rows.append(f"| retain perplexity | {'n/a' if ppl is None else f'{ppl:.2f}'} | | |")
        return "\n".join(rows)


def keyword_hit(answer: str, keywords: list[str]) -> bool:
    """Whether ``answer`` contains one of ``keywords`` (case-insensitive substring)."""
    low = answer.lower()
    return any(k.lower() in low for k in keywords)


def score_probes(
    model: nn.Module, tokenizer: Any, probes: list[dict[str, Any]], *, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Per probe: ``answer_prob``, ``first_token_top1`` (teacher-forced) and the greedy ``generation`` and
    ``keyword_hit``. The model is used as it is (the caller sets eval mode)."""
    if not probes:
        return []
    items = [encode_probe(tokenizer, p) for p in probes]
    stats = teacher_forced_stats(
        model, items, pad_id=pad_token_id(tokenizer), batch_size=batch_size, distribution=False
    )
    budgets = [ANSWER_TOKENS if p["form"] == "completion" else QUESTION_TOKENS for p in probes]
    answers = greedy_answers(model, tokenizer, [i[0] for i in items], budgets, batch_size=batch_size)
    return [
        {
            "id": p["id"],
            "group": p["group"],
            "target": p["target"],
            "answer_prob": answer_probability(s.logprobs),
            "first_token_top1": bool(s.correct[0]),
            "generation": a,
            "keyword_hit": keyword_hit(a, p["keywords"]),
        }
        for p, s, a in zip(probes, stats, answers, strict=True)
    ]


@torch.no_grad()
def retain_perplexity(model: nn.Module, tokenizer: Any, texts: list[str], *, block_size: int = 128) -> float:
    """:math:`\\exp(\\frac1n\\sum -\\log\\pi(y_i|x_i))` over every scored position of ``texts`` cut into
    blocks of ``block_size`` tokens (:func:`etu_hf.data.blocks.tokenize_and_block`)."""
    from etu_hf.data.blocks import iter_batches, tokenize_and_block
    from etu_hf.evaluation.measures import evaluate_perplexity

    blocks = tokenize_and_block(texts, tokenizer, block_size)
    return evaluate_perplexity(model, iter_batches(blocks, None, 8)).perplexity


@torch.no_grad()
def sample_generations(model: nn.Module, tokenizer: Any, prompts: list[str]) -> list[dict[str, str]]:
    """Greedy continuations (:data:`GENERATION_TOKENS` tokens) of ``prompts`` put as chat questions."""
    ids = [tokenizer(question_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    outs = greedy_answers(model, tokenizer, ids, [GENERATION_TOKENS] * len(ids), batch_size=8)
    return [{"prompt": p, "generation": g} for p, g in zip(prompts, outs, strict=True)]


def aggregate(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """``{group}_{metric}`` means over the rows of each group (``None`` for a group without probes)."""
    out: dict[str, float | None] = {}
    for g in GROUPS:
        sel = [r for r in rows if r["group"] == g]
        out[f"{g}_probes"] = len(sel)
        for key, col in (
            ("answer_prob", "answer_prob"),
            ("first_token_top1", "first_token_top1"),
            ("keyword_acc", "keyword_hit"),
        ):
            out[f"{g}_{key}"] = float(np.mean([float(r[col]) for r in sel])) if sel else None
    return out


def evaluate_knowledge(
    model: nn.Module,
    tokenizer: Any,
    benchmark: KnowledgeBenchmark,
    targets: list[str],
    *,
    batch_size: int = 16,
    block_size: int = 128,
    generation_prompts: int = 3,
    model_name: str | None = None,
) -> KnowledgeEval:
    """Score ``model`` on the probes of an unlearning of ``targets`` (forget, their neighbours, utility), its
    retain perplexity, and ``generation_prompts`` greedy answers to the first forget questions. The model is
    put in eval mode for the evaluation and back into its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        groups = benchmark.probes_for(targets)
        rows = score_probes(model, tokenizer, [p for g in GROUPS for p in groups[g]], batch_size=batch_size)
        agg = aggregate(rows)
        agg["retain_ppl"] = retain_perplexity(model, tokenizer, benchmark.retain_heldout, block_size=block_size)
        questions = [p["prompt"] for p in groups["forget"] if p["form"] == "question"][:generation_prompts]
        gens = sample_generations(model, tokenizer, questions) if questions else []
    finally:
        model.train(was_training)
    info = {"benchmark": benchmark.name, "targets": targets, "model": model_name, "block_size": block_size}
    if any(v is not None and isinstance(v, float) and not math.isfinite(v) for v in agg.values()):
        logger.warning("some aggregates are not finite: %s", agg)
    return KnowledgeEval(aggregates=agg, probes=rows, generations=gens, info=info)
