"""The question/answer shape of an unlearning benchmark (TOFU-shaped), shared by every part that reads it.

A benchmark is three splits of the same columns (:data:`SPLITS`, :data:`COLUMNS`):

- ``forget``: the entities to unlearn; ``retain``: entities to keep; ``holdout``: entities no model was
  trained on (the non-members of membership inference);
- each row is one question about one entity: ``entity`` (its name), ``question``, ``answer`` (the fact
  as trained), ``paraphrased_answer`` (the same fact, other words), ``perturbed_answers`` (a list of
  wrong answers in the paraphrase's style).

A row becomes a model input as ``PROMPT_TEMPLATE.format(question=...)`` followed by ``" " + answer``:
:func:`encode_qa` tokenizes the prompt and the answer *separately* and concatenates the ids, so the
answer's tokens are the same whatever the prompt (no merge across the boundary) and every metric
scores exactly the answer's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from etu_hf.data.blocks import IGNORE_INDEX

#: The splits of a benchmark, in this order.
SPLITS: tuple[str, ...] = ("forget", "retain", "holdout")
#: The columns every split must have.
COLUMNS: tuple[str, ...] = ("entity", "question", "answer", "paraphrased_answer", "perturbed_answers")
#: How a question is put to the model; the answer follows after one space.
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str) -> str:
    """The prompt text of a question (:data:`PROMPT_TEMPLATE`)."""
    return PROMPT_TEMPLATE.format(question=question)


def encode_qa(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)``: the prompt with the tokenizer's special tokens (a BOS where the
    tokenizer adds one), the answer (``" " + answer``) without any; no EOS on either."""
    prompt = tokenizer(format_prompt(question), add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    return list(prompt), list(answer_ids)


def qa_features(
    tokenizer: Any, question: str, answer: str, *, add_eos: bool = True, max_length: int | None = None
) -> dict[str, list[int]]:
    """One training example: ``input_ids = prompt + answer (+ EOS)``, ``labels`` -100 on the prompt and
    the ids on the answer (and EOS), ``attention_mask`` all ones. ``max_length`` truncates from the end."""
    prompt, ans = encode_qa(tokenizer, question, answer)
    if add_eos and tokenizer.eos_token_id is not None:
        ans = [*ans, int(tokenizer.eos_token_id)]
    ids = prompt + ans
    labels = [IGNORE_INDEX] * len(prompt) + ans
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_qa(
    dataset: Any,
    tokenizer: Any,
    *,
    answer_column: str = "answer",
    add_eos: bool = True,
    max_length: int | None = None,
) -> Any:
    """A ``datasets.Dataset`` of :func:`qa_features` rows (variable length: pad them with a collator
    that pads ``labels`` with -100, e.g. ``transformers.DataCollatorForSeq2Seq``), one per row of
    ``dataset``, the answer taken from ``answer_column``."""
    from datasets import Dataset

    rows = [
        qa_features(tokenizer, q, a, add_eos=add_eos, max_length=max_length)
        for q, a in zip(dataset["question"], dataset[answer_column], strict=True)
    ]
    return Dataset.from_list(rows)


def missing_columns(names: Sequence[str]) -> list[str]:
    """The :data:`COLUMNS` a split lacks."""
    return [c for c in COLUMNS if c not in names]
