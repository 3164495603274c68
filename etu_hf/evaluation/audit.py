r"""``etu_hf.audit``: measure how well a model (usually an unlearned adapter) suppresses V_S.

On held-out forget text it measures the base and the unlearned mass on V_S (means over scored
positions), their Wilson upper bounds and bootstrap intervals over sequences, the share of positions
above epsilon, and :math:`\delta = \overline{KL(\pi_\theta \| q_\lambda)}` with the Pinsker bound; on
held-out retain text the perplexity of both. Everything runs without gradients, in batches, with the
output head applied chunk by chunk, and restores the model's train/eval mode.
"""

from __future__ import annotations

import logging as _logging_for_logger
import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from etu_hf.data.blocks import iter_batches, tokenize_and_block
from etu_hf.evaluation.activations import activation_statistics
from etu_hf.evaluation.measures import evaluate_mass, evaluate_perplexity, tilt_statistic_sums, tilt_statistics
from etu_hf.evaluation.plots import plot_activations, plot_histogram
from etu_hf.evaluation.report import ACTIVATIONS_FILE, HISTOGRAM_FILE, REPORT_FILE, AuditReport
from etu_hf.forbidden_set import ForbiddenSet, resolve_forbidden_set
from etu_hf.modeling.base import AdapterDisabledBase, BaseDistribution, FrozenCopyBase
from etu_hf.modeling.checks import check_causal_lm
from etu_hf.modeling.head import (
    eval_mode,
    head_matches_logits,
    is_peft_model,
    output_head,
    output_vocab_size,
    unwrap_model,
)
from etu_hf.ops.bounds import bootstrap_ratio_interval, pinsker_slack, sequence_upper_bound, wilson_upper
from etu_hf.ops.tilt import TiltSpec, closed_form_lambda

logger = _logging_for_logger.getLogger(__name__)

#: Default cap on the held-out blocks the audit measures per corpus (about 0.5M positions at 512 tokens
#: per block): a seeded sample of this many blocks keeps an end-of-run audit in minutes whatever the
#: size of the held-out text. ``max_sequences=None`` (``--audit_max_sequences 0``) measures them all.
DEFAULT_AUDIT_MAX_SEQUENCES = 1024


def resolve_base(model: nn.Module, base: BaseDistribution | nn.Module | None) -> BaseDistribution:
    """The base distribution to compare against: the PEFT model with adapters disabled by default, a
    given base model, or a given :class:`~etu_hf.modeling.base.BaseDistribution`."""
    if isinstance(base, BaseDistribution):
        return base
    if base is not None:
        check_causal_lm(base)
        return FrozenCopyBase(base, copy_model=False)
    if is_peft_model(model):
        return AdapterDisabledBase(model)
    raise ValueError(
        "no base model to compare with: the model has no PEFT adapter to disable, so pass base= (the model before "
        "unlearning); from the command line, --model_name_or_path BASE with --adapter UNLEARNED"
    )


def _as_dataset(data: Any, tokenizer: Any, block_size: int, name: str) -> Any:
    if data is None:
        return None
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], str):
        if tokenizer is None:
            raise ValueError(f"{name} is a list of texts: pass tokenizer= to tokenize it")
        data = tokenize_and_block(list(data), tokenizer, block_size)
    if len(data) == 0:
        raise ValueError(f"{name} is empty: the audit needs held-out text")
    return data


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def cap_sequences(data: Any, max_sequences: int | None, seed: int, name: str) -> Any:
    """``data`` itself, or a seeded random sample of ``max_sequences`` of its blocks (in their order).

    A sample rather than the first blocks, so that every held-out document can be drawn: long documents
    are cut into blocks like training data, and one huge document would otherwise fill the cap.
    """
    if not max_sequences or len(data) <= max_sequences:
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=max_sequences, replace=False)).tolist()
    logger.info("audit: %s: a seeded sample of %d of its %d blocks (max_sequences)", name, max_sequences, len(data))
    if hasattr(data, "select"):
        return data.select(idx)
    return torch.utils.data.Subset(data, idx)


@torch.no_grad()
def greedy_samples(
    model: nn.Module,
    base: BaseDistribution,
    dataset: Any,
    tokenizer: Any,
    num: int = 3,
    prompt_tokens: int = 16,
    max_new_tokens: int = 24,
) -> list[dict[str, str]]:
    """Greedy continuations of the first ``prompt_tokens`` tokens of ``num`` held-out forget sequences,
    by the base and the unlearned model. An illustration: tiny models repeat themselves."""
    if tokenizer is None or num <= 0:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(min(num, len(dataset))):
        item = dataset[i]
        ids = [
            t
            for t, a in zip(item["input_ids"], item.get("attention_mask") or [1] * len(item["input_ids"]), strict=True)
            if a
        ][:prompt_tokens]
        if len(ids) < 2:
            continue
        prompt = torch.tensor([ids], device=device)
        kwargs = dict(
            attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        texts = {}
        with base.as_model() as bm, eval_mode(bm):
            texts["base"] = bm.generate(prompt.to(next(bm.parameters()).device), **kwargs)[0, len(ids) :]
        with eval_mode(model):
            texts["updated"] = model.generate(input_ids=prompt, **kwargs)[0, len(ids) :]
        out.append(
            {
                "prompt": tokenizer.decode(ids),
                **{k: tokenizer.decode(v, skip_special_tokens=True) for k, v in texts.items()},
            }
        )
    return out


def audit(
    model: nn.Module,
    forget_data: Any,
    forbidden_set: ForbiddenSet | str | Sequence[int],
    *,
    epsilon: float,
    base: BaseDistribution | nn.Module | None = None,
    retain_data: Any = None,
    tokenizer: Any = None,
    tilt: TiltSpec | None = None,
    collator: Any = None,
    batch_size: int = 8,
    block_size: int = 512,
    chunk_size: int = 1024,
    wilson_max_n: int = 2048,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    num_samples: int = 3,
    max_new_tokens: int = 24,
    analyze_activations: bool = False,
    output_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    sources: dict[str, Any] | None = None,
    max_sequences: int | None = DEFAULT_AUDIT_MAX_SEQUENCES,
) -> AuditReport:
    """Audit ``model`` on held-out data; write the report files to ``output_dir`` when given.

    Args:
        model: the unlearned model: a ``PeftModel`` (its base is the same model with adapters
            disabled) or a plain/merged model together with ``base``.
        forget_data, retain_data: held-out data: datasets of token blocks (``input_ids``,
            ``attention_mask``, ``labels``) or lists of texts (tokenized with ``tokenizer`` into
            ``block_size`` blocks). Never the training data.
        forbidden_set: V_S (a :class:`~etu_hf.ForbiddenSet`, a path to V_S.ids.json or a list of ids).
        epsilon: the target mass.
        base: the base model or :class:`~etu_hf.modeling.base.BaseDistribution` (default: adapters disabled).
        tilt: the target used for ``delta`` (default: the exact per-position tilt at ``epsilon``).
        wilson_max_n: cap on ``n`` in the Wilson bounds. bootstrap_samples: resamples of sequences.
        num_samples: greedy continuations to show (0: none). analyze_activations: per-layer statistics.
        overwrite: allow replacing an existing ``suppression_report.json`` in ``output_dir``.
        progress: progress bars, one per pass over the data (each pass is also logged at INFO).
        max_sequences: measure at most this many blocks of each of forget_data and retain_data, a
            seeded sample (default :data:`DEFAULT_AUDIT_MAX_SEQUENCES`; ``None`` or 0: all).
    """
    start = time.time()
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon: must be strictly between 0 and 1 (got {epsilon})")
    check_causal_lm(model)
    vocab = output_vocab_size(model)
    fs = resolve_forbidden_set(forbidden_set)
    if fs is None:
        raise ValueError("forbidden_set: the audit needs V_S (V_S.ids.json, a ForbiddenSet or a list of ids)")
    fs.check_vocab(vocab, "forbidden set (--forbidden)")
    if output_dir and not overwrite and os.path.exists(os.path.join(output_dir, REPORT_FILE)):
        raise ValueError(
            f"{output_dir} already holds {REPORT_FILE}; nothing was written. Pass --overwrite_output_dir "
            "(overwrite=True) or choose another --output_dir."
        )
    forget = _as_dataset(forget_data, tokenizer, block_size, "forget_data (held-out forget text)")
    if forget is None:
        raise ValueError("forget_data (held-out forget text) is missing: the audit needs held-out forget data")
    retain = _as_dataset(retain_data, tokenizer, block_size, "retain_data (held-out retain text)")
    if max_sequences is not None and max_sequences < 0:
        raise ValueError(f"max_sequences: must be >= 0 or None (got {max_sequences})")
    forget = cap_sequences(forget, max_sequences, seed, "forget_data")
    if retain is not None:
        retain = cap_sequences(retain, max_sequences, seed, "retain_data")
    base_dist = resolve_base(model, base)
    tilt = tilt or TiltSpec(epsilon=epsilon)
    device = next(model.parameters()).device
    S = fs.tensor(device)
    n_batches = -(-len(forget) // batch_size)

    def batches(data: Any, desc: str) -> Any:
        total = -(-len(data) // batch_size)
        logger.info("%s: %d batches (%.0f s into the audit)", desc, total, time.time() - start)
        return _progress(iter_batches(data, collator, batch_size), total, desc, progress)

    first = next(iter(iter_batches(forget, collator, batch_size)))
    use_hidden = head_matches_logits(
        unwrap_model(model), output_head(model), {k: v.to(device) for k, v in first.items()}
    )

    logger.info("auditing on %d held-out forget sequences (%d batches)", len(forget), n_batches)
    updated = evaluate_mass(
        model, batches(forget, "audit: unlearned mass"), S, chunk_size=chunk_size, keep_positions=True
    )
    with base_dist.as_model() as bm:
        base_mass = evaluate_mass(
            bm, batches(forget, "audit: base mass"), S, chunk_size=chunk_size, keep_positions=True
        )
    if tilt.mode == "global" and tilt.global_lambda is None:  # not from a run: the closed form at the base mass
        lam0 = closed_form_lambda(base_mass.mean, epsilon, tilt.lambda_max, tilt.allow_negative)
        tilt = replace(tilt, global_lambda=float(lam0))
    sums, per_seq = tilt_statistic_sums(
        unwrap_model(model),
        base_dist,
        batches(forget, "audit: delta"),
        S,
        tilt,
        chunk_size=chunk_size,
        use_hidden=use_hidden,
    )
    stats = tilt_statistics(sums, per_seq)

    ppl_base = ppl_updated = None
    if retain is not None:
        ppl_updated = evaluate_perplexity(model, batches(retain, "audit: unlearned perplexity"), chunk_size=chunk_size)
        with base_dist.as_model() as bm:
            ppl_base = evaluate_perplexity(bm, batches(retain, "audit: base perplexity"), chunk_size=chunk_size)

    n_wilson = min(updated.n_positions, wilson_max_n)
    updated_bound = sequence_upper_bound(updated.sequence_sums, updated.sequence_counts, seed=seed)
    base_bound = sequence_upper_bound(base_mass.sequence_sums, base_mass.sequence_counts, seed=seed)
    slack = pinsker_slack(stats.delta)
    activations = None
    if analyze_activations:
        activations = {
            "forget": activation_statistics(model, base_dist.as_model, batches(forget, "audit: activations"))
        }
        if retain is not None:
            activations["retain"] = activation_statistics(
                model, base_dist.as_model, batches(retain, "audit: activations")
            )
    samples = greedy_samples(model, base_dist, forget, tokenizer, num_samples, max_new_tokens=max_new_tokens)

    report = AuditReport(
        epsilon=epsilon,
        V_S_size=len(fs),
        V_S_fraction=len(fs) / vocab,
        vocab_size=vocab,
        forget_sequences=updated.n_sequences,
        forget_positions=updated.n_positions,
        base_p_S=base_mass.mean,
        updated_p_S=updated.mean,
        base_p_S_upper=base_bound.upper,
        updated_p_S_upper=updated_bound.upper,
        upper_bound=updated_bound.to_dict(),
        base_p_S_token_wilson_upper=wilson_upper(base_mass.mean, n_wilson),
        updated_p_S_token_wilson_upper=wilson_upper(updated.mean, n_wilson),
        token_wilson_n=n_wilson,
        wilson_max_n=wilson_max_n,
        base_p_S_bootstrap_95=bootstrap_ratio_interval(
            base_mass.sequence_sums, base_mass.sequence_counts, bootstrap_samples, seed
        ),
        updated_p_S_bootstrap_95=bootstrap_ratio_interval(
            updated.sequence_sums, updated.sequence_counts, bootstrap_samples, seed
        ),
        bootstrap_samples=bootstrap_samples,
        suppression_ratio=updated.mean / base_mass.mean if base_mass.mean > 0 else math.nan,
        delta=stats.delta,
        mean_target_mass=stats.mean_target_mass,
        pinsker_bound=epsilon + slack,
        pinsker_bound_from_target=stats.mean_target_mass + slack,
        share_above_epsilon_base=base_mass.share_above(epsilon),
        share_above_epsilon_updated=updated.share_above(epsilon),
        retain_sequences=len(retain) if retain is not None else None,
        retain_positions=ppl_updated.n_positions if ppl_updated else None,
        base_perplexity=ppl_base.perplexity if ppl_base else None,
        updated_perplexity=ppl_updated.perplexity if ppl_updated else None,
        perplexity_ratio=ppl_updated.perplexity / ppl_base.perplexity if ppl_base else None,
        target_achieved=bool(updated.mean <= epsilon),
        target_achieved_upper=bool(updated_bound.upper <= epsilon),
        clamped_share=stats.clamped_share,
        tilt={
            "mode": tilt.mode,
            "epsilon": tilt.epsilon,
            "lambda_max": tilt.lambda_max,
            "allow_negative": tilt.allow_negative,
            "global_lambda": tilt.global_lambda,
            "offset": tilt.offset,
            "effective_epsilon": tilt.effective_epsilon if tilt.mode == "per_position" else None,
        },
        seconds=0.0,
        samples=samples,
        activations=activations,
        sources=dict(sources or {}),
    )
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        if plot_histogram(
            np.asarray(base_mass.positions),
            np.asarray(updated.positions),
            epsilon,
            os.path.join(output_dir, HISTOGRAM_FILE),
        ):
            report.files["histogram"] = HISTOGRAM_FILE
        else:
            logger.warning("matplotlib is not installed: skipped %s (pip install 'etu-hf[plot]')", HISTOGRAM_FILE)
        if activations and plot_activations(activations, os.path.join(output_dir, ACTIVATIONS_FILE)):
            report.files["activations"] = ACTIVATIONS_FILE
    report.seconds = time.time() - start
    if output_dir:
        report.save(output_dir)
    return report
