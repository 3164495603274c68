"""The benchmark's models: a *target* model fine-tuned on the forget and retain authors and a *retain*
model fine-tuned on the retain authors only, from one initialisation and with one tokenizer.

The retain model is what perfect unlearning of the forget authors would give (TOFU's gold standard);
the holdout authors are trained on by neither model (the non-members of membership inference).

- Tokenizer: byte-level BPE (:func:`etu_hf.demo.pretrain.train_tokenizer`) trained on every text of
  every split (prompts, answers, paraphrases, perturbed answers), so no split is out of vocabulary.
- Model: a tiny ``LlamaForCausalLM`` (:data:`ARCHITECTURE`), randomly initialised from ``seed``; both
  models start from these same weights and are fine-tuned with the same settings on their own rows
  (``transformers.Trainer``, answer-only labels from :func:`~etu_hf.benchmark.qa.tokenize_qa`, padded by
  ``DataCollatorForSeq2Seq``). Weights are stored in float16 and load as float32.

:func:`benchmark_models` returns the models shipped in ``etu_hf/benchmark/assets/benchmark-v1`` when they
match this generator and recipe, else a cached build, else builds one (a few minutes on two CPU cores)::

    python -m etu_hf.benchmark.models --output_dir DIR     # --small: the 30-author test configuration
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from etu_hf.benchmark.generate import DEFAULT_SETTINGS, GENERATOR_VERSION, Benchmark, build_benchmark
from etu_hf.benchmark.qa import SPLITS, format_prompt, tokenize_qa

logger = logging.getLogger(__name__)

#: Bumped whenever the training recipe changes (cached and shipped builds of another version are rebuilt).
BUILD_VERSION = 1
#: The folder name of a default build, in the cache and in the package's assets.
BUILD_NAME = f"benchmark-v{BUILD_VERSION}"
#: The default build shipped with the package (when present).
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "assets", BUILD_NAME)
#: The file a finished build writes last.
BUILD_FILE = "build.json"

#: The tiny Llama both models use (the demo model's shape).
ARCHITECTURE: dict[str, int] = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
}


@dataclass(frozen=True)
class TrainSettings:
    """How both models are made (the same for each): the tokenizer's ``vocab_size``, the initialisation
    ``seed``, and the fine-tuning (``epochs`` over the model's rows, AdamW at ``learning_rate`` with a
    linear warm-up over ``warmup_fraction`` of the steps then a cosine decay, no weight decay)."""

    epochs: float = 12.0
    learning_rate: float = 3e-3
    batch_size: int = 32
    warmup_fraction: float = 0.05
    vocab_size: int = 1024
    seed: int = 0
    architecture: dict[str, int] = field(default_factory=lambda: dict(ARCHITECTURE))


#: The test configuration: 30 authors, a 2-layer model of width 64, a smaller vocabulary (seconds to build).
SMALL_BENCHMARK: dict[str, Any] = {"n_entities": 30}
SMALL_TRAINING: dict[str, Any] = {
    "epochs": 15.0,
    "vocab_size": 512,
    "architecture": {**ARCHITECTURE, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2},
}


@dataclass(frozen=True)
class BenchmarkModels:
    """A finished build: the ``target`` and ``retain`` model folders (model and tokenizer each), the
    ``benchmark`` folder they were trained on (see :meth:`Benchmark.save`), and ``build`` (build.json)."""

    root: str
    target: str
    retain: str
    benchmark: str
    build: dict[str, Any]

    @classmethod
    def from_folder(cls, root: str) -> BenchmarkModels:
        with open(os.path.join(root, BUILD_FILE), encoding="utf-8") as f:
            build = json.load(f)
        paths = {name: os.path.join(root, name) for name in ("target", "retain", "benchmark")}
        return cls(root=root, build=build, **paths)


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------
def benchmark_texts(benchmark: Benchmark) -> list[str]:
    """Every text of every split a model may be scored on: the formatted prompts, answers, paraphrased
    answers and perturbed answers (the tokenizer's training text)."""
    texts: list[str] = []
    for name in SPLITS:
        split = benchmark.split(name)
        texts += [format_prompt(q) for q in split["question"]]
        texts += list(split["answer"]) + list(split["paraphrased_answer"])
        texts += [p for perturbed in split["perturbed_answers"] for p in perturbed]
    return texts


def build_tokenizer(benchmark: Benchmark, vocab_size: int) -> Any:
    """Byte-level BPE of ``vocab_size`` pieces on :func:`benchmark_texts` (EOS doubles as BOS)."""
    from etu_hf.demo.pretrain import train_tokenizer

    return train_tokenizer(benchmark_texts(benchmark), vocab_size)


def init_model(tokenizer: Any, seed: int, architecture: dict[str, int] | None = None) -> Any:
    """A randomly initialised Llama of ``architecture`` (default :data:`ARCHITECTURE`) for ``tokenizer``,
    drawn after ``torch.manual_seed(seed)``; untied input and output embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(architecture or ARCHITECTURE),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_on_qa(model: Any, tokenizer: Any, dataset: Any, settings: TrainSettings) -> float:
    """Fine-tune ``model`` in place on the ``answer`` column of ``dataset`` with ``transformers.Trainer``
    (see :class:`TrainSettings`); returns the mean training loss (answer tokens and EOS)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    features = tokenize_qa(dataset, tokenizer)
    steps = math.ceil(math.ceil(len(features) / settings.batch_size) * settings.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=settings.batch_size,
            num_train_epochs=settings.epochs,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=round(settings.warmup_fraction * steps),
            weight_decay=0.0,
            logging_steps=max(1, round(steps / 6)),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=settings.seed,
            disable_tqdm=True,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        result = Trainer(model=model, args=args, train_dataset=features, data_collator=collator).train()
    return float(result.training_loss)


def answer_probabilities(
    model: Any, tokenizer: Any, dataset: Any, column: str = "answer", batch_size: int = 64
) -> list[float]:
    """Per row, ``exp(-(1/T) * sum_t NLL_t)``: the geometric mean of the probabilities of the ``T``
    answer tokens (``" " + row[column]``, no EOS) given the prompt and the tokens before them (TOFU's
    length-normalised answer probability)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    features = tokenize_qa(dataset, tokenizer, answer_column=column, add_eos=False)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = collator([features[i] for i in range(start, min(start + batch_size, len(features)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            out += torch.exp(-nll.sum(1) / mask.sum(1)).tolist()
    return out


def _save_float16(model: Any, tokenizer: Any, folder: str) -> None:
    """``save_pretrained`` with float16 weights; the config keeps float32, so loading gives float32."""
    import torch

    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)


def _versions() -> dict[str, str]:
    import datasets
    import tokenizers
    import torch
    import transformers

    import etu_hf

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "etu_hf": getattr(etu_hf, "__version__", "unknown"),
    }


# ---------------------------------------------------------------------------------------------
# Building, caching
# ---------------------------------------------------------------------------------------------
def memorisation_figures(folder: str, benchmark: Benchmark) -> dict[str, dict[str, dict[str, float]]]:
    """Mean over rows of :func:`answer_probabilities` for each saved model, split and answer column:
    ``{column: {model: {split: value}}}`` (the models as saved: float16 weights loaded as float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out: dict[str, dict[str, dict[str, float]]] = {"answer": {}, "paraphrased_answer": {}}
    for name in ("target", "retain"):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, name))
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, name))
        for column, table in out.items():
            table[name] = {}
            for split in SPLITS:
                probs = answer_probabilities(model, tokenizer, benchmark.split(split), column)
                table[name][split] = round(sum(probs) / len(probs), 4)
    return out


def build_models(
    output_dir: str,
    benchmark: Benchmark | None = None,
    *,
    epochs: float = TrainSettings.epochs,
    seed: int = TrainSettings.seed,
    learning_rate: float = TrainSettings.learning_rate,
    batch_size: int = TrainSettings.batch_size,
    vocab_size: int = TrainSettings.vocab_size,
    architecture: dict[str, int] | None = None,
    overwrite: bool = False,
) -> BenchmarkModels:
    """Build the target and retain models of ``benchmark`` (default: :func:`build_benchmark`) into
    ``output_dir``: ``target/``, ``retain/`` (model + tokenizer), ``benchmark/`` (the data) and
    ``build.json`` (settings, versions, the memorisation figures of :func:`memorisation_figures`, wall time).

    Everything is written to a temporary sibling folder renamed to ``output_dir`` at the end, so a
    build that stops half way leaves nothing at ``output_dir``. An existing ``output_dir`` is replaced
    only with ``overwrite=True``.
    """
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"--output_dir {output_dir} exists and is not empty; remove it or pass --overwrite.")
    for flag, value in (("--epochs", epochs), ("learning_rate", learning_rate), ("batch_size", batch_size)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value!r}")
    from datasets import concatenate_datasets

    started = time.perf_counter()
    benchmark = benchmark if benchmark is not None else build_benchmark()
    settings = TrainSettings(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        vocab_size=vocab_size,
        seed=seed,
        architecture=dict(architecture or ARCHITECTURE),
    )
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.partial-", dir=parent)
    try:
        tokenizer = build_tokenizer(benchmark, settings.vocab_size)
        start = init_model(tokenizer, settings.seed, settings.architecture)
        logger.info(
            "benchmark %s: %s rows; tokenizer |V|=%d; model %s parameters",
            benchmark.name,
            {name: len(benchmark.split(name)) for name in SPLITS},
            len(tokenizer),
            f"{start.num_parameters():,}",
        )
        train_rows = {"target": concatenate_datasets([benchmark.forget, benchmark.retain]), "retain": benchmark.retain}
        seconds, losses = {}, {}
        for name, rows in train_rows.items():
            logger.info("training the %s model on %d rows for %g epochs", name, len(rows), settings.epochs)
            t0 = time.perf_counter()
            model = copy.deepcopy(start)
            losses[name] = round(train_on_qa(model, tokenizer, rows, settings), 4)
            seconds[name] = round(time.perf_counter() - t0, 1)
            _save_float16(model, tokenizer, os.path.join(tmp, name))
            logger.info("%s model: mean training loss %.4f, %.0f s", name, losses[name], seconds[name])
        benchmark.save(os.path.join(tmp, "benchmark"))
        logger.info("measuring the answer probabilities of both models")
        figures = memorisation_figures(tmp, benchmark)
        build = {
            "build_version": BUILD_VERSION,
            "generator_version": GENERATOR_VERSION,
            "benchmark": {"name": benchmark.name, "settings": benchmark.settings},
            "training": asdict(settings),
            "trained_on": {"target": ["forget", "retain"], "retain": ["retain"]},
            "parameters": start.num_parameters(),
            "weights_dtype": "float16 (loads as float32)",
            "versions": _versions(),
            "mean_training_loss": losses,
            "answer_probability": figures,
            "answer_probability_definition": "mean over rows of exp(-mean NLL of the answer tokens given the prompt)",
            "train_seconds": seconds,
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        with open(os.path.join(tmp, BUILD_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(build, indent=2) + "\n")
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    answer = figures["answer"]
    logger.info(
        "built %s in %.0f s: answer probability target/forget %.3f, target/holdout %.3f, retain/forget %.3f",
        output_dir,
        build["wall_seconds"],
        answer["target"]["forget"],
        answer["target"]["holdout"],
        answer["retain"]["forget"],
    )
    return BenchmarkModels.from_folder(output_dir)


def default_cache_dir() -> str:
    """``$ETU_HF_CACHE/benchmark-v1``, else ``~/.cache/etu_hf/benchmark-v1``."""
    root = os.environ.get("ETU_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "etu_hf")
    return os.path.join(root, BUILD_NAME)


def is_current_build(folder: str) -> bool:
    """Whether ``folder`` holds a finished default build of this generator and recipe: its build.json has
    this :data:`GENERATOR_VERSION` and :data:`BUILD_VERSION`, the default benchmark and training settings,
    and both model folders and the benchmark folder exist."""
    try:
        found = BenchmarkModels.from_folder(folder)
    except (OSError, ValueError):
        return False
    build = found.build
    return (
        build.get("generator_version") == GENERATOR_VERSION
        and build.get("build_version") == BUILD_VERSION
        and build.get("benchmark", {}).get("settings") == DEFAULT_SETTINGS
        and build.get("training") == asdict(TrainSettings())
        and all(os.path.isfile(os.path.join(p, "config.json")) for p in (found.target, found.retain))
        and os.path.isfile(os.path.join(found.benchmark, "benchmark.json"))
    )


def benchmark_models(cache_dir: str | None = None, rebuild: bool = False) -> BenchmarkModels:
    """The default build: the shipped one (:data:`SHIPPED_DIR`) when it is current, else the one in
    ``cache_dir`` (default :func:`default_cache_dir`) when it is current, else a new build there (a few
    minutes; progress is logged). ``rebuild=True`` builds anew into the cache whatever exists."""
    if not rebuild and is_current_build(SHIPPED_DIR):
        return BenchmarkModels.from_folder(SHIPPED_DIR)
    folder = cache_dir or default_cache_dir()
    if not rebuild and is_current_build(folder):
        return BenchmarkModels.from_folder(folder)
    logger.info("building the benchmark models into %s (a few minutes on CPU)", folder)
    return build_models(folder, overwrite=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m etu_hf.benchmark.models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output_dir", required=True, help="Folder to create (target/, retain/, benchmark/, build.json)."
    )
    parser.add_argument("--small", action="store_true", help="The test configuration: 30 authors, a 2-layer model.")
    parser.add_argument(
        "--n_entities", type=int, default=None, help="Authors in the benchmark (default 200; 30 with --small)."
    )
    parser.add_argument(
        "--epochs", type=float, default=None, help=f"Fine-tuning epochs (default {TrainSettings.epochs:g})."
    )
    parser.add_argument("--seed", type=int, default=TrainSettings.seed, help="Initialisation and data-order seed.")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_dir.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    bench_settings = dict(SMALL_BENCHMARK) if args.small else {}
    if args.n_entities is not None:
        bench_settings["n_entities"] = args.n_entities
    train = dict(SMALL_TRAINING) if args.small else {}
    if args.epochs is not None:
        train["epochs"] = args.epochs
    built = build_models(
        args.output_dir, build_benchmark(**bench_settings), seed=args.seed, overwrite=args.overwrite, **train
    )
    print(json.dumps(built.build["answer_probability"], indent=2))


if __name__ == "__main__":
    main()
