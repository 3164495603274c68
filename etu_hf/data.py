"""Data plumbing shared by the trainer, the CLI and the evaluation.

- :func:`scored_positions`: which next-token predictions are trained and measured.
- Corpus specs (``--forget_corpora`` / ``--retain_corpora``): local files and folders, or hub datasets
  ``"repo:config[:split]"``; :func:`load_corpus` returns documents.
- :func:`tokenize_and_block`: documents -> causal-LM token blocks; long documents are split across
  blocks, never dropped, and the last partial block is padded, not discarded.
- :class:`ForgetRetainDataset` and :class:`ForgetRetainCollator`: pair each forget example with a
  retain example so that the Trainer's own sampler, sharding and resume logic drive both.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: Prefix of the retain half of a paired batch (``retain_input_ids``, ``retain_attention_mask``, ...).
RETAIN_PREFIX = "retain_"
#: Columns with this prefix hold variable-length lists (e.g. ``pref_chosen_ids``); the collator passes
#: them through as Python lists instead of tensorizing them.
PASSTHROUGH_PREFIX = "pref_"
#: Optional column that ties forget and retain examples of the same corpus pair together.
CORPUS_ID_COLUMN = "corpus_id"

_LOCAL_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

#: Short names accepted in corpus specs (the original tool's names), expanded to hub datasets.
CORPUS_ALIASES = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    "cyber-forget-corpus": ("cais/wmdp-corpora", "cyber-forget-corpus", "train"),
    "cyber-retain-corpus": ("cais/wmdp-corpora", "cyber-retain-corpus", "train"),
    "bio-retain-corpus": ("cais/wmdp-corpora", "bio-retain-corpus", "train"),
}


# ---------------------------------------------------------------------------------------------
# Scored positions
# ---------------------------------------------------------------------------------------------
def scored_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(mask, targets)``, both ``[B, T-1]``, for next-token prediction.

    The prediction made at position ``t`` targets ``y = labels[t+1]`` (``input_ids[t+1]`` when there
    are no labels). It is *scored* iff ``y != -100`` and both ``t`` and ``t+1`` are attended
    (``attention_mask == 1``), so padding never counts, whichever side it is on. ``targets`` holds
    ``y`` with unscored entries set to 0 (a valid index; always use it together with ``mask``).
    """
    targets = (labels if labels is not None else input_ids)[:, 1:]
    mask = targets != IGNORE_INDEX
    if attention_mask is not None:
        am = attention_mask.bool()
        mask = mask & am[:, 1:] & am[:, :-1]
    return mask, targets.masked_fill(~mask, 0)


# ---------------------------------------------------------------------------------------------
# Corpus specs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusSpec:
    """One corpus: a local file or folder, or a hub dataset ``repo[:config[:split]]``."""

    raw: str
    kind: str  # "local" or "hub"
    path: str | None = None
    repo: str | None = None
    config: str | None = None
    split: str = "train"

    def describe(self) -> str:
        if self.kind == "local":
            return self.path or self.raw
        return f"{self.repo} (config={self.config or 'default'}, split={self.split})"


def _looks_local(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~"))
        or os.path.splitext(spec)[1].lower() in _LOCAL_SUFFIXES
        or (os.sep in spec and ":" not in spec and spec.count("/") > 1)
    )


def _split_specs(value: str | Sequence[str]) -> list[str]:
    """Each string that names an existing file or folder is one spec, commas and all; any other string
    is a comma-separated list of specs."""
    out: list[str] = []
    for item in [value] if isinstance(value, str) else list(value):
        if os.path.exists(os.path.expanduser(item.strip())):
            out.append(item.strip())
        else:
            out += item.split(",")
    return out


def parse_corpus_specs(value: str | Sequence[str] | None, flag: str = "--forget_corpora") -> list[CorpusSpec]:
    """Parse corpus specs: a comma-separated string, or a list of them (the flag given several values or
    repeated). A path that exists is taken whole even when it contains commas.

    A spec is an existing local ``.txt``/``.json``/``.jsonl``/``.parquet``/``.csv`` file or a folder of
    such files; or a hub dataset ``"repo"``, ``"repo:config"`` or ``"repo:config:split"`` (for example
    ``"cais/wmdp-corpora:cyber-forget-corpus"``); or one of :data:`CORPUS_ALIASES`. A spec that looks
    like a path but does not exist raises ``FileNotFoundError`` naming ``flag``.
    """
    if value is None:
        return []
    items = _split_specs(value)
    specs = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        expanded = os.path.expanduser(item)
        if os.path.exists(expanded):
            specs.append(CorpusSpec(raw=item, kind="local", path=expanded))
        elif item in CORPUS_ALIASES:
            repo, config, split = CORPUS_ALIASES[item]
            specs.append(CorpusSpec(raw=item, kind="hub", repo=repo, config=config, split=split))
        elif _looks_local(item):
            raise FileNotFoundError(
                f"{flag}: corpus {item!r} does not exist. Give an existing .txt/.json/.jsonl/.parquet/.csv "
                "file or folder, or a hub dataset as 'repo:config[:split]'."
            )
        else:
            parts = item.split(":")
            if len(parts) > 3 or not parts[0]:
                raise ValueError(f"{flag}: cannot parse corpus spec {item!r}; expected 'repo[:config[:split]]'.")
            repo, config, split = [*parts, None, None][:3]
            specs.append(CorpusSpec(raw=item, kind="hub", repo=repo, config=config or None, split=split or "train"))
    return specs


def _local_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if os.path.splitext(n)[1].lower() in _LOCAL_SUFFIXES]
    return sorted(files)


def load_corpus(spec: CorpusSpec, text_column: str = "text", flag: str = "--forget_corpora") -> list[str]:
    """Load the documents of one corpus as a list of strings (empty documents removed).

    Local ``.txt`` files are split into documents at blank lines (``datasets``' text loader with
    ``sample_by="paragraph"``), so a document keeps its lines together; structured files and hub
    datasets give one document per row of ``text_column``.
    """
    import datasets

    if spec.kind == "local":
        files = _local_files(spec.path)
        if not files:
            raise FileNotFoundError(f"{flag}: folder {spec.path!r} holds no .txt/.json/.jsonl/.parquet/.csv file.")
        texts: list[str] = []
        for builder in sorted({_LOCAL_SUFFIXES[os.path.splitext(f)[1].lower()] for f in files}):
            group = [f for f in files if _LOCAL_SUFFIXES[os.path.splitext(f)[1].lower()] == builder]
            group = [f for f in group if os.path.getsize(f) > 0 and (builder == "parquet" or _check_text_file(f, flag))]
            if not group:  # datasets fails obscurely on files without any content; the caller names the flag
                continue
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files=group, split="train", **kwargs)
            except Exception as err:  # datasets wraps parser errors (row numbers buried); say which file and line
                raise ValueError(_load_failure(builder, group, err, flag)) from err
            texts += _text_column(ds, text_column, spec, flag)
    else:
        try:
            ds = datasets.load_dataset(spec.repo, spec.config, split=spec.split)
        except Exception as err:  # the datasets library raises many types; re-raise with the flag named
            raise ValueError(
                f"{flag}: could not load hub dataset {spec.describe()} from spec {spec.raw!r}: {err}. "
                "If this was meant to be a local file, check the path; offline, give local files instead."
            ) from err
        texts = _text_column(ds, text_column, spec, flag)
    return [t.strip() for t in texts if t and t.strip()]


NEWLINE = b"\n"


def _check_text_file(path: str, flag: str) -> bool:
    """True when the file holds some non-blank text; ``ValueError`` naming ``flag``, the file and the
    position when it is binary (NUL bytes) or not UTF-8, instead of a decoding traceback from datasets."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, has_text = 0, 1, False
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise ValueError(
                    f"{flag}: {path} looks binary (a NUL byte at byte {offset + nul}), not text. Give UTF-8 "
                    ".txt/.json/.jsonl/.csv files or .parquet."
                )
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = min(max(0, err.start), len(chunk) - 1)
                where = f"line {line + chunk[:at].count(NEWLINE)}, byte {offset + at}"
                raise ValueError(
                    f"{flag}: {path} is not UTF-8 text (byte 0x{chunk[at]:02x} at {where}). Convert it, e.g. "
                    "`iconv -f latin1 -t utf-8 FILE > FILE.utf8.txt`."
                ) from err
            has_text = has_text or bool(text.strip())
            line += chunk.count(NEWLINE)
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise ValueError(f"{flag}: {path} is not UTF-8 text (it ends inside a multi-byte character).") from err
    return has_text


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _bad_json_line(path: str) -> str | None:
    """``"line N: ..."`` for the first line of a JSON Lines file that is not a JSON object, else None."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {n} is not valid JSON ({err.msg}, column {err.colno})"
            if not isinstance(row, dict):
                return f'line {n} is not a JSON object (each line must look like {{"text": "..."}})'
    return None


def _json_problem(path: str) -> str | None:
    """What makes a .json/.jsonl file unreadable, with its line, or None when it parses."""
    with open(path, encoding="utf-8") as f:
        try:
            json.load(f)
            return None  # one whole JSON document (an array of rows, say)
        except json.JSONDecodeError as err:
            whole = err
    problem = _bad_json_line(path)
    if problem and not (problem.startswith("line 1 ") and not path.endswith(".jsonl")):
        return problem
    return f"is not valid JSON ({whole.msg} at line {whole.lineno}, column {whole.colno})"


def _load_failure(builder: str, files: list[str], err: Exception, flag: str) -> str:
    """One line saying which file (and, for JSON, which line) ``datasets`` could not read."""
    if builder == "json":
        for path in files:
            problem = _json_problem(path)
            if problem:
                return f"{flag}: {path} {problem}. Fix it (JSON Lines: one object per line)."
    cause = _root_cause(err)
    shown = files[0] if len(files) == 1 else f"{len(files)} {builder} files ({files[0]}, ...)"
    return f"{flag}: could not read {shown}: {type(cause).__name__}: {cause}"


def _text_column(ds: Any, text_column: str, spec: CorpusSpec, flag: str) -> list[str]:
    if text_column not in ds.column_names:
        raise ValueError(
            f"{flag}: corpus {spec.raw!r} has no column {text_column!r} (columns: {', '.join(ds.column_names)}). "
            "Set --text_column."
        )
    return list(ds[text_column])


def split_documents(docs: Sequence[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle documents with ``seed`` and split off ``heldout_fraction`` of them (at least one).

    The split is by document, so held-out text never shares a document with the training blocks.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(docs) < 2:
        raise ValueError("need at least two documents to keep one held out")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_held = min(len(docs) - 1, max(1, round(heldout_fraction * len(docs))))
    held = [docs[i] for i in sorted(order[:n_held])]
    train = [docs[i] for i in sorted(order[n_held:])]
    return train, held


# ---------------------------------------------------------------------------------------------
# Tokenization into blocks
# ---------------------------------------------------------------------------------------------
def tokenize_and_block(
    texts: Sequence[str],
    tokenizer: Any,
    block_size: int,
    *,
    add_eos: bool = True,
    corpus_id: int | None = None,
    batch_size: int = 1000,
) -> Any:
    """Tokenize documents, concatenate them (an EOS after each) and cut the stream into blocks.

    Returns a ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` of length
    ``block_size``; ``labels == input_ids`` on real tokens and -100 on padding. Documents longer than
    a block continue in the next block; the final partial block is right-padded with the tokenizer's
    pad token (EOS when it has none), so no text is dropped. With ``corpus_id`` an integer column
    :data:`CORPUS_ID_COLUMN` is added (used to pair forget and retain corpora).
    """
    import datasets

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    pieces: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), add_special_tokens=False)["input_ids"]
        for ids in enc:
            if add_eos and eos is not None:
                ids = [*ids, eos]
            pieces.append(np.asarray(ids, dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_blocks = -(-len(stream) // block_size)
    total = n_blocks * block_size
    input_ids = np.full(total, pad, dtype=np.int64)
    input_ids[: len(stream)] = stream
    attention = np.zeros(total, dtype=np.int64)
    attention[: len(stream)] = 1
    labels = np.where(attention == 1, input_ids, IGNORE_INDEX)
    columns = {
        "input_ids": input_ids.reshape(n_blocks, block_size).tolist(),
        "attention_mask": attention.reshape(n_blocks, block_size).tolist(),
        "labels": labels.reshape(n_blocks, block_size).tolist(),
    }
    if corpus_id is not None:
        columns[CORPUS_ID_COLUMN] = [corpus_id] * n_blocks
    return datasets.Dataset.from_dict(columns)


# ---------------------------------------------------------------------------------------------
# Forget/retain pairing
# ---------------------------------------------------------------------------------------------
def _corpus_ids(dataset: Any) -> np.ndarray | None:
    names = getattr(dataset, "column_names", None)
    if names is not None and CORPUS_ID_COLUMN in names:
        return np.asarray(dataset[CORPUS_ID_COLUMN], dtype=np.int64)
    return None


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is forget example ``i`` plus one retain example.

    The retain keys get the prefix :data:`RETAIN_PREFIX`. The retain example paired with forget
    example ``i`` is fixed at construction: a seeded permutation of the retain pool, tiled to the
    forget length. When both datasets carry a :data:`CORPUS_ID_COLUMN`, forget examples of corpus
    ``k`` are paired only with retain examples of corpus ``k`` (the original tool's aligned splits);
    otherwise the whole retain dataset is one pool. Because the pairing is a function of the forget
    index, the Trainer's sampler, distributed sharding and resume-time batch skipping apply to both
    halves at once.
    """

    def __init__(self, forget: Any, retain: Any, seed: int = 42):
        if isinstance(forget, torch.utils.data.IterableDataset) or not hasattr(forget, "__len__"):
            raise TypeError(
                "retain_dataset needs a map-style train_dataset (with __len__); got an iterable dataset. "
                "Materialise the forget data or train without retain_dataset."
            )
        if len(retain) == 0:
            raise ValueError("retain_dataset is empty")
        self.forget = forget
        self.retain = retain
        rng = np.random.default_rng(seed)
        f_ids, r_ids = _corpus_ids(forget), _corpus_ids(retain)
        if f_ids is None or r_ids is None:
            f_ids = np.zeros(len(forget), dtype=np.int64)
            r_ids = np.zeros(len(retain), dtype=np.int64)
        index = np.empty(len(forget), dtype=np.int64)
        for group in np.unique(f_ids):
            f_pos = np.flatnonzero(f_ids == group)
            pool = np.flatnonzero(r_ids == group)
            if len(pool) == 0:
                raise ValueError(f"forget corpus {group} has no retain corpus to pair with (corpus_id {group})")
            index[f_pos] = np.resize(rng.permutation(pool), len(f_pos))
        self.retain_index = index

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.forget[i])
        for key, value in self.retain[int(self.retain_index[i])].items():
            item[RETAIN_PREFIX + key] = value
        return item


class ForgetRetainCollator:
    """Collate paired features with the user's collator, once per half.

    Features without retain keys (evaluation batches, for instance) go to ``collator`` as they are;
    columns starting with :data:`PASSTHROUGH_PREFIX` are handed on as Python lists.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        passthrough = {
            k: [f[k] for f in features] for k in (features[0] if features else {}) if k.startswith(PASSTHROUGH_PREFIX)
        }
        if passthrough:
            features = [{k: v for k, v in f.items() if k not in passthrough} for f in features]
            return {**self._collate(features), **passthrough}
        return self._collate(features)

    def _collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features or not any(k.startswith(RETAIN_PREFIX) for k in features[0]):
            return self.collator(features)
        forget = [{k: v for k, v in f.items() if not k.startswith(RETAIN_PREFIX)} for f in features]
        retain = [{k[len(RETAIN_PREFIX) :]: v for k, v in f.items() if k.startswith(RETAIN_PREFIX)} for f in features]
        batch = dict(self.collator(forget))
        for key, value in self.collator(retain).items():
            batch[RETAIN_PREFIX + key] = value
        return batch


def check_token_dataset(dataset: Any, name: str) -> None:
    """``ValueError`` naming ``name`` when ``dataset`` has no ``input_ids`` (text that was not tokenized).

    Checked from ``column_names`` (``datasets``) or the first item (map-style datasets of dicts); an
    iterable dataset without either is not checked.
    """
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset) > 0:
        first = dataset[0]
        columns = list(first) if isinstance(first, dict) else None
    if columns is not None and "input_ids" not in columns:
        raise ValueError(
            f"{name} has no 'input_ids' column (its columns: {', '.join(map(str, columns)) or 'none'}): it needs "
            "token ids. Tokenize the text first, e.g. etu_hf.data.tokenize_and_block(texts, tokenizer, block_size=512)."
        )


def split_forget_retain(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a (possibly paired) batch into its forget half and its retain half (or ``None``)."""
    forget = {k: v for k, v in inputs.items() if not k.startswith(RETAIN_PREFIX)}
    retain = {k[len(RETAIN_PREFIX) :]: v for k, v in inputs.items() if k.startswith(RETAIN_PREFIX)}
    return forget, (retain or None)


# ---------------------------------------------------------------------------------------------
# Iterating collated batches (for counting and estimation, outside the training loop)
# ---------------------------------------------------------------------------------------------
MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def iter_batches(
    dataset: Any, collator: Callable | None, batch_size: int, indices: Iterable[int] | None = None
) -> Iterable[dict[str, torch.Tensor]]:
    """Yield collated batches of ``dataset`` (only ``input_ids``/``attention_mask``/``labels``).

    The user's ``collator`` is applied, so the batches are what the training loop sees (padding and
    -100 labels included); extra columns are dropped first.
    """
    from transformers import default_data_collator

    collate = collator or default_data_collator
    order = list(indices) if indices is not None else range(len(dataset))
    for start in range(0, len(order), batch_size):
        feats = [dataset[int(i)] for i in order[start : start + batch_size]]
        feats = [{k: f[k] for k in MODEL_KEYS if k in f} for f in feats]
        batch = collate(feats)
        yield {k: batch[k] for k in MODEL_KEYS if k in batch}
