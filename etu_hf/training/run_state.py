"""What a run records besides the weights (docs/artifacts.md): the checkpoint run state and metrics.json.

- :data:`RUN_STATE_FILE` (``etu_trainer_state.json``), written into every checkpoint: the loss sum,
  training time and ETU statistic sums so far, so that metrics.json after a resume covers the whole run.
- metrics.json: :func:`training_metrics` assembles the training numbers that ``train()`` writes;
  :func:`update_metrics` adds sections (the audit's ``heldout`` summary and ``data`` counts) to it.
  Both write atomically (:func:`etu_hf.artifacts.files.write_json`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from etu_hf.artifacts.files import FORBIDDEN_SET_FILE, METRICS_FILE, REPORT_FILE, RUN_STATE_FILE, write_json
from etu_hf.forbidden_set import ForbiddenSet
from etu_hf.training.statistics import StatisticsAccumulator
from etu_hf.training.tilt_state import TiltState

logger = logging.getLogger(__name__)


def check_checkpoint_forbidden_set(checkpoint: str, forbidden_set: ForbiddenSet) -> None:
    """Refuse to resume a checkpoint trained against another V_S (other data or V_S settings)."""
    path = os.path.join(checkpoint, FORBIDDEN_SET_FILE)
    if not os.path.isfile(path):
        return
    saved = ForbiddenSet.load(path)
    if saved.ids != forbidden_set.ids:
        raise ValueError(
            f"--resume_from_checkpoint: {checkpoint} was trained with another V_S ({len(saved)} tokens; this run "
            f"built {len(forbidden_set)}). Resume with the same data and V_S settings, or pass "
            f"--forbidden_ids_path {path}."
        )


def restore_run_state(checkpoint: str | None, total: StatisticsAccumulator, main_process: bool, device: Any) -> dict:
    """Read :data:`RUN_STATE_FILE` of the checkpoint: returns the loss sum and training time before it
    (``complete`` False for a checkpoint without the file) and the epsilon it trained with (``epsilon``:
    :meth:`TiltState.epsilon_record`, ``None`` when the file holds none), and loads the ETU statistic sums
    into ``total`` on the main process (the sums are reduced over processes when read)."""
    before = {"checkpoint": checkpoint, "loss_sum": 0.0, "training_seconds": 0.0, "complete": True, "epsilon": None}
    if checkpoint is None:
        return before
    path = os.path.join(checkpoint, RUN_STATE_FILE)
    if not os.path.isfile(path):
        logger.warning(
            "%s holds no %s (saved by an older etu-hf): metrics.json will cover only the resumed steps",
            checkpoint,
            RUN_STATE_FILE,
        )
        return {**before, "complete": False}
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("stats") and main_process:
        total.restore(state["stats"], device)
    return {
        **before,
        "loss_sum": float(state["loss_sum"]),
        "training_seconds": float(state["training_seconds"]),
        "epsilon": state.get("epsilon"),
    }


def run_state(
    global_step: int, loss_sum: float, training_seconds: float, stats: dict | None, epsilon: dict[str, Any] | None
) -> dict[str, Any]:
    """The content of :data:`RUN_STATE_FILE`; ``epsilon`` is :meth:`TiltState.epsilon_record` (so that a resumed
    run keeps an epsilon resolved from ``epsilon_ratio``)."""
    return {
        "format": "etu-hf/trainer-state",
        "version": 1,
        "global_step": global_step,
        "loss_sum": loss_sum,
        "training_seconds": training_seconds,
        "stats": stats,
        "epsilon": epsilon,
    }


def training_metrics(
    *,
    tilt: TiltState,
    vocab_size: int,
    state: Any,
    controller: Any,
    final: dict[str, float] | None,
    total: dict[str, float],
    train_loss: float | None,
    before: dict[str, Any],
    duration: float,
) -> dict[str, Any]:
    """metrics.json's training numbers (docs/artifacts.md): ``final`` are the metrics of the last logging
    window, ``total`` those of the whole run, ``before`` what :func:`restore_run_state` returned."""
    a = tilt.args
    fs = tilt.forbidden_set
    spec = tilt.tilt_spec()
    history = controller.history if controller is not None else []
    final = final or {}
    return {
        "format": "etu-hf/metrics",
        "version": 1,
        "training_success": True,
        **tilt.epsilon_record(),
        "base_p_S": tilt.base_p_s,
        "base_p_S_positions": tilt.base_p_s_positions,
        "lambda": {
            "mode": a.lambda_mode,
            "closed_form_global": tilt.global_lambda,
            "offset": tilt.offset,
            "adaptive": controller is not None,
            "controller_updates": len(history),
            "effective_epsilon": spec.effective_epsilon if spec.mode == "per_position" else None,
            "global_value": spec.global_value() if spec.mode == "global" and tilt.global_lambda is not None else None,
            "last_update": history[-1] if history else None,
            "mean": total.get("etu/lambda"),
            "min": total.get("etu/lambda_min"),
            "max": total.get("etu/lambda_max"),
            "final_mean": final.get("etu/lambda"),
        },
        "V_S_size": len(fs),
        "V_S_fraction": fs.fraction if fs.fraction is not None else len(fs) / vocab_size,
        "vocab_size": vocab_size,
        "steps": state.global_step,
        "epochs": state.epoch,
        "training_duration_seconds": before["training_seconds"] + duration,
        "train_loss": train_loss,
        "resumed_from_checkpoint": before["checkpoint"],
        "final_training_pi_s": final.get("etu/pi_s"),
        "final_training_q_s": final.get("etu/q_s"),
        "final_training_kl": final.get("etu/loss"),
        "mean_training_pi_s": total.get("etu/pi_s"),
        "training_clamped_share": total.get("etu/clamped_share"),
        "training_forget_positions": total.get("etu/forget_positions"),
    }


def audit_summary(report: Any) -> dict[str, Any]:
    """metrics.json's ``heldout`` section: the audit's main numbers (see suppression_report.json)."""
    return {
        "definition": "see suppression_report.json: held-out forget documents (never trained on) and held-out "
        "retain documents",
        "report": REPORT_FILE,
        "epsilon": report.epsilon,
        "base_p_S": report.base_p_S,
        "updated_p_S": report.updated_p_S,
        "updated_p_S_upper": report.updated_p_S_upper,
        "updated_p_S_token_wilson_upper": report.updated_p_S_token_wilson_upper,
        "suppression_ratio": report.suppression_ratio,
        "suppression_ratio_upper": report.suppression_ratio_upper,
        "base_p_S_lower": report.base_p_S_lower,
        "share_above_epsilon_before": report.share_above_epsilon_base,
        "share_above_epsilon_after": report.share_above_epsilon_updated,
        "positions": report.forget_positions,
        "sequences": report.forget_sequences,
        "delta": report.delta,
        "base_perplexity": report.base_perplexity,
        "updated_perplexity": report.updated_perplexity,
        "perplexity_ratio": report.perplexity_ratio,
        "target_achieved": report.target_achieved,
        "target_achieved_upper": report.target_achieved_upper,
        "verdict": report.verdict,
    }


def _size(dataset: Any) -> int:
    return len(dataset) if dataset is not None else 0


def data_counts(
    forget_train: Any, heldout: Any, retain_train: Any, forget_audit: Any, retain_audit: Any, block_size: int | None
) -> dict[str, Any]:
    """metrics.json's ``data`` section: blocks in each part of the data."""
    return {
        "forget_train_blocks": _size(forget_train),
        "controller_heldout_blocks": _size(heldout),
        "forget_heldout_blocks": _size(forget_audit),
        "retain_train_blocks": _size(retain_train),
        "retain_heldout_blocks": _size(retain_audit),
        "block_size": block_size,
    }


def write_metrics(output_dir: str, metrics: dict[str, Any]) -> str:
    """Write metrics.json (replacing a previous run's)."""
    return write_json(os.path.join(output_dir, METRICS_FILE), metrics)


def update_metrics(output_dir: str, base: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """Add ``sections`` to the metrics.json of ``output_dir`` (or to ``base`` when it has none yet) and
    write it; returns the new content."""
    path = os.path.join(output_dir, METRICS_FILE)
    metrics = dict(base or {})
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    metrics.update(sections)
    write_json(path, metrics)
    return metrics
