"""A TOFU-shaped unlearning benchmark: question/answer splits about fictitious authors and the models
trained on them.

- :mod:`~etu_hf.benchmark.qa`: the shared shape (splits, columns, prompt, tokenization);
- :mod:`~etu_hf.benchmark.generate`: the built-in benchmark, generated from a seed (:func:`build_benchmark`);
- :mod:`~etu_hf.benchmark.folder`: ``--benchmark builtin`` or a folder of splits (:func:`load_benchmark`);
- :mod:`~etu_hf.benchmark.models`: the target and retain models (:func:`benchmark_models`).

See docs/benchmark.md.
"""

from etu_hf.benchmark.folder import load_benchmark
from etu_hf.benchmark.generate import DEFAULT_SETTINGS, GENERATOR_VERSION, Benchmark, build_benchmark
from etu_hf.benchmark.qa import COLUMNS, PROMPT_TEMPLATE, SPLITS, encode_qa, qa_features, tokenize_qa

__all__ = [
    "COLUMNS",
    "DEFAULT_SETTINGS",
    "GENERATOR_VERSION",
    "PROMPT_TEMPLATE",
    "SPLITS",
    "Benchmark",
    "BenchmarkModels",
    "benchmark_models",
    "build_benchmark",
    "build_models",
    "encode_qa",
    "load_benchmark",
    "qa_features",
    "tokenize_qa",
]

_MODELS = ("BenchmarkModels", "benchmark_models", "build_models")


def __getattr__(name: str):
    # the models module is imported on first use, so `python -m etu_hf.benchmark.models` runs it only once
    if name in _MODELS:
        from etu_hf.benchmark import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
