r"""Forbidden sets per context: forbidden words through a piece trie, and forbidden continuations.

A :class:`~etu_hf.ForbiddenSet` with ``words`` or ``continuations`` forbids, at the context ``x`` that ends with
the tokens :math:`x_1 \dots x_t` and whose next token in the text is :math:`y`,

.. math::
    S(x) = V_S \;\cup\; \{\, w_{k+1} : w_1 \dots w_k = x_{t-k+1} \dots x_t,\ 1 \le k < |w|,\ w \text{ a form of a
    forbidden word} \,\} \;\cup\; \{\, y : y \text{ informative} \,\}\ \text{(continuations only)},

where ``V_S`` (the set's ``ids``) holds the first pieces of the forbidden words that are not mostly used by other
words (measured on the retain corpus, :meth:`~etu_hf.data.word_trie.PieceTrie.shared_first_pieces`), a word's forms
are its piece sequences with and without a leading space and capitalised (:func:`~etu_hf.data.word_trie.surface_forms`),
and a continuation :math:`y` is *informative* when it holds a letter, is not a special token and is not a common
word: one of the ``continuation_skip_top_k`` most frequent tokens of the retain corpus (without one, of the
tokenizer's first ids) standing alone as a word; a word of several pieces is never an everyday word. With
``continuation_per_word`` (the default) only the first informative piece of each word of the text is forbidden;
without it a common token is never informative, wherever it stands. A generic piece ("ot", "ter") is thus
forbidden only inside a forbidden word.
The tilt, the loss, the controller and the audit take :math:`S(x)` position by position
(:mod:`etu_hf.ops.row_sets`); the continuation part needs the text's next token, so it exists on forget text
(training and held-out), never at generation time.

Words are chosen by :func:`~etu_hf.data.words.forbidden_words_from_corpora` (a :math:`G^2` test of forget against
retain frequency plus a log-ratio floor, so the threshold scales with the corpus size), merged with the user's
words (``--forbidden_words FILE``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from etu_hf.data.blocks import scored_positions
from etu_hf.data.token_counts import as_token_batch
from etu_hf.data.word_trie import DEFAULT_MIN_SHARE, piece_allowed, word_pieces
from etu_hf.data.words import DEFAULT_MIN_G2, DEFAULT_MIN_LOG_RATIO, DEFAULT_SMOOTHING, forbidden_words_from_corpora

logger = logging.getLogger(__name__)

#: Default share of the vocabulary, from its first id, whose one-piece words count as common words.
DEFAULT_COMMON_RANK = 0.125
#: Below this share of forget positions whose next token is in S(x), the build warns: the certificate then speaks
#: about little of the forget text.
MIN_COVERAGE = 0.01


def _rows(batches: Iterable[Any]) -> list[np.ndarray]:
    """The attended token ids of every row of ``batches`` (collated batches or plain id sequences)."""
    out = []
    for item in batches:
        b = as_token_batch(item)
        ids = b["input_ids"].reshape(len(b["input_ids"]), -1)
        am = b.get("attention_mask")
        for i in range(ids.shape[0]):
            row = ids[i] if am is None else ids[i][am[i].bool()]
            out.append(row.numpy().astype(np.int64))
    return out


def decode_rows(rows: Sequence[np.ndarray], tokenizer: Any) -> list[str]:
    """The texts of token rows (special tokens dropped), for word counting."""
    return tokenizer.batch_decode([r.tolist() for r in rows], skip_special_tokens=True)


def build_word_forbidden_set(
    forget: Iterable[Any],
    retain: Iterable[Any] | None,
    *,
    vocab_size: int,
    tokenizer: Any,
    min_g2: float = DEFAULT_MIN_G2,
    min_log_ratio: float = DEFAULT_MIN_LOG_RATIO,
    smoothing: float = DEFAULT_SMOOTHING,
    user_words: Sequence[str] = (),
    min_share: float = DEFAULT_MIN_SHARE,
    common_rank: float = DEFAULT_COMMON_RANK,
) -> Any:
    """V_S at the level of words (``vs_method="words"``): a :class:`~etu_hf.ForbiddenSet` whose ``ids`` are the
    shared first pieces and whose ``words`` list every forbidden word with its forms (piece ids and pieces), counts and
    scores.

    ``forget``/``retain`` are iterables of collated batches (or id sequences), decoded with ``tokenizer`` and split
    into words. Scored words with fewer than 3 letters and common words (:func:`common_word_test` with
    ``common_rank``) are left out; ``user_words`` are always kept. Without retain data only ``user_words`` can be
    used (scoring needs both corpora). Raises ``ValueError`` naming the flags to loosen when no word is kept.
    """
    from etu_hf.forbidden_set import ForbiddenSet

    if tokenizer is None or not hasattr(tokenizer, "batch_decode"):
        raise ValueError(
            "vs_method='words' (the default) needs the tokenizer to find the words of the text: pass "
            "processing_class=tokenizer, or choose vs_method='pmi' (pieces; then also forbid_continuations=False)"
        )
    forget_rows = _rows(forget)
    retain_rows = _rows(retain) if retain is not None else []
    if not forget_rows or not sum(len(r) for r in forget_rows):
        raise ValueError("the forget data has no token: nothing to forget.")
    if retain_rows:
        chosen = forbidden_words_from_corpora(
            decode_rows(forget_rows, tokenizer),
            decode_rows(retain_rows, tokenizer),
            tokenizer,
            min_g2=min_g2,
            min_log_ratio=min_log_ratio,
            smoothing=smoothing,
            user_words=user_words,
            exclude=common_word_test(tokenizer, vocab_size, common_rank),
        )
        evidence = {
            w.word: {
                "forget_count": w.forget_count,
                "retain_count": w.retain_count,
                "g2": w.g2,
                "log_ratio": w.log_ratio,
                "source": w.source,
            }
            for w in chosen
        }
        words = [w.word for w in chosen]
    elif user_words:
        words = list(dict.fromkeys(user_words))
        evidence = {w: {"source": "user"} for w in words}
    else:
        raise ValueError(
            "vs_method='words' (the default) scores words of the forget text against retain text: pass retain data "
            "(retain_dataset= / --retain_corpora), list the words yourself (--forbidden_words FILE), or choose "
            "--vs_method frequency"
        )
    wp = word_pieces(words, tokenizer, retain_rows, vocab_size, min_share)
    entries = []
    for w in words:
        forms = [list(f) for f in wp.forms[w]]
        entries.append(
            {
                "word": w,
                **evidence.get(w, {}),
                "forms": forms,
                "pieces": [tokenizer.convert_ids_to_tokens(f) for f in forms],
            }
        )
    shared = wp.shared.tolist()
    params = {
        "word_min_g2": min_g2,
        "word_min_log_ratio": min_log_ratio,
        "word_smoothing": smoothing,
        "word_min_share": min_share,
        "word_common_rank": common_rank,
        "user_words": len(user_words),
        "forget_tokens": int(sum(len(r) for r in forget_rows)),
        "retain_tokens": int(sum(len(r) for r in retain_rows)),
    }
    fs = ForbiddenSet(
        ids=sorted(shared),
        vocab_size=vocab_size,
        method="words",
        parameters=params,
        tokens=tokenizer.convert_ids_to_tokens(sorted(shared)),
        words=entries,
        dropped_first_pieces=wp.dropped_first_pieces.tolist(),
    )
    logger.info(
        "built V_S (words): %d words, %d piece sequences, %d shared first pieces (%d left to the trie: mostly used by "
        "other words in the retain text)",
        len(words),
        sum(len(e["forms"]) for e in entries),
        len(shared),
        len(wp.dropped_first_pieces),
    )
    return fs


def common_word_test(tokenizer: Any, vocab_size: int, common_rank: float) -> Any:
    """``word -> bool``: the word is common in general text, by the tokenizer's own ranking. A word whose
    space-prefixed form is one piece with id below ``common_rank x vocab_size`` is common: BPE and SentencePiece
    vocabularies list merges (pieces) roughly from the most frequent, so the first eighth (the default 0.125) holds
    everyday words ("book", "series", "since"), while names and rare terms are late pieces or several pieces. ``None``
    (no test) when ``common_rank`` is 0."""
    if common_rank <= 0:
        return None
    limit = common_rank * vocab_size

    def common(word: str) -> bool:
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
        return len(ids) == 1 and ids[0] < limit

    return common


def continuation_skip_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids that are never forbidden continuations (sorted): the special tokens and every piece with no letter
    (whitespace, punctuation, digits)."""
    ids = np.arange(min(vocab_size, len(tokenizer)), dtype=np.int64)
    return sorted(ids[~piece_allowed(tokenizer, ids)].tolist())


def common_token_ids(
    retain: Iterable[Any] | None, vocab_size: int, top_k: int, common_rank: float = DEFAULT_COMMON_RANK
) -> list[int]:
    """The common tokens (sorted), never forbidden as a continuation when they make a word alone: the ``top_k``
    most frequent tokens of the ``retain`` corpus, or without retain data the first ``common_rank x vocab_size``
    ids (the tokenizer's most frequent pieces, see :func:`common_word_test`; the forget text's own most frequent
    tokens would be the topic's)."""
    if retain is None:
        return list(range(int(common_rank * vocab_size)))
    counts = np.zeros(vocab_size, dtype=np.int64)
    for row in _rows(retain):
        counts += np.bincount(row[(row >= 0) & (row < vocab_size)], minlength=vocab_size)
    top = np.argsort(-counts, kind="stable")[:top_k]
    return sorted(top[counts[top] > 0].tolist())


def word_boundary_ids(tokenizer: Any, vocab_size: int) -> tuple[list[int], list[int]]:
    """``(joining, closed)``, the two id lists that tell where a word goes on (see :func:`first_piece_of_word`).

    ``joining``: the pieces whose text, written right after a letter, starts with a letter or digit (no space
    marker), e.g. ``ing`` but not ``Ġseries`` / ``▁series``; measured by decoding ``[a, id]`` so it holds for
    byte-level BPE and SentencePiece alike. ``closed``: the pieces whose text does not end with a letter or digit
    (punctuation, whitespace, byte fragments, special tokens). A piece continues the word of the previous one
    exactly when it is joining and the previous piece is not closed."""
    n = min(vocab_size, len(tokenizer))
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    prefix = tokenizer.decode([anchor])
    pairs = tokenizer.batch_decode([[anchor, i] for i in range(n)])
    singles = tokenizer.batch_decode([[i] for i in range(n)])
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    joining = [
        i
        for i, t in enumerate(pairs)
        if i not in special and t.startswith(prefix) and len(t) > len(prefix) and t[len(prefix)].isalnum()
    ]
    closed = [i for i, t in enumerate(singles) if i in special or not (t and t[-1].isalnum())]
    return joining, closed


def first_piece_of_word(informative: torch.Tensor, continues: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: ``informative`` positions that are the first informative piece of their word.

    ``continues[b, t]``: the piece at ``t`` continues the word of the piece before it (a word starts where it is
    false; column 0 always starts one). With ``s(t)`` the start of the word holding ``t`` and
    ``c(t) = #{u <= t: informative[u]}``, position ``t`` is kept iff ``informative[t]`` and
    ``c(t) - c(s(t) - 1) == 1``."""
    b, t = informative.shape
    cols = torch.arange(t, device=informative.device).expand(b, t)
    start = torch.where(continues, torch.zeros_like(cols), cols).cummax(dim=1).values
    count = informative.long().cumsum(dim=1)
    before = (count - informative.long()).gather(1, start)
    return informative & (count - before == 1)


class ContextSets:
    """The per-context part of a forbidden set, ready to compute: the trie of the word forms, the ids that are never
    forbidden continuations (``skip``) and the common tokens (``common``). With ``joining``/``closed``
    (:func:`word_boundary_ids`) a forbidden continuation is only the first informative piece of each word of the
    text (the word is capped there; the rest of its spelling is left alone), and a common token is informative
    unless it is the whole word: a word of several pieces is never an everyday word, so `` St`` + ``arr`` is capped
    at `` St``, not at its spelling ``arr``. Without ``joining`` a common token is never forbidden. Built from a
    :class:`~etu_hf.ForbiddenSet` (see :meth:`ForbiddenSet.extra_ids`)."""

    def __init__(
        self,
        shared: Sequence[int],
        forms: Sequence[Sequence[int]],
        skip: Sequence[int] | None,
        joining: Sequence[int] | None = None,
        closed: Sequence[int] | None = None,
        common: Sequence[int] = (),
    ):
        from etu_hf.data.word_trie import PieceTrie

        self.shared = np.asarray(sorted(shared), dtype=np.int64)
        self.trie = PieceTrie(forms) if forms else None
        self.skip = torch.as_tensor(sorted(skip), dtype=torch.long) if skip is not None else None
        self.per_word = joining is not None
        self.joining = torch.as_tensor(sorted(joining or []), dtype=torch.long)
        self.closed = torch.as_tensor(sorted(closed or []), dtype=torch.long)
        self.common = torch.as_tensor(sorted(common), dtype=torch.long)

    def extra_ids(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``[B, T-1, k]`` padded with ``-1``: the extras of S(x) at each prediction position of ``input_ids``
        ``[B, T]`` (position ``t`` predicts token ``t + 1``); ``targets`` ``[B, T-1]`` the next tokens (for
        continuations; positions outside ``mask`` get none). ``None`` when no position has an extra.

        Continuations: the target ``y_t`` is added unless it is in ``skip``, or it is common and (per word) alone
        in its word, or (per word) an earlier target of its word was added. Words are read from ``input_ids``
        (masked labels do not split them): token ``t + 1`` continues the word of token ``t`` when it is in
        ``joining`` and token ``t`` is not in ``closed``; a common token is alone when it does not continue the
        token before it (known at ``t = 0`` too) and token ``t + 2`` does not continue it (the last position counts
        as a word end)."""
        parts = []
        if self.trie is not None:
            rows = input_ids[:, :-1].detach().cpu().numpy()
            e = self.trie.extra_ids(rows, self.shared)
            if e.shape[-1]:
                parts.append(torch.from_numpy(e))
        if self.skip is not None and targets is not None:
            t = targets.detach().cpu().long()
            drop = torch.isin(t, self.skip) | (t < 0)
            if mask is not None:
                drop |= ~mask.detach().cpu().bool()
            common = torch.isin(t, self.common)
            if self.per_word:
                x = input_ids.detach().cpu().long()
                continues = torch.isin(x[:, 1:], self.joining) & ~torch.isin(x[:, :-1], self.closed)
                ends = torch.ones_like(continues)  # the next piece does not continue the word
                ends[:, :-1] = ~continues[:, 1:]
                drop |= common & ~continues & ends
                drop |= ~first_piece_of_word(~drop, continues)
            else:
                drop |= common
            parts.append(t.masked_fill(drop, -1).unsqueeze(-1))
        if not parts:
            return None
        return torch.cat(parts, -1).to(input_ids.device)


def forbidden_coverage(fs: Any, batches: Iterable[Any]) -> float:
    """Share of the scored positions of ``batches`` whose next token is in S(x): how much of the text the forbidden
    set, and so its certificate, speaks about."""
    hit = total = 0
    shared = torch.as_tensor(fs.ids, dtype=torch.long)
    for item in batches:
        b = as_token_batch(item)
        mask, targets = scored_positions(b["input_ids"], b.get("attention_mask"), b.get("labels"))
        inside = torch.isin(targets, shared)
        extra = fs.extra_ids(b["input_ids"], targets, mask)
        if extra is not None:
            inside |= (extra == targets.unsqueeze(-1)).any(-1)
        hit += int((inside & mask).sum())
        total += int(mask.sum())
    return hit / total if total else 0.0


def warn_low_coverage(coverage: float) -> None:
    """Warn (and log) when S(x) holds the next token at fewer than :data:`MIN_COVERAGE` of the forget positions."""
    if coverage >= MIN_COVERAGE:
        return
    msg = (
        f"V_S holds the next token at only {coverage:.2%} of the forget positions: its certificate speaks about that "
        "little of the forget text. Give the topic's names (--forbidden_words FILE), use --vs_method words, or add "
        "--forbid_continuations true."
    )
    warnings.warn(msg, stacklevel=2)
    logger.warning(msg)
