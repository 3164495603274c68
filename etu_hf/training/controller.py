r"""``AdaptiveLambdaCallback``: enforces the mass bound on held-out forget text (docs/method.md, "The controller").

Training fits the tilted target on *training* positions; the guarantee is about text the model has
not seen. Every ``lambda_update_freq`` optimiser steps the callback measures the held-out slice of the
forget data with a probe (never trained on; statistics combined over processes) and applies the rule
of :mod:`etu_hf.training.controller_rule` (:func:`controller_step`, a pure function) to the offset of
the run's :class:`~etu_hf.training.tilt_state.TiltState`.

The state (offset, last error, history) is written to ``etu_controller.json`` in every checkpoint and
read back by ``ETUTrainer.train(resume_from_checkpoint=...)``, so a resumed run continues the same
trajectory. The history also goes to ``lambda_history.json`` and ``lambda_history.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, replace
from typing import Any, Protocol

from transformers import TrainerCallback

from etu_hf.artifacts.files import CONTROLLER_STATE_FILE as STATE_FILE
from etu_hf.artifacts.files import LAMBDA_HISTORY_FILE as HISTORY_FILE
from etu_hf.artifacts.files import LAMBDA_PLOT_FILE as PLOT_FILE
from etu_hf.artifacts.files import write_json
from etu_hf.evaluation.measures import TiltStatistics
from etu_hf.evaluation.plots import load_pyplot
from etu_hf.ops.bounds import MIN_SEQUENCES
from etu_hf.training.config import ETUTrainingArguments
from etu_hf.training.controller_rule import (
    AUTO_MAX_PERIOD,
    AUTO_UPDATES,
    ControllerSettings,
    ControllerState,
    HeldoutMeasurement,
    auto_update_freq,
    controller_step,
)
from etu_hf.training.tilt_state import TiltState

__all__ = [
    "CLAMP_WARN_SHARE",
    "AdaptiveLambdaCallback",
    "ControllerSettings",
    "ControllerState",
    "HeldoutMeasurement",
    "Probe",
    "controller_step",
]

logger = logging.getLogger(__name__)


#: Share of clamped positions above which the controller warns (the target misses epsilon there).
CLAMP_WARN_SHARE = 0.01


class Probe(Protocol):
    """What the controller measures with (:class:`etu_hf.training.probe.HeldoutProbe`)."""

    def measure(self) -> TiltStatistics: ...


class AdaptiveLambdaCallback(TrainerCallback):
    """Enforces the mass bound on held-out forget data with the rule of :mod:`etu_hf.training.controller_rule`.

    ``ETUTrainer`` adds one automatically when ``adaptive_lambda=True`` (the default) and binds any
    instance passed in ``callbacks=`` or ``add_callback``. Keyword arguments override the matching
    ``ETUTrainingArguments`` fields (``lambda_update_freq``, ``lambda_eta``, ``lambda_band``,
    ``lambda_step_max``, ``use_upper_for_lambda``, ``stop_when_certified``, ``lambda_min_response``).

    Bound (:meth:`bind`) to a probe of the held-out slice and to the run's
    :class:`~etu_hf.training.tilt_state.TiltState`, the only place the offset is kept: every update
    measures with ``probe.measure()``, applies :func:`controller_step` and sets the new offset with
    ``TiltState.set_offset``.

    Logged at the next logging step after an update (the trainer adds :meth:`pop_logs` to its logs):
    ``etu/heldout_pi_s`` (point estimate), ``etu/heldout_upper`` (sequence-level upper bound),
    ``etu/delta``, ``etu/pinsker_bound``, ``etu/heldout_clamped_share``, ``etu/lambda_offset``,
    ``etu/effective_epsilon`` (per-position mode) or ``etu/lambda_global`` (global mode).
    """

    def __init__(
        self,
        update_freq: int | None = None,
        eta: float | None = None,
        band: float | None = None,
        step_max: float | None = None,
        use_upper: bool | None = None,
        stop_when_certified: int | None = None,
        min_response: float | None = None,
    ):
        self.overrides = {
            "update_freq": update_freq,
            "eta": eta,
            "band": band,
            "step_max": step_max,
            "use_upper": use_upper,
            "stop_when_certified": stop_when_certified,
            "min_response": min_response,
        }
        ControllerSettings(**{k: v for k, v in self.overrides.items() if v is not None})  # fail now on a bad value
        self.settings: ControllerSettings | None = None
        self.probe: Probe | None = None
        self.tilt: TiltState | None = None
        self.seed = 0
        #: e_{k-1}, the previous update's logit error (None before the first update), and one record per update.
        self.last_error: float | None = None
        self.history: list[dict[str, Any]] = []
        self._logs: dict[str, float] = {}
        self._warned_few = False  # the warning that the held-out slice is too small for the bound, once per run

    # ------------------------------------------------------------------ binding
    def bind(self, args: ETUTrainingArguments, probe: Probe | None, tilt: TiltState) -> None:
        """Attach to a run (done by ``ETUTrainer``): its arguments, a probe of its held-out forget slice
        (``None`` when it has none) and its tilt state."""
        self.settings = ControllerSettings.from_args(args, **self.overrides)
        self.probe, self.tilt, self.seed = probe, tilt, args.seed

    @property
    def bound(self) -> bool:
        return self.tilt is not None

    def _require_bound(self) -> TiltState:
        if self.tilt is None:
            raise RuntimeError(
                "AdaptiveLambdaCallback needs an ETUTrainer: it measures the held-out forget slice and moves the "
                "ETU tilt. Use it with etu_hf.ETUTrainer (which adds one itself when adaptive_lambda=True), not "
                "with transformers.Trainer."
            )
        return self.tilt

    @property
    def state(self) -> ControllerState:
        """The rule's state now: the offset (read from the tilt state), the last error and the history."""
        offset = self.tilt.offset if self.tilt is not None else 0.0
        return ControllerState(offset=offset, last_error=self.last_error, history=self.history)

    def pop_logs(self) -> dict[str, float]:
        """The values of the last update not yet logged (then forgotten)."""
        logs, self._logs = self._logs, {}
        return logs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"format": "etu-hf/controller-state", "version": 2, **asdict(self.state)}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        if data.get("version", 1) < 2:
            raise ValueError(
                "etu_controller.json was written by an older etu-hf whose controller rule differs; the trajectory "
                "cannot be continued. Resume without the controller state (delete the file) or start a new run."
            )
        self._require_bound().set_offset(float(data["offset"]))
        self.last_error, self.history = data.get("last_error"), list(data["history"])

    def load_from_checkpoint(self, checkpoint_dir: str) -> bool:
        """Restore the state saved in ``checkpoint_dir``; False when the checkpoint holds none."""
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as f:
            self.load_state_dict(json.load(f))
        return True

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._require_bound()
        if self.settings.update_freq is None:  # lambda_update_freq=None: from the step budget
            self.settings.update_freq = auto_update_freq(state.max_steps)
            logger.info(
                "[lambda-update] the controller measures every %d steps (lambda_update_freq: min(%d, ceil(%d / %d)))",
                self.settings.update_freq,
                AUTO_MAX_PERIOD,
                state.max_steps,
                AUTO_UPDATES,
            )
        if self.probe is None:
            raise ValueError(
                "AdaptiveLambdaCallback has no held-out forget data: pass it in callbacks= or set adaptive_lambda=True "
                "so ETUTrainer keeps heldout_batches of forget data out of training, or give heldout_dataset=."
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0 and state.global_step % self.settings.update_freq == 0:
            self.update(state.global_step, args)
            n = self.settings.stop_when_certified
            if n and self.certified_streak() >= n:
                logger.info(
                    "[lambda-update] step %d: the held-out upper bound has been <= epsilon for %d updates in a row: "
                    "training stops (--stop_when_certified %d)",
                    state.global_step,
                    n,
                    n,
                )
                control.should_training_stop = True

    def certified_streak(self) -> int:
        """Consecutive updates, up to the last, whose held-out upper bound was <= epsilon."""
        k = 0
        for rec in reversed(self.history):
            if not (rec["heldout_upper"] <= self.settings.epsilon):
                break
            k += 1
        return k

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                write_json(os.path.join(folder, STATE_FILE), self.state_dict())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save and self.history:
            self.write_history(args.output_dir)
            self.plot(args.output_dir)

    # ------------------------------------------------------------------ the update
    def update(self, step: int, args: Any = None) -> dict[str, Any]:
        """Measure the held-out slice, apply one step of the rule, record and return it. With ``args``
        (the TrainingArguments) the history is written to ``args.output_dir`` when ``args.should_save``.

        With fewer than :data:`~etu_hf.ops.bounds.MIN_SEQUENCES` held-out sequences the upper bound is 1.0
        whatever the model does, so the update decides on the point estimate ``m_k`` instead of ``U_k`` (a
        warning once per run; the record's ``decided_on`` is ``"point"`` and ``too_few_sequences`` true)."""
        tilt = self._require_bound()
        # the run's epsilon, resolved at the start of training when it is a share of p_S (epsilon_ratio)
        self.settings = replace(self.settings, epsilon=tilt.epsilon)
        stats = self.probe.measure()
        bound = stats.upper_bound(seed=self.seed)
        measurement = HeldoutMeasurement(
            mass=stats.mean_mass,
            upper=bound.upper,
            delta=stats.delta,
            mean_target_mass=stats.mean_target_mass,
            positions=stats.n_positions,
            sequences=bound.sequences,
            clamped_share=stats.clamped_share,
        )
        tilt_before = tilt.tilt_spec()
        new_state, record = controller_step(self.state, self.settings, measurement, tilt.offset_bounds())
        if record["too_few_sequences"] and not self._warned_few:
            self._warned_few = True
            logger.warning(
                "the controller's held-out slice has %d sequences, fewer than the %d its upper bound needs (the "
                "bound is 1.0 below that): it decides on the held-out point estimate instead. Give it more "
                "held-out forget data (heldout_dataset=, --heldout_batches, --heldout_max_share) for the bound.",
                bound.sequences,
                MIN_SEQUENCES,
            )
        tilt.set_offset(new_state.offset)
        spec = tilt.tilt_spec()
        per_position = spec.mode == "per_position"
        record = {
            "step": step,
            **record,
            # the target in effect during this measurement, and after this update
            "effective_epsilon_measured": tilt_before.effective_epsilon if per_position else None,
            "effective_epsilon": spec.effective_epsilon if per_position else None,
            # global mode: the lambda in effect after this update; per-position mode has no single lambda
            "lam": spec.global_value() if not per_position else None,
            # mean lambda over the held-out positions during this measurement (offset before the update)
            "mean_lam_measured": stats.mean_lambda,
            "bound": bound.to_dict(),
        }
        self.last_error, self.history = new_state.last_error, [*self.history, record]
        self._logs = {
            "etu/heldout_pi_s": record["heldout_mass"],
            "etu/heldout_upper": record["heldout_upper"],
            "etu/delta": record["delta"],
            "etu/pinsker_bound": record["pinsker_bound"],
            "etu/heldout_clamped_share": record["clamped_share"],
            "etu/lambda_offset": record["offset"],
        }
        if per_position:
            self._logs["etu/effective_epsilon"] = record["effective_epsilon"]
        else:
            self._logs["etu/lambda_global"] = record["lam"]
        self._report(record, stats, spec.lambda_max)
        if args is not None and args.should_save:
            self.write_history(args.output_dir)
        return record

    def _report(self, record: dict[str, Any], stats: TiltStatistics, lambda_max: float | None) -> None:
        logger.info(
            "[lambda-update] step %d: held-out mass %.4f (upper %.4f over %d sequences), epsilon %.4g -> %s, "
            "offset %.3f -> %.3f%s",
            record["step"],
            record["heldout_mass"],
            record["heldout_upper"],
            record["sequences"],
            self.settings.epsilon,
            record["decision"],
            record["offset_before"],
            record["offset"],
            f" (eps' = {record['effective_epsilon']:.4g})" if record["effective_epsilon"] is not None else "",
        )
        if math.isfinite(stats.clamped_share) and stats.clamped_share > CLAMP_WARN_SHARE:
            logger.warning(
                "the lambda clamp binds at %.1f%% of held-out positions: the target cannot reach epsilon there. "
                "Raise --lambda_max (now %s).",
                100 * stats.clamped_share,
                lambda_max,
            )
        previous = self.history[-2]["decision"] if len(self.history) > 1 else None
        if record["decision"] == "stalled" and previous != "stalled":  # the stall begins
            logger.warning(
                "the held-out mass no longer follows the offset (%.3f logits fallen per nat added over the last two "
                "updates, under --lambda_min_response %g): the controller holds the offset at %.3f instead of "
                "tightening every forget context's target further, which would not reach held-out text and would "
                "move the model further from the base. It raises again if the held-out mass falls while it holds. "
                "The gap left is generalisation: more (or more varied) forget text, more steps, or "
                "--lambda_min_response 0 to raise regardless.",
                record["offset_response"] if record["offset_response"] is not None else math.nan,
                self.settings.min_response,
                record["offset"],
            )
        if record["offset_at_bound"] and record["decision"] == "raise":
            logger.warning(
                "the lambda offset is at its ceiling (lambda_max = %s) and the held-out %s is still above epsilon",
                lambda_max,
                "upper bound" if record["decided_on"] == "upper" else "point estimate",
            )

    # ------------------------------------------------------------------ outputs
    def write_history(self, output_dir: str) -> str:
        """Write ``lambda_history.json``: settings plus one record per update."""
        tilt = self._require_bound()
        return write_json(
            os.path.join(output_dir, HISTORY_FILE),
            {
                "format": "etu-hf/lambda-history",
                "version": 2,
                "mode": tilt.args.lambda_mode,
                "epsilon": self.settings.epsilon,
                "closed_form_lambda": tilt.global_lambda,
                "settings": asdict(self.settings),
                "records": self.history,
            },
        )

    def plot(self, output_dir: str) -> str | None:
        """Write ``lambda_history.png`` (lambda and held-out mass against epsilon over steps).

        matplotlib is a dependency; should it be missing, the plot is skipped
        with a warning and the JSON history remains.
        """
        plt = load_pyplot()
        if plt is None:
            logger.warning("matplotlib is not installed: skipped %s (pip install matplotlib)", PLOT_FILE)
            return None
        rec = self.history
        mode = self._require_bound().args.lambda_mode
        steps = [r["step"] for r in rec]
        eps = self.settings.epsilon
        fig, (ax_l, ax_m) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        if mode == "global":
            ax_l.plot(steps, [r["lam"] for r in rec], marker="o", label="lambda (after update)")
        ax_l.plot(steps, [r["mean_lam_measured"] for r in rec], marker="x", label="mean lambda over held-out positions")
        ax_l.plot(steps, [r["offset"] for r in rec], marker=".", linestyle="--", label="offset (after update)")
        ax_l.set_ylabel("lambda")
        ax_l.legend(loc="best")
        ax_m.plot(steps, [r["heldout_mass"] for r in rec], marker="o", label="held-out mass on V_S")
        ax_m.plot(steps, [r["heldout_upper"] for r in rec], marker="^", linestyle="--", label="upper bound U")
        ax_m.axhline(eps, color="red", label=f"epsilon = {eps}")
        if mode == "per_position":  # drawn over epsilon, which it equals at offset 0
            ax_m.plot(
                steps,
                [r["effective_epsilon_measured"] for r in rec],
                drawstyle="steps-post",
                linestyle=":",
                linewidth=2,
                color="black",
                zorder=3,
                label="per-context target eps' while measured",
            )
        ax_m.set_xlabel("optimiser step")
        ax_m.set_ylabel("mass")
        finite = [
            r[k] for r in rec for k in ("heldout_mass", "heldout_upper") if r[k] is not None and math.isfinite(r[k])
        ]
        top = max([eps * 3, *finite])
        ax_m.set_ylim(0, min(1.0, top * 1.1))
        ax_m.legend(loc="best")
        fig.suptitle("ETU adaptive lambda")
        fig.tight_layout()
        path = os.path.join(output_dir, PLOT_FILE)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
