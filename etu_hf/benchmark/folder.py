"""``--benchmark``: the built-in benchmark or a folder of question/answer splits, checked on load.

A benchmark folder holds one file per split, ``<split>.jsonl`` (or ``.json``, ``.csv``, ``.parquet``;
read with ``datasets`` like the corpora of :mod:`etu_hf.data.corpus`), for each of ``forget``,
``retain`` and ``holdout``, each with the columns :data:`~etu_hf.benchmark.qa.COLUMNS`;
``perturbed_answers`` is a list of strings (in a CSV file: a JSON list in the cell). An optional
``benchmark.json`` (written by :meth:`Benchmark.save`) gives the name and settings.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

from etu_hf.benchmark.generate import BUILTIN_NAME, Benchmark, build_benchmark, qa_dataset
from etu_hf.benchmark.qa import COLUMNS, SPLITS, missing_columns

logger = logging.getLogger(__name__)

FLAG = "--benchmark"
#: The file types a split may be stored as, in the order they are looked for, and their datasets builders.
SPLIT_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_COLUMNS = tuple(c for c in COLUMNS if c != "perturbed_answers")


def load_benchmark(spec: str = BUILTIN_NAME, **builtin_settings: Any) -> Benchmark:
    """The benchmark named by ``spec``: ``"builtin"`` builds :func:`~etu_hf.benchmark.generate.build_benchmark`
    in memory with ``builtin_settings``; anything else is a folder read by :func:`load_benchmark_folder`."""
    if spec == BUILTIN_NAME:
        return build_benchmark(**builtin_settings)
    if builtin_settings:
        raise ValueError(
            f"{FLAG} {spec!r} is a folder; generator settings ({', '.join(sorted(builtin_settings))}) apply only to "
            f"{FLAG} {BUILTIN_NAME}."
        )
    return load_benchmark_folder(spec)


def split_file(folder: str, split: str) -> str:
    """The one file holding ``split`` in ``folder`` (``<split>`` + a suffix of :data:`SPLIT_FORMATS`)."""
    found = [os.path.join(folder, split + s) for s in SPLIT_FORMATS if os.path.isfile(os.path.join(folder, split + s))]
    if not found:
        raise ValueError(
            f"{FLAG} {folder}: no {split} split; expected a file {split}.jsonl (or "
            f"{', '.join(split + s for s in list(SPLIT_FORMATS)[1:])}) with the columns {', '.join(COLUMNS)}."
        )
    if len(found) > 1:
        raise ValueError(f"{FLAG} {folder}: the {split} split is in several files ({', '.join(found)}); keep one.")
    return found[0]


def _read_split(path: str, folder: str, split: str) -> Any:
    import datasets

    builder = SPLIT_FORMATS[os.path.splitext(path)[1]]
    if os.path.getsize(path) == 0:
        raise ValueError(f"{FLAG} {folder}: the {split} split ({path}) is empty; it needs at least one row.")
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as err:  # datasets raises many types; name the folder, split and file
        raise ValueError(f"{FLAG} {folder}: could not read the {split} split {path}: {err}") from err


def _as_list(value: Any) -> Any:
    """A CSV cell holding a JSON list becomes that list; anything else is returned as is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def check_split(dataset: Any, folder: str, split: str) -> Any:
    """``dataset`` reduced to :data:`COLUMNS` after checking it: no missing column, at least one row, a
    non-empty string in each text column, a non-empty list of non-empty strings in ``perturbed_answers``
    (``ValueError`` naming the folder, the split and the first bad row otherwise)."""
    missing = missing_columns(dataset.column_names)
    if missing:
        raise ValueError(
            f"{FLAG} {folder}: the {split} split lacks the column(s) {', '.join(missing)}; every split needs "
            f"{', '.join(COLUMNS)} (it has {', '.join(dataset.column_names)})."
        )
    if len(dataset) == 0:
        raise ValueError(f"{FLAG} {folder}: the {split} split has no rows; it needs at least one.")
    rows = []
    for i, row in enumerate(dataset):
        for column in TEXT_COLUMNS:
            if not isinstance(row[column], str) or not row[column].strip():
                raise ValueError(f"{FLAG} {folder}: {split} row {i}: {column} must be a non-empty string.")
        perturbed = _as_list(row["perturbed_answers"])
        if not (isinstance(perturbed, list) and perturbed and all(isinstance(p, str) and p.strip() for p in perturbed)):
            raise ValueError(
                f"{FLAG} {folder}: {split} row {i}: perturbed_answers must be a non-empty list of non-empty strings, "
                f"got {row['perturbed_answers']!r}."
            )
        rows.append({**{c: row[c] for c in TEXT_COLUMNS}, "perturbed_answers": perturbed})
    return qa_dataset(rows)


def load_benchmark_folder(folder: str) -> Benchmark:
    """Read and check (:func:`check_split`) the three splits of a benchmark folder; the name and settings
    come from its ``benchmark.json`` when present, else the name is the folder's. Warns when an entity
    appears in more than one split (the splits of a TOFU-shaped benchmark are disjoint by entity)."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise ValueError(
            f"{FLAG} {folder!r} is not a folder; give '{BUILTIN_NAME}' or a folder with "
            f"{', '.join(s + '.jsonl' for s in SPLITS)}."
        )
    splits = {
        split: check_split(_read_split(split_file(folder, split), folder, split), folder, split) for split in SPLITS
    }
    _warn_shared_entities(splits, folder)
    meta_path = os.path.join(folder, "benchmark.json")
    name, settings = os.path.basename(os.path.normpath(folder)), {"folder": os.path.abspath(folder)}
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        name = str(meta.get("name", name))
        settings = {**meta.get("settings", {}), **settings}
    logger.info("%s %s: %s rows", FLAG, folder, {s: len(d) for s, d in splits.items()})
    return Benchmark(**splits, name=name, settings=settings)


def _warn_shared_entities(splits: dict[str, Any], folder: str) -> None:
    seen: dict[str, str] = {}
    for split, dataset in splits.items():
        for entity in dict.fromkeys(dataset["entity"]):
            if entity in seen and seen[entity] != split:
                msg = (
                    f"{FLAG} {folder}: entity {entity!r} is in both the {seen[entity]} and the {split} split; "
                    "forget quality and membership figures assume the splits share no entity."
                )
                warnings.warn(msg, UserWarning, stacklevel=3)
                logger.warning(msg)
                return
            seen.setdefault(entity, split)
