r"""The trainer's statistics: position counts for the loss normaliser, and the logged metrics.

Metrics follow TRL's ``_metrics[mode]`` pattern (trl/trainer/dpo_trainer.py): one accumulator per mode
(``"train"``, ``"eval"``) with the same keys in both. Training logs carry them as ``etu/<name>``
(means over the scored forget positions since the previous log); evaluation adds them with the
Trainer's metric prefix, ``eval_etu/<name>`` (``{metric_key_prefix}_etu/<name>``). Keys:

- ``etu/loss``: mean :math:`KL(q_\lambda \| \pi_\theta)` over forget positions;
- ``etu/lambda``, ``etu/lambda_min``, ``etu/lambda_max``: the tilt over those positions;
- ``etu/pi_s``, ``etu/q_s``, ``etu/base_p_s``: model, target and base mass on V_S;
- ``etu/clamped_share``: share of positions where a lambda clamp binds;
- ``etu/forget_positions``: scored forget positions;
- ``etu/retain_loss`` (with a retain term), ``etu/pref_loss`` (with a preference term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: Layout of the on-device sums (over scored positions; ``pref`` and ``w_pref`` over sequences).
STAT_NAMES = ("kl", "w_forget", "lambda", "pi_s", "q_s", "base_p_s", "clamped", "retain", "w_retain", "pref", "w_pref")


@dataclass
class ScoredCounts:
    """Scored forget/retain positions in one optimiser step's micro-batches, summed over processes.

    :meth:`ETUTrainer.get_batch_samples` returns it in place of the Trainer's ``num_items_in_batch``
    and ``compute_loss`` divides each term by its own count. The Trainer's count cannot serve: it
    counts the ``labels != -100`` of the whole batch, retain half included, while the forget term is a
    mean over forget positions, the retain term over retain positions and the preference term over
    forget sequences with a completion.
    """

    forget: torch.Tensor
    retain: torch.Tensor
    world_size: int = 1
    #: Forget sequences with a completion (for the preference term), over the step and all processes.
    sequences: torch.Tensor | None = None


def stat_values(kl: Any, retain: tuple[torch.Tensor, torch.Tensor], pref: tuple[torch.Tensor, torch.Tensor]):
    """The :data:`STAT_NAMES` sums of one micro-batch: the tilted KL output, then (sum, weight) of the
    retain and the preference terms."""
    return torch.stack(
        [
            kl.kl_sum,
            kl.weight_sum,
            kl.lambda_sum,
            kl.student_mass_sum,
            kl.target_mass_sum,
            kl.base_mass_sum,
            kl.clamped_sum,
            *retain,
            *pref,
        ]
    ).float()


class StatisticsAccumulator:
    """Device-side sums of :data:`STAT_NAMES` and the lambda range; read back (one sync) only when logging."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.lam_min: torch.Tensor | None = None
        self.lam_max: torch.Tensor | None = None

    def add(self, values: torch.Tensor, lam_min: torch.Tensor, lam_max: torch.Tensor) -> None:
        if self.sums is None:
            self.sums, self.lam_min, self.lam_max = values.clone(), lam_min.clone(), lam_max.clone()
        else:
            self.sums += values
            self.lam_min = torch.minimum(self.lam_min, lam_min)
            self.lam_max = torch.maximum(self.lam_max, lam_max)

    def reset(self) -> None:
        self.sums = self.lam_min = self.lam_max = None

    def snapshot(self, reduce: Any, device: torch.device) -> dict[str, Any] | None:
        """The sums so far as JSON-able values, reduced over processes (a collective under DDP: every
        process must call it); ``None`` when nothing was accumulated anywhere."""
        n = len(STAT_NAMES)
        sums = self.sums if self.sums is not None else torch.zeros(n, device=device)
        lo = self.lam_min if self.lam_min is not None else torch.tensor(float("inf"), device=device)
        hi = self.lam_max if self.lam_max is not None else torch.tensor(float("-inf"), device=device)
        if reduce is not None:
            sums, lo, hi = reduce(sums, "sum"), -reduce(-lo, "max"), reduce(hi, "max")
        if float(sums[STAT_NAMES.index("w_forget")]) == 0:
            return None
        return {
            "names": list(STAT_NAMES),
            "sums": sums.double().tolist(),
            "lambda_min": float(lo),
            "lambda_max": float(hi),
        }

    def restore(self, snapshot: dict[str, Any], device: torch.device) -> None:
        """Start from a :meth:`snapshot` (on one process only: :meth:`read` sums over processes). Sums are
        matched by name; one the snapshot lacks (saved by an older etu-hf) starts at 0."""
        saved = dict(zip(snapshot["names"], snapshot["sums"], strict=True))
        self.sums = torch.tensor([saved.get(k, 0.0) for k in STAT_NAMES], dtype=torch.float32, device=device)
        self.lam_min = torch.tensor(snapshot["lambda_min"], dtype=torch.float32, device=device)
        self.lam_max = torch.tensor(snapshot["lambda_max"], dtype=torch.float32, device=device)

    def read(self, reduce: Any = None) -> dict[str, float] | None:
        """The metrics (``etu/...`` keys, see the module docstring) as means over the accumulated positions;
        ``reduce`` sums/maxes across processes."""
        if self.sums is None:
            return None
        sums, lo, hi = self.sums, self.lam_min, self.lam_max
        if reduce is not None:
            sums, lo, hi = reduce(sums, "sum"), -reduce(-lo, "max"), reduce(hi, "max")
        s = dict(zip(STAT_NAMES, sums.double().tolist(), strict=True))
        wf, wr = max(s["w_forget"], 1.0), max(s["w_retain"], 1.0)
        out = {
            "etu/loss": s["kl"] / wf,
            "etu/lambda": s["lambda"] / wf,
            "etu/pi_s": s["pi_s"] / wf,
            "etu/q_s": s["q_s"] / wf,
            "etu/base_p_s": s["base_p_s"] / wf,
            "etu/lambda_min": float(lo),
            "etu/lambda_max": float(hi),
            "etu/clamped_share": s["clamped"] / wf,
            "etu/forget_positions": s["w_forget"],
        }
        if s["w_retain"] > 0:
            out["etu/retain_loss"] = s["retain"] / wr
        if s["w_pref"] > 0:
            out["etu/pref_loss"] = s["pref"] / s["w_pref"]
        return out


class ETUMetrics:
    """``_metrics[mode]`` for the two modes, plus the whole run's training sums (for metrics.json).

    ``pop(mode)`` reads a mode's window and starts a new one; the last training window is kept
    (``last_train``) for the final numbers of metrics.json.
    """

    MODES = ("train", "eval")

    def __init__(self) -> None:
        self.window = {mode: StatisticsAccumulator() for mode in self.MODES}
        self.total = StatisticsAccumulator()
        self.last_train: dict[str, float] | None = None

    def reset(self) -> None:
        for acc in (*self.window.values(), self.total):
            acc.reset()
        self.last_train = None

    def add(self, mode: str, values: torch.Tensor, lam_min: torch.Tensor, lam_max: torch.Tensor) -> None:
        self.window[mode].add(values, lam_min, lam_max)
        if mode == "train":
            self.total.add(values, lam_min, lam_max)

    def pop(self, mode: str, reduce: Any = None) -> dict[str, float] | None:
        stats = self.window[mode].read(reduce)
        self.window[mode].reset()
        if mode == "train" and stats is not None:
            self.last_train = stats
        return stats
