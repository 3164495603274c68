r"""Unlearning baselines on ETUTrainer's input path: GA, GradDiff, NPO, SimNPO and UNDIAL (docs/baselines.md).

Each baseline is an :class:`~etu_hf.ETUTrainer` that overrides one method, :meth:`~etu_hf.ETUTrainer.forget_loss`,
with its own forget term (formula in its class docstring; the maths in :mod:`etu_hf.ops.unlearning_losses`).
The rest is ETUTrainer's: forget/retain batching and pairing, the normalisers over the whole accumulated
batch (:class:`~etu_hf.training.statistics.ScoredCounts`), the retain term (``retain_weight`` times
:math:`KL(\pi_b\|\pi_\theta)` or the NLL), the base distribution, LoRA/QLoRA/DeepSpeed, V_S and :math:`p_S` (so
:meth:`audit` and the mass on V_S mean the same for every method) and the run folder. ETU's lambda
controller and in-loop preference term are refused (:class:`BaselineTrainingArguments`).

Logged every ``logging_steps`` (and by ``evaluate()`` with the Trainer's prefix) under the method's name
``m``: ``m/loss`` (the forget term: mean over forget positions, or over forget sequences for NPO and
SimNPO), ``m/forget_nll`` (mean :math:`-\log\pi_\theta(y_i|x_i)`), ``m/pi_s`` (mean :math:`\pi_\theta(S|x_i)`, the
model's mass on V_S), ``m/forget_positions``, ``m/forget_sequences`` (NPO, SimNPO), ``m/retain_loss``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch

from etu_hf.data.blocks import scored_positions
from etu_hf.modeling.head import head_fn
from etu_hf.ops.unlearning_losses import (
    TargetLogpsOutput,
    chunked_target_logps,
    chunked_undial_loss,
    gradient_ascent_loss,
    npo_forget_loss,
    simnpo_forget_loss,
)
from etu_hf.training.config import ETUTrainingArguments
from etu_hf.training.controller import AdaptiveLambdaCallback
from etu_hf.training.loss_terms import LossContext, base_positions, student_positions
from etu_hf.training.statistics import ETUMetrics, ScoredCounts
from etu_hf.training.trainer import ETUTrainer

__all__ = [
    "UNLEARNING_METHODS",
    "BaselineTrainer",
    "BaselineTrainingArguments",
    "GradAscentTrainer",
    "GradDiffTrainer",
    "NPOBaselineTrainer",
    "SimNPOBaselineTrainer",
    "UNDIALTrainer",
    "trainer_class",
]

logger = logging.getLogger(__name__)

#: UNDIAL's default strength: open-unlearning's UNDIAL config (``beta: 10.0``; its notes give 3, 10 or 30).
DEFAULT_UNDIAL_GAMMA = 10.0


@dataclass
class BaselineTrainingArguments(ETUTrainingArguments):
    r"""
    Configuration of the baseline trainers: every field of [`ETUTrainingArguments`] (V_S, the retain term,
    `loss_chunk_size`, `epsilon` for the audit's verdict, ...) plus the ones below. With
    [`~transformers.HfArgumentParser`] each field becomes a flag of `etu-hf unlearn --method <name>`.

    Parameters:
        > Parameters that control the baselines' forget terms

        npo_beta (`float`, *optional*, defaults to `0.1`):
            NPO's and SimNPO's inverse temperature beta. Must be > 0.
        simnpo_gamma (`float`, *optional*, defaults to `0.0`):
            SimNPO's margin gamma. Must be >= 0.
        undial_gamma (`float`, *optional*, defaults to `10.0`):
            UNDIAL's strength: how far the target token's base logit is lowered in the distillation target
            `softmax(z_base - gamma * onehot(y))` (open-unlearning's default; its notes suggest 3, 10 or 30).
            Must be > 0 (0 would make the target the base model: nothing is forgotten).

        > ETU settings that a baseline refuses

        adaptive_lambda (`bool`, *optional*, defaults to `False`):
            Must stay False: the lambda controller steers ETU's tilt toward epsilon; a baseline has no tilt.
        preference_weight (`float`, *optional*, defaults to `0.0`), stop_when_certified (`int`, *optional*,
        defaults to `0`):
            Must stay 0: ETU's in-loop preference term (train NPO itself with `--method npo`) and the
            controller's early stop.
    """

    npo_beta: float = field(default=0.1, metadata={"help": "NPO/SimNPO inverse temperature beta (> 0)."})
    simnpo_gamma: float = field(default=0.0, metadata={"help": "SimNPO margin gamma (>= 0)."})
    undial_gamma: float = field(
        default=DEFAULT_UNDIAL_GAMMA,
        metadata={"help": "UNDIAL strength: the target token's base logit is lowered by this (> 0)."},
    )
    adaptive_lambda: bool = field(
        default=False, metadata={"help": "ETU's lambda controller: must stay False for a baseline."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()

        def fail(name: str, message: str) -> None:
            raise ValueError(f"{name}: {message} (got {getattr(self, name)!r})")

        if self.npo_beta <= 0:  # nan and inf are refused by ETUTrainingArguments' checks
            fail("npo_beta", "must be > 0, e.g. 0.1")
        if self.simnpo_gamma < 0:
            fail("simnpo_gamma", "must be >= 0, e.g. 0.0")
        if self.undial_gamma <= 0:
            fail("undial_gamma", f"must be > 0 (0 leaves the base model as the target), e.g. {DEFAULT_UNDIAL_GAMMA}")
        if self.adaptive_lambda:
            fail("adaptive_lambda", "the baselines have no tilt for a lambda controller to steer: leave it False")
        if self.preference_weight > 0:
            fail("preference_weight", "ETU's in-loop preference term is not a baseline's: set it to 0 (--method npo)")
        if self.stop_when_certified > 0:
            fail("stop_when_certified", "needs ETU's lambda controller, which the baselines do not have: set it to 0")


# ---------------------------------------------------------------------------------------------- metrics
#: Sums of one baseline's statistics: the forget term and what it is averaged over (positions or sequences),
#: the forget NLL, the mass on V_S and the scored forget positions, then the retain term's sum and weight.
BASELINE_STAT_NAMES = ("loss", "loss_count", "nll", "pi_s", "positions", "retain", "w_retain")


class BaselineStatistics:
    """Device-side sums of :data:`BASELINE_STAT_NAMES`, read back (one sync) only when logging; the
    interface of :class:`~etu_hf.training.statistics.StatisticsAccumulator` (checkpoints hold its snapshot)."""

    def __init__(self, prefix: str, per_sequence: bool):
        self.prefix, self.per_sequence = prefix, per_sequence
        self.sums: torch.Tensor | None = None

    def add(self, values: torch.Tensor, lam_min: Any = None, lam_max: Any = None) -> None:
        """Add one micro-batch's sums (a baseline has no lambda: ``lam_min``/``lam_max`` are ignored)."""
        self.sums = values.detach().clone() if self.sums is None else self.sums + values.detach()

    def reset(self) -> None:
        self.sums = None

    def _reduced(self, reduce: Any, device: Any) -> torch.Tensor:
        sums = self.sums if self.sums is not None else torch.zeros(len(BASELINE_STAT_NAMES), device=device)
        return reduce(sums, "sum") if reduce is not None else sums

    def snapshot(self, reduce: Any, device: Any) -> dict[str, Any] | None:
        """The sums as JSON-able values (a collective under DDP); ``None`` when nothing was accumulated."""
        sums = self._reduced(reduce, device)
        if float(sums[BASELINE_STAT_NAMES.index("positions")]) == 0:
            return None
        return {"names": list(BASELINE_STAT_NAMES), "sums": sums.double().tolist()}

    def restore(self, snapshot: dict[str, Any], device: Any) -> None:
        """Start from a :meth:`snapshot`, matched by name (a name it lacks starts at 0)."""
        saved = dict(zip(snapshot["names"], snapshot["sums"], strict=True))
        self.sums = torch.tensor([saved.get(k, 0.0) for k in BASELINE_STAT_NAMES], dtype=torch.float32, device=device)

    def read(self, reduce: Any = None) -> dict[str, float] | None:
        """The logged metrics (module docstring) as means over what was accumulated."""
        if self.sums is None:
            return None
        s = dict(zip(BASELINE_STAT_NAMES, self._reduced(reduce, None).double().tolist(), strict=True))
        p, n = self.prefix, max(s["positions"], 1.0)
        out = {
            f"{p}/loss": s["loss"] / max(s["loss_count"], 1.0),
            f"{p}/forget_nll": s["nll"] / n,
            f"{p}/pi_s": s["pi_s"] / n,
            f"{p}/forget_positions": s["positions"],
        }
        if self.per_sequence:
            out[f"{p}/forget_sequences"] = s["loss_count"]
        if s["w_retain"] > 0:
            out[f"{p}/retain_loss"] = s["retain"] / s["w_retain"]
        return out


class BaselineMetrics(ETUMetrics):
    """``_metrics[mode]`` of a baseline: :class:`~etu_hf.training.statistics.ETUMetrics` (one window per mode,
    the whole run's training sums, the last training window) over :class:`BaselineStatistics`."""

    def __init__(self, prefix: str, per_sequence: bool):
        self.window = {mode: BaselineStatistics(prefix, per_sequence) for mode in self.MODES}
        self.total = BaselineStatistics(prefix, per_sequence)
        self.last_train: dict[str, float] | None = None


# ---------------------------------------------------------------------------------------------- trainers
class ForgetPositions(NamedTuple):
    """A forget micro-batch at its ``N = B (T-1)`` predictions: the model's ``states`` ``[N, D]`` (logits, or
    hidden states for ``head``), its ``outputs``, the scored ``mask`` ``[B, T-1]``, ``targets`` and ``weights``
    ``[N]`` (1 where scored), V_S's ids, the model's and the base's heads (``None`` with full logits), and the
    per-context extras of S(x) ``[N, k]`` (``None`` for one set everywhere)."""

    states: torch.Tensor
    outputs: Any
    mask: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    forbidden_ids: torch.Tensor
    head: Any
    base_head: Any
    extra_ids: torch.Tensor | None = None


class BaselineTrainer(ETUTrainer):
    """What the baselines share: their arguments' check, their metrics and metrics.json entries. A subclass
    sets :attr:`method_name` and implements :meth:`forget_loss`, returning the sums of
    ``(loss, loss_count, nll, pi_s, positions)`` as its statistics."""

    method_name: ClassVar[str]
    #: True: the forget term is a mean over forget sequences (ScoredCounts.sequences), else over positions.
    per_sequence: ClassVar[bool] = False
    fits_tilted_target: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "method_name", None):  # the method's name joins the tags of model cards and hub commits
            cls._tag_names = [*ETUTrainer._tag_names, cls.method_name]

    def __init__(self, model: Any = None, args: BaselineTrainingArguments | None = None, *pos: Any, **kwargs: Any):
        name = type(self).__name__
        if args is None:
            args = BaselineTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, BaselineTrainingArguments):
            raise TypeError(
                f"{name} needs BaselineTrainingArguments, got {type(args).__name__}: use "
                "etu_hf.BaselineTrainingArguments(...) (ETUTrainingArguments' fields plus the baselines', "
                "adaptive_lambda off)."
            )
        callbacks = kwargs.get("callbacks") or []
        if any(c is AdaptiveLambdaCallback or isinstance(c, AdaptiveLambdaCallback) for c in callbacks):
            raise ValueError(f"callbacks: {name} has no tilt for an AdaptiveLambdaCallback to steer; remove it")
        if not self.has_retain_term and kwargs.get("retain_dataset") is not None and args.retain_weight > 0:
            logger.warning(
                "%s has no retain term: the retain data only sets V_S's PMI background (use graddiff for one)", name
            )
        super().__init__(model, args, *pos, **kwargs)
        self._metrics = BaselineMetrics(self.method_name, self.per_sequence)

    def count_sequences(self, forget: dict[str, Any], device: torch.device) -> torch.Tensor:
        """Per-sequence methods divide by the forget rows with at least one scored position."""
        if not self.per_sequence:
            return super().count_sequences(forget, device)
        mask, _ = scored_positions(forget["input_ids"], forget.get("attention_mask"), forget.get("labels"))
        return mask.any(1).sum().to(device=device, dtype=torch.float32)

    def _normalizer(self, counts: ScoredCounts | None) -> torch.Tensor | None:
        if counts is None:
            return None
        return (counts.sequences if self.per_sequence else counts.forget).clamp_min(1.0)

    def _positions(self, ctx: LossContext, forget: dict[str, Any], keep_logits: bool) -> ForgetPositions:
        """The model's states at every forget prediction (unscored rows zeroed) and what goes with them."""
        states, outputs, mask, targets = student_positions(ctx, forget, keep_logits)
        device = forget["input_ids"].device
        heads = (head_fn(ctx.head, device), ctx.base.head(device)) if ctx.use_hidden else (None, None)
        ids = ctx.tilt.forbidden_ids(device)
        extra = ctx.tilt.position_extra_ids(forget["input_ids"], targets, mask)
        return ForgetPositions(
            states, outputs, mask, targets.reshape(-1), mask.reshape(-1).float(), ids, *heads, extra_ids=extra
        )

    def add_metrics(
        self, mode: str, forget_stats: torch.Tensor, retain_sums: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        retain = torch.stack([r.to(forget_stats.device) for r in retain_sums])
        self._metrics.add(mode, torch.cat([forget_stats.float(), retain.float()]), None, None)

    def _training_metrics(self, output: Any, duration: float) -> dict[str, Any]:
        """metrics.json of ETU (the ``lambda`` section being the audit's reference target, not trained
        toward) plus ``method`` and the method's own metrics (``method_metrics``: last window, whole run)."""
        metrics = super()._training_metrics(output, duration)
        final, total = self._metrics.last_train or {}, self._metrics.total.read(self._reduce()) or {}
        p = self.method_name
        metrics.update(
            method=p,
            method_metrics={"final": final, "mean": total},
            final_training_pi_s=final.get(f"{p}/pi_s"),
            mean_training_pi_s=total.get(f"{p}/pi_s"),
            training_forget_positions=total.get(f"{p}/forget_positions"),
        )
        return metrics


def _policy_logps(ctx: LossContext, p: ForgetPositions) -> TargetLogpsOutput:
    """The model's :math:`\\log\\pi_\\theta(y_i|x_i)` at every forget prediction, with the NLL and V_S mass sums."""
    return chunked_target_logps(
        p.states,
        p.targets,
        weights=p.weights,
        forbidden_ids=p.forbidden_ids,
        head=p.head,
        chunk_size=ctx.chunk_size,
        extra_ids=p.extra_ids,
    )


class GradAscentTrainer(BaselineTrainer):
    r"""Gradient ascent: :math:`L = \frac{1}{N_f}\sum_i \log\pi_\theta(y_i|x_i)` over the scored forget positions
    (minimising it maximises the forget NLL). No retain term (:class:`GradDiffTrainer` adds one)."""

    method_name = "ga"
    has_retain_term = False

    def forget_loss(
        self,
        ctx: LossContext,
        forget: dict,
        retain: dict | None,
        counts: ScoredCounts | None,
        keep_logits: bool = False,
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        p = self._positions(ctx, forget, keep_logits)
        out = _policy_logps(ctx, p)
        loss = gradient_ascent_loss(out.logps, p.weights, self._normalizer(counts))
        stats = torch.stack([-out.nll_sum, out.weight_sum, out.nll_sum, out.mass_sum, out.weight_sum])
        return loss, p.outputs, stats


class GradDiffTrainer(GradAscentTrainer):
    r"""Gradient difference: gradient ascent on the forget data plus ``retain_weight`` times the retain term
    (``retain_loss_type``: ``"nll"``, the published GradDiff, or ``"kl"``, :math:`KL(\pi_b\|\pi_\theta)`)."""

    method_name = "graddiff"
    has_retain_term = True


class NPOBaselineTrainer(BaselineTrainer):
    r"""NPO on the forget rows, the reference being the base distribution:
    :math:`L = \frac{1}{B}\sum_s -\frac{2}{\beta}\log\sigma(-\beta(\log\pi_\theta(y_s|x_s) - \log\pi_b(y_s|x_s)))`
    (``beta = npo_beta``; the sequence :math:`y_s` is the row's scored positions) plus the retain term.
    Unlike :class:`~etu_hf.NPOTrainer` (prompt/completion data, ``etu-hf refine``) it trains on ETU's data."""

    method_name = "npo"
    per_sequence = True

    def forget_loss(
        self,
        ctx: LossContext,
        forget: dict,
        retain: dict | None,
        counts: ScoredCounts | None,
        keep_logits: bool = False,
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        p = self._positions(ctx, forget, keep_logits)
        policy = _policy_logps(ctx, p)
        with torch.no_grad():
            base = base_positions(ctx, forget, p.mask)
            ref = chunked_target_logps(base, p.targets.to(base.device), head=p.base_head, chunk_size=ctx.chunk_size)
        ref_logps = ref.logps.to(policy.logps.device)
        out = npo_forget_loss(policy.logps, ref_logps, p.mask, self.args.npo_beta, self._normalizer(counts))
        stats = torch.stack([out.loss_sum, out.sequences, policy.nll_sum, policy.mass_sum, policy.weight_sum])
        return out.loss, p.outputs, stats


class SimNPOBaselineTrainer(BaselineTrainer):
    r"""SimNPO (reference-free, length-normalised) on the forget rows:
    :math:`L = \frac{1}{B}\sum_s -\frac{2}{\beta}\log\sigma(-\frac{\beta}{|y_s|}\log\pi_\theta(y_s|x_s) - \gamma)`
    (``beta = npo_beta``, ``gamma = simnpo_gamma``) plus the retain term."""

    method_name = "simnpo"
    per_sequence = True

    def forget_loss(
        self,
        ctx: LossContext,
        forget: dict,
        retain: dict | None,
        counts: ScoredCounts | None,
        keep_logits: bool = False,
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        p = self._positions(ctx, forget, keep_logits)
        policy = _policy_logps(ctx, p)
        a = self.args
        out = simnpo_forget_loss(policy.logps, p.mask, a.npo_beta, a.simnpo_gamma, self._normalizer(counts))
        stats = torch.stack([out.loss_sum, out.sequences, policy.nll_sum, policy.mass_sum, policy.weight_sum])
        return out.loss, p.outputs, stats


class UNDIALTrainer(BaselineTrainer):
    r"""UNDIAL: self-distillation toward the base distribution with the target token's logit lowered,
    :math:`L = \frac{1}{N_f}\sum_i KL(\mathrm{softmax}(z_b(x_i) - \gamma e_{y_i}) \| \pi_\theta(\cdot|x_i))`
    (``gamma = undial_gamma``) plus the retain term. ETU tilts a fixed token set V_S by a lambda chosen to
    reach epsilon; UNDIAL tilts each position's own target token by a fixed strength."""

    method_name = "undial"

    def forget_loss(
        self,
        ctx: LossContext,
        forget: dict,
        retain: dict | None,
        counts: ScoredCounts | None,
        keep_logits: bool = False,
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        p = self._positions(ctx, forget, keep_logits)
        out = chunked_undial_loss(
            p.states,
            base_positions(ctx, forget, p.mask),
            p.targets,
            self.args.undial_gamma,
            weights=p.weights,
            forbidden_ids=p.forbidden_ids,
            student_head=p.head,
            base_head=p.base_head,
            chunk_size=ctx.chunk_size,
            normalizer=self._normalizer(counts),
            extra_ids=p.extra_ids,
        )
        stats = torch.stack([out.kl_sum, out.weight_sum, out.nll_sum, out.mass_sum, out.weight_sum])
        return out.loss, p.outputs, stats


#: The unlearning methods by name (``etu-hf unlearn --method <name>``).
UNLEARNING_METHODS: dict[str, type[ETUTrainer]] = {
    "etu": ETUTrainer,
    "ga": GradAscentTrainer,
    "graddiff": GradDiffTrainer,
    "npo": NPOBaselineTrainer,
    "simnpo": SimNPOBaselineTrainer,
    "undial": UNDIALTrainer,
}


def trainer_class(name: str) -> type[ETUTrainer]:
    """The trainer class of the method ``name`` (a key of :data:`UNLEARNING_METHODS`)."""
    if name not in UNLEARNING_METHODS:
        raise ValueError(f"--method: unknown unlearning method {name!r}; known: {', '.join(UNLEARNING_METHODS)}")
    return UNLEARNING_METHODS[name]
