r"""``AdaptiveLambdaCallback``: keeps the held-out mass on V_S between epsilon and the Pinsker margin.

The update rule (ETU_SPEC.md, section 5). Every ``lambda_update_freq`` optimiser steps ``k``, on the
held-out forget slice (never on training batches; statistics summed over processes):

.. code-block:: text

    m_k      = mean over scored positions of pi_theta(S|x)
    delta_k  = mean over scored positions of KL(pi_theta(.|x) || q_lam(.|x))       (per token)
    ema_k    = m_k at the first update, else  beta * ema_{k-1} + (1 - beta) * m_k   (beta = lambda_ema)
    s_k      = wilson_upper(ema_k, min(n_k, wilson_max_n)) if use_upper_for_lambda else ema_k
    margin_k = epsilon + min(sqrt(delta_k / 2), pinsker_cap)
    e_k      = s_k - margin_k   if s_k > margin_k    "raise"  (mass above what training error explains)
               s_k - epsilon    if s_k < epsilon     "lower"  (over-suppressed: relax toward the base model)
               0                otherwise            "hold"
    I_k      = clip(I_{k-1} + e_k / epsilon, +-lambda_integral_max)   (frozen while the offset is clamped
                                                                       in the direction of e_k: anti-windup)
    u_k      = lambda_eta * sign(e_k) + lambda_ki * I_k
    offset_k = clip(offset_{k-1} + u_k, offset bounds)

Global mode: the tilt is ``lam = clamp(lam_closed_form + offset)`` to ``[lower, lambda_max]`` with
``lower = -lambda_max`` if ``allow_negative_lambda`` else 0, and the offset is bounded so that ``lam``
stays inside. Per-position mode: ``offset`` is added to every ``lam(x)`` (each clamped the same way),
bounded to ``[-lambda_max, lambda_max]``. With ``lambda_ki = 0`` (default) this is the original
tool's rule: steps of ``lambda_eta`` with a dead band between ``epsilon`` and the margin.

The state (offset, EMA, integral, history) is written to ``etu_controller.json`` in every checkpoint
and read back by ``ETUTrainer.train(resume_from_checkpoint=...)``, so a resumed run continues the
same trajectory. The history also goes to ``lambda_history.json`` and ``lambda_history.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from transformers import TrainerCallback

from etu_hf.artifacts import load_pyplot, write_json
from etu_hf.bounds import pinsker_slack, wilson_upper

logger = logging.getLogger(__name__)

STATE_FILE = "etu_controller.json"
HISTORY_FILE = "lambda_history.json"
PLOT_FILE = "lambda_history.png"


@dataclass
class ControllerSettings:
    """The controller's gains and thresholds (defaults come from ``ETUTrainingArguments``)."""

    epsilon: float
    update_freq: int = 25
    eta: float = 0.25
    ema: float = 0.5
    use_upper: bool = True
    wilson_max_n: int = 2048
    pinsker_cap: float | None = None
    ki: float = 0.0
    integral_max: float = 10.0


@dataclass
class ControllerState:
    """What a checkpoint must hold to continue the same trajectory."""

    offset: float = 0.0
    ema: float | None = None
    integral: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def controller_step(
    state: ControllerState,
    settings: ControllerSettings,
    mass: float,
    delta: float,
    n_positions: int,
    offset_bounds: tuple[float, float],
) -> tuple[ControllerState, dict[str, Any]]:
    """One update of the rule in the module docstring. Returns the new state and the record."""
    eps = settings.epsilon
    ema = mass if state.ema is None else settings.ema * state.ema + (1 - settings.ema) * mass
    n_eff = min(n_positions, settings.wilson_max_n)
    upper = wilson_upper(ema, n_eff)
    s = upper if settings.use_upper else ema
    slack = pinsker_slack(delta, settings.pinsker_cap)
    margin = eps + slack
    if s > margin:
        error, decision = s - margin, "raise"
    elif s < eps:
        error, decision = s - eps, "lower"
    else:
        error, decision = 0.0, "hold"
    lo, hi = offset_bounds
    saturated = (state.offset >= hi and error > 0) or (state.offset <= lo and error < 0)
    integral = state.integral
    if settings.ki > 0 and not saturated:
        integral = min(max(integral + error / eps, -settings.integral_max), settings.integral_max)
    sign = (error > 0) - (error < 0)
    offset = min(max(state.offset + settings.eta * sign + settings.ki * integral, lo), hi)
    record = {
        "ema_mass": ema,
        "heldout_mass": mass,
        "wilson_upper": upper,
        "wilson_n": n_eff,
        "delta": delta,
        "pinsker_slack": slack,
        "margin": margin,
        "decision": decision,
        "error": error,
        "integral": integral,
        "offset": offset,
    }
    return ControllerState(offset=offset, ema=ema, integral=integral, history=state.history), record


class AdaptiveLambdaCallback(TrainerCallback):
    """Adapts lambda from held-out forget data; see the module docstring for the exact rule.

    ``ETUTrainer`` adds one automatically when ``adaptive_lambda=True`` (the default) and binds any
    instance passed in ``callbacks=``. Keyword arguments override the matching
    ``ETUTrainingArguments`` fields (``lambda_update_freq``, ``lambda_eta``, ``lambda_ema``,
    ``use_upper_for_lambda``, ``wilson_max_n``, ``pinsker_cap``, ``lambda_ki``, ``lambda_integral_max``).

    Logged at the next logging step after an update: ``etu/heldout_pi_s``, ``etu/heldout_upper``,
    ``etu/delta``, ``etu/margin``, ``etu/lambda_offset`` and, in global mode, ``etu/lambda_global``.
    """

    _ARG_NAMES: ClassVar[dict[str, str]] = {
        "update_freq": "lambda_update_freq",
        "eta": "lambda_eta",
        "ema": "lambda_ema",
        "use_upper": "use_upper_for_lambda",
        "wilson_max_n": "wilson_max_n",
        "pinsker_cap": "pinsker_cap",
        "ki": "lambda_ki",
        "integral_max": "lambda_integral_max",
    }

    def __init__(
        self,
        update_freq: int | None = None,
        eta: float | None = None,
        ema: float | None = None,
        use_upper: bool | None = None,
        wilson_max_n: int | None = None,
        pinsker_cap: float | None = None,
        ki: float | None = None,
        integral_max: float | None = None,
    ):
        self.overrides = {k: v for k, v in locals().items() if k in self._ARG_NAMES and v is not None}
        if self.overrides.get("update_freq", 1) < 1:
            raise ValueError("AdaptiveLambdaCallback: update_freq (lambda_update_freq) must be >= 1")
        if self.overrides.get("eta", 1.0) <= 0:
            raise ValueError("AdaptiveLambdaCallback: eta (lambda_eta) must be > 0")
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
        return {"format": "etu-hf/controller-state", "version": 1, **asdict(self.state)}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        self.state = ControllerState(
            offset=float(data["offset"]),
            ema=data["ema"],
            integral=float(data["integral"]),
            history=list(data["history"]),
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
        new_state, record = controller_step(
            self.state, self.settings, stats.mean_mass, stats.delta, stats.n_positions, trainer.offset_bounds()
        )
        trainer.lambda_offset = new_state.offset
        tilt = trainer.tilt_spec()
        record = {
            "step": step,
            # global mode: the lambda in effect after this update; per-position mode has no single lambda
            "lam": tilt.global_value() if tilt.mode == "global" else None,
            # mean lambda over the held-out positions during this measurement (offset before the update)
            "mean_lam_measured": stats.mean_lambda,
            "mean_target_mass": stats.mean_target_mass,
            "positions": stats.n_positions,
            **record,
        }
        new_state.history = [*self.state.history, record]
        self.state = new_state
        trainer.record_controller_log(
            {
                "etu/heldout_pi_s": record["heldout_mass"],
                "etu/heldout_upper": record["wilson_upper"],
                "etu/delta": record["delta"],
                "etu/margin": record["margin"],
                "etu/lambda_offset": record["offset"],
                **({"etu/lambda_global": record["lam"]} if tilt.mode == "global" else {}),
            }
        )
        logger.info(
            "[lambda-update] step %d: held-out mass %.4f (EMA %.4f, upper %.4f), delta %.4f, margin %.4f -> %s, "
            "offset %.3f",
            step,
            record["heldout_mass"],
            record["ema_mass"],
            record["wilson_upper"],
            record["delta"],
            record["margin"],
            record["decision"],
            record["offset"],
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
                "version": 1,
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
        fig, (ax_l, ax_m) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        if self.trainer.args.lambda_mode == "global":
            ax_l.plot(steps, [r["lam"] for r in rec], marker="o", label="lambda (after update)")
        ax_l.plot(steps, [r["mean_lam_measured"] for r in rec], marker="x", label="mean lambda over held-out positions")
        ax_l.plot(steps, [r["offset"] for r in rec], marker=".", linestyle="--", label="offset")
        ax_l.set_ylabel("lambda")
        ax_l.legend(loc="best")
        ax_m.plot(steps, [r["heldout_mass"] for r in rec], marker="o", label="held-out mass on V_S")
        ax_m.plot(steps, [r["wilson_upper"] for r in rec], linestyle="--", label="Wilson upper (EMA)")
        ax_m.plot(steps, [r["margin"] for r in rec], linestyle=":", label="margin eps + sqrt(delta/2)")
        ax_m.axhline(self.settings.epsilon, color="red", label=f"epsilon = {self.settings.epsilon}")
        ax_m.set_xlabel("optimiser step")
        ax_m.set_ylabel("mass")
        top = max(
            [self.settings.epsilon * 3]
            + [r[key] for r in rec for key in ("heldout_mass", "wilson_upper", "margin") if math.isfinite(r[key])]
        )
        ax_m.set_ylim(0, min(1.0, top * 1.1 if math.isfinite(top) else 1.0))
        ax_m.legend(loc="best")
        fig.suptitle("ETU adaptive lambda")
        fig.tight_layout()
        path = os.path.join(output_dir, PLOT_FILE)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
