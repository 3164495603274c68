r"""``AdaptiveLambdaCallback``: enforces the mass bound on held-out forget text.

Training fits the tilted target on *training* positions; the guarantee is about text the model has
not seen. Every ``lambda_update_freq`` optimiser steps the controller measures a held-out slice of
the forget data (never trained on; statistics combined over processes) and tightens or relaxes the
target. The rule (``s`` is clipped to ``[1e-12, 1 - 1e-12]`` before the logit):

.. code-block:: text

    m_k  = mean over held-out positions of pi_theta(S|x)                  (point estimate)
    U_k  = sequence-level upper confidence bound of m_k                    (etu_hf.ops.bounds.sequence_upper_bound)
    s_k  = U_k if use_upper_for_lambda else m_k
    e_k  = logit(s_k) - logit(epsilon)                                     (> 0: the bound is not met)
    set  = -lambda_band / 2                                                (aim inside the certified band)
    decision: "raise"  if e_k > 0:
                  step = min(lambda_eta * (e_k - set), lambda_step_max)               (> 0)
              "lower"  if e_k < -lambda_band and e_{k-1} < -lambda_band and offset > floor:
                  step = max(lambda_eta / 2 * (e_k - set), -lambda_step_max)          (< 0)
              "hold"   otherwise (certified within the band, first measurement below it, or at the floor)
    offset_k = clip(offset_{k-1} + step, floor, ceiling)

Why logit space: in per-position mode the offset ``o`` is the same as the per-context target
``eps' = sigmoid(logit(epsilon) - o)`` (each context gets ``q(S|x) = min(p(x), eps')``), so a model
that follows its target moves ``logit(m)`` about one for one with ``o``; with ``lambda_eta = 1`` one
update then closes the gap, and a model that lags gets a smaller correction each time because its
error shrinks (velocity form: there is no integral state to wind up; the clip of the offset is the
anti-windup). The hold band lies *below* epsilon: the controller holds only when the bound is met.
Relaxing is not what the guarantee needs, so it is cautious: only after two measurements in a row
below the band, at half the gain; a model that responds slowly (2% of the way to its target per
step) then settles without turning back up (tests/test_controller.py simulates it).

Ranges of the offset. Per-position mode: ``[0, lambda_max]`` (``[-lambda_max, lambda_max]`` with
``allow_negative_lambda``); at the floor 0 every context's target is ``min(p(x), epsilon)``, so the
target never exceeds epsilon. Global mode: the offset moves the single ``lam = lam_0 + o`` (``lam_0``
the closed form at the mean base mass), kept inside the lambda clamps.

The Pinsker bound ``mean q_lam(S) + sqrt(delta/2)`` (how well the model fits its target) is logged
and recorded but does not gate the rule. The state (offset, history) is written to
``etu_controller.json`` in every checkpoint and read back by
``ETUTrainer.train(resume_from_checkpoint=...)``, so a resumed run continues the same trajectory. The
history also goes to ``lambda_history.json`` and ``lambda_history.png``.
"""

from __future__ import annotations

import json
import logging as _logging_for_logger
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from transformers import TrainerCallback

from etu_hf.artifacts.files import write_json
from etu_hf.evaluation.plots import load_pyplot
from etu_hf.ops.bounds import pinsker_slack

logger = _logging_for_logger.getLogger(__name__)

STATE_FILE = "etu_controller.json"

HISTORY_FILE = "lambda_history.json"

PLOT_FILE = "lambda_history.png"

#: Share of clamped positions above which the controller warns (the target misses epsilon there).
CLAMP_WARN_SHARE = 0.01


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return math.log(p) - math.log1p(-p)


@dataclass
class ControllerSettings:
    """The controller's gains and band (defaults come from ``ETUTrainingArguments``; see the module docstring)."""

    epsilon: float
    update_freq: int = 25
    eta: float = 1.0
    band: float = 0.5
    step_max: float = 2.0
    use_upper: bool = True
    stop_when_certified: int = 0

    def __post_init__(self) -> None:
        checks = {
            "lambda_update_freq (update_freq)": self.update_freq >= 1,
            "lambda_eta (eta)": math.isfinite(self.eta) and self.eta > 0,
            "lambda_band (band)": math.isfinite(self.band) and self.band > 0,
            "lambda_step_max (step_max)": math.isfinite(self.step_max) and self.step_max > 0,
            "epsilon": 0.0 < self.epsilon < 1.0,
            "stop_when_certified": self.stop_when_certified >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"AdaptiveLambdaCallback: {name} is out of range (got {self!r}); see the docstring")


@dataclass
class ControllerState:
    """What a checkpoint must hold to continue the same trajectory."""

    offset: float = 0.0
    #: e_{k-1}, the previous update's logit error (None before the first update).
    last_error: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class HeldoutMeasurement:
    """What the controller needs from one held-out measurement.

    See :class:`etu_hf.evaluation.measures.TiltStatistics`.
    """

    mass: float
    upper: float
    delta: float = math.nan
    mean_target_mass: float = math.nan
    positions: int = 0
    sequences: int = 0
    clamped_share: float = 0.0


def controller_step(
    state: ControllerState,
    settings: ControllerSettings,
    measurement: HeldoutMeasurement,
    offset_bounds: tuple[float, float],
) -> tuple[ControllerState, dict[str, Any]]:
    """One update of the rule in the module docstring. Returns the new state and the record."""
    eps = settings.epsilon
    s = measurement.upper if settings.use_upper else measurement.mass
    floor, ceiling = offset_bounds
    if not math.isfinite(s):
        error, decision, step = math.nan, "hold", 0.0  # nothing measured (no held-out position)
    else:
        error = _logit(s) - _logit(eps)
        below = error < -settings.band
        was_below = state.last_error is not None and state.last_error < -settings.band
        if error > 0:
            decision, step = "raise", min(settings.eta * (error + settings.band / 2), settings.step_max)
        elif below and was_below and state.offset > floor:
            decision, step = "lower", max(settings.eta / 2 * (error + settings.band / 2), -settings.step_max)
        else:
            decision, step = "hold", 0.0
    offset = min(max(state.offset + step, floor), ceiling)
    slack = pinsker_slack(measurement.delta) if math.isfinite(measurement.delta) else math.nan
    record = {
        "heldout_mass": measurement.mass,
        "heldout_upper": measurement.upper,
        "decided_on": "upper" if settings.use_upper else "point",
        "sequences": measurement.sequences,
        "positions": measurement.positions,
        "delta": measurement.delta,
        "mean_target_mass": measurement.mean_target_mass,
        "pinsker_bound": measurement.mean_target_mass + slack,
        "clamped_share": measurement.clamped_share,
        "error_logit": error,
        "decision": decision,
        "offset_before": state.offset,
        "offset": offset,
        "offset_at_bound": offset in (floor, ceiling) and decision != "hold",
    }
    last_error = error if math.isfinite(error) else state.last_error
    return ControllerState(offset=offset, last_error=last_error, history=state.history), record


class AdaptiveLambdaCallback(TrainerCallback):
    """Enforces the mass bound on held-out forget data; see the module docstring for the exact rule.

    ``ETUTrainer`` adds one automatically when ``adaptive_lambda=True`` (the default) and binds any
    instance passed in ``callbacks=``. Keyword arguments override the matching
    ``ETUTrainingArguments`` fields (``lambda_update_freq``, ``lambda_eta``, ``lambda_band``,
    ``lambda_step_max``, ``use_upper_for_lambda``).

    Logged at the next logging step after an update: ``etu/heldout_pi_s`` (point estimate),
    ``etu/heldout_upper`` (sequence-level upper bound), ``etu/delta``, ``etu/pinsker_bound``,
    ``etu/heldout_clamped_share``, ``etu/lambda_offset``, ``etu/effective_epsilon`` (per-position
    mode) or ``etu/lambda_global`` (global mode).
    """

    _ARG_NAMES: ClassVar[dict[str, str]] = {
        "update_freq": "lambda_update_freq",
        "eta": "lambda_eta",
        "band": "lambda_band",
        "step_max": "lambda_step_max",
        "use_upper": "use_upper_for_lambda",
        "stop_when_certified": "stop_when_certified",
    }

    def __init__(
        self,
        update_freq: int | None = None,
        eta: float | None = None,
        band: float | None = None,
        step_max: float | None = None,
        use_upper: bool | None = None,
        stop_when_certified: int | None = None,
    ):
        self.overrides = {k: v for k, v in locals().items() if k in self._ARG_NAMES and v is not None}
        # Validate the overrides now (epsilon is checked again at binding).
        ControllerSettings(epsilon=0.5, **self.overrides)
        self.trainer: Any = None
        self.settings: ControllerSettings | None = None
        self.state = ControllerState()

    # ------------------------------------------------------------------ binding
    def bind(self, trainer: Any) -> None:
        """Attach to an ``ETUTrainer`` (done by the trainer itself)."""
        args = trainer.args
        values = {field_name: getattr(args, arg) for field_name, arg in self._ARG_NAMES.items()}
        values.update(self.overrides)
        self.settings = ControllerSettings(epsilon=args.epsilon, **values)
        self.trainer = trainer

    def _require_trainer(self) -> None:
        if self.trainer is None:
            raise RuntimeError(
                "AdaptiveLambdaCallback needs an ETUTrainer: it measures the held-out forget slice and moves the "
                "ETU tilt. Use it with etu_hf.ETUTrainer (which adds one itself when adaptive_lambda=True), not "
                "with transformers.Trainer."
            )

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"format": "etu-hf/controller-state", "version": 2, **asdict(self.state)}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        if data.get("version", 1) < 2:
            raise ValueError(
                "etu_controller.json was written by an older etu-hf whose controller rule differs; the trajectory "
                "cannot be continued. Resume without the controller state (delete the file) or start a new run."
            )
        self.state = ControllerState(
            offset=float(data["offset"]), last_error=data.get("last_error"), history=list(data["history"])
        )
        if self.trainer is not None:
            self.trainer.lambda_offset = self.state.offset

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
        self._require_trainer()
        if self.trainer.heldout_dataset is None:
            raise ValueError(
                "AdaptiveLambdaCallback has no held-out forget data: pass it in callbacks= or set adaptive_lambda=True "
                "so ETUTrainer keeps heldout_batches of forget data out of training, or give heldout_dataset=."
            )
        self.trainer.lambda_offset = self.state.offset

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0 and state.global_step % self.settings.update_freq == 0:
            self.update(state.global_step)
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
        for rec in reversed(self.state.history):
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
        if args.should_save and self.state.history:
            self.write_history(args.output_dir)
            self.plot(args.output_dir)

    # ------------------------------------------------------------------ the update
    def update(self, step: int) -> dict[str, Any]:
        """Measure the held-out slice, apply one step of the rule, record and return it."""
        self._require_trainer()
        trainer = self.trainer
        stats = trainer.measure_heldout()
        bound = stats.upper_bound(seed=trainer.args.seed)
        measurement = HeldoutMeasurement(
            mass=stats.mean_mass,
            upper=bound.upper,
            delta=stats.delta,
            mean_target_mass=stats.mean_target_mass,
            positions=stats.n_positions,
            sequences=bound.sequences,
            clamped_share=stats.clamped_share,
        )
        tilt_before = trainer.tilt_spec()
        new_state, record = controller_step(self.state, self.settings, measurement, trainer.offset_bounds())
        trainer.lambda_offset = new_state.offset
        tilt = trainer.tilt_spec()
        record = {
            "step": step,
            **record,
            # the target in effect during this measurement, and after this update
            "effective_epsilon_measured": tilt_before.effective_epsilon if tilt.mode == "per_position" else None,
            "effective_epsilon": tilt.effective_epsilon if tilt.mode == "per_position" else None,
            # global mode: the lambda in effect after this update; per-position mode has no single lambda
            "lam": tilt.global_value() if tilt.mode == "global" else None,
            # mean lambda over the held-out positions during this measurement (offset before the update)
            "mean_lam_measured": stats.mean_lambda,
            "bound": bound.to_dict(),
        }
        new_state.history = [*self.state.history, record]
        self.state = new_state
        logs = {
            "etu/heldout_pi_s": record["heldout_mass"],
            "etu/heldout_upper": record["heldout_upper"],
            "etu/delta": record["delta"],
            "etu/pinsker_bound": record["pinsker_bound"],
            "etu/heldout_clamped_share": record["clamped_share"],
            "etu/lambda_offset": record["offset"],
        }
        if tilt.mode == "global":
            logs["etu/lambda_global"] = record["lam"]
        else:
            logs["etu/effective_epsilon"] = record["effective_epsilon"]
        trainer.record_controller_log(logs)
        logger.info(
            "[lambda-update] step %d: held-out mass %.4f (upper %.4f over %d sequences), epsilon %.4g -> %s, "
            "offset %.3f -> %.3f%s",
            step,
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
                trainer.args.lambda_max,
            )
        if record["offset_at_bound"] and record["decision"] == "raise":
            logger.warning(
                "the lambda offset is at its ceiling (lambda_max = %s) and the held-out bound is still above epsilon",
                trainer.args.lambda_max,
            )
        if trainer.args.should_save:
            self.write_history(trainer.args.output_dir)
        return record

    # ------------------------------------------------------------------ outputs
    def write_history(self, output_dir: str) -> str:
        """Write ``lambda_history.json``: settings plus one record per update."""
        trainer = self.trainer
        return write_json(
            os.path.join(output_dir, HISTORY_FILE),
            {
                "format": "etu-hf/lambda-history",
                "version": 2,
                "mode": trainer.args.lambda_mode,
                "epsilon": self.settings.epsilon,
                "closed_form_lambda": trainer.global_lambda,
                "settings": asdict(self.settings),
                "records": self.state.history,
            },
        )

    def plot(self, output_dir: str) -> str | None:
        """Write ``lambda_history.png`` (lambda and held-out mass against epsilon over steps).

        matplotlib is an optional extra (``pip install etu-hf[plot]``); without it the plot is skipped
        with a warning and the JSON history remains.
        """
        plt = load_pyplot()
        if plt is None:
            logger.warning("matplotlib is not installed: skipped %s (pip install 'etu-hf[plot]')", PLOT_FILE)
            return None
        rec = self.state.history
        steps = [r["step"] for r in rec]
        eps = self.settings.epsilon
        fig, (ax_l, ax_m) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        if self.trainer.args.lambda_mode == "global":
            ax_l.plot(steps, [r["lam"] for r in rec], marker="o", label="lambda (after update)")
        ax_l.plot(steps, [r["mean_lam_measured"] for r in rec], marker="x", label="mean lambda over held-out positions")
        ax_l.plot(steps, [r["offset"] for r in rec], marker=".", linestyle="--", label="offset (after update)")
        ax_l.set_ylabel("lambda")
        ax_l.legend(loc="best")
        ax_m.plot(steps, [r["heldout_mass"] for r in rec], marker="o", label="held-out mass on V_S")
        ax_m.plot(steps, [r["heldout_upper"] for r in rec], marker="^", linestyle="--", label="upper bound U")
        ax_m.axhline(eps, color="red", label=f"epsilon = {eps}")
        if self.trainer.args.lambda_mode == "per_position":  # drawn over epsilon, which it equals at offset 0
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
