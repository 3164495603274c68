"""A real-knowledge unlearning benchmark (RWKU-shaped): facts a pretrained model demonstrably knows,
probes that ask for them, and text about each target to unlearn from.

A knowledge benchmark folder holds:

- ``benchmark.json``: ``{"kind": "knowledge", "name", "targets": [...], "dropped": [...], "settings": {...}}``;
  ``targets`` are the kept targets, in order (the first is the default ``--target``); ``dropped`` the
  candidates the base model did not know well enough (their probes stay in probes.jsonl and are skipped);
- ``probes.jsonl``: one probe a line: ``id``, ``target`` (the target a forget or neighbour probe belongs
  to; empty for utility probes), ``group`` (:data:`GROUPS`), ``form`` (:data:`FORMS`), ``prompt``,
  ``answer`` (what is scored teacher-forced) and ``keywords`` (a greedy answer is right when it contains
  one, case-insensitively);
- ``forget.jsonl``: ``target``, ``text``: the forget corpus of each target;
- ``retain.jsonl``: ``text``: other topics (neighbours included), trained on as the retain term;
- ``retain_heldout.jsonl``: ``text``: other documents of the same kind, for the retain perplexity.

Groups: ``forget`` probes ask for the target's facts (they must fall), ``neighbour`` probes ask for facts
of related entities (same genre or field, sharing words: they must stay), ``utility`` probes are general
knowledge (they must stay). A probe is put to the model as plain text to complete (``completion``: the
answer follows after one space) or as a user turn of the tokenizer's chat template (``question``; a
tokenizer without a template gets ``Question: ...\\nAnswer:``): :func:`encode_probe`.

The built-in one, ``--benchmark smollm2-knowledge``, is :data:`BUILTIN_DIR`: hand-written probes and text
SmolLM2-135M-Instruct wrote about each target (benchmarks/real_model/build_knowledge.py rebuilds it).
See docs/real_model.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from etu_hf.benchmark.qa import format_prompt

KIND = "knowledge"
BUILTIN_NAME = "smollm2-knowledge"
BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "assets", "knowledge-v1")
GROUPS: tuple[str, ...] = ("forget", "neighbour", "utility")
FORMS: tuple[str, ...] = ("completion", "question")
PROBE_FIELDS: tuple[str, ...] = ("id", "target", "group", "form", "prompt", "answer", "keywords")
#: The value of ``--target`` that unlearns every target at once.
ALL_TARGETS = "all"
FLAG = "--benchmark"


@dataclass
class KnowledgeBenchmark:
    """The content of a knowledge benchmark folder (see the module docstring)."""

    name: str
    targets: list[str]
    probes: list[dict[str, Any]]
    forget: dict[str, list[str]]
    retain: list[str]
    retain_heldout: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def resolve_targets(self, target: str | None, flag: str = "--target") -> list[str]:
        """The targets one run unlearns: ``None`` = the first, ``"all"`` = every target, else a name (or a
        comma list of names) of :attr:`targets`; ``ValueError`` naming ``flag`` otherwise."""
        if target is None:
            return self.targets[:1]
        if target == ALL_TARGETS:
            return list(self.targets)
        names = [t.strip() for t in target.split(",") if t.strip()]
        unknown = [t for t in names if t not in self.targets]
        if unknown or not names:
            raise ValueError(
                f"{flag}: {unknown or target!r} not a target of {self.name}; choose from {', '.join(self.targets)} "
                f"or '{ALL_TARGETS}'"
            )
        return names

    def probes_for(self, targets: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The probes of an unlearning of ``targets``, by group: their forget probes; the neighbour probes of
        those targets; every utility probe."""
        chosen = set(targets)
        return {
            "forget": [p for p in self.probes if p["group"] == "forget" and p["target"] in chosen],
            "neighbour": [p for p in self.probes if p["group"] == "neighbour" and p["target"] in chosen],
            "utility": [p for p in self.probes if p["group"] == "utility"],
        }

    def forget_texts(self, targets: list[str]) -> list[str]:
        return [t for name in targets for t in self.forget.get(name, [])]

    def save(self, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        meta = {
            "kind": KIND,
            "name": self.name,
            "targets": self.targets,
            "dropped": self.dropped,
            "settings": self.settings,
        }
        with open(os.path.join(folder, "benchmark.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        _write_jsonl(os.path.join(folder, "probes.jsonl"), self.probes)
        rows = [{"target": name, "text": t} for name in self.forget for t in self.forget[name]]
        _write_jsonl(os.path.join(folder, "forget.jsonl"), rows)
        _write_jsonl(os.path.join(folder, "retain.jsonl"), [{"text": t} for t in self.retain])
        _write_jsonl(os.path.join(folder, "retain_heldout.jsonl"), [{"text": t} for t in self.retain_heldout])
        return folder


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: str, folder: str) -> list[dict[str, Any]]:
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ValueError(f"{FLAG} {folder}: no {name}; a knowledge benchmark needs {name} (see docs)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{FLAG} {folder}: {name} line {n} is not JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{FLAG} {folder}: {name} line {n} is not a JSON object")
            rows.append(row)
    if not rows:
        raise ValueError(f"{FLAG} {folder}: {name} is empty; it needs at least one row")
    return rows


def is_knowledge_folder(folder: str) -> bool:
    """Whether ``folder`` holds a ``benchmark.json`` of kind ``knowledge``."""
    path = os.path.join(folder, "benchmark.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def is_knowledge_spec(spec: str) -> bool:
    """Whether a ``--benchmark`` value names a knowledge benchmark (the built-in name or such a folder)."""
    return spec == BUILTIN_NAME or (os.path.isdir(spec) and is_knowledge_folder(spec))


def check_probe(row: dict[str, Any], targets: list[str], where: str) -> dict[str, Any]:
    """A probe row checked: every field of :data:`PROBE_FIELDS`, known group and form, non-empty prompt and
    answer, a non-empty list of keywords, forget/neighbour probes naming a listed target."""
    missing = [k for k in PROBE_FIELDS if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (a probe needs {', '.join(PROBE_FIELDS)})")
    if row["group"] not in GROUPS:
        raise ValueError(f"{where}: group {row['group']!r} is not one of {', '.join(GROUPS)}")
    if row["form"] not in FORMS:
        raise ValueError(f"{where}: form {row['form']!r} is not one of {', '.join(FORMS)}")
    for key in ("prompt", "answer"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"{where}: {key} must be a non-empty string (every probe needs its answer)")
    kw = row["keywords"]
    if not (isinstance(kw, list) and kw and all(isinstance(k, str) and k.strip() for k in kw)):
        raise ValueError(f"{where}: keywords must be a non-empty list of non-empty strings, got {kw!r}")
    if row["group"] != "utility" and row["target"] not in targets:
        raise ValueError(f"{where}: target {row['target']!r} is not in benchmark.json's targets {targets}")
    return {k: row[k] for k in PROBE_FIELDS}


def load_knowledge_benchmark(folder: str) -> KnowledgeBenchmark:
    """Read and check a knowledge benchmark folder (``ValueError`` naming the folder, file and line)."""
    if folder == BUILTIN_NAME:
        folder = BUILTIN_DIR
    with open(os.path.join(folder, "benchmark.json"), encoding="utf-8") as f:
        meta = json.load(f)
    targets = meta.get("targets")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"{FLAG} {folder}: benchmark.json needs 'targets', a non-empty list of names")
    dropped = list(meta.get("dropped") or [])
    probes = [
        check_probe(row, targets, f"{FLAG} {folder}: probes.jsonl row {i}")
        for i, row in enumerate(_read_jsonl(os.path.join(folder, "probes.jsonl"), folder))
        if row.get("target") not in dropped
    ]
    forget: dict[str, list[str]] = {t: [] for t in targets}
    for i, row in enumerate(_read_jsonl(os.path.join(folder, "forget.jsonl"), folder)):
        if row.get("target") not in forget or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{FLAG} {folder}: forget.jsonl row {i} needs a listed 'target' and a non-empty 'text'")
        forget[row["target"]].append(row["text"])
    for target in targets:
        if not any(p["target"] == target and p["group"] == "forget" for p in probes) or not forget[target]:
            raise ValueError(f"{FLAG} {folder}: target {target!r} needs forget probes and forget.jsonl text")
    texts = {}
    for split in ("retain", "retain_heldout"):
        rows = _read_jsonl(os.path.join(folder, f"{split}.jsonl"), folder)
        if any(not isinstance(r.get("text"), str) or not r["text"].strip() for r in rows):
            raise ValueError(f"{FLAG} {folder}: every row of {split}.jsonl needs a non-empty 'text'")
        texts[split] = [r["text"] for r in rows]
    return KnowledgeBenchmark(
        name=meta.get("name") or os.path.basename(os.path.normpath(folder)),
        targets=list(targets),
        probes=probes,
        forget=forget,
        retain=texts["retain"],
        retain_heldout=texts["retain_heldout"],
        settings=dict(meta.get("settings") or {}),
        dropped=dropped,
    )


def question_prompt(tokenizer: Any, question: str) -> str:
    """A question as the model's prompt: the chat template's user turn and generation prompt when the
    tokenizer has a template, else :func:`etu_hf.benchmark.qa.format_prompt`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return format_prompt(question)


def encode_probe(tokenizer: Any, probe: dict[str, Any]) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` of a probe, tokenized separately so the answer's tokens do not depend on
    the prompt. Completion: the prompt with the tokenizer's special tokens, the answer as ``" " + answer``.
    Question with a chat template: the rendered template (its own special tokens, none added), the answer
    as is; without a template: ``Question: ...\\nAnswer:`` and ``" " + answer``."""
    templated = probe["form"] == "question" and bool(getattr(tokenizer, "chat_template", None))
    if probe["form"] == "completion":
        prompt = tokenizer(probe["prompt"], add_special_tokens=True)["input_ids"]
    elif templated:
        prompt = tokenizer(question_prompt(tokenizer, probe["prompt"]), add_special_tokens=False)["input_ids"]
    else:
        prompt = tokenizer(format_prompt(probe["prompt"]), add_special_tokens=True)["input_ids"]
    answer = tokenizer(probe["answer"] if templated else " " + probe["answer"], add_special_tokens=False)
    return list(prompt), list(answer["input_ids"])


def load_any_benchmark(spec: str) -> Any:
    """``smollm2-knowledge`` or a knowledge folder -> :class:`KnowledgeBenchmark`; anything else -> the
    question/answer benchmark of :func:`etu_hf.benchmark.folder.load_benchmark`."""
    if is_knowledge_spec(spec):
        return load_knowledge_benchmark(spec)
    from etu_hf.benchmark.folder import load_benchmark

    return load_benchmark(spec)
