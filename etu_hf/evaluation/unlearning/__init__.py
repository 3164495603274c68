"""Unlearning metrics of the field (TOFU, MUSE, open-unlearning) on a question/answer benchmark, plus ETU's
mass on V_S: :func:`evaluate_benchmark`, :class:`BenchmarkEvaluator`, :class:`UnlearningEval`,
:func:`format_table`, and the metric registry :data:`METRICS`. Definitions: docs/evaluation.md.

- :mod:`.metrics`: the pure statistics (numpy/scipy);
- :mod:`.scores`: the per-example numbers of a model (teacher-forced answers, greedy answers, V_S mass);
- :mod:`.registry`: which metric needs what, and its aggregates;
- :mod:`.evaluate`: the evaluator and its result (EVAL.json); :mod:`.table`: the table.
"""

from etu_hf.evaluation.unlearning.evaluate import (
    EVAL_FILE,
    BenchmarkEvaluator,
    UnlearningEval,
    benchmark_fingerprint,
    evaluate_benchmark,
)
from etu_hf.evaluation.unlearning.registry import AGGREGATES, METRICS, Metric, resolve_metrics
from etu_hf.evaluation.unlearning.table import format_table

__all__ = [
    "AGGREGATES",
    "EVAL_FILE",
    "METRICS",
    "BenchmarkEvaluator",
    "Metric",
    "UnlearningEval",
    "benchmark_fingerprint",
    "evaluate_benchmark",
    "format_table",
    "resolve_metrics",
]
