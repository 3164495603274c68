"""Evaluate a model on a question/answer unlearning benchmark: :func:`evaluate_benchmark`, the reusable
:class:`BenchmarkEvaluator` (tokenizes once; the trainer calls it every evaluation) and the result,
:class:`UnlearningEval` (EVAL.json).

The metrics are the field's (TOFU, MUSE, open-unlearning; :mod:`~etu_hf.evaluation.unlearning.registry`),
plus ETU's mass on V_S; docs/evaluation.md defines each and the EVAL.json schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from etu_hf.artifacts.files import write_json
from etu_hf.benchmark.qa import COLUMNS, SPLITS
from etu_hf.evaluation.unlearning import scores as S
from etu_hf.evaluation.unlearning.metrics import MIN_K_FRACTION
from etu_hf.evaluation.unlearning.registry import (
    AGGREGATES,
    METRICS,
    MIA_ATTACKS,
    Metric,
    needed_passes,
    resolve_metrics,
)
from etu_hf.evaluation.unlearning.scores import STATS_CHUNK_SIZE
from etu_hf.forbidden_set import ForbiddenSet, resolve_forbidden_set
from etu_hf.modeling.head import eval_mode, output_vocab_size, probe_hidden_states

logger = logging.getLogger(__name__)

#: The file :meth:`UnlearningEval.save` writes in a folder.
EVAL_FILE = "EVAL.json"
FORMAT_NAME = "etu-hf/unlearning-eval"
FORMAT_VERSION = 1

NO_REFERENCE = (
    "needs the retain model's evaluation (etu-hf eval: --retain_model or --reference_eval; Python: reference=)"
)
NO_FORBIDDEN_SET = "needs V_S (etu-hf eval: --forbidden_ids_path or a run folder as --adapter; Python: forbidden_set=)"


@dataclass
class UnlearningEval:
    """The result of :func:`evaluate_benchmark`.

    ``aggregates``: flat ``{name: value}`` (``None`` where a metric could not be computed; ``notes[name]`` says
    why); ``per_example``: ``{split: {column: [one value per row]}}``, the rows in the benchmark's order;
    ``settings``: the metric definitions, k, batch size, versions, the benchmark (name, settings, fingerprint,
    sizes) and the model's name. Saved as EVAL.json (docs/evaluation.md).
    """

    aggregates: dict[str, float | None]
    per_example: dict[str, dict[str, list[Any]]]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "aggregates": self.aggregates,
            "notes": self.notes,
            "settings": self.settings,
            "per_example": self.per_example,
        }

    def save(self, path: str) -> str:
        """Write EVAL.json (``path`` a folder, or a ``.json`` file path), atomically; returns the file written."""
        if not path.endswith(".json"):
            path = os.path.join(path, EVAL_FILE)
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> UnlearningEval:
        """Read an EVAL.json (or the folder holding one); ``FileNotFoundError``/``ValueError`` naming the file."""
        if os.path.isdir(path):
            path = os.path.join(path, EVAL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist; write one with `etu-hf eval --output_dir ...`")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not an EVAL.json of etu-hf eval (no format {FORMAT_NAME!r})")
        return cls(
            aggregates=dict(data.get("aggregates") or {}),
            per_example={k: dict(v) for k, v in (data.get("per_example") or {}).items()},
            settings=dict(data.get("settings") or {}),
            notes=dict(data.get("notes") or {}),
        )

    def table(self, name: str = "model") -> str:
        """:func:`~etu_hf.evaluation.unlearning.table.format_table` of this result alone."""
        from etu_hf.evaluation.unlearning.table import format_table

        return format_table({name: self})


def _split(benchmark: Any, name: str) -> Any:
    """A split of a benchmark object (attribute) or mapping (key); ``None`` when it has none."""
    if isinstance(benchmark, Mapping):
        return benchmark.get(name)
    return getattr(benchmark, name, None)


def benchmark_fingerprint(benchmark: Any) -> str:
    """sha256 of every split's :data:`~etu_hf.benchmark.qa.COLUMNS` content (splits in :data:`SPLITS` order):
    two evaluations are comparable only on the same fingerprint."""
    h = hashlib.sha256()
    for name in SPLITS:
        data = _split(benchmark, name)
        if data is None:
            continue
        cols = {c: list(data[c]) for c in COLUMNS if c in data.column_names}
        h.update(json.dumps([name, cols], ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import transformers

    from etu_hf import __version__

    return {
        "etu_hf": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)


class BenchmarkEvaluator:
    """Scores models on one benchmark; built once (the splits are tokenized here), called per model.

    ``metrics``: names (comma string or list; ``None``/"all": every metric, where ``vs_mass`` is then left out
    without a V_S); ``reference``: the retain model's :class:`UnlearningEval` (for ``forget_quality`` and
    ``privleak``; without it they are ``None`` with a note); ``forbidden_set``: V_S (a
    :class:`~etu_hf.ForbiddenSet`, a V_S.ids.json path or ids) for ``vs_mass``. ``batch_size`` sequences per
    forward and per ``generate``; ``max_new_tokens`` caps greedy answers (default: answer length + 16);
    ``k`` the Min-K share. ``evaluator(model)`` returns the aggregates without ``None`` values (for
    ``Trainer.evaluate``); :meth:`evaluate` the full :class:`UnlearningEval`.
    """

    def __init__(
        self,
        benchmark: Any,
        tokenizer: Any,
        reference: UnlearningEval | None = None,
        metrics: str | Sequence[str] | None = None,
        *,
        forbidden_set: ForbiddenSet | str | Sequence[int] | None = None,
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        k: float = MIN_K_FRACTION,
        chunk_size: int = STATS_CHUNK_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1 (or None: answer length + margin), got {max_new_tokens}")
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k: the Min-K share must be in (0, 1], got {k}")
        explicit = not (metrics is None or (isinstance(metrics, str) and metrics.strip().lower() in ("", "all")))
        self.metrics: list[Metric] = resolve_metrics(metrics)
        self.forbidden = resolve_forbidden_set(forbidden_set)
        self.reference = reference
        self.tokenizer = tokenizer
        self.options = S.ScoreOptions(batch_size=batch_size, max_new_tokens=max_new_tokens, k=k, chunk_size=chunk_size)
        self.notes: dict[str, str] = {}
        if self.forbidden is None and explicit and any(m.forbidden_set for m in self.metrics):
            raise ValueError(f"metrics: vs_mass {NO_FORBIDDEN_SET}")
        self.fingerprint = benchmark_fingerprint(benchmark)
        self.active = [m for m in self.metrics if self._can_compute(m)]
        # A metric short of a reference still has its per-example values scored: this result can then be the
        # reference of another model (the retain model's forget truth ratios, its MIA scores).
        scored = [m for m in self.metrics if not (m.forbidden_set and self.forbidden is None)]
        self.passes = needed_passes(scored)
        self.splits: dict[str, S.EncodedSplit] = {}
        for name, passes in self.passes.items():
            data = _split(benchmark, name)
            if data is None or len(data) == 0:
                used = ", ".join(m.name for m in scored if name in m.needs)
                raise ValueError(f"benchmark: the {name!r} split is missing or empty; {used} need(s) it")
            self.splits[name] = S.encode_split(data, tokenizer, truth_ratio="truth_ratio" in passes, name=name)
        self.benchmark_info = {
            "name": getattr(benchmark, "name", None),
            "settings": getattr(benchmark, "settings", None),
            "fingerprint": self.fingerprint,
            "sizes": {n: len(d) for n in SPLITS if (d := _split(benchmark, n)) is not None},
        }

    def _can_compute(self, metric: Metric) -> bool:
        """False (with a note on each output) when a metric lacks its V_S or a usable reference."""
        why = None
        if metric.forbidden_set and self.forbidden is None:
            why = NO_FORBIDDEN_SET
        elif metric.reference:
            why = self._reference_problem(metric)
        for out in metric.outputs if why else ():
            self.notes[out] = why
        return why is None

    def _reference_problem(self, metric: Metric) -> str | None:
        ref = self.reference
        if ref is None:
            return NO_REFERENCE
        theirs = (ref.settings.get("benchmark") or {}).get("fingerprint")
        if theirs != self.fingerprint:
            raise ValueError(
                f"reference: the retain model's evaluation ({ref.settings.get('model')!r}) was made on another "
                f"benchmark (fingerprint {str(theirs)[:12]} vs {self.fingerprint[:12]}); evaluate the retain model on "
                "this benchmark"
            )
        needed = {
            "forget_quality": {"forget": ["truth_ratio"]},
            "privleak": {s: list(MIA_ATTACKS.values()) for s in ("forget", "holdout")},
        }.get(metric.name, {})
        missing = [f"{s}/{c}" for s, cols in needed.items() for c in cols if c not in ref.per_example.get(s, {})]
        if missing:
            return f"the retain model's evaluation has no {', '.join(missing)} (evaluate it with the same metrics)"
        return None

    def __call__(self, model: nn.Module, accelerator: Any = None) -> dict[str, float]:
        """The aggregates of ``model`` with ``None`` values left out (what ``Trainer.evaluate`` logs)."""
        return {k: v for k, v in self.evaluate(model, accelerator).aggregates.items() if v is not None}

    def evaluate(self, model: nn.Module, accelerator: Any = None, *, model_name: str | None = None) -> UnlearningEval:
        """Score ``model`` (in eval mode, without gradients; its modes are restored). With ``accelerator`` (an
        accelerate ``Accelerator`` or ``PartialState``) of several processes each process scores a shard of
        every split and all per-example values are gathered, in order, on every process."""
        start = time.perf_counter()
        forbidden = None
        if self.forbidden is not None and any("vs_mass" in p for p in self.passes.values()):
            self.forbidden.check_vocab(output_vocab_size(model), "forbidden_set")
            forbidden = self.forbidden.tensor(next(model.parameters()).device)
        per_example: dict[str, dict[str, list[Any]]] = {}
        with eval_mode(model), torch.no_grad():
            use_hidden = self._probe(model) if self.splits else None
            options = self.options
            if _zero3(accelerator):
                options = S.ScoreOptions(**{**options.__dict__, "synced_gpus": True})
            for name, passes in self.passes.items():
                split = self.splits[name]
                t0 = time.perf_counter()
                mine = S.shard_indices(len(split), accelerator)
                rows = S.score_examples(
                    model,
                    self.tokenizer,
                    split,
                    mine,
                    passes,
                    options,
                    forbidden_ids=forbidden,
                    use_hidden=use_hidden,
                    extra_ids=self.forbidden.extra_ids
                    if forbidden is not None and self.forbidden.per_context
                    else None,
                )
                per_example[name] = S.columns(S.gather_by_index(mine, rows, len(split), accelerator))
                logger.info("%s: %d rows (%s) in %.1fs", name, len(split), ", ".join(passes), time.perf_counter() - t0)
        aggregates, notes = self._aggregate(per_example)
        settings = {
            "model": model_name or _model_name(model),
            "benchmark": self.benchmark_info,
            "metrics": [m.name for m in self.metrics],
            "definitions": {m.name: m.description for m in self.metrics},
            "k": self.options.k,
            "batch_size": self.options.batch_size,
            "max_new_tokens": self.options.max_new_tokens,
            "generation_margin": S.GENERATION_MARGIN,
            "stop_strings": list(S.STOP_STRINGS),
            "forbidden_set": forbidden_info(self.forbidden),
            "reference": None if self.reference is None else {"model": self.reference.settings.get("model")},
            "num_processes": getattr(accelerator, "num_processes", 1),
            "versions": _versions(),
            "wall_seconds": round(time.perf_counter() - start, 3),
        }
        return UnlearningEval(aggregates=aggregates, per_example=per_example, settings=settings, notes=notes)

    def _probe(self, model: nn.Module) -> bool:
        """The head probe (:func:`~etu_hf.modeling.head.probe_hidden_states`) on the first answer, once per call."""
        split = next(iter(self.splits.values()))
        batch = S.right_padded([(split.prompts[0], split.answer_ids[0])], S.pad_token_id(self.tokenizer))
        return probe_hidden_states(model, batch)

    def _aggregate(self, per_example: dict[str, dict[str, list[Any]]]) -> tuple[dict[str, float | None], dict]:
        notes = dict(self.notes)
        out: dict[str, float | None] = {}
        ref = self.reference.per_example if self.reference is not None else None
        for m in self.metrics:
            values = m.aggregate(per_example, ref) if m in self.active else dict.fromkeys(m.outputs)
            for name in m.outputs:
                v = values.get(name)
                if v is not None and not math.isfinite(v):
                    notes[name] = "not finite (an empty split, or a value the statistic is undefined for)"
                    v = None
                out[name] = None if v is None else float(v)
        return {k: out[k] for k in AGGREGATES if k in out}, notes


def forbidden_info(forbidden: ForbiddenSet | None) -> dict[str, Any] | None:
    """Size, method and the sha256 of the sorted ids of V_S (which V_S a result was measured with)."""
    if forbidden is None:
        return None
    digest = hashlib.sha256(json.dumps(sorted(forbidden.ids)).encode()).hexdigest()
    return {"size": len(forbidden), "method": forbidden.method, "ids_sha256": digest}


def _zero3(accelerator: Any) -> bool:
    """True when weights are ZeRO-3-sharded over several processes (``generate`` then needs ``synced_gpus``)."""
    if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
        return False
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def evaluate_benchmark(
    model: nn.Module,
    tokenizer: Any,
    benchmark: Any,
    *,
    reference: UnlearningEval | None = None,
    metrics: str | Sequence[str] | None = None,
    forbidden_set: ForbiddenSet | str | Sequence[int] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    accelerator: Any = None,
    model_name: str | None = None,
) -> UnlearningEval:
    """Evaluate ``model`` on ``benchmark`` (an object or mapping with ``forget``/``retain``/``holdout``
    ``datasets.Dataset`` splits of the :data:`~etu_hf.benchmark.qa.COLUMNS`); see :class:`BenchmarkEvaluator`
    for the arguments and docs/evaluation.md for every metric. ``model_name`` is recorded in the settings
    (default: the model's ``name_or_path``)."""
    evaluator = BenchmarkEvaluator(
        benchmark,
        tokenizer,
        reference,
        metrics,
        forbidden_set=forbidden_set,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    return evaluator.evaluate(model, accelerator, model_name=model_name)


__all__ = [
    "EVAL_FILE",
    "METRICS",
    "BenchmarkEvaluator",
    "UnlearningEval",
    "benchmark_fingerprint",
    "evaluate_benchmark",
]
