r"""``TiltState``: the one owner of the facts that define the training target.

See docs/method.md, "The target: an exponential tilt". It holds:

- V_S, the forbidden set (loaded, or built from the forget and retain data: :func:`forbidden_set_for_run`);
- epsilon (:attr:`TiltState.epsilon`): ``args.epsilon``, or with ``args.epsilon_ratio = r`` the value
  :math:`\varepsilon = r\,p_S` resolved once, from the first base mass :meth:`TiltState.set_base_mass`
  records (or restored from a checkpoint by :meth:`TiltState.restore_epsilon`);
- the base mass :math:`p_S` (mean of :math:`\pi_b(S|x)` over a seeded sample of forget positions) and
  the closed-form global lambda :math:`\lambda_0 = \max(0, \mathrm{logit}(p_S) - \mathrm{logit}(\varepsilon))`;
- the controller's offset :math:`o` (stored here only; :meth:`TiltState.set_offset` clamps it);
- whether the losses feed the output head hidden states or take full logits (:attr:`TiltState.use_hidden`,
  decided by :meth:`TiltState.decide_head`).

:meth:`TiltState.tilt_spec` turns them into the :class:`~etu_hf.ops.tilt.TiltSpec` that the loss, the
held-out probe and the audit use.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from etu_hf.data.blocks import iter_batches
from etu_hf.data.words import read_forbidden_words
from etu_hf.forbidden_context import (
    build_word_forbidden_set,
    common_token_ids,
    continuation_skip_ids,
    forbidden_coverage,
    warn_low_coverage,
    word_boundary_ids,
)
from etu_hf.forbidden_set import ForbiddenSet, build_forbidden_set, resolve_forbidden_set
from etu_hf.modeling.head import probe_hidden_states
from etu_hf.ops.tilt import TiltSpec, closed_form_lambda, lambda_bounds
from etu_hf.training.config import ETUTrainingArguments, check_epsilon_reachable

logger = logging.getLogger(__name__)


class TiltState:
    """The target's state during a run: V_S, p_S, the closed-form lambda, the offset and the head mode."""

    def __init__(self, args: ETUTrainingArguments, forbidden_set: ForbiddenSet | None):
        self.args = args
        self.forbidden_set = forbidden_set
        #: Base mass on V_S and the scored positions it was measured over (set by :meth:`set_base_mass`).
        self.base_p_s: float | None = None
        self.base_p_s_positions = 0
        #: Closed-form lambda at ``base_p_s``, floored at 0 unless negative lambdas are allowed, not clamped
        #: (``TiltSpec.global_value`` applies ``lambda_max``, so a binding clamp is counted).
        self.global_lambda: float | None = None
        #: True: the losses feed final hidden states through the output head chunk by chunk; False: the
        #: model post-processes its head (e.g. logit soft-capping), so full logits are used. None: not decided.
        self.use_hidden: bool | None = None
        self._offset = 0.0
        self._ids: dict[torch.device, torch.Tensor] = {}
        #: With ``epsilon_ratio``: the resolved epsilon and the base mass it was resolved from (else None).
        self._resolved_epsilon: float | None = None
        self.epsilon_base_p_s: float | None = None

    # ------------------------------------------------------------------ epsilon
    @property
    def epsilon(self) -> float:
        """The run's target mass: ``args.epsilon``, or ``args.epsilon_ratio x p_S`` once p_S is known.

        With ``epsilon_ratio`` it is resolved by the first :meth:`set_base_mass` (at the start of training)
        and kept for the rest of the run (a resumed run restores it: :meth:`restore_epsilon`); reading it
        before then is an error, never a default.
        """
        a = self.args
        if a.epsilon_ratio is None:
            return a.epsilon
        if self._resolved_epsilon is None:
            raise ValueError(
                f"epsilon_ratio={a.epsilon_ratio}: epsilon is that share of the base mass p_S, which is estimated at "
                "the start of training; it is not known yet (train(), or audit(), estimates it)"
            )
        return self._resolved_epsilon

    @property
    def epsilon_resolved(self) -> bool:
        """False only while an ``epsilon_ratio`` waits for the base mass."""
        return self.args.epsilon_ratio is None or self._resolved_epsilon is not None

    def epsilon_record(self) -> dict[str, Any]:
        """What metrics.json and the checkpoint run state record of epsilon: the value, the ratio (or
        ``None``) and the base mass the ratio was applied to (or ``None``)."""
        return {
            "epsilon": self.epsilon,
            "epsilon_ratio": self.args.epsilon_ratio,
            "epsilon_base_p_S": self.epsilon_base_p_s,
        }

    def _resolve_epsilon(self, p_s: float) -> None:
        r = self.args.epsilon_ratio
        epsilon = r * p_s
        if not 0.0 < epsilon < 1.0:
            raise ValueError(
                f"epsilon_ratio: epsilon = {r} x the base mass on V_S ({p_s:.4g}) = {epsilon:.4g} is no target mass "
                "(the base model puts no mass on V_S at the forget positions); give an absolute --epsilon or "
                "check V_S (V_S.ids.json) against the forget data"
            )
        check_epsilon_reachable(epsilon, self.args.lambda_max)
        self._resolved_epsilon, self.epsilon_base_p_s = epsilon, p_s
        logger.info("epsilon = epsilon_ratio %g x base p_S %.4f = %.4g", r, p_s, epsilon)

    def restore_epsilon(self, record: dict[str, Any], source: str) -> None:
        """Keep the epsilon a checkpoint resolved (its run state's :meth:`epsilon_record`), so that a resumed
        run does not resolve it again from a new estimate of p_S. ``ValueError`` naming ``source`` when the
        checkpoint was trained with another ``epsilon_ratio``."""
        r = self.args.epsilon_ratio
        saved_r = record.get("epsilon_ratio")
        if r is None and saved_r is None:
            return
        if saved_r is None or r is None or float(saved_r) != float(r) or record.get("epsilon") is None:
            raise ValueError(
                f"--resume_from_checkpoint: {source} was trained with epsilon_ratio={saved_r} (epsilon "
                f"{record.get('epsilon')}); this run gives epsilon_ratio={r}. Resume with the setting it was "
                "trained with, or start afresh in another --output_dir."
            )
        self._resolved_epsilon, self.epsilon_base_p_s = float(record["epsilon"]), record.get("epsilon_base_p_S")
        logger.info("epsilon = %.4g, resolved by %s (epsilon_ratio %g)", self._resolved_epsilon, source, r)

    # ------------------------------------------------------------------ the offset
    @property
    def offset(self) -> float:
        """Added to every lambda (moved by the adaptive controller; 0 without one)."""
        return self._offset

    def offset_bounds(self) -> tuple[float, float]:
        """Range of the offset. Per-position mode: ``[0, lambda_max]`` (``[-lambda_max, lambda_max]`` with
        ``allow_negative_lambda``): at 0 every context's target is ``min(p(x), epsilon)``. Global mode keeps
        ``lambda_0 + offset`` inside the lambda clamps (so it needs :attr:`global_lambda`)."""
        a = self.args
        lower, upper = lambda_bounds(a.lambda_max, a.allow_negative_lambda)
        if a.lambda_mode != "global":
            return lower, upper
        if self.global_lambda is None:
            raise ValueError("global mode: the offset's range needs the closed-form lambda (p_S not estimated yet)")
        return lower - self.global_lambda, upper - self.global_lambda

    def set_offset(self, value: float) -> float:
        """Store the offset clamped to :meth:`offset_bounds` and return it. In global mode before p_S is
        estimated the value is kept as given and clamped by :meth:`set_base_mass`."""
        if self.args.lambda_mode == "global" and self.global_lambda is None:
            self._offset = float(value)
        else:
            lower, upper = self.offset_bounds()
            self._offset = min(max(float(value), lower), upper)
        return self._offset

    # ------------------------------------------------------------------ the target
    def tilt_spec(self) -> TiltSpec:
        """The current target: mode, epsilon, clamps, closed-form global lambda and the offset."""
        a = self.args
        return TiltSpec(
            epsilon=self.epsilon,
            mode=a.lambda_mode,
            lambda_max=a.lambda_max,
            allow_negative=a.allow_negative_lambda,
            global_lambda=self.global_lambda,
            offset=self._offset,
            lambda_floor=a.lambda_floor,
        )

    @property
    def needs_base_mass(self) -> bool:
        """Global mode without p_S yet, or an ``epsilon_ratio`` not resolved yet: the target is undefined until
        :meth:`set_base_mass`."""
        return (self.args.lambda_mode == "global" and self.global_lambda is None) or not self.epsilon_resolved

    def set_base_mass(self, p_s: float, positions: int) -> None:
        """Record p_S, resolve epsilon from it with ``epsilon_ratio`` (the first time only) and derive the
        closed-form lambda ``max(0, logit(p_S) - logit(epsilon))``."""
        a = self.args
        if not self.epsilon_resolved:
            self._resolve_epsilon(p_s)
        self.base_p_s, self.base_p_s_positions = p_s, positions
        self.global_lambda = float(closed_form_lambda(p_s, self.epsilon, None, a.allow_negative_lambda))
        self.set_offset(self._offset)  # its range in global mode is known only now
        logger.info(
            "base p_S = %.4f over %d forget positions; closed-form lambda = %.3f", p_s, positions, self.global_lambda
        )

    def forbidden_ids(self, device: torch.device) -> torch.Tensor:
        """V_S as a long tensor on ``device`` (cached)."""
        if device not in self._ids:
            self._ids[device] = self.forbidden_set.tensor(device)
        return self._ids[device]

    @property
    def extra_ids(self) -> Any:
        """The per-context extras of S(x) (:meth:`ForbiddenSet.extra_ids`), or ``None`` for one set everywhere."""
        fs = self.forbidden_set
        return fs.extra_ids if fs is not None and fs.per_context else None

    def position_extra_ids(
        self, input_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The extras of S(x) at every prediction position of a batch, flattened to ``[B*(T-1), k]`` (the layout of
        the losses' ``all_positions`` states), or ``None``."""
        fn = self.extra_ids
        extra = fn(input_ids, targets, mask) if fn is not None else None
        return None if extra is None else extra.reshape(-1, extra.shape[-1])

    def decide_head(self, model: nn.Module, batch: dict[str, Any]) -> bool:
        """Set :attr:`use_hidden` from one forward on ``batch``: hidden states when ``head(hidden)``
        reproduces the model's logits, full logits otherwise (a warning: memory then grows with |V|)."""
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.use_hidden = probe_hidden_states(model, batch)
        if not self.use_hidden:
            logger.warning(
                "the model post-processes its output head (e.g. logit soft-capping): the loss uses "
                "full logits, so memory grows with batch x length x |V|"
            )
        return self.use_hidden


def forbidden_set_for_run(
    forbidden_set: ForbiddenSet | str | list[int] | None,
    args: ETUTrainingArguments,
    vocab_size: int,
    forget: Any,
    retain: Any,
    collator: Any,
    tokenizer: Any,
) -> ForbiddenSet | None:
    """V_S of a run: ``forbidden_set`` (a ForbiddenSet, ids or a V_S.ids.json path), else
    ``args.forbidden_ids_path``, else built from the forget data against the retain data with the
    ``vs_*``/``pmi_*``/``word_*`` settings (docs/method.md, "Notation"); ``forbid_continuations`` adds the
    forget text's informative next tokens. ``None`` without any of them. Logs the share of forget positions
    whose next token S(x) holds (``parameters["coverage"]``) and warns when it is small."""
    source = "forbidden_set"
    if forbidden_set is None and args.forbidden_ids_path:
        forbidden_set, source = args.forbidden_ids_path, "--forbidden_ids_path"
    fs = resolve_forbidden_set(forbidden_set)
    tok = tokenizer if hasattr(tokenizer, "convert_ids_to_tokens") else None

    def batches(data: Any) -> Any:
        return iter_batches(data, collator, 64) if data is not None else None

    # forbid_continuations None (the default): on for a V_S built here by the words method, off for a given one
    continuations = args.forbid_continuations
    if continuations is None:
        continuations = fs is None and args.vs_method == "words"
    if fs is not None:
        fs.check_vocab(vocab_size, source, getattr(tokenizer, "pad_token_id", None))
        fs.vocab_size = fs.vocab_size or vocab_size
    elif forget is None:
        return None
    elif args.vs_method == "words" and retain is None and not args.forbidden_words and continuations:
        msg = (
            "no retain data: the forget text's words cannot be scored against a background, so S(x) holds only the "
            "forget text's own informative continuations (skipping the tokenizer's first word_common_rank x |V| ids "
            "where one makes a word alone). Pass retain data "
            "(retain_dataset= / --retain_corpora) or --forbidden_words FILE to forbid the topic's words as well."
        )
        warnings.warn(msg, stacklevel=2)
        logger.warning(msg)
        fs = ForbiddenSet(ids=[], vocab_size=vocab_size, method="words", parameters={"words": "none: no retain data"})
    elif args.vs_method == "words":
        fs = build_word_forbidden_set(
            batches(forget),
            batches(retain),
            vocab_size=vocab_size,
            tokenizer=tok,
            min_g2=args.word_min_g2,
            min_log_ratio=args.word_min_log_ratio,
            min_share=args.word_min_share,
            common_rank=args.word_common_rank,
            user_words=read_forbidden_words(args.forbidden_words, tok) if args.forbidden_words else (),
        )
    else:
        fs = build_forbidden_set(
            batches(forget),
            batches(retain),
            vocab_size=vocab_size,
            tokenizer=tok,
            method=args.vs_method,
            vs_freq_rate=args.vs_freq_rate,
            vs_abs_cap=args.vs_abs_cap,
            vocab_top_k=args.vocab_top_k,
            pmi_top_k=args.pmi_top_k,
            pmi_min_count=args.pmi_min_count,
            pmi_min_score=args.pmi_min_score,
            pmi_smoothing=args.pmi_smoothing,
            span_masking=args.span_masking,
            span_ngram_max=args.span_ngram_max,
        )
    if continuations and fs.continuations is None:
        if tok is None:
            raise ValueError(
                "forbid_continuations (on by default with vs_method='words') needs the tokenizer to tell informative "
                "tokens: pass processing_class=tokenizer, or set forbid_continuations=False"
            )
        skip = continuation_skip_ids(tok, vocab_size)
        common = common_token_ids(batches(retain), vocab_size, args.continuation_skip_top_k, args.word_common_rank)
        boundaries = word_boundary_ids(tok, vocab_size) if args.continuation_per_word else None
        common_source = "retain" if retain is not None else "tokenizer"
        fs.with_continuations(skip, args.continuation_skip_top_k, boundaries, common, common_source)
    if forget is not None:
        coverage = forbidden_coverage(fs, batches(forget))
        fs.parameters["coverage"] = coverage
        logger.info(
            "V_S (%s%s): %d shared tokens%s; S(x) holds the next token at %.2f%% of the forget positions",
            fs.method,
            " + continuations" if fs.continuations is not None else "",
            len(fs),
            f", {len(fs.words)} words" if fs.words else "",
            100 * coverage,
        )
        warn_low_coverage(coverage)
    return fs
