r"""``etu_hf.audit``: measure how well a model (usually an unlearned adapter) suppresses V_S.

On held-out forget text it measures the base and the unlearned mass on V_S (means over scored
positions), their sequence-level upper bounds, token-level Wilson bounds and bootstrap intervals over
sequences, the share of positions above epsilon, and :math:`\delta = \overline{KL(\pi_\theta \| q_\lambda)}`
with the Pinsker bound; on held-out retain text the perplexity of both (docs/method.md, "The audit and
its verdict"). Everything runs without gradients, in batches, with the output head applied chunk by
chunk, and restores the model's train/eval mode.

:func:`audit` runs the steps in order: check the inputs, measure the forget text (both models and the
tilt statistics), measure the retain text, optional activations and samples, then the report and its
files. :class:`AuditOptions` holds how it measures.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from etu_hf.artifacts.files import ACTIVATIONS_FILE, HISTOGRAM_FILE, REPORT_FILE
from etu_hf.artifacts.record import DEFAULT_AUDIT_BLOCK_SIZE
from etu_hf.data.blocks import iter_batches, tokenize_and_block
from etu_hf.evaluation.activations import activation_statistics
from etu_hf.evaluation.measures import (
    MassResult,
    PerplexityResult,
    TiltStatistics,
    evaluate_mass,
    evaluate_perplexity,
    tilt_statistic_sums,
    tilt_statistics,
)
from etu_hf.evaluation.plots import plot_activations, plot_histogram
from etu_hf.evaluation.report import AuditReport, build_report
from etu_hf.evaluation.samples import greedy_samples
from etu_hf.forbidden_set import ForbiddenSet, resolve_forbidden_set
from etu_hf.modeling.base import AdapterDisabledBase, BaseDistribution, FrozenCopyBase
from etu_hf.modeling.checks import check_causal_lm
from etu_hf.modeling.head import is_peft_model, output_vocab_size, probe_hidden_states, unwrap_model
from etu_hf.ops.chunked import DEFAULT_CHUNK_SIZE
from etu_hf.ops.tilt import TiltSpec, closed_form_lambda

logger = logging.getLogger(__name__)

#: Default cap on the held-out blocks the audit measures per corpus (about 0.5M positions at 512 tokens
#: per block, 130k at etu-hf unlearn's 128): a seeded sample of this many blocks keeps an end-of-run audit
#: in minutes whatever the size of the held-out text. ``max_sequences=None`` (``--audit_max_sequences 0``)
#: measures them all.
DEFAULT_AUDIT_MAX_SEQUENCES = 1024


@dataclasses.dataclass
class AuditOptions:
    """How :func:`audit` measures (what it audits is given to it directly).

    Args:
        collator: collates held-out rows into batches (default: pads ``input_ids``/``attention_mask``/``labels``).
        batch_size: held-out sequences per forward pass. block_size: tokens per block when the data are texts.
        chunk_size: positions per pass through the output head (``None`` or 0: all of a batch at once).
        wilson_max_n: cap on ``n`` in the token-level Wilson bounds. bootstrap_samples: resamples of sequences.
        seed: seeds the bootstrap and the ``max_sequences`` sample.
        num_samples: greedy continuations to show (0: none); max_new_tokens: their length.
        analyze_activations: per-layer hidden-state statistics (and their plot).
        progress: progress bars, one per pass over the data (each pass is also logged at INFO).
        max_sequences: measure at most this many blocks of each of forget and retain data, a seeded
            sample (default :data:`DEFAULT_AUDIT_MAX_SEQUENCES`; ``None`` or 0: all).
    """

    collator: Any = None
    batch_size: int = 8
    block_size: int = DEFAULT_AUDIT_BLOCK_SIZE
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    wilson_max_n: int = 2048
    bootstrap_samples: int = 1000
    seed: int = 0
    num_samples: int = 3
    max_new_tokens: int = 24
    analyze_activations: bool = False
    progress: bool = True
    max_sequences: int | None = DEFAULT_AUDIT_MAX_SEQUENCES

    def __post_init__(self) -> None:
        if self.max_sequences is not None and self.max_sequences < 0:
            raise ValueError(f"max_sequences: must be >= 0 or None (got {self.max_sequences})")

    @classmethod
    def from_object(cls, obj: Any, **overrides: Any) -> AuditOptions:
        """Options read from the attributes of ``obj`` that are named like a field (e.g. parsed command-line
        arguments), then ``overrides``; fields ``obj`` lacks keep their defaults."""
        found = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if hasattr(obj, f.name)}
        return cls(**{**found, **overrides})

    def updated(self, **overrides: Any) -> AuditOptions:
        """A copy with ``overrides``; a name that is not an option is a ``TypeError`` naming it."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"audit() got unknown option(s) {', '.join(unknown)}; see AuditOptions")
        return dataclasses.replace(self, **overrides)


def audit_tilt(tilt: TiltSpec | float | torch.Tensor | None, epsilon: float | None = None) -> TiltSpec:
    """The audit's target as a :class:`~etu_hf.ops.tilt.TiltSpec`.

    ``tilt`` is a TiltSpec, or a float (a 0-dim tensor too) that is epsilon with the default tilt (the exact
    per-position tilt, :func:`~etu_hf.ops.tilt.per_position_lambda`). ``epsilon`` is an alias kept for
    callers that name it: alone it means ``tilt=epsilon``; beside a TiltSpec it must equal its epsilon.
    """
    if isinstance(tilt, torch.Tensor):
        if tilt.dim() > 0:
            raise ValueError("tilt: the audit takes a TiltSpec or epsilon, not per-position lambdas")
        tilt = float(tilt)
    if tilt is None and epsilon is None:
        raise ValueError("audit needs the target: tilt= (a TiltSpec, or epsilon as a float) or epsilon=")
    if tilt is None or isinstance(tilt, (int, float)):
        value = float(tilt if tilt is not None else epsilon)
        if epsilon is not None and value != float(epsilon):
            raise ValueError(f"tilt={value} and epsilon={epsilon} disagree: give one of them")
        tilt = TiltSpec(epsilon=value)
    elif not isinstance(tilt, TiltSpec):
        raise TypeError(f"tilt: expected a TiltSpec or a float (epsilon), got {type(tilt).__name__}")
    elif epsilon is not None and float(epsilon) != tilt.epsilon:
        raise ValueError(f"epsilon={epsilon} disagrees with the tilt's epsilon {tilt.epsilon}: give one of them")
    if not 0.0 < tilt.epsilon < 1.0:
        raise ValueError(f"epsilon: must be strictly between 0 and 1 (got {tilt.epsilon})")
    return tilt


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


def audit(
    model: nn.Module,
    forget_data: Any,
    forbidden_set: ForbiddenSet | str | Sequence[int],
    tilt: TiltSpec | float | None = None,
    *,
    epsilon: float | None = None,
    base: BaseDistribution | nn.Module | None = None,
    retain_data: Any = None,
    tokenizer: Any = None,
    output_dir: str | None = None,
    overwrite: bool = False,
    sources: dict[str, Any] | None = None,
    options: AuditOptions | None = None,
    **option_overrides: Any,
) -> AuditReport:
    """Audit ``model`` on held-out data; write the report files to ``output_dir`` when given.

    Args:
        model: the unlearned model: a ``PeftModel`` (its base is the same model with adapters
            disabled) or a plain/merged model together with ``base``.
        forget_data, retain_data: held-out data: datasets of token blocks (``input_ids``,
            ``attention_mask``, ``labels``) or lists of texts (tokenized with ``tokenizer`` into
            ``block_size`` blocks). Never the training data.
        forbidden_set: V_S (a :class:`~etu_hf.ForbiddenSet`, a path to V_S.ids.json or a list of ids).
        tilt: the target: a :class:`~etu_hf.ops.tilt.TiltSpec` (the run's tilt, used for ``delta``), or a
            float, epsilon with the exact per-position tilt (:func:`audit_tilt`). ``epsilon=`` is an alias
            that must agree with the tilt.
        base: the base model or :class:`~etu_hf.modeling.base.BaseDistribution` (default: adapters disabled).
        overwrite: allow replacing an existing ``suppression_report.json`` in ``output_dir``.
        sources: where the models and data came from, copied into the report.
        options, option_overrides: how to measure: an :class:`AuditOptions` and/or its fields as keywords
            (``batch_size=``, ``chunk_size=``, ``num_samples=``, ``max_sequences=``, ...).
    """
    start = time.time()
    tilt = audit_tilt(tilt, epsilon)
    opts = (options or AuditOptions()).updated(**option_overrides)
    fs, vocab = _check_inputs(model, forbidden_set, output_dir, overwrite)
    forget, retain = _held_out(forget_data, retain_data, tokenizer, opts)
    base_dist = resolve_base(model, base)

    def batches(data: Any, desc: str) -> Any:
        logger.info("%s: %d batches (%.0f s into the audit)", desc, _n_batches(data, opts), time.time() - start)
        return _progress(
            iter_batches(data, opts.collator, opts.batch_size), _n_batches(data, opts), desc, opts.progress
        )

    S = fs.tensor(next(model.parameters()).device)
    extra = fs.extra_ids if fs.per_context else None
    updated, base_mass, tilt, stats = measure_forget(model, base_dist, forget, S, tilt, opts, batches, extra)
    ppl_updated, ppl_base = (
        measure_retain(model, base_dist, retain, opts, batches) if retain is not None else (None, None)
    )
    activations = None
    if opts.analyze_activations:
        activations = {
            name: activation_statistics(model, base_dist.as_model, batches(data, "audit: activations"))
            for name, data in (("forget", forget), ("retain", retain))
            if data is not None
        }
    report = build_report(fs, vocab, tilt, opts, updated, base_mass, stats, ppl_updated, ppl_base)
    report.retain_sequences = len(retain) if retain is not None else None
    report.activations = activations
    report.sources = dict(sources or {})
    report.samples = greedy_samples(
        model, base_dist, forget, tokenizer, opts.num_samples, max_new_tokens=opts.max_new_tokens
    )
    if output_dir:
        _write_plots(report, output_dir, base_mass, updated)
    report.seconds = time.time() - start
    if output_dir:
        report.save(output_dir)
    return report


def _n_batches(data: Any, opts: AuditOptions) -> int:
    return -(-len(data) // opts.batch_size)


def _check_inputs(
    model: nn.Module, forbidden_set: ForbiddenSet | str | Sequence[int], output_dir: str | None, overwrite: bool
) -> tuple[ForbiddenSet, int]:
    """Step 1: the model is a causal LM, V_S fits its vocabulary, ``output_dir`` may be written."""
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
    return fs, vocab


def _held_out(forget_data: Any, retain_data: Any, tokenizer: Any, opts: AuditOptions) -> tuple[Any, Any]:
    """Step 2: the held-out data as token blocks, each a seeded sample of at most ``max_sequences``."""
    forget = _as_dataset(forget_data, tokenizer, opts.block_size, "forget_data (held-out forget text)")
    if forget is None:
        raise ValueError("forget_data (held-out forget text) is missing: the audit needs held-out forget data")
    retain = _as_dataset(retain_data, tokenizer, opts.block_size, "retain_data (held-out retain text)")
    forget = cap_sequences(forget, opts.max_sequences, opts.seed, "forget_data")
    if retain is not None:
        retain = cap_sequences(retain, opts.max_sequences, opts.seed, "retain_data")
    return forget, retain


def measure_forget(
    model: nn.Module,
    base: BaseDistribution,
    forget: Any,
    forbidden_ids: torch.Tensor,
    tilt: TiltSpec,
    opts: AuditOptions,
    batches: Any,
    extra_ids: Any = None,
) -> tuple[MassResult, MassResult, TiltSpec, TiltStatistics]:
    """Step 3: the unlearned and the base mass on S(x) (every position kept, for the histogram) and the
    statistics against the tilted target. A global tilt without its lambda gets the closed form at
    the measured base mass. ``extra_ids``: the per-context extras of S(x)
    (:data:`~etu_hf.evaluation.measures.ExtraIdsFn`). Returns ``(updated, base, tilt, statistics)``."""
    logger.info("auditing on %d held-out forget sequences (%d batches)", len(forget), _n_batches(forget, opts))
    use_hidden = probe_hidden_states(model, next(iter(iter_batches(forget, opts.collator, opts.batch_size))))
    chunk = opts.chunk_size
    kw = {"chunk_size": chunk, "keep_positions": True, "extra_ids": extra_ids}
    updated = evaluate_mass(model, batches(forget, "audit: unlearned mass"), forbidden_ids, **kw)
    with base.as_model() as bm:
        base_mass = evaluate_mass(bm, batches(forget, "audit: base mass"), forbidden_ids, **kw)
    if tilt.mode == "global" and tilt.global_lambda is None:  # not from a run: the closed form at the base mass
        lam0 = closed_form_lambda(base_mass.mean, tilt.epsilon, tilt.lambda_max, tilt.allow_negative)
        tilt = dataclasses.replace(tilt, global_lambda=float(lam0))
    sums, per_seq = tilt_statistic_sums(
        unwrap_model(model),
        base,
        batches(forget, "audit: delta"),
        forbidden_ids,
        tilt,
        chunk_size=chunk,
        use_hidden=use_hidden,
        extra_ids=extra_ids,
    )
    return updated, base_mass, tilt, tilt_statistics(sums, per_seq)


def measure_retain(
    model: nn.Module, base: BaseDistribution, retain: Any, opts: AuditOptions, batches: Any
) -> tuple[PerplexityResult, PerplexityResult]:
    """Step 4: perplexity of the unlearned and the base model on held-out retain text: ``(updated, base)``."""
    updated = evaluate_perplexity(model, batches(retain, "audit: unlearned perplexity"), chunk_size=opts.chunk_size)
    with base.as_model() as bm:
        return updated, evaluate_perplexity(bm, batches(retain, "audit: base perplexity"), chunk_size=opts.chunk_size)


def _write_plots(report: AuditReport, output_dir: str, base: MassResult, updated: MassResult) -> None:
    """Step 6: the histogram of per-position masses and the activation plot (need matplotlib)."""
    os.makedirs(output_dir, exist_ok=True)
    hist = os.path.join(output_dir, HISTOGRAM_FILE)
    if plot_histogram(np.asarray(base.positions), np.asarray(updated.positions), report.epsilon, hist):
        report.files["histogram"] = HISTOGRAM_FILE
    else:
        logger.warning("matplotlib is not installed: skipped %s (pip install matplotlib)", HISTOGRAM_FILE)
    if report.activations and plot_activations(report.activations, os.path.join(output_dir, ACTIVATIONS_FILE)):
        report.files["activations"] = ACTIVATIONS_FILE
