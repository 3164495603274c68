"""mkdocs hook: flag tables generated from the argument dataclasses, so a table cannot drift from the code.

A page writes a marker on a line of its own (indented inside an admonition if need be) and the built
page gets the table in its place:

- ``<!-- flags: etu_hf.training.config.ETUTrainingArguments -->``: the fields the class declares itself
  (not those it inherits), grouped under the ``> Parameters that control ...`` headings of its docstring
  when it has them (HF's docstring style);
- ``<!-- flags: etu_hf.training.config.ETUTrainingArguments inherited -->``: the fields it inherits (for
  ETU's classes: every ``transformers.TrainingArguments`` field);
- ``<!-- flags: etu_hf.commands.push.PushArguments all -->``: every field;
- ``<!-- short-flags -->``: the short names of ``etu-hf unlearn`` (:data:`etu_hf.commands.arguments.SHORT_NAMES`).

Each row is one field, as ``transformers.HfArgumentParser`` turns it into a flag: ``--name`` (plus the
``--no_name`` that the parser adds for a boolean whose default is true, and the field's ``aliases``), the
default (``default`` or ``default_factory()``; *required* when there is none) and ``metadata["help"]``.
An unknown class or option is an error, so a build cannot pass with a stale marker.

``tests/test_docs.py`` imports this module to check every flag of ``etu-hf unlearn --help`` against it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import json
import re
from typing import Any

MARKER = re.compile(
    r"^(?P<indent>[ \t]*)<!-- "
    r"(?:flags: (?P<target>[\w.]+)(?: (?P<which>own|inherited|all))?|(?P<short>short-flags))"
    r" -->$",
    re.M,
)
_HEADING = re.compile(r"^\s*> (?P<title>.+?)\s*$")
_ENTRY = re.compile(r"(?:^\s*|, )(?P<name>[a-z_][a-z0-9_]*) \(`")


def load_class(path: str) -> type:
    """The dataclass at ``package.module.Class``."""
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"flags marker: {path!r} is not a dataclass")
    return cls


def own_field_names(cls: type) -> set[str]:
    """The fields ``cls`` declares in its own body (its annotations), not those of its bases."""
    return set(inspect.get_annotations(cls))


def selected_fields(cls: type, which: str = "own") -> list[dataclasses.Field]:
    """The fields of ``cls`` in declaration order: ``own``, ``inherited`` or ``all`` of them."""
    own = own_field_names(cls)
    keep = {"own": lambda f: f.name in own, "inherited": lambda f: f.name not in own, "all": lambda f: True}[which]
    return [f for f in dataclasses.fields(cls) if f.init and keep(f)]


def parser_defaults(cls: type) -> dict[str, Any]:
    """The default of each field as the command line really uses it: ``transformers.HfArgumentParser``'s
    (it can differ from the dataclass's: a ``str | list`` field with default ``""`` parses to ``None``), with
    ``etu-hf unlearn``'s own defaults for the training arguments it changes (``UNLEARN_TRAINING_DEFAULTS``)."""
    from transformers import HfArgumentParser

    from etu_hf.training.config import ETUTrainingArguments

    parser = HfArgumentParser(cls)
    if issubclass(cls, ETUTrainingArguments):  # etu-hf unlearn's own defaults for transformers' flags
        from etu_hf.commands.arguments import UNLEARN_TRAINING_DEFAULTS

        parser.set_defaults(**UNLEARN_TRAINING_DEFAULTS)
    return {f.name: parser.get_default(f.name) for f in dataclasses.fields(cls) if f.init}


def default_of(f: dataclasses.Field, parsed: dict[str, Any] | None = None) -> Any:
    """The field's default: the parser's when known, else ``default``, ``default_factory()``, or ``MISSING``
    for a required field."""
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return dataclasses.MISSING
    if parsed is not None and f.name in parsed:
        return parsed[f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def format_default(value: Any) -> str:
    """A default as a table cell: ``None``, ``True``/``False``, numbers as Python prints them, strings as
    they are typed on the command line (``''`` for the empty one), lists and dicts as JSON."""
    if value is dataclasses.MISSING:
        return "*required*"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return f"`{value}`" if value else "`''`"
    if isinstance(value, (list, tuple, dict)):
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    return f"`{value}`"


def flag_names(f: dataclasses.Field) -> list[str]:
    """The flags of a field, as HfArgumentParser declares them: ``--name``, its ``aliases``, and
    ``--no_name`` for a boolean whose default is true."""
    names = [f"--{f.name}"]
    aliases = f.metadata.get("aliases") or []
    names += [aliases] if isinstance(aliases, str) else list(aliases)
    if f.default is True and f.type in (bool, "bool", "bool | None", "Optional[bool]"):
        names.append(f"--no_{f.name}")
    return names


_CODE = re.compile(r"(`[^`]*`)")


def _cell(text: Any) -> str:
    """Help text as one table cell: one line, ``|`` escaped, and outside code spans nothing read as HTML,
    emphasis or a link."""
    parts = _CODE.split(" ".join(str(text or "").split()))
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        for old, new in (("\\", "\\\\"), ("<", "&lt;"), ("*", "\\*"), ("[", "\\["), ("_", "\\_")):
            parts[i] = parts[i].replace(old, new)
    return "".join(parts).replace("|", "\\|")


def _choices(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    if not choices and isinstance(f.type, type) and issubclass(f.type, enum.Enum):
        choices = [c.value for c in f.type]
    return f" One of: {', '.join(f'`{c}`' for c in choices)}." if choices else ""


def table(fields: list[dataclasses.Field], parsed: dict[str, Any] | None = None) -> str:
    """A markdown table of ``fields``: flag(s), default (``parsed``: the parser's defaults), help."""
    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in fields:
        flags = " ".join(f"`{n}`" for n in flag_names(f))
        lines.append(
            f"| {flags} | {format_default(default_of(f, parsed))} | {_cell(f.metadata.get('help'))}{_choices(f)} |"
        )
    return "\n".join(lines)


def docstring_groups(cls: type) -> list[tuple[str, list[str]]]:
    """``(heading, field names)`` for each ``> Parameters that control ...`` heading of the docstring of
    ``cls``, in order; empty when it has none."""
    groups: list[tuple[str, list[str]]] = []
    for line in (cls.__doc__ or "").splitlines():
        heading = _HEADING.match(line)
        if heading:
            groups.append((heading.group("title"), []))
        elif groups:
            groups[-1][1].extend(m.group("name") for m in _ENTRY.finditer(line))
    return groups


def flag_tables(cls: type, which: str = "own") -> str:
    """The tables of ``cls``'s fields: one per docstring heading (fields under no heading last), or one."""
    fields = selected_fields(cls, which)
    if not fields:
        raise ValueError(f"flags marker: {cls.__name__} has no {which} fields")
    parsed = parser_defaults(cls)
    groups = docstring_groups(cls) if which == "own" else []
    by_name = {f.name: f for f in fields}
    parts, placed = [], set()
    for title, names in groups:
        members = [by_name[n] for n in names if n in by_name and n not in placed]
        if members:
            placed.update(f.name for f in members)
            parts.append(f"*{title}:*\n\n{table(members, parsed)}")
    rest = [f for f in fields if f.name not in placed]
    if rest:
        parts.append(("*Other parameters:*\n\n" if parts else "") + table(rest, parsed))
    return "\n\n".join(parts)


def short_flags_table() -> str:
    """The short names of ``etu-hf unlearn`` and what each stands for."""
    from etu_hf.commands.arguments import SHORT_NAMES

    lines = ["| short name | stands for |", "| --- | --- |"]
    for name, (dest, settings) in SHORT_NAMES.items():
        if "const" in settings and settings.get("action") == "store_const":
            meaning = f"`--{dest} {settings['const']}`"
        elif dest == "vs_method":
            meaning = "`--vs_method pmi`; `--use_pmi_vs false`: `--vs_method frequency`"
        else:
            meaning = f"`--{dest}`"
        lines.append(f"| `{name}` | {meaning} |")
    return "\n".join(lines)


def expand(markdown: str) -> str:
    """``markdown`` with every marker replaced by its generated table."""

    def one(match: re.Match) -> str:
        if match.group("short"):
            text = short_flags_table()
        else:
            text = flag_tables(load_class(match.group("target")), match.group("which") or "own")
        indent = match.group("indent")  # a marker inside an indented block (an admonition) keeps its indent
        return "\n".join(indent + line if line else line for line in text.split("\n"))

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """mkdocs' page hook: expand the flag markers of every page."""
    return expand(markdown)
