r"""Measurements the trainer makes outside the loss: the held-out probe, the base mass p_S, the held-out split.

- :class:`HeldoutProbe`: the model against its current target on the held-out forget slice (what the
  adaptive controller decides on; docs/method.md, "The controller"): :math:`\frac1n\sum_i\pi_\theta(S|x_i)`,
  per-sequence sums for the sequence-level bound, :math:`\delta` and the clamped share.
- :func:`estimate_base_mass`: :math:`p_S = \frac1n\sum_i \pi_b(S|x_i)` over a seeded sample of forget sequences.
- :func:`split_heldout`: the controller's held-out slice, taken out of the forget data with a seeded draw.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from etu_hf.data.blocks import IGNORE_INDEX, MODEL_KEYS, iter_batches
from etu_hf.evaluation.measures import TiltStatistics, evaluate_mass, tilt_statistic_sums, tilt_statistics
from etu_hf.training.config import ETUTrainingArguments
from etu_hf.training.tilt_state import TiltState

logger = logging.getLogger(__name__)


class HeldoutProbe:
    """Measures the model on the held-out forget slice against the target of ``tilt``.

    The slice is a ``DataLoader`` prepared by ``accelerator`` (each process gets its share; all run the
    same number of forwards, as sharded models need). Where the last round is uneven accelerate repeats
    samples; the rows that ``accelerator.gather_for_metrics`` drops are measured with every label at
    -100 (so they add nothing) and their sequences are dropped, so every process gets the same numbers,
    those of one pass over the slice.

    Args:
        model: returns the model as it is now (the Trainer may wrap it after the probe is built).
        base: the base distribution (:class:`~etu_hf.modeling.base.BaseDistribution`).
        dataset: the held-out forget data (never trained on).
        collator: the user's data collator (``None``: ``default_data_collator``).
        chunk_size: positions per chunk (0 or ``None``: one chunk), as ``loss_chunk_size``.
    """

    def __init__(
        self,
        model: Callable[[], nn.Module],
        base: Any,
        dataset: Any,
        collator: Callable | None,
        batch_size: int,
        tilt: TiltState,
        accelerator: Any,
        chunk_size: int | None,
    ):
        self.model, self.base, self.dataset, self.tilt = model, base, dataset, tilt
        self.collator, self.batch_size, self.accelerator, self.chunk_size = (
            collator,
            batch_size,
            accelerator,
            chunk_size,
        )
        self._loader: Any = None

    def _batches(self) -> Any:
        if self._loader is None:
            from transformers import default_data_collator

            collate = self.collator or default_data_collator

            def model_batch(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
                batch = collate([{k: ex[k] for k in MODEL_KEYS if k in ex} for ex in examples])
                return {k: batch[k] for k in MODEL_KEYS if k in batch}

            loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=model_batch)
            self._loader = self.accelerator.prepare(loader)
        return self._loader

    def measure(self) -> TiltStatistics:
        """Mass on V_S (point estimate and per-sequence sums), delta = mean per-token KL(pi_theta || q_lam)
        and the clamped share over the held-out slice, combined over processes."""
        acc = self.accelerator
        model = self.model()
        ids = self.tilt.forbidden_ids(acc.device)
        totals: torch.Tensor | None = None
        per_sequence: list[torch.Tensor] = []
        for batch in self._batches():
            if self.tilt.use_hidden is None:
                self.tilt.decide_head(model, batch)
            rows = batch["input_ids"].shape[0]
            position = acc.process_index * rows + torch.arange(rows, device=batch["input_ids"].device)
            kept = torch.isin(position, acc.gather_for_metrics(position))
            if not bool(kept.all()):  # a repeated sample: run its forward, score none of its positions
                labels = batch.get("labels", batch["input_ids"]).clone()
                labels[~kept] = IGNORE_INDEX
                batch = {**batch, "labels": labels}
            sums, seq = tilt_statistic_sums(
                model,
                self.base,
                [batch],
                ids,
                self.tilt.tilt_spec(),
                chunk_size=self.chunk_size,
                use_hidden=self.tilt.use_hidden,
                extra_ids=self.tilt.extra_ids,
            )
            totals = sums if totals is None else totals + sums
            per_sequence.append(acc.gather_for_metrics(seq))
        if totals is None:
            raise ValueError("the held-out forget data is empty")
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        return tilt_statistics(totals, torch.cat(per_sequence))


@torch.no_grad()
def estimate_base_mass(
    base: Any,
    dataset: Any,
    collator: Callable | None,
    args: ETUTrainingArguments,
    forbidden_ids: torch.Tensor,
    extra_ids: Any = None,
) -> tuple[float, int, dict[str, torch.Tensor]]:
    """Mean base mass on S(x) over the scored positions of ``p_s_sample_size`` forget sequences (a seeded
    sample, the same on every process; ``extra_ids`` the per-context extras, see :data:`ExtraIdsFn`). Returns
    ``(p_S, positions, first batch)``."""
    rng = np.random.default_rng(args.seed)
    k = min(args.p_s_sample_size, len(dataset))
    idx = np.sort(rng.choice(len(dataset), size=k, replace=False))
    batches = list(iter_batches(dataset, collator, args.per_device_eval_batch_size, idx))
    with base.as_model() as base_model:
        mass = evaluate_mass(base_model, batches, forbidden_ids, chunk_size=args.loss_chunk_size, extra_ids=extra_ids)
    if mass.n_positions == 0:
        raise ValueError("the forget data has no scored position (every label is -100 or padding)")
    return mass.mean, mass.n_positions, batches[0]


def split_heldout(dataset: Any, args: ETUTrainingArguments) -> tuple[Any, Any]:
    """Take the controller's held-out slice out of the forget data (a seeded draw): ``(train, heldout)``.

    Its size ``k`` is ``round(heldout_fraction x n)`` of the ``n`` examples when ``heldout_fraction`` is set,
    else ``min(heldout_batches x per_device_train_batch_size, max(1, floor(heldout_max_share x n)))``: the
    batches asked for, capped so that a small forget set keeps most of its data for training (logged when
    the cap binds). A ``datasets.Dataset`` is split with
    ``Dataset.train_test_split(test_size=k, seed=args.seed)``; other map-style datasets with a seeded
    permutation into two ``torch.utils.data.Subset``. Raises ``ValueError`` naming the settings when that
    leaves no training data or no held-out data.
    """
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            "the adaptive lambda controller needs a map-style train_dataset to hold data out of; pass "
            "heldout_dataset= or set adaptive_lambda=False"
        )
    n = len(dataset)
    if args.heldout_fraction is not None:
        k = round(args.heldout_fraction * n)
        setting = f"heldout_fraction={args.heldout_fraction}"
    else:
        asked = args.heldout_batches * args.per_device_train_batch_size
        cap = max(1, math.floor(args.heldout_max_share * n + 1e-9))  # 0.29 * 100 is 28.999...
        k = min(asked, cap)
        setting = f"heldout_batches={args.heldout_batches} (x batch size {args.per_device_train_batch_size})"
        if k < asked:
            setting += f" capped by heldout_max_share={args.heldout_max_share}"
            logger.info(
                "the controller's held-out slice: %d of the %d forget examples (heldout_batches=%d x batch size %d "
                "asks for %d; heldout_max_share=%g caps it so that training keeps the rest)",
                k,
                n,
                args.heldout_batches,
                args.per_device_train_batch_size,
                asked,
                args.heldout_max_share,
            )
    if k < 1:
        raise ValueError(f"{setting} holds out no forget example (of {n}); raise it, or set adaptive_lambda=False")
    if k >= n:
        raise ValueError(
            f"{setting} holds out {k} of the {n} forget examples and leaves no training data: lower heldout_batches "
            "or heldout_fraction, give more forget data, pass heldout_dataset=, or set adaptive_lambda=False"
        )
    if hasattr(dataset, "train_test_split"):
        parts = dataset.train_test_split(test_size=k, seed=args.seed, shuffle=True)
        return parts["train"], parts["test"]
    order = np.random.default_rng(args.seed).permutation(n)
    held, train = np.sort(order[:k]), np.sort(order[k:])
    return torch.utils.data.Subset(dataset, train.tolist()), torch.utils.data.Subset(dataset, held.tolist())
