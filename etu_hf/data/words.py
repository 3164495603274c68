r"""Forbidden words: split text into words, score them forget vs retain, read a user's word list.

A topic is carried by words (names, terms), which a byte-level BPE splits into generic pieces; so V_S is chosen at
the level of words, and :mod:`etu_hf.data.word_trie` turns the words into per-position forbidden pieces.

Words are the tokenizer's pre-tokenized words (``pre_tokenizer.pre_tokenize_str``, after its normalizer), with the
surrounding whitespace dropped, or whitespace-separated words with their leading and trailing punctuation stripped
when the tokenizer has no pre-tokenizer. Words without a letter (punctuation, digits) are never candidates.

Scoring (Dunning, 1993). For a word ``w`` with forget count :math:`c_f`, retain count :math:`c_r` and corpus sizes
(in words) :math:`N_f`, :math:`N_r`, the 2x2 table of observed counts and its expectation under "same rate in both"

.. math::
    O = \begin{pmatrix} c_f & N_f - c_f \\ c_r & N_r - c_r \end{pmatrix},\qquad
    E_{ij} = \frac{(\text{row } i)(\text{column } j)}{N_f + N_r},\qquad
    G^2 = 2 \sum_{ij} O_{ij} \ln\frac{O_{ij}}{E_{ij}} \quad (0 \ln 0 = 0).

:math:`G^2` is asymptotically :math:`\chi^2_1` under that hypothesis, so the threshold scales with the corpus size by
itself: 10.83 is :math:`p < 0.001`, where a raw count floor would need a different value for every corpus. A word is
kept when its forget rate is higher (:math:`c_f/N_f > c_r/N_r`), :math:`G^2 \ge` ``min_g2``, and its smoothed log
ratio (additive smoothing ``a`` over the ``W`` word types seen in either corpus, as the piece-level PMI)

.. math::  r(w) = \ln\frac{c_f + a}{N_f + aW} - \ln\frac{c_r + a}{N_r + aW} \ge \text{min\_log\_ratio}

(default 1 nat: at least :math:`e \approx 2.7` times as frequent), so a frequent word that is only slightly more
common in the forget text, significant by size alone, is not kept.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: :math:`\chi^2_1` quantile at p = 0.001: the default G2 threshold.
DEFAULT_MIN_G2 = 10.83
#: Default floor of the smoothed log ratio, in nats.
DEFAULT_MIN_LOG_RATIO = 1.0
#: Default additive smoothing per word type.
DEFAULT_SMOOTHING = 1.0
#: Scored words need at least this many letters (single letters and initials are too generic to forbid).
DEFAULT_MIN_LETTERS = 3

_SPACE = re.compile(r"\s+")


# ------------------------------------------------------------------------------------------ splitting
def _is_punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith(("P", "S"))


def whitespace_words(text: str) -> list[str]:
    """Whitespace-separated words of ``text``, each with its leading and trailing punctuation/symbols stripped."""
    out = []
    for raw in _SPACE.split(text):
        start, end = 0, len(raw)
        while start < end and _is_punctuation(raw[start]):
            start += 1
        while end > start and _is_punctuation(raw[end - 1]):
            end -= 1
        if start < end:
            out.append(raw[start:end])
    return out


def word_splitter(tokenizer: Any = None) -> Callable[[str], list[str]]:
    """A function ``text -> words``: the tokenizer's pre-tokenizer when it has one, else :func:`whitespace_words`.

    ``tokenizer``: a ``transformers`` fast tokenizer (its ``backend_tokenizer``), a ``tokenizers.Tokenizer``, or
    ``None``. The pre-tokenizer's offsets cut the (normalized) text, so words come back as readable text (``"Harry"``,
    not the byte-level ``"ĠHarry"``), with surrounding whitespace dropped.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return whitespace_words
    normalizer = getattr(backend, "normalizer", None)

    def split(text: str) -> list[str]:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        words = (text[a:b].strip() for _, (a, b) in pre.pre_tokenize_str(text))
        return [w for w in words if w]

    return split


def has_letter(word: str) -> bool:
    """True when ``word`` holds a letter (words of punctuation or digits only are never forbidden words)."""
    return any(ch.isalpha() for ch in word)


def count_words(texts: Iterable[str], split: Callable[[str], list[str]]) -> Counter[str]:
    """Occurrences of every word of ``texts`` (all words, lettered or not: they all count in the corpus size)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(split(text))
    return counts


# ------------------------------------------------------------------------------------------ scoring
def g2_statistic(cf: np.ndarray, nf: float, cr: np.ndarray, nr: float) -> np.ndarray:
    r"""Dunning's :math:`G^2 = 2\sum O \ln(O/E)` of the 2x2 table of each word (module docstring), vectorised."""
    cf, cr = np.asarray(cf, dtype=np.float64), np.asarray(cr, dtype=np.float64)
    n = nf + nr
    col = cf + cr
    observed = (cf, nf - cf, cr, nr - cr)
    expected = (nf * col / n, nf * (n - col) / n, nr * col / n, nr * (n - col) / n)
    g2 = np.zeros_like(cf)
    for o, e in zip(observed, expected, strict=True):
        g2 += np.where(o > 0, o * np.log(np.where(o > 0, o, 1.0) / np.where(e > 0, e, 1.0)), 0.0)
    return np.maximum(2.0 * g2, 0.0)  # exact 0 where the rates are equal (rounding can give -1e-16)


def smoothed_log_ratio(
    cf: np.ndarray, nf: float, cr: np.ndarray, nr: float, smoothing: float, n_types: int
) -> np.ndarray:
    r""":math:`\ln\frac{c_f + a}{N_f + aW} - \ln\frac{c_r + a}{N_r + aW}` (module docstring), vectorised."""
    cf, cr = np.asarray(cf, dtype=np.float64), np.asarray(cr, dtype=np.float64)
    a, w = smoothing, n_types
    return np.log(cf + a) - math.log(nf + a * w) - (np.log(cr + a) - math.log(nr + a * w))


@dataclass(frozen=True)
class ForbiddenWord:
    """A forbidden word and its evidence: counts in the forget and retain corpora, :math:`G^2`, the smoothed log
    ratio (nats), and where it came from (``"scored"`` or ``"user"``: a user's word is kept whatever its score)."""

    word: str
    forget_count: int
    retain_count: int
    g2: float
    log_ratio: float
    source: str = "scored"


def score_words(
    forget_counts: Counter[str],
    retain_counts: Counter[str],
    words: Sequence[str] | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
) -> list[ForbiddenWord]:
    """:math:`G^2` and the smoothed log ratio of ``words`` (default: every lettered word of the forget corpus) from
    the two corpora's word counts; corpus sizes are the total word counts."""
    if words is None:
        words = [w for w in forget_counts if has_letter(w)]
    nf, nr = float(sum(forget_counts.values())), float(sum(retain_counts.values()))
    if nf == 0 or nr == 0:
        empty = "forget" if nf == 0 else "retain"
        raise ValueError(f"word scoring needs words in both corpora; the {empty} corpus has none")
    cf = np.array([forget_counts.get(w, 0) for w in words], dtype=np.float64)
    cr = np.array([retain_counts.get(w, 0) for w in words], dtype=np.float64)
    g2 = g2_statistic(cf, nf, cr, nr)
    ratio = smoothed_log_ratio(cf, nf, cr, nr, smoothing, len(set(forget_counts) | set(retain_counts)))
    return [
        ForbiddenWord(w, int(f), int(r), float(g), float(x))
        for w, f, r, g, x in zip(words, cf, cr, g2, ratio, strict=True)
    ]


def select_words(
    forget_counts: Counter[str],
    retain_counts: Counter[str],
    *,
    min_g2: float = DEFAULT_MIN_G2,
    min_log_ratio: float = DEFAULT_MIN_LOG_RATIO,
    smoothing: float = DEFAULT_SMOOTHING,
) -> list[ForbiddenWord]:
    r"""The words of the forget corpus that the rule keeps (module docstring): higher forget rate, :math:`G^2 \ge`
    ``min_g2``, smoothed log ratio :math:`\ge` ``min_log_ratio``, at least one letter; sorted by :math:`G^2`
    (highest first), then log ratio, then the word."""
    nf, nr = sum(forget_counts.values()), sum(retain_counts.values())
    kept = [
        s
        for s in score_words(forget_counts, retain_counts, smoothing=smoothing)
        if s.forget_count * nr > s.retain_count * nf and s.g2 >= min_g2 and s.log_ratio >= min_log_ratio
    ]
    return sorted(kept, key=lambda s: (-s.g2, -s.log_ratio, s.word))


def forbidden_words_from_corpora(
    forget_texts: Iterable[str],
    retain_texts: Iterable[str],
    tokenizer: Any = None,
    *,
    min_g2: float = DEFAULT_MIN_G2,
    min_log_ratio: float = DEFAULT_MIN_LOG_RATIO,
    smoothing: float = DEFAULT_SMOOTHING,
    user_words: Sequence[str] = (),
    min_letters: int = DEFAULT_MIN_LETTERS,
    exclude: Callable[[str], bool] | None = None,
) -> list[ForbiddenWord]:
    """Split both corpora into words (:func:`word_splitter`), keep the scored words (:func:`select_words`) that have
    at least ``min_letters`` letters and that ``exclude`` (e.g. a test for common words) does not reject, and merge
    the user's words (:func:`merge_words`, kept whatever the filters). An empty result is refused with one line
    saying what to loosen."""
    split = word_splitter(tokenizer)
    fc, rc = count_words(forget_texts, split), count_words(retain_texts, split)
    chosen = select_words(fc, rc, min_g2=min_g2, min_log_ratio=min_log_ratio, smoothing=smoothing)
    chosen = [
        w
        for w in chosen
        if sum(ch.isalpha() for ch in w.word) >= min_letters and not (exclude is not None and exclude(w.word))
    ]
    words = merge_words(chosen, user_words, fc, rc, smoothing=smoothing)
    if not words:
        raise ValueError(
            f"no forbidden word: no word of the forget corpus ({sum(fc.values())} words) is significantly more "
            f"frequent than in the retain corpus ({sum(rc.values())} words) and passes the filters. To loosen it, "
            f"lower --word_min_g2 (now {min_g2}) or --word_min_log_ratio (now {min_log_ratio}), set "
            "--word_common_rank 0 (keep everyday words), give more forget text, or list the words "
            "(--forbidden_words FILE)"
        )
    return words


def merge_words(
    scored: Sequence[ForbiddenWord],
    user_words: Sequence[str],
    forget_counts: Counter[str],
    retain_counts: Counter[str],
    smoothing: float = DEFAULT_SMOOTHING,
) -> list[ForbiddenWord]:
    """``scored`` plus the user's words not among them (``source="user"``, with their counts and scores from the same
    corpora, after the scored words in the order given)."""
    have = {s.word for s in scored}
    extra = list(dict.fromkeys(w for w in user_words if w not in have))
    if not extra:
        return list(scored)
    user = score_words(forget_counts, retain_counts, extra, smoothing)
    return [*scored, *(ForbiddenWord(u.word, u.forget_count, u.retain_count, u.g2, u.log_ratio, "user") for u in user)]


# ------------------------------------------------------------------------------------------ the user's file
def encode_word(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``)."""
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(out, "ids", out))


def read_forbidden_words(path: str | os.PathLike, tokenizer: Any, source: str = "--forbidden_words") -> list[str]:
    """The words of a file of one word per line (blank lines skipped, repeats once, order kept).

    Refused with one line naming ``source``: a missing or non-UTF-8 file, a file with no word, a line with a space
    inside (one word per line), and words the tokenizer cannot encode (no token at all, or its unknown token).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source} {path!r}: no such file; give a text file with one word per line")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError as err:
        raise ValueError(f"{source} {path!r}: not UTF-8 text ({err.reason}); save it as UTF-8") from err
    words = list(dict.fromkeys(line for line in lines if line))
    if not words:
        raise ValueError(f"{source} {path!r}: the file holds no word; write one word per line")
    spaced = [w for w in words if _SPACE.search(w)]
    if spaced:
        raise ValueError(
            f"{source} {path!r}: one word per line, but {spaced[0]!r} holds a space; put each word on its own line"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    bad = [w for w in words if not (ids := encode_word(tokenizer, w)) or (unk is not None and unk in ids)]
    if bad:
        raise ValueError(
            f"{source} {path!r}: the tokenizer cannot encode {len(bad)} word(s), e.g. {bad[:3]}; remove them or use "
            "the model's own tokenizer"
        )
    return words
