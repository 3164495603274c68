r"""From forbidden words to forbidden pieces per position: surface forms, a trie over piece sequences, S(x).

A forbidden word is the piece sequences the tokenizer produces for it (:func:`surface_forms`: the word as given
and capitalised, each with and without a leading space). With those sequences :math:`t_1 \dots t_m` in a trie, the
forbidden set at the context ``x`` that ends with the tokens :math:`x_1 \dots x_t` is

.. math::
    S(x) = S_{shared} \;\cup\; \{\, t_{k+1} : t_1 \dots t_k = x_{t-k+1} \dots x_t,\ 1 \le k < m,
    \text{ for a sequence } t \,\}

- :math:`S_{shared}` (:meth:`PieceTrie.shared_first_pieces`): the first pieces :math:`t_1`, forbidden at every
  position, except pieces with no letter or special tokens, and first pieces *mostly used by other words*: measured
  on the retain corpus, a first piece stays only when at least ``min_share`` of its occurrences there start a
  forbidden sequence (or it does not occur there at all);
- the rest, per position (:meth:`PieceTrie.extra_ids`): the next piece of every sequence whose first ``k`` pieces
  are exactly the last ``k`` tokens. A generic piece (``"ot"``, ``"ter"``) is thus forbidden only inside a forbidden
  word (after ``"ĠP"`` + ``"ot"`` for ``" Potter"``), not everywhere.

The extras come in the representation of :mod:`etu_hf.ops.row_sets`: ``[..., T, k_max]`` ids, ``-1`` = none,
``extras[..., t, :]`` for the logits at position ``t`` (which predict token ``t + 1``). Vectorised over a whole
batch: one ``np.searchsorted`` per trie depth over all positions (no Python loop over tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from etu_hf.data.words import encode_word

#: Default share of a first piece's retain occurrences that must start a forbidden sequence for it to be shared.
DEFAULT_MIN_SHARE = 0.5


def surface_forms(word: str, tokenizer: Any) -> list[tuple[int, ...]]:
    """The distinct piece sequences of ``word``: as given and with its first letter upper-cased, each without and
    with a leading space (in that order; empty encodings dropped)."""
    cap = word[:1].upper() + word[1:]
    forms = [encode_word(tokenizer, v) for v in (word, " " + word, cap, " " + cap)]
    return list(dict.fromkeys(tuple(f) for f in forms if f))


def _as_rows(ids: Any) -> np.ndarray:
    """Token ids as an int64 array of rows ``[B, T]`` (a single sequence becomes one row)."""
    arr = np.asarray(ids, dtype=np.int64)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def pad_rows(sequences: Iterable[Sequence[int]]) -> np.ndarray:
    """Sequences of different lengths as rows ``[B, T_max]`` padded with ``-1`` (which matches nothing)."""
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    out = np.full((len(seqs), max((len(s) for s in seqs), default=0)), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


class PieceTrie:
    """A trie over piece sequences (module docstring), stored as sorted edge keys for vectorised lookups.

    Node 0 is the root; an edge ``node --token--> child`` is the key ``node * V + token`` (``V`` one more than the
    largest piece id), so that looking up the children of many (node, token) pairs is one ``np.searchsorted``.
    """

    def __init__(self, sequences: Iterable[Sequence[int]]):
        seqs = [tuple(int(t) for t in s) for s in sequences]
        seqs = list(dict.fromkeys(s for s in seqs if s))
        if not seqs:
            raise ValueError("PieceTrie: no piece sequence (every word encoded to nothing)")
        if min(min(s) for s in seqs) < 0:
            raise ValueError("PieceTrie: piece ids must be >= 0")
        self.sequences = seqs
        self.key_base = max(max(s) for s in seqs) + 1
        edges: dict[tuple[int, int], int] = {}
        terminal = [False]
        for seq in seqs:
            node = 0
            for tok in seq:
                child = edges.get((node, tok))
                if child is None:
                    child = edges[(node, tok)] = len(terminal)
                    terminal.append(False)
                node = child
            terminal[node] = True
        keys = np.array([n * self.key_base + t for n, t in edges], dtype=np.int64)
        order = np.argsort(keys)
        self._keys = keys[order]
        self._child = np.array(list(edges.values()), dtype=np.int64)[order]
        self.terminal = np.array(terminal, dtype=bool)
        #: Depth of the longest sequence.
        self.depth = max(len(s) for s in seqs)
        self.first_pieces = np.unique([s[0] for s in seqs]).astype(np.int64)
        # children of every node as padded rows (-1 = none); the root's (the first pieces) are never extras
        parent, token = np.divmod(self._keys, self.key_base)
        n_children = np.bincount(parent, minlength=len(terminal))
        n_children[0] = 0
        self._children = np.full((len(terminal), max(int(n_children.max()), 1)), -1, dtype=np.int64)
        fill = np.zeros(len(terminal), dtype=np.int64)
        for p, t in zip(parent.tolist(), token.tolist(), strict=True):
            if p:
                self._children[p, fill[p]] = t
                fill[p] += 1

    @classmethod
    def from_words(cls, words: Iterable[str], tokenizer: Any) -> PieceTrie:
        """The trie of every surface form (:func:`surface_forms`) of ``words``."""
        return cls(form for w in words for form in surface_forms(w, tokenizer))

    def step(self, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The child of each ``nodes[i]`` along ``tokens[i]``, ``-1`` where there is none (or ``nodes[i] = -1``)."""
        ok = (nodes >= 0) & (tokens >= 0) & (tokens < self.key_base)
        keys = np.where(ok, nodes * self.key_base + tokens, 0)
        idx = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return np.where(ok & (self._keys[idx] == keys), self._child[idx], -1)

    def walk(self, ids: Any) -> list[np.ndarray]:
        """``nodes[k-1][b, t]``: the node reached by reading the ``k`` tokens ending at ``t`` from the root
        (``-1`` if they are not the start of a sequence), for ``k = 1 .. depth``. Arrays ``[B, T]``."""
        rows = _as_rows(ids)
        nodes = [self.step(np.zeros_like(rows), rows)]
        for _ in range(1, self.depth):
            prev = np.full_like(rows, -1)
            prev[:, 1:] = nodes[-1][:, :-1]
            nodes.append(self.step(prev, rows))
        return nodes

    def sequence_starts(self, ids: Any) -> np.ndarray:
        """``[B, T]`` bool: a whole forbidden sequence starts at this token."""
        rows = _as_rows(ids)
        starts = np.zeros(rows.shape, dtype=bool)
        for k, nodes in enumerate(self.walk(rows), start=1):
            b, t = np.nonzero((nodes >= 0) & self.terminal[np.maximum(nodes, 0)])
            starts[b, t - k + 1] = True
        return starts

    def shared_first_pieces(
        self, retain_ids: Any, min_share: float = DEFAULT_MIN_SHARE, allowed: np.ndarray | None = None
    ) -> np.ndarray:
        """The first pieces forbidden at every position (sorted ids).

        A first piece ``f`` with ``n(f)`` occurrences in ``retain_ids`` (rows ``[B, T]``, ``-1`` padding; see
        :func:`pad_rows`), ``s(f)`` of which start a whole forbidden sequence, is shared when ``n(f) = 0`` or
        ``s(f) >= min_share * n(f)``, and it is allowed: ``allowed`` is a bool array aligned with
        :attr:`first_pieces` (:func:`piece_allowed`: a letter, not a special token; default all allowed).
        """
        if not 0.0 <= min_share <= 1.0:
            raise ValueError(f"min_share must be in [0, 1], got {min_share}")
        rows = _as_rows(retain_ids)
        first = self.first_pieces
        valid = (rows >= 0) & (rows < self.key_base)
        n = np.bincount(rows[valid], minlength=self.key_base)[first]
        s = np.bincount(rows[valid & self.sequence_starts(rows)], minlength=self.key_base)[first]
        keep = (n == 0) | (s >= min_share * n)
        if allowed is not None:
            keep &= np.asarray(allowed, dtype=bool)
        return first[keep]

    def extra_ids(self, ids: Any, shared: np.ndarray | Sequence[int] = ()) -> np.ndarray:
        """``[B, T, k_max]`` (or ``[T, k_max]`` for one sequence): at each position the next piece of every sequence
        whose first ``k >= 1`` pieces are the last ``k`` tokens, ``-1`` padded, without repeats and without the ids
        of ``shared`` (forbidden everywhere already). ``k_max`` is the largest count in this batch (0 if none)."""
        arr = np.asarray(ids, dtype=np.int64)
        rows = _as_rows(arr)
        cand = np.concatenate(
            [np.where(n[..., None] >= 0, self._children[np.maximum(n, 0)], -1) for n in self.walk(rows)], -1
        )
        cand = -np.sort(-cand, axis=-1)  # descending: ids first, -1 last
        drop = np.zeros(cand.shape, dtype=bool)
        drop[..., 1:] = cand[..., 1:] == cand[..., :-1]
        drop |= np.isin(cand, np.asarray(shared, dtype=np.int64))
        cand = -np.sort(-np.where(drop, -1, cand), axis=-1)
        k_max = int((cand >= 0).sum(-1).max(initial=0))
        out = cand[..., :k_max]
        return out[0] if arr.ndim == 1 else out


def piece_allowed(tokenizer: Any, ids: np.ndarray) -> np.ndarray:
    """Bool per id of ``ids``: the piece may be forbidden everywhere: its text holds a letter and it is not a special
    token (whitespace, punctuation and digit pieces never enter the shared set)."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    raws = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return np.array(
        [
            raw is not None
            and int(i) not in special
            and any(c.isalpha() for c in tokenizer.convert_tokens_to_string([raw]))
            for i, raw in zip(ids, raws, strict=True)
        ],
        dtype=bool,
    )


#: A first piece with fewer letters than this is never forbidden everywhere unless it is a whole word form.
MIN_SHARED_LETTERS = 3


def _word_like(tokenizer: Any, first: np.ndarray, sequences: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Bool per first piece: a whole form (a one-piece word) or at least :data:`MIN_SHARED_LETTERS` letters. Short
    pieces that start longer words ("H" of "Harry" at a line start, " w" of " wizard") are forbidden only through
    the trie, so they stay free everywhere else."""
    whole = {s[0] for s in sequences if len(s) == 1}
    texts = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(first.tolist())]
    return np.array(
        [
            int(i) in whole or sum(c.isalpha() for c in t) >= MIN_SHARED_LETTERS
            for i, t in zip(first, texts, strict=True)
        ],
        dtype=bool,
    )


@dataclass
class WordPieces:
    """Forbidden words as pieces: the trie, the shared set, and the first pieces left out of it (used mostly by
    other words in the retain corpus; still forbidden nowhere on their own, their words from the second piece)."""

    words: list[str]
    forms: dict[str, list[tuple[int, ...]]]
    trie: PieceTrie
    shared: np.ndarray
    dropped_first_pieces: np.ndarray

    def extra_ids(self, ids: Any) -> np.ndarray:
        """Per-position extras of S(x) for token rows ``ids`` (see :meth:`PieceTrie.extra_ids`)."""
        return self.trie.extra_ids(ids, self.shared)


def word_pieces(
    words: Sequence[str],
    tokenizer: Any,
    retain_sequences: Iterable[Sequence[int]],
    vocab_size: int,
    min_share: float = DEFAULT_MIN_SHARE,
) -> WordPieces:
    """Build :class:`WordPieces` for ``words`` with the retain corpus as token-id sequences (``vocab_size``: the
    model's output vocabulary; every piece must lie in it)."""
    if not words:
        raise ValueError("no forbidden word: nothing to build the per-position sets from")
    forms = {w: surface_forms(w, tokenizer) for w in words}
    trie = PieceTrie(f for fs in forms.values() for f in fs)
    if trie.key_base > vocab_size:
        raise ValueError(
            f"a forbidden word encodes to piece id {trie.key_base - 1} outside the vocabulary {vocab_size}"
        )
    allowed = piece_allowed(tokenizer, trie.first_pieces) & _word_like(tokenizer, trie.first_pieces, trie.sequences)
    shared = trie.shared_first_pieces(pad_rows(retain_sequences), min_share, allowed)
    dropped = np.setdiff1d(trie.first_pieces, shared)
    return WordPieces(list(words), forms, trie, shared, dropped)
