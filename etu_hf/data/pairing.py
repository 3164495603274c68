"""Forget/retain pairing: one training example holds a forget block and (prefixed ``retain_``) a
retain block, so one batch feeds both loss terms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

#: Optional forget-data column with the token ids of an alternate (chosen) answer, for DPO.
PREF_CHOSEN_COLUMN = "pref_chosen_ids"


def chosen_batch(prompts: list[list[int]], chosen: list[list[int]], pad_id: int, device: Any) -> dict[str, Any]:
    """``prompt + chosen`` sequences right-padded with TRL's ``pad``, with their completion mask."""
    from trl.trainer.utils import pad

    ids = [torch.tensor(p + c) for p, c in zip(prompts, chosen, strict=True)]
    masks = [torch.tensor([0] * len(p) + [1] * len(c)) for p, c in zip(prompts, chosen, strict=True)]
    return {
        "input_ids": pad(ids, padding_value=pad_id).to(device),
        "attention_mask": pad([torch.ones_like(m) for m in masks], padding_value=0).to(device),
        "completion_mask": pad(masks, padding_value=0).to(device),
    }


#: Prefix of the retain half of a paired batch (``retain_input_ids``, ``retain_attention_mask``, ...).
RETAIN_PREFIX = "retain_"

#: Columns with this prefix hold variable-length lists (e.g. ``pref_chosen_ids``); the collator passes
#: them through as Python lists instead of tensorizing them.
PASSTHROUGH_PREFIX = "pref_"

#: Optional column that ties forget and retain examples of the same corpus pair together.
CORPUS_ID_COLUMN = "corpus_id"


# ---------------------------------------------------------------------------------------------
# Forget/retain pairing
# ---------------------------------------------------------------------------------------------
def _corpus_ids(dataset: Any) -> np.ndarray | None:
    names = getattr(dataset, "column_names", None)
    if names is not None and CORPUS_ID_COLUMN in names:
        return np.asarray(dataset[CORPUS_ID_COLUMN], dtype=np.int64)
    return None


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is forget example ``i`` plus one retain example.

    The retain keys get the prefix :data:`RETAIN_PREFIX`. The retain example paired with forget
    example ``i`` is fixed at construction: a seeded permutation of the retain pool, tiled to the
    forget length. When both datasets carry a :data:`CORPUS_ID_COLUMN`, forget examples of corpus
    ``k`` are paired only with retain examples of corpus ``k`` (corpus-aligned pairs: ``--retain_corpora``
    given once per ``--forget_corpora``);
    otherwise the whole retain dataset is one pool. Because the pairing is a function of the forget
    index, the Trainer's sampler, distributed sharding and resume-time batch skipping apply to both
    halves at once.
    """

    def __init__(self, forget: Any, retain: Any, seed: int = 42):
        if isinstance(forget, torch.utils.data.IterableDataset) or not hasattr(forget, "__len__"):
            raise TypeError(
                "retain_dataset needs a map-style train_dataset (with __len__); got an iterable dataset. "
                "Materialise the forget data or train without retain_dataset."
            )
        if len(retain) == 0:
            raise ValueError("retain_dataset is empty")
        self.forget = forget
        self.retain = retain
        rng = np.random.default_rng(seed)
        f_ids, r_ids = _corpus_ids(forget), _corpus_ids(retain)
        if f_ids is None or r_ids is None:
            f_ids = np.zeros(len(forget), dtype=np.int64)
            r_ids = np.zeros(len(retain), dtype=np.int64)
        index = np.empty(len(forget), dtype=np.int64)
        for group in np.unique(f_ids):
            f_pos = np.flatnonzero(f_ids == group)
            pool = np.flatnonzero(r_ids == group)
            if len(pool) == 0:
                raise ValueError(f"forget corpus {group} has no retain corpus to pair with (corpus_id {group})")
            index[f_pos] = np.resize(rng.permutation(pool), len(f_pos))
        self.retain_index = index

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.forget[i])
        for key, value in self.retain[int(self.retain_index[i])].items():
            item[RETAIN_PREFIX + key] = value
        return item


class ForgetRetainCollator:
    """Collate paired features with the user's collator, once per half.

    Features without retain keys (evaluation batches, for instance) go to ``collator`` as they are;
    columns starting with :data:`PASSTHROUGH_PREFIX` are handed on as Python lists.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        passthrough = {
            k: [f[k] for f in features] for k in (features[0] if features else {}) if k.startswith(PASSTHROUGH_PREFIX)
        }
        if passthrough:
            features = [{k: v for k, v in f.items() if k not in passthrough} for f in features]
            return {**self._collate(features), **passthrough}
        return self._collate(features)

    def _collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features or not any(k.startswith(RETAIN_PREFIX) for k in features[0]):
            return self.collator(features)
        forget = [{k: v for k, v in f.items() if not k.startswith(RETAIN_PREFIX)} for f in features]
        retain = [{k[len(RETAIN_PREFIX) :]: v for k, v in f.items() if k.startswith(RETAIN_PREFIX)} for f in features]
        batch = dict(self.collator(forget))
        for key, value in self.collator(retain).items():
            batch[RETAIN_PREFIX + key] = value
        return batch


def split_forget_retain(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a (possibly paired) batch into its forget half and its retain half (or ``None``)."""
    forget = {k: v for k, v in inputs.items() if not k.startswith(RETAIN_PREFIX)}
    retain = {k[len(RETAIN_PREFIX) :]: v for k, v in inputs.items() if k.startswith(RETAIN_PREFIX)}
    return forget, (retain or None)
