"""Build the real-text ETU benchmark case: corpora, tokenizer and a tiny pretrained Llama.

Everything comes from text already on the machine, nothing is generated:

* forget = docstrings of one subject area, linear algebra: ``numpy.linalg``, numpy's core linear-algebra
  routines (``numpy.dot``, ``matmul``, ``einsum``, ``numpy.matrix`` ...), ``scipy.linalg`` (with
  ``scipy.linalg.interpolative``), ``scipy.sparse`` (sparse matrices) and ``scipy.sparse.linalg``;
* retain = docstrings of unrelated standard-library modules (json, email, http, urllib, logging,
  asyncio, sqlite3, tarfile, ...; see :data:`RETAIN_MODULES`).

A document is one function, class, method or property docstring (``inspect.getdoc``), normalised
(whitespace-only lines removed, so that no blank line splits it when ``etu-hf unlearn`` reads the
``.txt`` file, whose documents are separated by blank lines), at least :data:`MIN_CHARS` characters,
deduplicated and sorted by qualified name. A retain document that mentions the forget area (numpy,
scipy, matrices, eigenvalues, LAPACK, ...) is dropped, and a text found in both pools is dropped from
both, so neither side leaks into the other.

A small share of the documents of each side (``pretrain_valid_*.txt``) is kept out of everything, so
that the pretraining perplexity can also be reported on text the model never saw. The rest is
``forget.txt`` and ``retain.txt`` (the corpora for ``etu-hf unlearn``) and the model is pretrained on
all of it (``pretrain.txt`` = both files, shuffled): it "knows" the forget area. ``etu-hf unlearn``
then holds out ``--eval_fraction`` of these documents from the unlearning run itself.

Then a byte-level BPE tokenizer (vocab 4096) is trained on forget + retain, and a tiny Llama (hidden
128, 4 layers, 4 heads, intermediate 512, untied output head, 2.1M parameters) is pretrained with the
plain ``transformers.Trainer`` on blocks of 128 tokens.

Output goes to ``benchmarks/real_text/.cache/`` (``--cache_dir``); a build is skipped when
``manifest.json`` there holds the same settings, Python/numpy/scipy versions and corpus sha256.
About 4-5 minutes on 2 idle CPU cores (700 pretraining steps at ~0.35 s)::

    python benchmarks/real_text/build.py [--cache_dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import re
import resource
import shutil
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CACHE = os.path.join(HERE, ".cache")

#: Subject area of the forget corpus: linear algebra. Modules whose public members are all taken ...
FORGET_MODULES = [
    "numpy.linalg", "scipy.linalg", "scipy.linalg.interpolative", "scipy.sparse", "scipy.sparse.linalg",
]  # fmt: skip
#: ... plus numpy's core linear-algebra routines (numpy reference, "Linear algebra" page).
FORGET_NUMPY_MEMBERS = [
    "dot", "vdot", "inner", "outer", "matmul", "matvec", "vecmat", "vecdot", "tensordot", "einsum",
    "einsum_path", "kron", "trace", "cross", "matrix",
]  # fmt: skip
#: Unrelated standard-library modules, all importable on any CPython build (no maths: statistics, random, math,
#: cmath, decimal, fractions, numbers, array, builtins are left out; nor optional ones such as tkinter, curses).
RETAIN_MODULES = [
    "argparse", "asyncio", "ast", "atexit", "base64", "bdb", "binascii", "bz2", "cProfile", "calendar", "cmd", "code",
    "codecs", "codeop", "collections", "compileall", "concurrent.futures", "configparser", "contextlib",
    "contextvars", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "doctest", "email.charset",
    "email.contentmanager", "email.encoders", "email.feedparser", "email.generator", "email.header",
    "email.headerregistry", "email.iterators", "email.message", "email.mime.text", "email.parser", "email.policy",
    "email.utils", "enum", "errno", "faulthandler", "filecmp", "fileinput", "fnmatch", "ftplib", "functools", "gc",
    "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "hmac", "html", "html.parser",
    "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib.metadata",
    "importlib.resources", "importlib.util", "inspect", "io", "ipaddress", "json", "json.decoder", "json.encoder",
    "keyword", "linecache", "locale", "logging", "logging.config", "logging.handlers", "lzma", "mailbox", "mimetypes",
    "mmap", "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.queues", "multiprocessing.synchronize", "netrc", "optparse", "os", "os.path", "pathlib", "pdb",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "py_compile", "pyclbr",
    "pydoc", "queue", "quopri", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "string", "struct",
    "subprocess", "symtable", "sys", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing", "unittest",
    "unittest.mock", "urllib.parse", "urllib.request", "urllib.response", "urllib.robotparser", "uuid", "venv",
    "warnings", "weakref", "webbrowser", "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server",
    "wsgiref.util", "wsgiref.validate", "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax",
    "xml.sax.handler", "xml.sax.saxutils", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib",
    "zoneinfo",
]  # fmt: skip
#: A retain document matching this is about the forget area and is dropped.
FORGET_AREA_RE = re.compile(
    r"numpy|scipy|linalg|\bnp\.|ndarray|matri(x|ces)|eigen|determinant|singular value|lapack|\bblas\b|"
    r"cholesky|hermitian|orthogonal|orthonormal|factori[sz]ation|least.squares|\bsvd\b",
    re.IGNORECASE,
)
#: Base classes whose methods are not about the subject area (numpy.matrix keeps its own methods only).
GENERIC_BASES = ("numpy.ndarray",)
MIN_CHARS = 200

SETTINGS = {
    "corpus_version": 1,
    "min_chars": MIN_CHARS,
    "valid_fraction": 0.04,
    "seed": 1234,
    "vocab_size": 4096,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "block_size": 128,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "warmup_steps": 50,
    "max_steps": 700,
    "eval_steps": 100,
    "weight_decay": 0.01,
    "lr_scheduler_type": "cosine",
}

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
FILES = {
    "forget": "forget.txt",
    "retain": "retain.txt",
    "valid_forget": "pretrain_valid_forget.txt",
    "valid_retain": "pretrain_valid_retain.txt",
    "pretrain": "pretrain.txt",
}


def log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_cpu_env(threads: int = 2) -> None:
    """Thread counts and glibc malloc settings (PLATFORM_NOTES: 1.6-2.5x faster tiny-model steps).

    The malloc variables are read at process start, so they only help subprocesses and re-executed runs;
    :func:`main` re-executes itself once when they are missing."""
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(key, str(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "4294967296")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "4294967296")


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------
def normalize(doc: str) -> str:
    """One document per docstring: tabs expanded, trailing spaces and whitespace-only lines removed."""
    lines = [line.rstrip() for line in doc.expandtabs(4).replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(line for line in lines if line.strip()).strip()


def _doc(obj) -> str | None:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    try:
        return inspect.getdoc(obj)
    except Exception:  # some C objects raise on attribute access
        return None


def _members(obj) -> list[tuple[str, object]]:
    names = sorted(n for n in dir(obj) if not n.startswith("_"))
    out = []
    for name in names:
        try:
            out.append((name, getattr(obj, name)))
        except Exception:
            continue
    return out


def _class_docs(prefix: str, cls: type, owners: tuple[str, ...], out: dict[str, str]) -> None:
    """Docstrings of a class's public methods and properties, including those inherited from base classes
    of the same owners (not from ``object`` or builtins)."""
    for base in cls.__mro__:
        if base is not cls and (not _owned(base, owners) or f"{base.__module__}.{base.__qualname__}" in GENERIC_BASES):
            continue
        for name, attr in sorted(vars(base).items()):
            if name.startswith("_") or f"{prefix}.{name}" in out:
                continue
            if not (inspect.isroutine(attr) or isinstance(attr, (property, staticmethod, classmethod))):
                continue
            text = attr.__doc__ if isinstance(attr, property) else _doc(attr)
            if text:
                out[f"{prefix}.{name}"] = text


def _owned(obj, owners: tuple[str, ...]) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return any(module == o or module.startswith(o + ".") for o in owners)


def collect(modules: list[str], owners: tuple[str, ...], extra: list[tuple[str, object]] = ()) -> dict[str, str]:
    """Qualified name -> raw docstring for the public functions and classes (and their own methods)
    of ``modules`` whose ``__module__`` belongs to ``owners`` (so re-exports of other packages and
    builtins such as ``int`` constants are left out)."""
    found: dict[str, str] = {}
    items: list[tuple[str, object]] = list(extra)
    for modname in modules:
        module = importlib.import_module(modname)
        items += [(f"{modname}.{name}", obj) for name, obj in _members(module)]
    for qualname, obj in items:
        if not (inspect.isroutine(obj) or inspect.isclass(obj)) or not _owned(obj, owners):
            continue
        if qualname.rsplit(".", 1)[-1] == "test":  # scipy's PytestTester
            continue
        text = _doc(obj) if not inspect.isclass(obj) or obj.__doc__ else None  # no inherited class docs
        if text:
            found[qualname] = text
        if inspect.isclass(obj):
            _class_docs(qualname, obj, owners, found)
    return found


def build_corpus(min_chars: int = MIN_CHARS) -> dict[str, dict[str, str]]:
    """``{"forget": {name: text}, "retain": {name: text}, "stats": {...}}`` (texts normalised, filtered,
    deduplicated; a text kept under its first qualified name in sorted order)."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = [(f"numpy.{n}", getattr(np, n)) for n in FORGET_NUMPY_MEMBERS if hasattr(np, n)]
        forget_raw = collect(FORGET_MODULES, ("numpy", "scipy"), extra)
        tops = {m.split(".")[0] for m in RETAIN_MODULES}
        stdlib_owners = tuple(sorted(tops | {"_" + m for m in tops} | {"posix", "posixpath", "pyexpat"}))
        retain_raw = collect(RETAIN_MODULES, stdlib_owners)

    def clean(raw: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        seen: set[str] = set()
        for name in sorted(raw):
            text = normalize(raw[name])
            if len(text) < min_chars or text in seen:
                continue
            seen.add(text)
            out[name] = text
        return out

    forget, retain = clean(forget_raw), clean(retain_raw)
    stats = {"forget_candidates": len(forget_raw), "retain_candidates": len(retain_raw)}
    shared = set(forget.values()) & set(retain.values())
    leaked = {n for n, t in retain.items() if FORGET_AREA_RE.search(t)}
    forget = {n: t for n, t in forget.items() if t not in shared}
    retain = {n: t for n, t in retain.items() if t not in shared and n not in leaked}
    stats.update({"dropped_shared_texts": len(shared), "dropped_retain_mentioning_forget_area": len(leaked)})
    # Checks: neither side's text appears in the other; no retain text mentions the forget area; no blank
    # line inside a document (it would split it when read back as a .txt corpus).
    assert not set(forget.values()) & set(retain.values())
    assert not any(FORGET_AREA_RE.search(t) for t in retain.values())
    assert not any("\n\n" in t or t != t.strip() for t in [*forget.values(), *retain.values()])
    return {"forget": forget, "retain": retain, "stats": stats}


def split_valid(docs: dict[str, str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of a sorted document dict into (kept, pretraining-validation) name lists."""
    import numpy as np

    names = sorted(docs)
    n_valid = max(1, round(fraction * len(names)))
    order = np.random.default_rng(seed).permutation(len(names))
    valid = sorted(names[i] for i in order[:n_valid])
    kept = sorted(names[i] for i in order[n_valid:])
    return kept, valid


def write_docs(path: str, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n\n".join(texts) + "\n")


def read_docs(path: str) -> list[str]:
    """Documents of a ``.txt`` corpus the way ``etu-hf unlearn`` reads it (split at blank lines, stripped)."""
    with open(path, encoding="utf-8") as f:
        return [d.strip() for d in f.read().split("\n\n") if d.strip()]


def sha256_texts(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizer, blocks, model
# ---------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """The demo's byte-level BPE tokenizer trainer (etu_hf.demo.pretrain), same special tokens."""
    from etu_hf.demo.pretrain import EOS_TOKEN as DEMO_EOS
    from etu_hf.demo.pretrain import PAD_TOKEN as DEMO_PAD
    from etu_hf.demo.pretrain import train_tokenizer as demo_train_tokenizer

    if (DEMO_EOS, DEMO_PAD) != (EOS_TOKEN, PAD_TOKEN):  # the model config written below relies on these
        raise RuntimeError(f"special tokens differ from etu_hf.demo.pretrain: {(DEMO_EOS, DEMO_PAD)}")
    return demo_train_tokenizer(texts, vocab_size)


def token_stream(texts: list[str], tokenizer) -> list[int]:
    """Documents tokenized and concatenated, an EOS after each (as ``etu-hf unlearn`` blocks them)."""
    ids: list[int] = []
    for start in range(0, len(texts), 1000):
        for piece in tokenizer(texts[start : start + 1000], add_special_tokens=False)["input_ids"]:
            ids += [*piece, tokenizer.eos_token_id]
    return ids


def blocks(stream: list[int], block_size: int) -> list[list[int]]:
    """Cut a token stream into blocks of ``block_size``; the last one may be shorter (kept, not padded)."""
    return [stream[i : i + block_size] for i in range(0, len(stream), block_size)]


def block_perplexity(model, tokenizer, texts: list[str], block_size: int = 128, batch_size: int = 32) -> dict:
    """exp(mean next-token NLL) over the documents cut into ``block_size``-token blocks, with the model's
    own cross-entropy: a plain loop, independent of etu_hf. Returns ``{"perplexity", "nll", "tokens",
    "blocks"}`` (``tokens``: predicted positions, ``block_size - 1`` per full block)."""
    import torch
    import torch.nn.functional as F

    chunks = blocks(token_stream(texts, tokenizer), block_size)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        by_len: dict[int, list[list[int]]] = {}
        for c in chunks:
            if len(c) >= 2:
                by_len.setdefault(len(c), []).append(c)
        for length in sorted(by_len):
            group = by_len[length]
            for start in range(0, len(group), batch_size):
                ids = torch.tensor(group[start : start + batch_size], dtype=torch.long)
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
                total += nll.item()
                count += ids[:, 1:].numel()
    mean = total / max(count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "blocks": len(chunks)}


def versions() -> dict[str, str]:
    import numpy
    import scipy
    import tokenizers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def manifest_key(manifest: dict) -> dict:
    """What decides whether a cached build is still valid."""
    v = manifest.get("versions", {})
    return {
        "settings": manifest.get("settings"),
        "python": v.get("python"),
        "numpy": v.get("numpy"),
        "scipy": v.get("scipy"),
        "corpus_sha256": manifest.get("corpus_sha256"),
    }


def padded_examples(texts: list[str], tokenizer, block_size: int) -> list[dict]:
    """Training examples: full blocks, the last one right-padded (padding masked out of the loss)."""
    pieces = blocks(token_stream(texts, tokenizer), block_size)
    pieces[-1] = pieces[-1] + [tokenizer.pad_token_id] * (block_size - len(pieces[-1]))
    out = []
    for p in pieces:
        mask = [1 if t != tokenizer.pad_token_id else 0 for t in p]
        labels = [t if m else -100 for t, m in zip(p, mask, strict=True)]
        out.append({"input_ids": p, "attention_mask": mask, "labels": labels})
    return out


def pretrain(
    cache: str, texts: list[str], tokenizer, settings: dict, valid: dict[str, list[str]]
) -> tuple[object, list[dict], float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    s = settings
    train = padded_examples(texts, tokenizer, s["block_size"])
    evals = {k: padded_examples(v, tokenizer, s["block_size"]) for k, v in valid.items()}
    tokens = len(train) * s["block_size"]
    epochs = s["max_steps"] * s["batch_size"] / len(train)
    log(f"pretraining on {len(train)} blocks of {s['block_size']} tokens ({tokens:,} tokens): {s['max_steps']} steps "
        f"of {s['batch_size']} blocks = {epochs:.1f} epochs")  # fmt: skip

    torch.manual_seed(s["seed"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_attention_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    log(f"model: {model.num_parameters():,} parameters")
    history: list[dict] = []

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                entry = {"step": state.global_step, "loss": logs["loss"], "elapsed_s": round(time.time() - t0, 1)}
                history.append(entry)
                log(f"step {entry['step']}/{state.max_steps} train loss {entry['loss']:.3f} "
                    f"(ppl {math.exp(entry['loss']):.1f}) {entry['elapsed_s']:.0f}s")  # fmt: skip
            elif logs and any(k.endswith("_loss") and k.startswith("eval_") for k in logs):
                found = {k[5:-5]: v for k, v in logs.items() if k.startswith("eval_") and k.endswith("_loss")}
                history.append({"step": state.global_step, **{f"{k}_loss": v for k, v in found.items()}})
                shown = ", ".join(f"{k} {math.exp(v):.1f}" for k, v in found.items())
                log(f"step {state.global_step}: held-out perplexity (documents never trained on): {shown}")

    def collate(batch):
        return {k: torch.tensor([b[k] for b in batch], dtype=torch.long) for k in batch[0]}

    tmp = os.path.join(cache, "trainer_tmp")
    targs = TrainingArguments(
        output_dir=tmp,
        per_device_train_batch_size=s["batch_size"],
        max_steps=s["max_steps"],
        learning_rate=s["learning_rate"],
        warmup_steps=s["warmup_steps"],
        lr_scheduler_type=s["lr_scheduler_type"],
        weight_decay=s["weight_decay"],
        logging_steps=100,
        eval_strategy="steps",
        eval_steps=s["eval_steps"],
        per_device_eval_batch_size=64,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=s["seed"],
        data_seed=s["seed"],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    t0 = time.time()
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=evals,
        data_collator=collate,
        callbacks=[Progress()],
    )
    trainer.train()
    shutil.rmtree(tmp, ignore_errors=True)
    return model, history, time.time() - t0


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def collect_texts(settings: dict) -> dict:
    """The forget/retain documents and their validation parts (and, under ``_parts``, the corpus and the
    names of each side's kept and validation documents)."""
    log(f"collecting docstrings (Python {platform.python_version()})")
    corpus = build_corpus(settings["min_chars"])
    forget_keep, forget_valid = split_valid(corpus["forget"], settings["valid_fraction"], settings["seed"])
    retain_keep, retain_valid = split_valid(corpus["retain"], settings["valid_fraction"], settings["seed"] + 1)
    return {
        "forget": [corpus["forget"][n] for n in forget_keep],
        "retain": [corpus["retain"][n] for n in retain_keep],
        "valid_forget": [corpus["forget"][n] for n in forget_valid],
        "valid_retain": [corpus["retain"][n] for n in retain_valid],
        "_parts": (corpus, (forget_keep, forget_valid), (retain_keep, retain_valid)),
    }


def write_corpora(cache_dir: str, settings: dict | None = None) -> dict:
    """Only the corpora (forget.txt, retain.txt and the validation files) in ``cache_dir``, for a run on a
    model of the user's (no tokenizer training, no pretraining); returns the settings used."""
    settings = {**SETTINGS, **(settings or {})}
    texts = collect_texts(settings)
    texts.pop("_parts")
    os.makedirs(cache_dir, exist_ok=True)
    for key, name in FILES.items():
        if key in texts:
            write_docs(os.path.join(cache_dir, name), texts[key])
    return settings


def build(cache_dir: str = DEFAULT_CACHE, force: bool = False, settings: dict | None = None) -> dict:
    """Build (or reuse) the benchmark case in ``cache_dir``; return its manifest."""
    set_cpu_env()
    import torch

    torch.set_num_threads(2)
    settings = {**SETTINGS, **(settings or {})}
    t_start = time.time()
    texts = collect_texts(settings)
    corpus, (forget_keep, forget_valid), (retain_keep, retain_valid) = texts.pop("_parts")
    sha = {k: sha256_texts(v) for k, v in texts.items()}
    manifest_path = os.path.join(cache_dir, "manifest.json")
    wanted = {"settings": settings, "versions": versions(), "corpus_sha256": sha}
    if not force and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if manifest_key(old) == manifest_key(wanted) and os.path.exists(
            os.path.join(cache_dir, "model", "config.json")
        ):
            log(f"up to date: {cache_dir} (same settings, versions and corpus sha256); --force rebuilds")
            return old
        log("cached build differs (settings, versions or corpus); rebuilding")

    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an interrupted rebuild must not look complete
    os.makedirs(cache_dir, exist_ok=True)
    for key, name in FILES.items():
        if key != "pretrain":
            write_docs(os.path.join(cache_dir, name), texts[key])
            assert read_docs(os.path.join(cache_dir, name)) == texts[key], f"{name} does not read back"
    import numpy as np

    pretrain_texts = texts["forget"] + texts["retain"]
    order = np.random.default_rng(settings["seed"]).permutation(len(pretrain_texts))
    pretrain_texts = [pretrain_texts[i] for i in order]
    write_docs(os.path.join(cache_dir, FILES["pretrain"]), pretrain_texts)
    with open(os.path.join(cache_dir, "documents.json"), "w") as f:
        json.dump(
            {"forget": forget_keep, "retain": retain_keep, "valid_forget": forget_valid, "valid_retain": retain_valid},
            f,
            indent=0,
        )
    log(
        f"corpus: forget {len(texts['forget'])} documents (+{len(forget_valid)} validation), retain "
        f"{len(texts['retain'])} (+{len(retain_valid)}); {corpus['stats']}"
    )

    t_tok = time.time()
    tokenizer = train_tokenizer(texts["forget"] + texts["retain"], settings["vocab_size"])
    counts = {k: len(token_stream(v, tokenizer)) for k, v in texts.items()}
    chars = {k: sum(len(t) for t in v) for k, v in texts.items()}
    log(
        f"tokenizer: |V| = {len(tokenizer)} in {time.time() - t_tok:.1f}s; tokens (incl. one EOS per document) {counts}"
    )

    valid = {"valid_forget": texts["valid_forget"], "valid_retain": texts["valid_retain"]}
    model, history, train_s = pretrain(cache_dir, pretrain_texts, tokenizer, settings, valid)
    model_dir = os.path.join(cache_dir, "model")
    tmp_dir = model_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp_dir, model_dir)

    log("measuring perplexity on 128-token blocks")
    ppl = {k: block_perplexity(model, tokenizer, v, settings["block_size"]) for k, v in texts.items()}
    for k, v in ppl.items():
        log(f"  {k:13s} perplexity {v['perplexity']:8.2f} over {v['tokens']:,} predicted tokens")
    manifest = {
        "format": "etu-hf/real-text-benchmark",
        "version": 1,
        **wanted,
        "documents": {k: len(v) for k, v in texts.items()},
        "characters": chars,
        "tokens": counts,
        "corpus_stats": corpus["stats"],
        "vocab_size": len(tokenizer),
        "parameters": model.num_parameters(),
        "pretrain_history": history,
        "pretrain_seconds": round(train_s, 1),
        "perplexity": {k: round(v["perplexity"], 3) for k, v in ppl.items()},
        "perplexity_definition": "exp(mean next-token NLL) on 128-token blocks of the documents concatenated with an "
        "EOS after each; forget/retain: the documents pretrained on; valid_*: documents never seen",
        "build_seconds": round(time.time() - t_start, 1),
        "build_cpu_seconds": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 1),
        "files": FILES,
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"built in {manifest['build_seconds']:.0f}s ({manifest['build_cpu_seconds']:.0f} CPU s) -> {cache_dir}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE, help="where the build goes (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    parser.add_argument(
        "--max_steps", type=int, default=None, help=f"pretraining steps (default {SETTINGS['max_steps']})"
    )
    args = parser.parse_args(argv)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and argv is None:  # malloc reads these at start: re-exec once
        set_cpu_env()
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    overrides = {"max_steps": args.max_steps} if args.max_steps else {}
    m = build(args.cache_dir, args.force, overrides)
    print(json.dumps({k: m[k] for k in ("documents", "tokens", "perplexity", "build_seconds")}, indent=1))


if __name__ == "__main__":
    main()
