"""The checks of :class:`~etu_hf.ETUTrainingArguments`' own settings (its ``__post_init__`` runs them), each error
naming the flag and the fix before anything is loaded or written (docs/bad_inputs.md)."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from etu_hf.artifacts.record import DEFAULT_EPSILON
from etu_hf.ops.tilt import DEFAULT_LAMBDA_MAX


def check_etu_arguments(args: Any) -> None:
    """The ETU settings of ``args`` (an :class:`~etu_hf.ETUTrainingArguments`), in ``__post_init__``: each bad value
    is a ``ValueError`` naming the flag and the fix; without ``--epsilon`` or ``--epsilon_ratio``, epsilon becomes
    :data:`~etu_hf.artifacts.record.DEFAULT_EPSILON`."""

    def fail(name: str, message: str) -> None:
        raise ValueError(f"{name}: {message} (got {getattr(args, name)!r})")

    if args.epsilon_ratio is not None:
        if not 0.0 < args.epsilon_ratio < 1.0:
            fail("epsilon_ratio", "must be strictly between 0 and 1 (epsilon = r x the base mass p_S), e.g. 0.25")
        if args.epsilon is not None:
            raise ValueError(
                f"epsilon_ratio: give --epsilon_ratio (epsilon = r x the base mass) or --epsilon (an absolute "
                f"mass), not both (got epsilon_ratio={args.epsilon_ratio!r} and epsilon={args.epsilon!r})"
            )
    elif args.epsilon is None:
        args.epsilon = DEFAULT_EPSILON
    if args.epsilon is not None and not 0.0 < args.epsilon < 1.0:
        fail("epsilon", "must be strictly between 0 and 1, e.g. 0.05")
    if not (math.isfinite(args.lambda_max) and args.lambda_max > 0):
        fail("lambda_max", f"must be finite and > 0, e.g. {DEFAULT_LAMBDA_MAX}")
    if not (math.isfinite(args.lambda_floor) and 0.0 <= args.lambda_floor < args.lambda_max):
        fail("lambda_floor", f"must be in [0, lambda_max={args.lambda_max!r}), e.g. 2.0 (0: no floor)")
    if args.lambda_floor > 0 and args.allow_negative_lambda:
        fail("lambda_floor", "a floor above 0 contradicts --allow_negative_lambda; leave one of them out")
    if args.lambda_mode not in ("per_position", "global"):
        fail("lambda_mode", "must be 'per_position' or 'global'")
    if args.epsilon is not None:  # with epsilon_ratio, checked once epsilon is resolved (TiltState)
        check_epsilon_reachable(args.epsilon, args.lambda_max)
    if args.p_s_sample_size < 1:
        fail("p_s_sample_size", "must be >= 1")
    if args.vs_method not in ("words", "pmi", "frequency"):
        fail("vs_method", "must be 'words', 'pmi' or 'frequency'")
    if args.word_min_g2 < 0:
        fail("word_min_g2", "must be >= 0, e.g. 10.83 (p < 0.001)")
    if not math.isfinite(args.word_min_log_ratio):
        fail("word_min_log_ratio", "must be a finite number of nats, e.g. 1.0")
    if not 0.0 <= args.word_min_share <= 1.0:
        fail("word_min_share", "must be in [0, 1], e.g. 0.5")
    if not 0.0 <= args.word_common_rank <= 1.0:
        fail("word_common_rank", "must be in [0, 1], e.g. 0.125 (0: keep everyday words)")
    if args.forbidden_words is not None:
        if args.vs_method != "words":
            fail("forbidden_words", "needs --vs_method words (the words are merged with the scored words)")
        if not os.path.isfile(args.forbidden_words):
            fail("forbidden_words", "no such file; give a text file with one word per line")
    if args.continuation_skip_top_k < 0:
        fail("continuation_skip_top_k", "must be >= 0")
    if not 0.0 < args.vs_freq_rate <= 1.0:
        fail("vs_freq_rate", "must be in (0, 1]")
    if args.vs_abs_cap < 1:
        fail("vs_abs_cap", "must be >= 1")
    if args.vocab_top_k is not None and args.vocab_top_k < 1:
        fail("vocab_top_k", "must be >= 1 or unset")
    if args.pmi_top_k < 1:
        fail("pmi_top_k", "must be >= 1")
    if args.pmi_min_count < 1:
        fail("pmi_min_count", "must be >= 1")
    if args.pmi_min_score < 0:
        fail("pmi_min_score", "must be >= 0 (nats), e.g. 1.0")
    if args.pmi_smoothing <= 0:
        fail("pmi_smoothing", "must be > 0")
    if args.forbidden_ids_path is not None and not os.path.exists(args.forbidden_ids_path):
        fail("forbidden_ids_path", "does not exist; give a V_S.ids.json file or a folder holding one")
    if args.span_ngram_max < 2:
        fail("span_ngram_max", "must be >= 2")
    if args.retain_weight < 0:
        fail("retain_weight", "must be >= 0")
    for name in ("seed", "data_seed"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < 2**32:
            fail(name, "must be in [0, 2**32) (numpy and torch take seeds there), e.g. 42")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        fail(
            "num_train_epochs",
            "with max_steps <= 0 it trains 0 steps: give --max_steps N or --num_train_epochs > 0",
        )
    if args.retain_loss_type not in ("nll", "kl"):
        fail("retain_loss_type", "must be 'nll' or 'kl'")
    if args.loss_chunk_size < 0:
        fail("loss_chunk_size", "must be >= 0 (0 = unchunked)")
    if args.lambda_update_freq is not None and args.lambda_update_freq < 1:
        fail("lambda_update_freq", "must be >= 1 (optimiser steps between lambda updates)")
    if not (math.isfinite(args.lambda_eta) and args.lambda_eta > 0):
        fail("lambda_eta", "must be finite and > 0, e.g. 1.0")
    if not (math.isfinite(args.lambda_band) and args.lambda_band > 0):
        fail("lambda_band", "must be finite and > 0 (logit units), e.g. 0.5")
    if not (math.isfinite(args.lambda_step_max) and args.lambda_step_max > 0):
        fail("lambda_step_max", "must be finite and > 0, e.g. 2.0")
    if not (math.isfinite(args.lambda_min_response) and args.lambda_min_response >= 0):
        fail("lambda_min_response", "must be finite and >= 0 (0: the controller never stalls), e.g. 0.1")
    if args.wilson_max_n < 1:
        fail("wilson_max_n", "must be >= 1")
    if args.stop_when_certified < 0:
        fail("stop_when_certified", "must be >= 0 (0: never stop early)")
    if args.heldout_batches < 1:
        fail("heldout_batches", "must be >= 1")
    if not 0.0 < args.heldout_max_share <= 1.0:  # nan fails this comparison too
        fail("heldout_max_share", "must be in (0, 1] (1: no cap), e.g. 0.25")
    if args.preference_weight < 0:
        fail("preference_weight", "must be >= 0 (0 turns preference refinement off)")
    if args.pref_beta <= 0:
        fail("pref_beta", "must be > 0, e.g. 0.1")
    if args.pref_every < 1:
        fail("pref_every", "must be >= 1")
    if args.pref_prompt_tokens < 1:
        fail("pref_prompt_tokens", "must be >= 1")
    if args.pref_format not in ("npo", "simnpo", "dpo"):
        fail("pref_format", "must be 'npo', 'simnpo' or 'dpo'")
    if args.pref_chosen not in ("refusal", "retain", "data"):
        fail("pref_chosen", "must be 'refusal', 'retain' or 'data'")
    if args.pref_chosen == "refusal" and not any(r.strip() for r in args.pref_refusals):
        fail("pref_refusals", "is empty: give at least one refusal, or another --pref_chosen")
    if args.heldout_fraction is not None and not 0.0 < args.heldout_fraction < 1.0:
        fail("heldout_fraction", "must be in (0, 1) or unset")


#: A warning when contexts above this base mass on V_S cannot be tilted down to epsilon.
REACHABLE_MASS_WARN = 0.999


def check_epsilon_reachable(epsilon: float, lambda_max: float) -> None:
    """Refuse an epsilon no lambda within the clamp can reach; warn when high-mass contexts miss it.

    A context whose base mass on V_S is ``p`` reaches epsilon at ``lambda = logit(p) - logit(epsilon)``.
    Even ``p = 0.5`` needs ``-logit(epsilon)``: above ``lambda_max`` the target is unreachable almost
    everywhere, so it is refused. Otherwise contexts with ``p > sigmoid(lambda_max + logit(epsilon))``
    stay above epsilon; a warning says so when that threshold is below :data:`REACHABLE_MASS_WARN`.
    """
    if not (0.0 < epsilon < 1.0 and math.isfinite(lambda_max) and lambda_max > 0):
        return  # reported by the range checks
    needed = math.log1p(-epsilon) - math.log(epsilon)  # -logit(epsilon)
    if needed > lambda_max:
        raise ValueError(
            f"epsilon: {epsilon!r} is unreachable with lambda_max={lambda_max!r}: even a context whose base mass on "
            f"V_S is 0.5 needs lambda = -logit(epsilon) = {needed:.1f}. Raise --lambda_max above {math.ceil(needed)} "
            "or raise --epsilon."
        )
    headroom = lambda_max - needed
    if headroom < math.log(REACHABLE_MASS_WARN / (1 - REACHABLE_MASS_WARN)):
        p_max = 1.0 / (1.0 + math.exp(-headroom))
        warnings.warn(
            f"epsilon={epsilon!r} with lambda_max={lambda_max!r}: contexts whose base mass on V_S exceeds {p_max:.3f} "
            f"cannot be tilted down to epsilon (they need lambda > lambda_max). Raise --lambda_max to "
            f"{math.ceil(needed + math.log(REACHABLE_MASS_WARN / (1 - REACHABLE_MASS_WARN)))} or more to reach "
            f"contexts up to {REACHABLE_MASS_WARN}.",
            UserWarning,
            stacklevel=4,
        )
