"""What a run folder says about the run that wrote it: :class:`RunRecord`, the one reader of its files.

A run folder (an ``etu-hf unlearn`` or ``etu-hf refine`` ``output_dir``, or any ``ETUTrainer``
``output_dir``) holds ``args.json`` (the run's arguments), ``metrics.json`` (its results, with the
tilt it ended with under ``"lambda"``) and ``V_S.ids.json`` (the forbidden set); their schemas are in
docs/artifacts.md. Commands that continue or audit a run read it here, so the tilt a run trained with is
rebuilt in one place.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from etu_hf.artifacts.files import (
    ARGS_FILE,
    CONTROLLER_STATE_FILE,
    FORBIDDEN_SET_FILE,
    METRICS_FILE,
    RUN_STATE_FILE,
)

if TYPE_CHECKING:
    from etu_hf.ops.tilt import TiltSpec

#: The target mass of a run whose args.json does not say (``ETUTrainingArguments``' default).
DEFAULT_EPSILON = 0.05

#: The block length an audit of a run cuts held-out text into when neither a flag nor the run's args.json says
#: (``etu-hf audit --block_size``, ``etu-hf refine --audit_block_size``, ``AuditOptions.block_size``).
DEFAULT_AUDIT_BLOCK_SIZE = 512


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err.msg} at line {err.lineno}); was the run interrupted?"
            ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


#: A Trainer checkpoint folder's name (``transformers.trainer_utils.PREFIX_CHECKPOINT_DIR`` + ``-<step>``).
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


def _checkpoint_record(folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(args, metrics)`` of the run at the checkpoint ``folder``: args.json of the run folder above it, and a
    metrics record holding what the checkpoint itself says (``epsilon``, ``lambda.offset``) and the run's
    ``lambda.closed_form_global`` when its metrics.json has one. Empty dicts where the files are missing."""
    run_folder = os.path.dirname(os.path.normpath(folder))
    args = _read_json(os.path.join(run_folder, ARGS_FILE))
    state = _read_json(os.path.join(folder, RUN_STATE_FILE))
    controller = _read_json(os.path.join(folder, CONTROLLER_STATE_FILE))
    metrics: dict[str, Any] = {}
    resolved = state.get("epsilon")  # {"epsilon": ..., "epsilon_ratio": ..., "epsilon_base_p_S": ...}
    if isinstance(resolved, dict) and resolved.get("epsilon") is not None:
        metrics["epsilon"] = resolved["epsilon"]
    lam: dict[str, Any] = {}
    if controller.get("offset") is not None:
        lam["offset"] = controller["offset"]
    closed_form = (_read_json(os.path.join(run_folder, METRICS_FILE)).get("lambda") or {}).get("closed_form_global")
    if closed_form is not None:
        lam["closed_form_global"] = closed_form
    if lam:
        metrics["lambda"] = lam
    return args, metrics


@dataclass(frozen=True)
class RunRecord:
    """The files of one run folder: ``args`` (args.json), ``metrics`` (metrics.json) and the path of
    its V_S.ids.json (docs/artifacts.md). Missing files read as empty: a folder that is not a run
    gives an empty record (``bool(record)`` is False)."""

    folder: str
    args: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    forbidden_path: str | None = None

    @classmethod
    def read(cls, folder: str) -> RunRecord:
        """Read args.json, metrics.json and locate V_S.ids.json in ``folder``; ``ValueError`` naming the
        file when one exists but is not a JSON object.

        A ``checkpoint-<step>`` folder holds neither file: its record is the run's args.json (in the folder
        above it) with the tilt the run had at that step, the epsilon of its etu_trainer_state.json and the
        controller's offset of its etu_controller.json (plus the run's closed-form global lambda, which is fixed
        at the start of training, when metrics.json above says it).
        """
        forbidden = os.path.join(folder, FORBIDDEN_SET_FILE)
        args = _read_json(os.path.join(folder, ARGS_FILE))
        metrics = _read_json(os.path.join(folder, METRICS_FILE))
        if not args and not metrics and _CHECKPOINT.match(os.path.basename(os.path.normpath(folder))):
            args, metrics = _checkpoint_record(folder)
        return cls(
            folder=folder,
            args=args,
            metrics=metrics,
            forbidden_path=forbidden if os.path.isfile(forbidden) else None,
        )

    def __bool__(self) -> bool:
        return bool(self.args or self.metrics)

    @property
    def epsilon(self) -> float:
        """The run's target mass ``epsilon``: args.json's; for a run given ``epsilon_ratio`` (whose args.json
        holds ``epsilon: null``) the value it resolved, from metrics.json; :data:`DEFAULT_EPSILON` when
        neither file says."""
        value = self.args.get("epsilon")
        if value is None and self.args.get("epsilon_ratio") is not None:
            value = self.metrics.get("epsilon")
            if value is None:
                raise ValueError(
                    f"{self.folder}: the run set epsilon_ratio={self.args['epsilon_ratio']} but its metrics.json "
                    "holds no resolved epsilon (the run did not finish); give --epsilon"
                )
        return float(value if value is not None else DEFAULT_EPSILON)

    @property
    def block_size(self) -> int | None:
        """The length of the blocks the run's own audit measured: ``refine.audit_block_size`` of an ``etu-hf
        refine`` run when it was given, else ``block_size`` (an ``etu-hf unlearn`` run's training and held-out
        blocks; a refined run's args.json carries its ETU run's); ``None`` when args.json holds no valid one
        (an ``ETUTrainer`` run from Python)."""
        refine = self.args.get("refine")
        value = refine.get("audit_block_size") if isinstance(refine, dict) else None
        if value is None:
            value = self.args.get("block_size")
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 2 else None

    def audit_block_size(self, given: int | None = None) -> int:
        """The block length to audit this run's held-out text in: ``given`` (a flag) when set, else
        :attr:`block_size` (as the run's own audit cut it), else :data:`DEFAULT_AUDIT_BLOCK_SIZE`."""
        return given if given is not None else (self.block_size or DEFAULT_AUDIT_BLOCK_SIZE)

    @property
    def lambda_record(self) -> dict[str, Any]:
        """The ``"lambda"`` section of metrics.json (mode, closed-form global lambda, controller offset, ...)."""
        return self.metrics.get("lambda") or {}

    @property
    def tilt(self) -> TiltSpec:
        r"""The tilt the run ended with (docs/method.md, "The target: an exponential tilt").

        ``epsilon``, ``lambda_mode``, ``lambda_max``, ``allow_negative_lambda`` and ``lambda_floor`` from args.json; the
        closed-form global lambda (``lambda.closed_form_global``) and the controller's offset :math:`o`
        (``lambda.offset``) from metrics.json. Settings a file does not hold take ``TiltSpec``'s defaults
        (offset 0).
        """
        from etu_hf.ops.tilt import DEFAULT_LAMBDA_MAX, TiltSpec

        lam = self.lambda_record
        return TiltSpec(
            epsilon=self.epsilon,
            mode=self.args.get("lambda_mode", "per_position"),
            lambda_max=self.args.get("lambda_max", DEFAULT_LAMBDA_MAX),
            allow_negative=bool(self.args.get("allow_negative_lambda", False)),
            global_lambda=lam.get("closed_form_global"),
            offset=float(lam.get("offset") or 0.0),
            lambda_floor=float(self.args.get("lambda_floor") or 0.0),
        )
