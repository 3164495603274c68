"""Token counts over scored positions, the data V_S is built from (see :mod:`etu_hf.forbidden_set`).

``count_scored_tokens`` counts the target token of every scored position (one ``np.bincount`` per
collated batch, or per group of plain id sequences) and, for span masking, collects the (first piece,
continuation piece) pairs of multi-piece words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from etu_hf.data.blocks import scored_positions

#: Markers with which BPE (GPT-2 "Ġ", newline "Ċ") and SentencePiece ("▁") pieces start a new word.
_WORD_START_MARKERS = ("Ġ", "▁", "Ċ")


def as_token_batch(item: Any) -> Mapping[str, torch.Tensor]:
    """A collated batch's model keys as tensors, or a bare sequence of ids as a batch of one."""
    if isinstance(item, Mapping):
        return {k: torch.as_tensor(v) for k, v in item.items() if k in ("input_ids", "attention_mask", "labels")}
    ids = torch.as_tensor(item, dtype=torch.long)
    return {"input_ids": ids.reshape(1, -1)}


@dataclass
class TokenCounts:
    """Target-token counts over scored positions (``counts[v]``, ``total``) and the span pairs."""

    counts: np.ndarray
    total: int
    span_pairs: np.ndarray | None  # unique first_id * V + continuation_id


class PieceInfo:
    """Per-token string facts, computed lazily for the ids that occur."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.known = np.zeros(vocab_size, dtype=bool)
        self.has_letter = np.zeros(vocab_size, dtype=bool)
        self.starts_word = np.zeros(vocab_size, dtype=bool)
        self.raw: dict[int, str | None] = {}
        special = getattr(tokenizer, "all_special_ids", None) or []
        self.special = np.zeros(vocab_size, dtype=bool)
        self.special[[i for i in special if 0 <= i < vocab_size]] = True

    def ensure(self, ids: np.ndarray) -> None:
        todo = np.unique(ids[~self.known[ids]])
        if len(todo) == 0:
            return
        pieces = self.tokenizer.convert_ids_to_tokens(todo.tolist())
        for i, raw in zip(todo.tolist(), pieces, strict=True):
            self.raw[i] = raw
            text = self.tokenizer.convert_tokens_to_string([raw]) if raw is not None else ""
            self.has_letter[i] = any(c.isalpha() for c in text)
            self.starts_word[i] = raw is not None and (raw.startswith(_WORD_START_MARKERS) or text[:1].isspace())
        self.known[todo] = True

    def allowed(self) -> np.ndarray:
        """Tokens that may enter V_S: not special, and with at least one letter."""
        return self.has_letter & ~self.special


def span_pairs(stream: np.ndarray, info: PieceInfo, n_max: int) -> np.ndarray:
    """Unique ``first * V + piece`` keys for continuation pieces of words of 2..n_max pieces.

    ``stream`` holds token ids with -1 separators. A word is a maximal run of lettered pieces whose
    pieces after the first do not start a new word (no ``Ġ``/``▁`` marker, no leading space).
    """
    valid = stream >= 0
    safe = np.where(valid, stream, 0)
    word = valid & info.has_letter[safe]
    prev_word = np.concatenate([[False], word[:-1]])
    cont = word & prev_word & ~info.starts_word[safe]
    start = word & ~cont
    run = np.cumsum(start) - 1  # run index of every token (meaningful where word)
    n_runs = int(start.sum())
    if n_runs == 0:
        return np.zeros(0, dtype=np.int64)
    length = np.bincount(run[word], minlength=n_runs)
    first = safe[start]
    sel = cont & (length[run] >= 2) & (length[run] <= n_max)
    keys = first[run[sel]].astype(np.int64) * info.vocab_size + safe[sel].astype(np.int64)
    return np.unique(keys)


#: Plain id sequences gathered before they are counted together (one ``np.bincount`` per group).
_SEQUENCE_GROUP = 256


def _check_ids(ids: np.ndarray, vocab_size: int, source: str, separators: int = 0) -> None:
    """``ValueError`` naming ``source`` for an id outside ``[0, vocab_size)``; ``separators``: how many ``-1``
    separators ``ids`` holds (any further ``-1`` is an id of the data, out of range)."""
    if not ids.size:
        return
    hi, lo = int(ids.max()), int(ids.min())
    bad = None
    if hi >= vocab_size:
        bad = hi
    elif lo < (-1 if separators else 0):
        bad = lo
    elif separators and int((ids == -1).sum()) != separators:  # a -1 of the data, not a separator
        bad = -1
    if bad is not None:
        raise ValueError(
            f"{source} holds token id {bad} outside the model's vocabulary of {vocab_size}: "
            "the tokenizer does not match the model."
        )


def _batch_stream(item: Any) -> tuple[np.ndarray, np.ndarray]:
    """A collated batch as ``(targets [B*(T-1)], stream)``: the targets with unscored positions 0 (see
    :func:`~etu_hf.data.blocks.scored_positions`) and the span stream (scored targets, ``-1`` at unscored
    positions and after every row)."""
    batch = {k: v.cpu() for k, v in as_token_batch(item).items()}
    mask, targets = scored_positions(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
    rows = torch.where(mask, targets, torch.full_like(targets, -1))
    rows = torch.cat([rows, torch.full((rows.shape[0], 1), -1, dtype=rows.dtype)], dim=1)
    return targets.reshape(-1).numpy(), rows.reshape(-1).numpy()


def _sequence_stream(group: list[np.ndarray]) -> np.ndarray:
    """Plain id sequences as one stream: every token after the first, ``-1`` after every sequence."""
    sep = np.full(1, -1, dtype=np.int64)
    return np.concatenate([part for seq in group for part in (seq[1:], sep)])


def count_scored_tokens(
    batches: Iterable[Any],
    vocab_size: int,
    piece_info: PieceInfo | None = None,
    span_ngram_max: int = 0,
    source: str = "forget data",
) -> TokenCounts:
    """Count target tokens over scored positions, and collect span pairs.

    ``counts[v]`` = the number of scored positions whose target is ``v``. Vectorised: one ``np.bincount``
    per collated batch (weighted by the scored-position mask, so no boolean indexing) and one per group of
    plain id sequences (:data:`_SEQUENCE_GROUP` sequences concatenated).
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    spans = piece_info is not None and span_ngram_max >= 2
    pairs: list[np.ndarray] = []
    group: list[np.ndarray] = []

    def add_stream(stream: np.ndarray) -> None:
        if spans:
            piece_info.ensure(stream[stream >= 0])
            pairs.append(span_pairs(stream, piece_info, span_ngram_max))

    def flush() -> None:
        stream = _sequence_stream(group)
        _check_ids(stream, vocab_size, source, separators=len(group))
        group.clear()
        counts[:] += np.bincount(stream + 1, minlength=vocab_size + 1)[1:]
        add_stream(stream)

    for item in batches:
        if isinstance(item, Mapping):
            targets, stream = _batch_stream(item)
            _check_ids(targets, vocab_size, source)  # unscored positions hold 0, a valid id
            counts += np.bincount(stream + 1, minlength=vocab_size + 1)[1:]
            add_stream(stream)
            continue
        group.append(np.asarray(item, dtype=np.int64).reshape(-1))
        if len(group) >= _SEQUENCE_GROUP:
            flush()
    if group:
        flush()
    return TokenCounts(counts, int(counts.sum()), np.unique(np.concatenate(pairs)) if pairs else None)
