r"""The forbidden token set V_S: construction by frequency or PMI, span masking, and V_S.ids.json.

Flags: docs/cli.md ("ETU settings", the forbidden set V_S). Counts are taken over *scored* positions (see
:func:`etu_hf.data.scored_positions`): the tokens the model is trained to predict, padding and
``-100`` labels excluded. Counting is vectorised (``np.bincount``, see :mod:`etu_hf.data.token_counts`);
nothing loops over tokens in Python.

- frequency: drop tokens with count :math:`c_f > \max(1, \min(r N, \mathrm{cap}))` (very frequent,
  function-like tokens), keep the ``vocab_top_k`` most frequent of the rest.
- PMI: :math:`\mathrm{score}(t) = \log\frac{c_f + a}{N_f + a|V|} - \log\frac{c_r + a}{N_r + a|V|}`
  (background :math:`1/|V|` without retain data); keep :math:`c_f \ge` ``pmi_min_count`` and
  score > ``pmi_min_score``, then the ``pmi_top_k`` best. The default ``pmi_min_score = 1`` asks
  a token to be at least :math:`e \approx 2.7` times as frequent in the forget text as in the
  retain text: on real text a threshold of 0 admits function words and single letters that are
  only slightly more common in the forget text ("of", "e", "may"), whose suppression then costs
  retain quality (measured in BENCHMARKS.md).
- Both drop special tokens and pieces with no letter at all (whitespace-, punctuation- or digit-only
  pieces, for byte-level BPE ``Ġ`` and SentencePiece ``▁`` tokenizers alike).
- Span masking: for every word of the forget data that the tokenizer splits into 2 to
  ``span_ngram_max`` pieces and whose leading piece is in V_S, the other pieces are added, so the
  word is suppressed whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from etu_hf.artifacts.files import FORBIDDEN_SET_FILE, atomic_write
from etu_hf.data.token_counts import PieceInfo, count_scored_tokens

logger = logging.getLogger(__name__)

FORMAT_NAME = "etu-hf/forbidden-set"
#: Files of per-context sets (``words``, ``dropped_first_pieces``, ``continuations``) are version 2; a set that is the
#: same everywhere is still written as version 1, which older etu-hf reads. Both load.
FORMAT_VERSION = 2


def token_ids(values: Any, source: str = "forbidden ids") -> list[int]:
    """``values`` (a sequence, array or tensor of token ids) as a list of ``int``.

    Anything that is not an integer (``1.5``, ``2.0``, ``true``, ``"7"``) is a ``ValueError`` naming
    ``source``: ``int()`` would silently turn 1.5 into 1 and true into 1 (often the pad token).
    """
    if isinstance(values, (torch.Tensor, np.ndarray)):
        dtype = str(values.dtype)
        if "int" not in dtype:
            raise ValueError(f"{source}: token ids must be integers; got an array of {dtype}")
        values = values.reshape(-1).tolist()
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(
                f"{source}: token ids must be integers; got {v!r} ({type(v).__name__}). Write ids as whole numbers, "
                "e.g. [5, 17, 230]."
            )
        out.append(int(v))
    return out


@dataclass
class ForbiddenSet:
    """A forbidden token set V_S with the evidence it was built from.

    ``ids`` are sorted token ids. The parallel lists ``tokens`` (tokenizer pieces), ``forget_counts``,
    ``retain_counts`` and ``scores`` (the PMI score, or the forget count for the frequency method) are
    kept for audit when known. ``span_added`` lists ids added by span masking.

    Per-context sets (:mod:`etu_hf.forbidden_context`): ``words`` lists the forbidden words (``vs_method="words"``),
    each a dict with ``word``, ``forms`` (piece-id sequences), ``pieces`` and its evidence; ``ids`` then holds their
    shared first pieces and ``dropped_first_pieces`` the first pieces left to the trie. ``continuations`` (a dict with
    ``skip_ids``, never forbidden, and ``common_ids``, not forbidden as a word of their own) makes the text's own next
    token forbidden where it is informative; with ``joining_ids`` and ``closed_ids`` (``per_word``) only at the first
    informative piece of each word (files written before ``common_ids`` list the common tokens in ``skip_ids``).
    With either, S(x) = ids + :meth:`extra_ids` at each position.
    """

    ids: list[int]
    vocab_size: int | None = None
    method: str = "custom"
    parameters: dict[str, Any] = field(default_factory=dict)
    tokens: list[str | None] | None = None
    forget_counts: list[int] | None = None
    retain_counts: list[int] | None = None
    scores: list[float] | None = None
    span_added: list[int] = field(default_factory=list)
    words: list[dict[str, Any]] | None = None
    dropped_first_pieces: list[int] = field(default_factory=list)
    continuations: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.ids = token_ids(self.ids)
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("forbidden ids contain duplicates")
        for w in self.words or []:
            if not isinstance(w, dict) or not w.get("forms"):
                raise ValueError(f"forbidden words: each entry needs 'word' and 'forms' (piece id lists); got {w!r}")
            w["forms"] = [token_ids(f, f"forms of forbidden word {w.get('word')!r}") for f in w["forms"]]
        if self.continuations is not None:
            skip = self.continuations.get("skip_ids", []) if isinstance(self.continuations, dict) else None
            if skip is None:
                raise ValueError("continuations: expected an object with 'skip_ids' (token ids never forbidden)")
            self.continuations["skip_ids"] = token_ids(skip, "continuations.skip_ids")
            for key in ("joining_ids", "closed_ids", "common_ids"):
                if self.continuations.get(key) is not None:
                    self.continuations[key] = token_ids(self.continuations[key], f"continuations.{key}")
            if (self.continuations.get("joining_ids") is None) != (self.continuations.get("closed_ids") is None):
                raise ValueError("continuations: 'joining_ids' and 'closed_ids' go together (per-word continuations)")
        self._context: Any = None

    @property
    def per_context(self) -> bool:
        """S(x) differs per position: forbidden words (a trie over their pieces) or forbidden continuations."""
        return bool(self.words) or self.continuations is not None

    def context_sets(self) -> Any:
        """The per-context part as a :class:`~etu_hf.forbidden_context.ContextSets` (cached; ``None`` without one)."""
        if not self.per_context:
            return None
        if self._context is None:
            from etu_hf.forbidden_context import ContextSets

            forms = [f for w in self.words or [] for f in w["forms"]]
            cont = self.continuations or {}
            skip = cont["skip_ids"] if self.continuations is not None else None
            self._context = ContextSets(
                self.ids, forms, skip, cont.get("joining_ids"), cont.get("closed_ids"), cont.get("common_ids") or ()
            )
        return self._context

    def extra_ids(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The per-position extras of S(x) beyond ``ids``: ``[B, T-1, k]`` (``-1`` = none) for the predictions of
        ``input_ids`` ``[B, T]``, or ``None`` for a set that is the same everywhere (see
        :meth:`~etu_hf.forbidden_context.ContextSets.extra_ids`; ``targets``/``mask`` from
        :func:`~etu_hf.data.scored_positions`, needed for continuations)."""
        ctx = self.context_sets()
        return None if ctx is None else ctx.extra_ids(input_ids, targets, mask)

    def with_continuations(
        self,
        skip_ids: Sequence[int],
        skip_top_k: int,
        boundaries: tuple[Sequence[int], Sequence[int]] | None = None,
        common_ids: Sequence[int] = (),
        common_source: str = "retain",
    ) -> ForbiddenSet:
        """This set with forbidden continuations switched on. ``skip_ids``: never forbidden as a continuation;
        ``common_ids`` (the ``skip_top_k`` most frequent retain tokens, or without retain data the tokenizer's first
        ids; ``common_source`` says which): not forbidden when they make a word alone.
        ``boundaries`` (``(joining, closed)`` of :func:`~etu_hf.forbidden_context.word_boundary_ids`): forbid only
        the first informative piece of each word (``per_word``); ``None``: every informative piece, and never a
        common token."""
        self.continuations = {
            "skip_top_k": skip_top_k,
            "skip_ids": token_ids(skip_ids, "continuations.skip_ids"),
            "common_ids": token_ids(common_ids, "continuations.common_ids"),
            "common_source": common_source,
            "per_word": boundaries is not None,
        }
        if boundaries is not None:
            self.continuations["joining_ids"] = token_ids(boundaries[0], "continuations.joining_ids")
            self.continuations["closed_ids"] = token_ids(boundaries[1], "continuations.closed_ids")
        self._context = None
        return self

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fraction(self) -> float | None:
        """|V_S| / |V| (``None`` when the vocabulary size is unknown)."""
        return len(self.ids) / self.vocab_size if self.vocab_size else None

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The ids as a long tensor (for ``logits[..., ids]``)."""
        return torch.tensor(self.ids, dtype=torch.long, device=device)

    def check_vocab(self, vocab_size: int, source: str = "forbidden_ids_path", pad_token_id: int | None = None) -> None:
        """Raise ``ValueError`` naming ``source`` if V_S does not fit the model: it is empty or holds the whole
        vocabulary (no token would be left to move the mass to), it was built for a vocabulary of another
        size (its ``vocab_size``), an id is outside ``[0, vocab_size)``, or it holds ``pad_token_id``."""
        if not self.ids and not self.per_context:
            raise ValueError(f"{source}: the forbidden set V_S is empty.")
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            raise ValueError(
                f"{source}: V_S was built for a vocabulary of {self.vocab_size} tokens (its vocab_size) but the "
                f"model has {vocab_size}: it belongs to another model or tokenizer; rebuild V_S for this model."
            )
        if len(set(self.ids)) >= vocab_size:
            raise ValueError(
                f"{source}: V_S holds every one of the model's {vocab_size} tokens, so no token is left to move the "
                "mass to; give only the tokens to suppress (--pmi_top_k / --vocab_top_k bound a built V_S)."
            )
        if pad_token_id is not None and pad_token_id in self.ids:
            raise ValueError(
                f"{source}: V_S holds the tokenizer's pad token (id {pad_token_id}): padding is not text, and when the "
                f"pad token is also the EOS token suppressing it stops the model from ending text; remove id "
                f"{pad_token_id} from V_S."
            )
        bad = [i for i in self.ids if i < 0 or i >= vocab_size]
        bad += [i for w in self.words or [] for f in w["forms"] for i in f if i < 0 or i >= vocab_size]
        if bad:
            raise ValueError(
                f"{source}: {len(bad)} forbidden token id(s) are outside the model's vocabulary [0, {vocab_size}), "
                f"e.g. {bad[:5]}. The file was probably built for another tokenizer; rebuild V_S for this model."
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.words:
            d.pop("words"), d.pop("dropped_first_pieces")
        if self.continuations is None:
            d.pop("continuations")
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION if self.per_context else 1,
            "size": len(self.ids),
            "fraction_of_vocab": self.fraction,
            **d,
        }

    def save(self, path: str) -> str:
        """Write ``V_S.ids.json`` (``path`` may be a folder). Returns the file written."""
        if os.path.isdir(path):
            path = os.path.join(path, FORBIDDEN_SET_FILE)
        data = self.to_dict()
        return atomic_write(path, lambda f: json.dump(data, f, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, path: str) -> ForbiddenSet:
        """Read ``V_S.ids.json`` (or a folder holding it). A flat JSON list of ids is accepted
        too."""
        if os.path.isdir(path):
            path = os.path.join(path, FORBIDDEN_SET_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"forbidden set file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a valid V_S.ids.json file ({err}); rebuild V_S or fix the file") from err
        if isinstance(data, list):
            return cls(ids=sorted(token_ids(data, path)), method="list")
        if not isinstance(data, dict) or "ids" not in data:
            raise ValueError(f"{path}: not a V_S.ids.json file (expected a list of ids or an object with 'ids')")
        token_ids(data["ids"], path)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Selection rules (pure numpy, exposed for tests)
# ---------------------------------------------------------------------------------------------
def frequency_selection(
    counts: np.ndarray, allowed: np.ndarray, vs_freq_rate: float, vs_abs_cap: int, vocab_top_k: int | None
) -> np.ndarray:
    r"""Ids kept by the frequency rule: :math:`0 < c \le \max(1, \min(r N, \mathrm{cap}))`.

    Of those, the ``vocab_top_k`` most frequent (ties by id) when given.
    """
    threshold = max(1.0, min(vs_freq_rate * counts.sum(), float(vs_abs_cap)))
    keep = np.flatnonzero((counts > 0) & (counts <= threshold) & allowed)
    order = np.lexsort((keep, -counts[keep]))  # count descending, then id
    keep = keep[order]
    return np.sort(keep[:vocab_top_k] if vocab_top_k else keep)


def pmi_scores(forget_counts: np.ndarray, retain_counts: np.ndarray | None, smoothing: float) -> np.ndarray:
    r"""PMI score of every token: :math:`\log\frac{c_f + a}{N_f + a|V|} - \log\frac{c_r + a}{N_r + a|V|}`.

    Without retain counts the background is uniform: the second term is :math:`\log(1/|V|)`.
    """
    v = len(forget_counts)
    cf = forget_counts.astype(np.float64)
    fg = np.log(cf + smoothing) - math.log(cf.sum() + smoothing * v)
    if retain_counts is None:
        return fg + math.log(v)
    cr = retain_counts.astype(np.float64)
    return fg - (np.log(cr + smoothing) - math.log(cr.sum() + smoothing * v))


def pmi_selection(
    scores: np.ndarray,
    forget_counts: np.ndarray,
    allowed: np.ndarray,
    pmi_min_count: int,
    pmi_top_k: int,
    pmi_min_score: float = 0.0,
) -> np.ndarray:
    """Ids with ``c_f >= pmi_min_count`` and score > ``pmi_min_score``, the ``pmi_top_k`` highest scores
    (ties: count, id)."""
    keep = np.flatnonzero((forget_counts >= max(pmi_min_count, 1)) & (scores > pmi_min_score) & allowed)
    order = np.lexsort((keep, -forget_counts[keep], -scores[keep]))
    return np.sort(keep[order][:pmi_top_k])


# ---------------------------------------------------------------------------------------------
# Public builder
# ---------------------------------------------------------------------------------------------
def build_forbidden_set(
    forget: Iterable[Any],
    retain: Iterable[Any] | None = None,
    *,
    vocab_size: int,
    tokenizer: Any = None,
    method: str = "pmi",
    vs_freq_rate: float = 0.01,
    vs_abs_cap: int = 20000,
    vocab_top_k: int | None = None,
    pmi_top_k: int = 2000,
    pmi_min_count: int = 20,
    pmi_smoothing: float = 1.0,
    pmi_min_score: float = 1.0,
    span_masking: bool = False,
    span_ngram_max: int = 3,
) -> ForbiddenSet:
    """Build V_S from forget data (and retain data for PMI).

    ``forget``/``retain`` are iterables of collated batches (mappings with ``input_ids`` and optional
    ``attention_mask``/``labels``, counted over scored positions) or of plain token-id sequences
    (every token after the first is counted). ``vocab_size`` is the model's output vocabulary |V|.
    With a ``tokenizer``, special tokens and letterless pieces are excluded and span masking is
    available. Raises ``ValueError`` naming the flags to change when V_S comes out empty; warns when
    |V_S|/|V| > 0.5.
    """
    if method not in ("pmi", "frequency"):
        raise ValueError(f"vs_method must be 'pmi' or 'frequency', got {method!r}")
    if span_masking and tokenizer is None:
        raise ValueError("span_masking needs the tokenizer (to find word boundaries)")
    info = PieceInfo(tokenizer, vocab_size) if tokenizer is not None else None
    fc = count_scored_tokens(forget, vocab_size, info, span_ngram_max if span_masking else 0, "forget data")
    if fc.total == 0:
        raise ValueError("the forget data has no scored token (empty, or every label is -100): nothing to forget.")
    rc = count_scored_tokens(retain, vocab_size, source="retain data") if retain is not None else None
    if rc is not None and rc.total == 0:
        rc = None
    if method == "pmi" and rc is None:
        msg = (
            "vs_method='pmi' without retain data uses a uniform background, which ranks tokens by forget frequency "
            "alone and picks function words; pass retain data (retain_dataset= / --retain_corpora) or use "
            "vs_method='frequency', which drops very frequent tokens."
        )
        warnings.warn(msg, stacklevel=2)
        logger.warning(msg)
    if info is not None:
        info.ensure(np.flatnonzero(fc.counts > 0))
        allowed = info.allowed()
    else:
        allowed = np.ones(vocab_size, dtype=bool)

    retain_counts = rc.counts if rc is not None else None
    if method == "frequency":
        ids = frequency_selection(fc.counts, allowed, vs_freq_rate, vs_abs_cap, vocab_top_k)
        scores = fc.counts.astype(np.float64)
        hint = (
            "raise --vs_freq_rate or --vs_abs_cap (the frequency cap drops common tokens), raise --vocab_top_k, "
            "or use --vs_method pmi"
        )
        params = {"vs_freq_rate": vs_freq_rate, "vs_abs_cap": vs_abs_cap, "vocab_top_k": vocab_top_k}
    else:
        scores = pmi_scores(fc.counts, retain_counts, pmi_smoothing)
        ids = pmi_selection(scores, fc.counts, allowed, pmi_min_count, pmi_top_k, pmi_min_score)
        hint = (
            "lower --pmi_min_count (tokens must occur that often in the forget data), lower --pmi_min_score, "
            "raise --pmi_top_k, "
            "give more forget data or retain data that differs from it, or use --vs_method frequency"
        )
        params = {
            "pmi_top_k": pmi_top_k,
            "pmi_min_count": pmi_min_count,
            "pmi_smoothing": pmi_smoothing,
            "pmi_min_score": pmi_min_score,
            "background": "retain" if rc is not None else "uniform",
        }
    if len(ids) == 0:
        raise ValueError(f"V_S is empty: no token of the forget data passed the {method} rule. To loosen it, {hint}.")

    span_added: list[int] = []
    if span_masking and fc.span_pairs is not None and len(fc.span_pairs):
        first, piece = np.divmod(fc.span_pairs, vocab_size)
        extra = np.unique(piece[np.isin(first, ids)])
        extra = extra[allowed[extra] & ~np.isin(extra, ids)]
        span_added = extra.tolist()
        ids = np.union1d(ids, extra)
    params.update(
        span_masking=span_masking,
        span_ngram_max=span_ngram_max if span_masking else None,
        forget_tokens=fc.total,
        retain_tokens=rc.total if rc is not None else 0,
    )

    fs = ForbiddenSet(
        ids=ids.tolist(),
        vocab_size=vocab_size,
        method=method,
        parameters=params,
        tokens=[info.raw.get(i) for i in ids.tolist()] if info is not None else None,
        forget_counts=fc.counts[ids].tolist(),
        retain_counts=retain_counts[ids].tolist() if retain_counts is not None else None,
        scores=[float(x) for x in scores[ids]],
        span_added=span_added,
    )
    if fs.fraction is not None and fs.fraction > 0.5:
        msg = (
            f"V_S holds {len(fs)} of {vocab_size} tokens ({fs.fraction:.0%} of the vocabulary): suppressing that "
            "much will damage the model. Lower --pmi_top_k / --vocab_top_k."
        )
        warnings.warn(msg, stacklevel=2)
        logger.warning(msg)
    return fs


def resolve_forbidden_set(value: ForbiddenSet | str | Sequence[int] | None) -> ForbiddenSet | None:
    """Accept a :class:`ForbiddenSet`, a path to V_S.ids.json (or its folder), or a list of ids."""
    if value is None or isinstance(value, ForbiddenSet):
        return value
    if isinstance(value, (str, os.PathLike)):
        return ForbiddenSet.load(os.fspath(value))
    return ForbiddenSet(ids=sorted(token_ids(value, "forbidden_set")), method="list")
