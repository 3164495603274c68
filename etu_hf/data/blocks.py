"""Token blocks and scored positions: tokenizing documents into blocks, which positions a loss
scores, and batching a dataset for evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from etu_hf.data.pairing import CORPUS_ID_COLUMN

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------
def pad_token_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS token, else 0.

    Padded positions are never scored (:func:`scored_positions` masks them), so any valid id serves;
    0 is the last resort for a tokenizer with neither token.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS token as pad token (the usual choice for causal
    LMs, whose pretraining had no padding); returns the tokenizer."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Scored positions
# ---------------------------------------------------------------------------------------------
def scored_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(mask, targets)``, both ``[B, T-1]``, for next-token prediction.

    The prediction made at position ``t`` targets ``y = labels[t+1]`` (``input_ids[t+1]`` when there
    are no labels). It is *scored* iff ``y != -100`` and both ``t`` and ``t+1`` are attended
    (``attention_mask == 1``), so padding never counts, whichever side it is on. ``targets`` holds
    ``y`` with unscored entries set to 0 (a valid index; always use it together with ``mask``).
    """
    targets = (labels if labels is not None else input_ids)[:, 1:]
    mask = targets != IGNORE_INDEX
    if attention_mask is not None:
        am = attention_mask.bool()
        mask = mask & am[:, 1:] & am[:, :-1]
    return mask, targets.masked_fill(~mask, 0)


# ---------------------------------------------------------------------------------------------
# Tokenization into blocks
# ---------------------------------------------------------------------------------------------
def tokenize_and_block(
    texts: Sequence[str],
    tokenizer: Any,
    block_size: int,
    *,
    add_eos: bool = True,
    corpus_id: int | None = None,
    batch_size: int = 1000,
) -> Any:
    """Tokenize documents, concatenate them (an EOS after each) and cut the stream into blocks.

    Returns a ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` of length
    ``block_size``; ``labels == input_ids`` on real tokens and -100 on padding. Documents longer than
    a block continue in the next block; the final partial block is right-padded with the tokenizer's
    pad token (EOS when it has none), so no text is dropped. With ``corpus_id`` an integer column
    :data:`CORPUS_ID_COLUMN` is added (used to pair forget and retain corpora).
    """
    import datasets

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is None and eos is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    pad = pad_token_id(tokenizer)
    pieces: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), add_special_tokens=False)["input_ids"]
        for ids in enc:
            if add_eos and eos is not None:
                ids = [*ids, eos]
            pieces.append(np.asarray(ids, dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_blocks = -(-len(stream) // block_size)
    total = n_blocks * block_size
    input_ids = np.full(total, pad, dtype=np.int64)
    input_ids[: len(stream)] = stream
    attention = np.zeros(total, dtype=np.int64)
    attention[: len(stream)] = 1
    labels = np.where(attention == 1, input_ids, IGNORE_INDEX)
    columns = {
        "input_ids": input_ids.reshape(n_blocks, block_size).tolist(),
        "attention_mask": attention.reshape(n_blocks, block_size).tolist(),
        "labels": labels.reshape(n_blocks, block_size).tolist(),
    }
    if corpus_id is not None:
        columns[CORPUS_ID_COLUMN] = [corpus_id] * n_blocks
    return datasets.Dataset.from_dict(columns)


def check_token_dataset(dataset: Any, name: str) -> None:
    """``ValueError`` naming ``name`` when ``dataset`` has no ``input_ids`` (text that was not tokenized).

    Checked from ``column_names`` (``datasets``) or the first item (map-style datasets of dicts); an
    iterable dataset without either is not checked.
    """
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset) > 0:
        first = dataset[0]
        columns = list(first) if isinstance(first, dict) else None
    if columns is not None and "input_ids" not in columns:
        raise ValueError(
            f"{name} has no 'input_ids' column (its columns: {', '.join(map(str, columns)) or 'none'}): it needs "
            "token ids. Tokenize the text first, e.g. etu_hf.data.tokenize_and_block(texts, tokenizer, block_size=512)."
        )


# ---------------------------------------------------------------------------------------------
# Iterating collated batches (for counting and estimation, outside the training loop)
# ---------------------------------------------------------------------------------------------
MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def iter_batches(
    dataset: Any, collator: Callable | None, batch_size: int, indices: Iterable[int] | None = None
) -> Iterable[dict[str, torch.Tensor]]:
    """Yield collated batches of ``dataset`` (only ``input_ids``/``attention_mask``/``labels``).

    The user's ``collator`` is applied, so the batches are what the training loop sees (padding and
    -100 labels included); extra columns are dropped first.
    """
    from transformers import default_data_collator

    collate = collator or default_data_collator
    order = list(indices) if indices is not None else range(len(dataset))
    columns = getattr(dataset, "column_names", None)
    bulk = hasattr(dataset, "select_columns") and isinstance(columns, list)
    if bulk:  # a datasets.Dataset: one read per batch (a column-wise slice), not one per row
        dataset = dataset.select_columns([k for k in MODEL_KEYS if k in columns])
        if collator is None:  # numpy rows: default_data_collator stacks them instead of parsing nested lists
            dataset = dataset.with_format("numpy")
    for start in range(0, len(order), batch_size):
        rows = [int(i) for i in order[start : start + batch_size]]
        if bulk:
            cols = dataset[rows]
            feats = [{k: v[j] for k, v in cols.items()} for j in range(len(rows))]
        else:
            feats = [{k: f[k] for k in MODEL_KEYS if k in f} for f in (dataset[i] for i in rows)]
        batch = collate(feats)
        yield {k: batch[k] for k in MODEL_KEYS if k in batch}
