r"""The adaptive controller's rule, a pure function of its state and one held-out measurement.

:class:`~etu_hf.training.controller.AdaptiveLambdaCallback` applies it during training.

Training fits the tilted target on *training* positions; the guarantee is about text the model has
not seen. Every ``lambda_update_freq`` optimiser steps the controller measures a held-out slice of
the forget data (never trained on; statistics combined over processes) and tightens or relaxes the
target. The rule (``s`` is clipped to ``[1e-12, 1 - 1e-12]`` before the logit):

.. code-block:: text

    m_k  = mean over held-out positions of pi_theta(S|x)                  (point estimate)
    U_k  = sequence-level upper confidence bound of m_k                    (etu_hf.ops.bounds.sequence_upper_bound)
    s_k  = U_k if use_upper_for_lambda else m_k    (m_k when U_k comes from 1 to 7 sequences: it is then 1.0)
    e_k  = logit(s_k) - logit(epsilon)                                     (> 0: the bound is not met)
    set  = -lambda_band / 2                                                (aim inside the certified band)
    decision: "raise"  if e_k > 0:
                  step = min(lambda_eta * (e_k - set), lambda_step_max)               (> 0)
              "lower"  if e_k < -lambda_band and e_{k-1} < -lambda_band and offset > floor:
                  step = max(lambda_eta / 2 * (e_k - set), -lambda_step_max)          (< 0)
              "hold"   otherwise (certified within the band, first measurement below it, or at the floor)
    stall:    a "raise" becomes "stalled" (step 0) when the held-out mass has stopped following the offset:
                  added = offset_{k-1} - offset before the update k-2        (offset added over two updates)
                  fall  = logit(m_{k-2}) - logit(m_k)                        (how far the held-out logit fell)
                  stalled if added >= 0.5 and fall < lambda_min_response * added
              and stays "stalled" until m_k has fallen by lambda_min_response logits below the m of the
              update that stalled (the model was only lagging: raising resumes)
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

Why the stall: the rule assumes that raising the offset lowers the held-out mass. Training lowers the mass
at the *training* contexts; held-out text follows only as far as what is learned carries over. When two
updates added half a nat or more of offset and the held-out logit fell by less than ``lambda_min_response``
(default 0.1) per nat added, the rest of the gap is generalisation: a tighter target on every training context
no longer reaches held-out text and only moves the model further from the base (on SmolLM2 the offset went on
to 4.2, a per-context target of 0.0008, while the held-out mass moved from 0.0476 to 0.0440, and that run kept
0.87x of the neighbouring knowledge against 0.91x with the stall; BENCHMARKS.md). The
controller then holds, and resumes raising only if the held-out mass falls while it holds (a lagging model,
not a gap). ``lambda_min_response = 0`` turns the stall off (raise while the bound is above epsilon).

The Pinsker bound ``mean q_lam(S) + sqrt(delta/2)`` (how well the model fits its target) is logged
and recorded but does not gate the rule. The state (offset, history) is written to
``etu_controller.json`` in every checkpoint and read back by
``ETUTrainer.train(resume_from_checkpoint=...)``, so a resumed run continues the same trajectory. The
history also goes to ``lambda_history.json`` and ``lambda_history.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from etu_hf.artifacts.record import DEFAULT_EPSILON
from etu_hf.ops.bounds import MIN_SEQUENCES, pinsker_slack
from etu_hf.training.config import ETUTrainingArguments


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return math.log(p) - math.log1p(-p)


#: The stall test looks at the held-out mass this many updates back, and only once that much offset was added.
STALL_WINDOW = 2
STALL_MIN_OFFSET = 0.5

#: The automatic controller period: at most this many steps, and about ``AUTO_UPDATES`` updates per run.
AUTO_MAX_PERIOD = 25
AUTO_UPDATES = 8


def auto_update_freq(max_steps: int) -> int:
    """The controller period when ``lambda_update_freq`` is ``None``: ``min(25, ceil(max_steps / 8))``, at least 1.

    A 40-step run measures every 5 steps (8 updates), the 150-step demo every 19, runs of 200 steps or more
    every 25. With a fixed period of 25 a 40-step run got one update, 15 steps before the end (BENCHMARKS.md).
    """
    return max(1, min(AUTO_MAX_PERIOD, math.ceil(max(int(max_steps), 1) / AUTO_UPDATES)))


def _arg(name: str) -> Any:
    """A settings field whose default and meaning are those of ``ETUTrainingArguments.<name>``."""
    default = ETUTrainingArguments.__dataclass_fields__[name].default
    return field(default=default, metadata={"arg": name})


@dataclass
class ControllerSettings:
    """The controller's gains and band (see the module docstring). Each field's default is the matching
    ``ETUTrainingArguments`` field, named in its ``metadata["arg"]``; :meth:`from_args` reads them all.
    ``epsilon`` is ``None`` while a run's ``epsilon_ratio`` waits for the base mass: the callback sets the
    run's resolved epsilon before every update (:meth:`AdaptiveLambdaCallback.update`)."""

    epsilon: float | None = field(default=DEFAULT_EPSILON, metadata={"arg": "epsilon"})
    #: ``None`` until :func:`auto_update_freq` resolves it from the run's step budget.
    update_freq: int | None = _arg("lambda_update_freq")
    eta: float = _arg("lambda_eta")
    band: float = _arg("lambda_band")
    step_max: float = _arg("lambda_step_max")
    use_upper: bool = _arg("use_upper_for_lambda")
    stop_when_certified: int = _arg("stop_when_certified")
    min_response: float = _arg("lambda_min_response")

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> ControllerSettings:
        """Settings from ``ETUTrainingArguments``; ``overrides`` (by the names here, ``None`` ignored) win."""
        values = {f.name: getattr(args, f.metadata["arg"]) for f in fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        checks = {
            "update_freq": self.update_freq is None or self.update_freq >= 1,
            "eta": math.isfinite(self.eta) and self.eta > 0,
            "band": math.isfinite(self.band) and self.band > 0,
            "step_max": math.isfinite(self.step_max) and self.step_max > 0,
            "epsilon": self.epsilon is None or 0.0 < self.epsilon < 1.0,
            "stop_when_certified": self.stop_when_certified >= 0,
            "min_response": math.isfinite(self.min_response) and self.min_response >= 0,
        }
        arg = {f.name: f.metadata["arg"] for f in fields(self)}
        for name, ok in checks.items():
            if not ok:
                label = name if arg[name] == name else f"{arg[name]} ({name})"
                raise ValueError(f"AdaptiveLambdaCallback: {label} is out of range (got {self!r}); see the docstring")


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


def offset_response(state: ControllerState, mass: float) -> tuple[float, float] | None:
    """``(added, fall)`` over the last :data:`STALL_WINDOW` updates: the offset added since the measurement
    ``STALL_WINDOW`` updates back (``state.offset`` minus that record's ``offset_before``) and how far the held-out
    logit fell since then (``logit(m_{k-2}) - logit(mass)``). ``None`` with a shorter history or no finite mass."""
    if len(state.history) < STALL_WINDOW or not math.isfinite(mass):
        return None
    ref = state.history[-STALL_WINDOW]
    if not math.isfinite(ref["heldout_mass"]):
        return None
    return state.offset - ref["offset_before"], _logit(ref["heldout_mass"]) - _logit(mass)


def _stalled(
    state: ControllerState, settings: ControllerSettings, mass: float, response: tuple[float, float] | None
) -> bool:
    """Whether a raise is futile (module docstring, "stall"): the held-out mass stopped following the offset.
    ``response`` is :func:`offset_response` of ``state`` and ``mass``."""
    if settings.min_response <= 0 or not math.isfinite(mass):
        return False
    history = state.history
    if history and history[-1]["decision"] == "stalled":
        first = len(history) - 1
        while first > 0 and history[first - 1]["decision"] == "stalled":
            first -= 1
        return _logit(history[first]["heldout_mass"]) - _logit(mass) < settings.min_response
    if response is None:
        return False
    added, fall = response
    return added >= STALL_MIN_OFFSET and fall < settings.min_response * added


def controller_step(
    state: ControllerState,
    settings: ControllerSettings,
    measurement: HeldoutMeasurement,
    offset_bounds: tuple[float, float],
) -> tuple[ControllerState, dict[str, Any]]:
    """One update of the rule in the module docstring. Returns the new state and the record.

    ``state.history`` holds the earlier updates' records (the stall test reads their ``heldout_mass``,
    ``offset_before`` and ``decision``); the caller appends the returned record to it."""
    eps = settings.epsilon
    if eps is None:
        raise ValueError("controller_step: settings.epsilon is not resolved yet (epsilon_ratio before p_S is known)")
    # Below MIN_SEQUENCES the bound is 1.0 whatever the model does: deciding on it would raise the offset at every
    # update up to lambda_max, so such an update decides on the point estimate (0 sequences: nothing measured).
    few = settings.use_upper and 0 < measurement.sequences < MIN_SEQUENCES
    on_upper = settings.use_upper and not few
    s = measurement.upper if on_upper else measurement.mass
    floor, ceiling = offset_bounds
    response = offset_response(state, measurement.mass)
    if not math.isfinite(s):
        error, decision, step = math.nan, "hold", 0.0  # nothing measured (no held-out position)
    else:
        error = _logit(s) - _logit(eps)
        below = error < -settings.band
        was_below = state.last_error is not None and state.last_error < -settings.band
        if error > 0 and _stalled(state, settings, measurement.mass, response):
            decision, step = "stalled", 0.0
        elif error > 0:
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
        "decided_on": "upper" if on_upper else "point",
        "too_few_sequences": few,
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
        # held-out logit fallen per nat of offset added over the last STALL_WINDOW updates (None before)
        "offset_response": None if response is None or response[0] <= 0 else response[1] / response[0],
    }
    last_error = error if math.isfinite(error) else state.last_error
    return ControllerState(offset=offset, last_error=last_error, history=state.history), record
