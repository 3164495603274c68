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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_LOCAL_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

#: Short names accepted in corpus specs for common unlearning corpora (WikiText-2 and the WMDP cyber and
#: bio corpora), expanded to ``(hub repo, config, split)``.
CORPUS_ALIASES = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    "cyber-forget-corpus": ("cais/wmdp-corpora", "cyber-forget-corpus", "train"),
    "cyber-retain-corpus": ("cais/wmdp-corpora", "cyber-retain-corpus", "train"),
    "bio-retain-corpus": ("cais/wmdp-corpora", "bio-retain-corpus", "train"),
}


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


def looks_local(spec: str) -> bool:
    """Whether a corpus spec reads as a local path (not a hub dataset id)."""
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
        elif looks_local(item):
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


#: Compressed files ``datasets`` reads as they are (``corpus.jsonl.gz``): the suffix before it decides the format.
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")

#: Files only an etu-hf run folder holds: such a folder given as a corpus is refused (its JSON files are not text).
_RUN_FOLDER_FILES = ("V_S.ids.json", "args.json")


def _builder(path: str) -> str | None:
    """The ``datasets`` builder of a corpus file (``text``, ``json``, ``parquet``, ``csv``), or None."""
    stem, ext = os.path.splitext(path.lower())
    if ext in _COMPRESSED:
        ext = os.path.splitext(stem)[1]
    return _LOCAL_SUFFIXES.get(ext)


def _local_files(path: str, flag: str = "--forget_corpora") -> list[str]:
    known = ".txt/.json/.jsonl/.parquet/.csv (optionally compressed: .gz, .bz2, .xz, .zst)"
    if os.path.isfile(path):
        if _builder(path) is None:
            raise ValueError(f"{flag}: {path} is not a corpus file this command reads; give {known} files.")
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} is neither a file nor a folder (a FIFO or a device?); give {known} files.")
    found = [n for n in _RUN_FOLDER_FILES if os.path.isfile(os.path.join(path, n))]
    if found:
        raise ValueError(
            f"{flag}: {path!r} is an etu-hf run folder ({', '.join(found)}), not a corpus; give the text files the run "
            "was trained on."
        )
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if _builder(n) is not None]
    return sorted(files)


def load_corpus(spec: CorpusSpec, text_column: str = "text", flag: str = "--forget_corpora") -> list[str]:
    """Load the documents of one corpus as a list of strings (empty documents removed).

    Local ``.txt`` files are split into documents at blank lines (``datasets``' text loader with
    ``sample_by="paragraph"``), so a document keeps its lines together; structured files and hub
    datasets give one document per row of ``text_column``.
    """
    import datasets

    if spec.kind == "local":
        files = _local_files(spec.path, flag)
        if not files:
            raise FileNotFoundError(f"{flag}: folder {spec.path!r} holds no .txt/.json/.jsonl/.parquet/.csv file.")
        texts: list[str] = []
        for builder in sorted({_builder(f) for f in files}):
            group = [f for f in files if _builder(f) == builder]
            group = [
                f
                for f in group
                if os.path.getsize(f) > 0
                and (builder == "parquet" or f.endswith(_COMPRESSED) or _check_text_file(f, flag))
            ]
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
        for path in (f for f in files if not f.endswith(_COMPRESSED)):
            problem = _json_problem(path)
            if problem:
                return f"{flag}: {path} {problem}. Fix it (JSON Lines: one object per line)."
    cause = _root_cause(err)
    shown = files[0] if len(files) == 1 else f"{len(files)} {builder} files ({files[0]}, ...)"
    first = (str(cause).strip().splitlines() or [""])[0][:300]  # datasets' schema errors run to 80 lines
    return f"{flag}: could not read {shown}: {type(cause).__name__}: {first}"


def _text_column(ds: Any, text_column: str, spec: CorpusSpec, flag: str) -> list[str]:
    if text_column not in ds.column_names:
        raise ValueError(
            f"{flag}: corpus {spec.raw!r} has no column {text_column!r} (columns: {', '.join(ds.column_names)}). "
            "Set --text_column."
        )
    texts = list(ds[text_column])
    for row, value in enumerate(texts, 1):
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{flag}: corpus {spec.raw!r}, column {text_column!r} row {row} holds {type(value).__name__} "
                f"{str(value)[:40]!r}, not text; every row must be a string (or set --text_column)."
            )
    return texts


def split_documents(docs: Sequence[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split documents into ``(train, held)`` with ``datasets.Dataset.train_test_split`` (seeded).

    ``n_held = min(n - 1, max(1, round(heldout_fraction * n)))`` documents are held out: the first
    ``n_held`` of the seeded permutation ``np.random.default_rng(seed).permutation(n)`` that
    ``train_test_split`` draws. Both parts keep the corpus order. The split is by document, so
    held-out text never shares a document with the training blocks.
    """
    import datasets

    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(docs) < 2:
        raise ValueError("need at least two documents to keep one held out")
    n_held = min(len(docs) - 1, max(1, round(heldout_fraction * len(docs))))
    positions = datasets.Dataset.from_dict({"position": list(range(len(docs)))})
    parts = positions.train_test_split(test_size=n_held, seed=seed)
    # train_test_split returns its draw in permutation order; the blocks follow the documents as given.
    train, held = (sorted(parts[name]["position"]) for name in ("train", "test"))
    return [docs[i] for i in train], [docs[i] for i in held]


def load_documents(value: str | None, text_column: str, flag: str) -> list[str]:
    """All documents of a comma-separated list of corpus specs (see :func:`etu_hf.data.parse_corpus_specs`)."""
    return [doc for docs in load_corpora(parse_corpus_specs(value, flag), text_column, flag) for doc in docs]


def load_corpora(specs: list[CorpusSpec], text_column: str, flag: str) -> list[list[str]]:
    """The documents of each corpus spec (one list per spec, in order), with a log line for each."""
    out = []
    for spec in specs:
        docs = load_corpus(spec, text_column, flag)
        logger.info("%s: %s -> %d documents", flag, spec.describe(), len(docs))
        out.append(docs)
    return out


#: Warn when at least this share of the forget documents also appears in the retain corpus.
OVERLAP_WARN_SHARE = 0.5


def warn_if_corpora_overlap(forget_docs: list[str], retain_docs: list[str]) -> float:
    """Share of the forget documents that are also retain documents; warns from :data:`OVERLAP_WARN_SHARE`.

    Identical corpora give V_S nothing to separate (PMI scores near 0: V_S becomes a few stray pieces)
    and the retain term trains back what the forget term removes.
    """
    if not forget_docs or not retain_docs:
        return 0.0
    retain = set(retain_docs)
    share = sum(doc in retain for doc in forget_docs) / len(forget_docs)
    if share >= OVERLAP_WARN_SHARE:
        msg = (
            f"{share:.0%} of the forget documents are also in the retain corpus (are --forget_corpora and "
            "--retain_corpora the same?): V_S cannot separate the topic and the retain term trains back what is "
            "forgotten. Give retain text that is not about the forget topic."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        logger.warning(msg)
    return share
