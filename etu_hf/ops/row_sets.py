r"""Forbidden sets that differ per position: a shared set plus padded per-row extras.

At each scored position ``x`` the forbidden set is

.. math::  S(x) = S_{shared} \cup E(x),

where :math:`S_{shared}` (``forbidden_ids``, ``[K]``) holds the columns every row forbids (the global V_S of
the original method) and :math:`E(x)` the row's own extra ids, given as a padded LongTensor ``extra_ids`` of
shape ``[..., k_max]`` (the leading dimensions those of the logits without the vocabulary) with ``-1`` for
"none". ``S(x)`` is a set: an extra id already in :math:`S_{shared}`, or repeated in a row, counts once.

:class:`RowSets` is that representation made safe to compute with: duplicates and overlaps with the shared set
are dropped, each row's valid extras come first, and the padding is redirected to a column the row already
writes, so that one ``gather``/``scatter`` over ``[..., k_max]`` (never a boolean mask over the vocabulary, never
a host synchronisation) reads or writes the extra columns of every row. Pure torch, no transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The padding value of ``extra_ids``: no extra id in that slot.
PAD_ID = -1


def clean_extra_ids(forbidden_ids: torch.Tensor, extra_ids: torch.Tensor) -> torch.Tensor:
    """``extra_ids`` ``[..., k]`` as sets: ids already in ``forbidden_ids`` and repeats within a row become
    :data:`PAD_ID`, and each row lists its distinct ids first (in decreasing order), then the padding.

    Idempotent: a cleaned tensor cleans to itself. Every value must be :data:`PAD_ID` or a column id (>= 0).
    """
    if extra_ids.dtype != torch.long:
        raise TypeError(f"extra_ids: expected a LongTensor (padded with {PAD_ID}), got {extra_ids.dtype}")
    if extra_ids.shape[-1] == 0:
        return extra_ids
    ids, _ = extra_ids.sort(-1, descending=True)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[..., 1:] = ids[..., 1:] == ids[..., :-1]
    drop = repeat | torch.isin(ids, forbidden_ids.to(ids.device)) | (ids < 0)
    ids = ids.masked_fill(drop, PAD_ID)
    return ids.sort(-1, descending=True).values


@dataclass(frozen=True)
class RowSets:
    r"""The per-row extras :math:`E(x)` of :math:`S(x) = S_{shared} \cup E(x)`, ready for gather/scatter.

    ``index`` ``[..., k]``: a row's distinct extra ids first; each padding slot repeats the row's first extra id
    (or column 0 in a row without extras), so every write through ``index`` is deterministic (a column receives
    one value). ``valid`` ``[..., k]``: which slots are real extras. Build it with :meth:`build`.
    """

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def build(cls, forbidden_ids: torch.Tensor, extra_ids: torch.Tensor) -> RowSets:
        """From the shared ids ``[K]`` and padded extras ``[..., k]`` (cleaned here: see :func:`clean_extra_ids`)."""
        ids = clean_extra_ids(forbidden_ids, extra_ids)
        valid = ids >= 0
        first = ids[..., :1].clamp_min(0)  # the row's first extra, or column 0 without one
        return cls(torch.where(valid, ids, first), valid)

    def __getitem__(self, rows: slice | torch.Tensor) -> RowSets:
        """The sets of some rows (slicing the leading dimension)."""
        return RowSets(self.index[rows], self.valid[rows])

    def to(self, device: torch.device) -> RowSets:
        """The same sets on ``device``."""
        return RowSets(self.index.to(device), self.valid.to(device))

    @property
    def any_valid(self) -> torch.Tensor:
        """``[..., 1]``: the row has at least one extra id."""
        return self.valid[..., :1]

    def gather(self, z: torch.Tensor) -> torch.Tensor:
        r"""``[..., k]``: :math:`z_y` for each extra :math:`y \in E(x)`, :math:`-\infty` in the padding slots
        (so a sum of :math:`e^{z}` over them adds 0)."""
        return z.gather(-1, self.index).masked_fill(~self.valid, -float("inf"))

    def put_(self, z: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """In place, ``z[row, y] = values[row, j]`` for the extra ``y`` in slot ``j`` of each row; the padding slots
        write what their column receives anyway (the row's first extra value, or ``z``'s own value). Returns ``z``."""
        values = values.to(z.dtype).expand(self.index.shape)
        pad = torch.where(self.any_valid, values[..., :1], z.gather(-1, self.index))
        return z.scatter_(-1, self.index, torch.where(self.valid, values, pad))

    def fill_(self, z: torch.Tensor, value: float) -> torch.Tensor:
        """In place, ``z[row, y] = value`` for every extra ``y`` of each row. Returns ``z``."""
        return self.put_(z, z.new_full((), value))

    def columns(self, z: torch.Tensor, forbidden_ids: torch.Tensor) -> torch.Tensor:
        r"""``[..., K + k]``: the columns of :math:`S(x)`, shared then extras (:math:`-\infty` in the padding)."""
        return torch.cat([z.index_select(-1, forbidden_ids), self.gather(z)], -1)


def row_sets(
    forbidden_ids: torch.Tensor, extra_ids: torch.Tensor | RowSets | None, like: torch.Tensor
) -> RowSets | None:
    """:class:`RowSets` of ``extra_ids`` for logits ``like`` ``[..., V]`` (``None`` stays ``None``).

    Checks the shape (``like.shape[:-1] + (k,)``) with one clear line. A :class:`RowSets` is passed through (it is
    already clean: the chunk loops build one per call and slice it).
    """
    if extra_ids is None or isinstance(extra_ids, RowSets):
        return extra_ids
    if extra_ids.dim() != like.dim() or extra_ids.shape[:-1] != like.shape[:-1]:
        raise ValueError(
            f"extra_ids: expected shape {tuple(like.shape[:-1])} + (k_max,) (one padded row of extra forbidden ids "
            f"per position, {PAD_ID} = none), got {tuple(extra_ids.shape)}"
        )
    return RowSets.build(forbidden_ids, extra_ids.to(like.device))


def check_extra_ids(extra_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse, with one clear line, extra ids outside ``[-1, vocab_size)`` (a host synchronisation: call it once
    per data set or batch, not per chunk)."""
    if extra_ids.numel() == 0:
        return
    low, high = int(extra_ids.min()), int(extra_ids.max())
    if low < PAD_ID or high >= vocab_size:
        raise ValueError(
            f"extra_ids: values must be token ids in [0, {vocab_size}) or {PAD_ID} for none, got the range "
            f"[{low}, {high}]; build them from the model's own tokenizer"
        )
