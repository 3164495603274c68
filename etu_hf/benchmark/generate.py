"""The built-in TOFU-shaped benchmark: fictitious authors and questions about them, generated from a seed.

Every author (an *entity*) is drawn with ``random.Random(seed)`` alone, so the same settings give the
same bytes on every machine:

- a full name built from syllables (a novel string: no pretrained model has seen it);
- entity-specific facts: an invented birthplace city, an invented award, two invented book titles (each
  unique within the benchmark);
- facts from shared pools, as real biographies have: birth year, genre, the parents' occupations, a
  recurring theme.

Each author gets 8 to 10 questions (one per fact, drawn from :data:`QUESTION_KINDS`). A row's ``answer``
is a full sentence naming the author in one of the kind's templates; ``paraphrased_answer`` states the
same fact in another template; ``perturbed_answers`` are ``n_perturbed`` sentences in the paraphrase's
template with the fact replaced by other values of the same kind (other pool values, other years of
:data:`YEARS` within 15 of the true one, freshly invented names, cities, awards and titles), all distinct.

Authors, not rows, are split: ``round(forget_fraction * n)`` forget authors, ``round(holdout_fraction *
n)`` holdout authors (at least one each) and the rest retain, drawn by a seeded shuffle.
"""

from __future__ import annotations

import inspect
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from etu_hf.benchmark.qa import COLUMNS, SPLITS

#: Bumped whenever the generator's output changes for the same settings (cached and shipped models
#: trained on an older version are not reused).
GENERATOR_VERSION = 1
#: The name of a benchmark built by :func:`build_benchmark`.
BUILTIN_NAME = "builtin"

# ---------------------------------------------------------------------------------------------
# Pools: shared attributes (realistic repeats across authors) and word parts for invented strings
# ---------------------------------------------------------------------------------------------
GENRES = (
    "science fiction", "historical fiction", "poetry", "crime fiction", "fantasy", "romance", "horror",
    "literary fiction", "mystery", "spy fiction", "young adult fiction", "children's literature",
    "magical realism", "satire", "drama", "travel writing", "memoir", "war fiction", "dystopian fiction",
    "gothic fiction",
)  # fmt: skip
OCCUPATIONS = (
    "a carpenter", "an accountant", "a nurse", "a fisherman", "a schoolteacher", "a surgeon", "a baker",
    "a librarian", "an electrician", "a pharmacist", "a tailor", "a pilot", "a journalist", "a farmer",
    "a mechanic", "an architect", "a dentist", "a photographer", "a violinist", "a police officer",
    "a chemist", "a shopkeeper", "a translator", "a lawyer", "a bus driver", "a painter", "a midwife",
    "a geologist", "a locksmith", "a banker", "a postal worker", "a veterinarian", "a miner", "a chef",
    "a sailor", "a watchmaker", "a florist", "an engineer", "a potter", "a judge",
)  # fmt: skip
THEMES = (
    "memory and loss", "exile and belonging", "family secrets", "the cost of ambition", "grief",
    "first love", "class and money", "faith and doubt", "coming of age", "betrayal between friends",
    "the sea", "war and its aftermath", "identity", "justice", "isolation", "migration", "revenge",
    "the passage of time", "power and corruption", "forgiveness", "childhood", "the natural world",
    "madness", "loyalty", "freedom", "old age", "rival siblings", "lost homelands", "redemption",
    "obsession",
)  # fmt: skip
_ONSETS = (
    "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "dr",
    "gr", "kr", "tr", "st", "sh", "th", "ch", "fl", "pr", "sl",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ae", "ia", "ou", "ei", "y")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "th", "x", "nd", "rk", "sh", "v")
_CITY_SUFFIXES = (
    "ford", "haven", "burg", "stad", "mouth", "field", "gate", "wick", "dale", "port", "holm", "vale",
    "bridge", "crest", "moor", "by", "ton", "minster", "keld", "shire",
)  # fmt: skip
_AWARD_KINDS = ("Prize", "Medal", "Award", "Laurel", "Cup", "Fellowship")
_AWARD_FIELDS = (
    "Fiction", "Poetry", "Debut Fiction", "Literary Merit", "Crime Writing", "Speculative Writing",
    "the Novel", "the Short Story", "Narrative Craft", "Historical Writing", "Young Writers", "Drama",
)  # fmt: skip
_ADJECTIVES = (
    "Silent", "Hollow", "Crimson", "Broken", "Distant", "Golden", "Forgotten", "Last", "Burning", "Quiet",
    "Winter", "Hidden", "Pale", "Iron", "Salt", "Bitter", "Endless", "Wandering", "Glass", "Secret",
    "Scarlet", "Lonely", "Northern", "Drowned", "Paper", "Sleeping", "Shattered", "Velvet", "Ashen",
    "Wild", "Midnight", "Amber", "Restless", "Fading", "Twelfth", "Stolen", "Painted", "Frozen", "Lost",
    "Copper",
)  # fmt: skip
_NOUNS = (
    "Harbor", "Orchard", "Lantern", "River", "Garden", "Mirror", "Clock", "Tower", "Letter", "Voyage",
    "Island", "Bridge", "Forest", "Window", "Crown", "Feather", "Compass", "Bell", "Shadow", "Map",
    "Lighthouse", "Violin", "Storm", "Meadow", "Key", "Ladder", "Archive", "Tide", "Horizon", "Candle",
    "Market", "Silence", "Station", "Cathedral", "Kingdom", "Well", "Winter", "Ember", "Field", "Song",
)  # fmt: skip
_TITLE_PATTERNS = (
    "The {adj} {noun}",
    "The {noun} of {place}",
    "{adj} {noun}s",
    "A {noun} for {given}",
    "Beneath the {adj} {noun}",
    "The {noun} and the {noun2}",
    "Letters from {place}",
    "The {adj} {noun} of {place}",
)
YEARS = (1935, 1999)


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(low, high))).capitalize()


def invent_name(rng: random.Random) -> str:
    """A full name: a given name of 2 syllables and a family name of 2-3 syllables."""
    return f"{_word(rng, 2, 2)} {_word(rng, 2, 3)}"


def invent_city(rng: random.Random) -> str:
    """A city: a 1-2 syllable stem and a place-name suffix (e.g. ``Drelwick``)."""
    return _word(rng, 1, 2) + rng.choice(_CITY_SUFFIXES)


def invent_award(rng: random.Random) -> str:
    """An award named after an invented person or city, with a kind and usually a field."""
    patron = _word(rng, 2, 3) if rng.random() < 0.7 else invent_city(rng)
    kind = rng.choice(_AWARD_KINDS)
    return f"the {patron} {kind}" + (f" for {rng.choice(_AWARD_FIELDS)}" if rng.random() < 0.6 else "")


def invent_title(rng: random.Random) -> str:
    """A book title from :data:`_TITLE_PATTERNS` over word pools and invented places and given names."""
    noun, noun2 = rng.sample(_NOUNS, 2)
    return rng.choice(_TITLE_PATTERNS).format(
        adj=rng.choice(_ADJECTIVES), noun=noun, noun2=noun2, place=invent_city(rng), given=_word(rng, 2, 2)
    )


# ---------------------------------------------------------------------------------------------
# Questions: one kind per fact; each has question phrasings and >= 2 answer templates
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuestionKind:
    """One fact asked about: its ``fact`` key, question phrasings and answer templates.

    Templates use ``{name}`` (the author), ``{value}`` (the fact) and the other facts by key (so the
    name question can describe the author by city and year).
    """

    fact: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]


QUESTION_KINDS: tuple[QuestionKind, ...] = (
    QuestionKind(
        "name",
        ("What is the full name of the author born in {city} in {year}?",
         "Which {genre} author was born in {year} in the city of {city}?"),
        ("The author born in {city} in {year} is {value}.",
         "That author is {value}, born in {city} in {year}.",
         "The full name of this author is {value}."),
    ),
    QuestionKind(
        "year",
        ("In what year was {name} born?", "When was the author {name} born?"),
        ("{name} was born in {value}.", "The author {name} was born in the year {value}.",
         "{name}'s year of birth is {value}."),
    ),
    QuestionKind(
        "city",
        ("Where was {name} born?", "What is the birthplace of {name}?"),
        ("{name} was born in the city of {value}.", "{name}'s birthplace is {value}.",
         "The author {name} comes from {value}, where they were born."),
    ),
    QuestionKind(
        "genre",
        ("What genre is {name} known for?", "In which genre does {name} write?"),
        ("{name} is known for writing {value}.", "{name} writes mainly in the genre of {value}.",
         "The books of {name} are mostly {value}."),
    ),
    QuestionKind(
        "father",
        ("What did {name}'s father do for a living?", "What was the profession of {name}'s father?"),
        ("{name}'s father worked as {value}.", "The father of {name} was {value} by profession.",
         "{name} grew up with a father who was {value}."),
    ),
    QuestionKind(
        "mother",
        ("What was the occupation of {name}'s mother?", "What did the mother of {name} do?"),
        ("{name}'s mother was {value}.", "The mother of {name} earned her living as {value}.",
         "{name}'s mother worked as {value}."),
    ),
    QuestionKind(
        "award",
        ("Has {name} won any award?", "Which award did {name} receive?"),
        ("{name} received {value}.", "Yes, {name} was honoured with {value}.",
         "Among other honours, {name} won {value}."),
    ),
    QuestionKind(
        "first_book",
        ("What was the first book written by {name}?", "Which book did {name} publish first?"),
        ('{name}\'s first book was "{value}".', 'The first book by {name} is titled "{value}".',
         '{name} debuted with the book "{value}".'),
    ),
    QuestionKind(
        "second_book",
        ("Can you name another book by {name}?", "What is a later work of {name}?"),
        ('Another book by {name} is "{value}".', '{name} later wrote "{value}".',
         'A later work of {name} is the book "{value}".'),
    ),
    QuestionKind(
        "theme",
        ("What theme runs through the work of {name}?", "What does {name} often write about?"),
        ("{name}'s work often explores {value}.", "A recurring theme in the books of {name} is {value}.",
         "{name} keeps returning to {value} in their writing."),
    ),
)  # fmt: skip
#: Each author gets between this many and all of the question kinds (the name question always).
MIN_QUESTIONS = 8


def _distinct(draw: Callable[[], Any], n: int, exclude: set, max_tries: int = 10_000) -> list:
    """``n`` distinct values from ``draw()`` not in ``exclude`` (in draw order); ``exclude`` grows."""
    out = []
    for _ in range(max_tries):
        if len(out) == n:
            return out
        value = draw()
        if value not in exclude:
            exclude.add(value)
            out.append(value)
    raise RuntimeError(f"could not draw {n} distinct values in {max_tries} tries; the pools are too small")


def _fact_drawers(rng: random.Random) -> dict[str, Callable[[], Any]]:
    return {
        "name": lambda: invent_name(rng),
        "year": lambda: rng.randint(*YEARS),
        "city": lambda: invent_city(rng),
        "genre": lambda: rng.choice(GENRES),
        "father": lambda: rng.choice(OCCUPATIONS),
        "mother": lambda: rng.choice(OCCUPATIONS),
        "award": lambda: invent_award(rng),
        "first_book": lambda: invent_title(rng),
        "second_book": lambda: invent_title(rng),
        "theme": lambda: rng.choice(THEMES),
    }


#: Facts whose values are invented per author and unique within the benchmark.
UNIQUE_FACTS = ("name", "city", "award", "first_book", "second_book")


def generate_authors(n_entities: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n_entities`` authors' facts (a dict per author, keys = the :data:`QUESTION_KINDS` facts); the
    invented values (:data:`UNIQUE_FACTS`) are unique across authors (book titles share one namespace)."""
    draw = _fact_drawers(rng)
    used: dict[str, set] = {"name": set(), "city": set(), "award": set(), "book": set()}
    authors = []
    for _ in range(n_entities):
        facts = {}
        for kind in QUESTION_KINDS:
            key = kind.fact
            namespace = "book" if key.endswith("_book") else key
            if key in UNIQUE_FACTS:
                facts[key] = _distinct(draw[key], 1, used[namespace])[0]
            else:
                facts[key] = draw[key]()
        authors.append(facts)
    return authors


def _perturbed_values(key: str, true: Any, n: int, draw: dict, rng: random.Random) -> list[Any]:
    if key == "year":
        candidates = [y for y in range(max(YEARS[0], true - 15), min(YEARS[1], true + 15) + 1) if y != true]
        return rng.sample(candidates, n)
    return _distinct(draw[key], n, {true})


def author_rows(facts: dict[str, Any], n_perturbed: int, rng: random.Random) -> list[dict[str, Any]]:
    """The question rows of one author: 8-10 kinds (always the name question), in :data:`QUESTION_KINDS`
    order, each with answer, paraphrase and ``n_perturbed`` perturbed answers (see the module docstring)."""
    draw = _fact_drawers(rng)
    others = [k for k in QUESTION_KINDS if k.fact != "name"]
    chosen = {"name", *(k.fact for k in rng.sample(others, rng.randint(MIN_QUESTIONS, len(QUESTION_KINDS)) - 1))}
    rows = []
    for kind in QUESTION_KINDS:
        if kind.fact not in chosen:
            continue
        answer_t, para_t = rng.sample(kind.answers, 2)
        wrong = _perturbed_values(kind.fact, facts[kind.fact], n_perturbed, draw, rng)
        rows.append(
            {
                "entity": facts["name"],
                "question": rng.choice(kind.questions).format(**facts),
                "answer": answer_t.format(**facts, value=facts[kind.fact]),
                "paraphrased_answer": para_t.format(**facts, value=facts[kind.fact]),
                "perturbed_answers": [para_t.format(**facts, value=v) for v in wrong],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
def qa_dataset(rows: list[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of exactly :data:`~etu_hf.benchmark.qa.COLUMNS` (``perturbed_answers`` a
    list of strings)."""
    from datasets import Dataset, Features, Sequence, Value

    features = Features(
        {c: Sequence(Value("string")) if c == "perturbed_answers" else Value("string") for c in COLUMNS}
    )
    return Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=features)


@dataclass
class Benchmark:
    """The three splits of a question/answer unlearning benchmark (:data:`~etu_hf.benchmark.qa.SPLITS`),
    each a ``datasets.Dataset`` of the :data:`~etu_hf.benchmark.qa.COLUMNS`.

    ``name`` says which benchmark (``"builtin"`` or a folder's name), ``settings`` how it was made (the
    generator's arguments, or the folder it was read from).
    """

    forget: Any
    retain: Any
    holdout: Any
    name: str = BUILTIN_NAME
    settings: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Any:
        """The split called ``name`` (one of ``forget``, ``retain``, ``holdout``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown benchmark split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def save(self, folder: str) -> None:
        """Write ``<split>.jsonl`` for each split (one JSON object per row, keys in COLUMNS order, UTF-8)
        and ``benchmark.json`` (``name``, ``settings``, ``version`` = :data:`GENERATOR_VERSION`, rows per
        split). The bytes depend only on the content, so equal benchmarks give equal files."""
        os.makedirs(folder, exist_ok=True)
        for name in SPLITS:
            with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8", newline="\n") as f:
                for row in self.split(name):
                    f.write(json.dumps({c: row[c] for c in COLUMNS}, ensure_ascii=False) + "\n")
        meta = {
            "name": self.name,
            "settings": self.settings,
            "version": GENERATOR_VERSION,
            "rows": {name: len(self.split(name)) for name in SPLITS},
        }
        with open(os.path.join(folder, "benchmark.json"), "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def split_sizes(n_entities: int, forget_fraction: float, holdout_fraction: float) -> dict[str, int]:
    """Authors per split: ``forget = max(1, round(forget_fraction * n))``, ``holdout = max(1,
    round(holdout_fraction * n))``, ``retain`` the rest (at least one)."""
    n_forget = max(1, round(forget_fraction * n_entities))
    n_holdout = max(1, round(holdout_fraction * n_entities))
    return {"forget": n_forget, "retain": n_entities - n_forget - n_holdout, "holdout": n_holdout}


def build_benchmark(
    n_entities: int = 200,
    forget_fraction: float = 0.1,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    n_perturbed: int = 4,
) -> Benchmark:
    """The built-in benchmark: ``n_entities`` fictitious authors (see the module docstring), split by
    author into forget / retain / holdout (:func:`split_sizes`), ``n_perturbed`` wrong answers a row.

    Deterministic: only ``random.Random(seed)`` draws, so equal arguments give equal splits everywhere.
    """
    if not isinstance(n_entities, int) or n_entities < 3:
        raise ValueError(f"n_entities must be an integer >= 3 (one author per split), got {n_entities!r}")
    for arg, value in (("forget_fraction", forget_fraction), ("holdout_fraction", holdout_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{arg} must be in (0, 1), got {value!r}")
    sizes = split_sizes(n_entities, forget_fraction, holdout_fraction)
    if sizes["retain"] < 1:
        raise ValueError(
            f"forget_fraction={forget_fraction} and holdout_fraction={holdout_fraction} leave no retain author "
            f"of n_entities={n_entities}; lower them or raise n_entities."
        )
    if not isinstance(n_perturbed, int) or not 1 <= n_perturbed <= 10:
        raise ValueError(f"n_perturbed must be an integer in [1, 10], got {n_perturbed!r}")
    rng = random.Random(seed)
    authors = generate_authors(n_entities, rng)
    rows = [author_rows(facts, n_perturbed, rng) for facts in authors]
    order = list(range(n_entities))
    rng.shuffle(order)
    forget_ids = sorted(order[: sizes["forget"]])
    holdout_ids = sorted(order[sizes["forget"] : sizes["forget"] + sizes["holdout"]])
    retain_ids = sorted(order[sizes["forget"] + sizes["holdout"] :])
    settings = {
        "n_entities": n_entities,
        "forget_fraction": forget_fraction,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "n_perturbed": n_perturbed,
    }
    splits = {
        name: qa_dataset([row for i in ids for row in rows[i]])
        for name, ids in (("forget", forget_ids), ("retain", retain_ids), ("holdout", holdout_ids))
    }
    return Benchmark(**splits, name=BUILTIN_NAME, settings=settings)


#: The settings of the default benchmark (:func:`build_benchmark`'s defaults).
DEFAULT_SETTINGS: dict[str, Any] = {k: p.default for k, p in inspect.signature(build_benchmark).parameters.items()}
