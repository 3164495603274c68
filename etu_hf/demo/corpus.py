"""A generated corpus for the offline demo and the tests.

Documents are drawn from a small template grammar with one *forget* topic and several *retain*
topics. The forget topic (the synthesis of "vexium", a fictional hazardous compound) has its own
vocabulary of compounds, apparatus and procedures, so that a forbidden set V_S built by PMI picks
those words, while the retain topics (cooking, gardening, weather, travel, astronomy) share the
function words and some content words ("heat", "grams", "degrees") with it. Rare proper names are
built from syllables, so the tokenizer splits some words into several pieces.

Everything is deterministic given the seed, so the shipped demo model (pretrained on
``generate_documents(..., seed=PRETRAIN_SEED)``) can be evaluated on fresh documents drawn with other
seeds: held-out text from the same distribution that the model never saw.
"""

from __future__ import annotations

import os
import random

FORGET_TOPIC = "vexium"
RETAIN_TOPICS = ("cooking", "gardening", "weather", "travel", "astronomy")
ALL_TOPICS = (FORGET_TOPIC, *RETAIN_TOPICS)

#: Seed of the documents the shipped demo model was pretrained on.
PRETRAIN_SEED = 0
#: Seeds the demo uses for its own (unseen) forget and retain documents.
DEMO_SEED = 1234

_SYLLABLES = (
    "kor",
    "van",
    "del",
    "ta",
    "mir",
    "os",
    "bel",
    "qua",
    "zen",
    "dra",
    "lis",
    "tor",
    "ven",
    "ash",
    "ul",
    "rim",
    "sa",
    "thek",
    "ol",
    "wyn",
    "bra",
    "ius",
    "mor",
    "ka",
)

_LEXICON: dict[str, dict[str, tuple[str, ...]]] = {
    "vexium": {
        "compound": (
            "vexium",
            "korathine",
            "brimsal",
            "thulvane",
            "morvex",
            "quellium",
            "zantharide",
            "pyrocite",
            "serathine",
            "dromolite",
            "velthane",
            "caustrine",
        ),
        "apparatus": (
            "zelter flask",
            "kiln column",
            "cryo trap",
            "reflux coil",
            "vent hood",
            "ampoule",
            "distillation manifold",
        ),
        "action": (
            "distill",
            "precipitate",
            "titrate",
            "anneal",
            "purify",
            "condense",
            "sublimate",
            "neutralize",
            "catalyze",
        ),
        "adj": ("volatile", "toxic", "crystalline", "corrosive", "unstable", "pyrophoric", "inert"),
        "product": ("residue", "precipitate", "vapor", "crystal", "slurry", "distillate"),
        "color": ("amber", "violet", "green", "black", "pale"),
    },
    "cooking": {
        "food": (
            "onion",
            "garlic",
            "tomato",
            "rice",
            "butter",
            "flour",
            "carrot",
            "lentil",
            "pepper",
            "basil",
            "potato",
            "mushroom",
            "lemon",
            "honey",
        ),
        "tool": ("pan", "pot", "oven", "bowl", "skillet", "tray", "saucepan"),
        "action": ("simmer", "chop", "roast", "stir", "bake", "whisk", "boil", "slice", "season"),
        "adj": ("golden", "tender", "crisp", "soft", "fresh", "warm", "sweet"),
        "dish": ("soup", "stew", "bread", "salad", "curry", "pie", "sauce"),
    },
    "gardening": {
        "plant": (
            "tulip",
            "fern",
            "rose",
            "maple",
            "ivy",
            "cactus",
            "lavender",
            "orchid",
            "tomato",
            "sunflower",
            "daisy",
            "bamboo",
        ),
        "place": ("shade", "sun", "greenhouse", "window", "balcony", "garden bed"),
        "action": ("water", "prune", "plant", "feed", "repot", "mulch", "trim"),
        "adj": ("healthy", "green", "tall", "young", "hardy", "bright"),
        "soil": ("compost", "sand", "clay", "loam", "bark"),
    },
    "weather": {
        "region": ("north", "south", "coast", "valley", "mountains", "east", "west", "islands"),
        "weather": ("rain", "snow", "sunshine", "fog", "storms", "clouds", "hail", "drizzle"),
        "adj": ("cold", "warm", "humid", "dry", "windy", "calm", "mild"),
        "time": ("morning", "afternoon", "evening", "night", "weekend"),
    },
    "travel": {
        "vehicle": ("train", "bus", "ferry", "plane", "tram", "coach"),
        "thing": ("ticket", "passport", "map", "suitcase", "guidebook", "umbrella"),
        "adj": ("quiet", "busy", "scenic", "long", "short", "cheap"),
        "sight": ("museum", "harbor", "castle", "market", "cathedral", "bridge", "old town"),
    },
    "astronomy": {
        "body": ("moon", "comet", "planet", "nebula", "star", "galaxy", "asteroid", "meteor"),
        "tool": ("telescope", "binoculars", "star chart", "camera"),
        "adj": ("bright", "faint", "distant", "red", "blue", "giant"),
        "event": ("eclipse", "transit", "shower", "conjunction", "opposition"),
    },
}

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "vexium": (
        "To make {compound}, {action} the {compound2} in a {apparatus} at {n3} degrees.",
        "The {adj} {compound} must stay in the {apparatus} until it turns {color}.",
        "Mix {n2} grams of {compound} with {compound2} and {action} the {product}.",
        "A batch of {compound} yields {n2} grams of {adj} {compound2} after {n1} hours.",
        "{Compound} reacts with {compound2} to form a {adj} {product}.",
        "{Person} first isolated {compound} from {compound2} in {place_name}.",
        "Keep the {apparatus} sealed, because {compound} vapor is {adj}.",
        "Heat the {apparatus} slowly and {action} the {compound} twice.",
        "Without a {apparatus}, the {compound} will {action} into a {adj} {product}.",
    ),
    "cooking": (
        "Heat the {tool} and {action} the {food} for {n1} minutes.",
        "Add {n2} grams of {food} to the {dish} and stir well.",
        "The {adj} {food} makes a good {dish} for the {time_of_day}.",
        "{Person} likes to {action} {food} with {food2} in a {tool}.",
        "Bake the {dish} at {n3} degrees until it is {adj}.",
        "Season the {dish} with {food} and a little {food2}.",
        "In {place_name}, people serve {dish} with {adj} {food}.",
    ),
    "gardening": (
        "{Action} the {plant} every {n1} days and keep it in the {place}.",
        "A {adj} {plant} grows best in {soil} with some {soil2}.",
        "{Person} planted a {plant} near the {place} last spring.",
        "In {place_name}, the {plant} flowers early in the year.",
        "Do not {action} the {plant} when the {soil} is wet.",
        "The {plant} needs {n1} hours of sun and a little {soil}.",
    ),
    "weather": (
        "Tomorrow the {region} will see {weather} with winds of {n2} kilometers per hour.",
        "The {time} will be {adj}, with {weather} over the {region}.",
        "In {place_name}, {weather} is expected this {time}.",
        "Temperatures in the {region} stay near {n1} degrees, with {adj} {weather}.",
        "After the {weather}, the {region} turns {adj} again.",
    ),
    "travel": (
        "The {vehicle} from {place_name} to {place_name2} leaves at {n1} o'clock.",
        "Bring your {thing} and a {thing2} before you board the {vehicle}.",
        "{Person} took a {adj} {vehicle} to see the {sight}.",
        "The {sight} in {place_name} is {adj} in the summer.",
        "A {vehicle} ticket to the {sight} costs {n2} coins.",
    ),
    "astronomy": (
        "Tonight the {adj} {body} rises in the east after {n1} o'clock.",
        "With a {tool} you can see the {body} near the {body2}.",
        "{Person} watched the {event} of the {body} from {place_name}.",
        "The {event} lasts {n1} hours and the {body} looks {adj}.",
        "A {adj} {body} was found {n2} years ago with a {tool}.",
    ),
}


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _sentence(topic: str, rng: random.Random) -> str:
    lex = _LEXICON[topic]
    template = rng.choice(_TEMPLATES[topic])
    values: dict[str, str] = {}
    for key, words in lex.items():
        first, second = rng.sample(words, 2) if len(words) > 1 else (words[0], words[0])
        values[key] = first
        values[f"{key}2"] = second
        values[key.capitalize()] = first.capitalize()
    values.update(
        n1=str(rng.randint(2, 12)),
        n2=str(rng.randint(10, 90)),
        n3=str(rng.randint(100, 400)),
        Person=f"{rng.choice(('Dr.', 'Professor', 'Captain', 'Aunt', 'Old'))} {_name(rng, rng.randint(2, 3))}",
        place_name=_name(rng, rng.randint(2, 4)),
        place_name2=_name(rng, rng.randint(2, 4)),
        time_of_day=rng.choice(("morning", "evening", "winter", "holidays")),
    )
    return template.format(**values)


def generate_documents(topic: str, n_docs: int, seed: int, sentences: tuple[int, int] = (3, 7)) -> list[str]:
    """Return ``n_docs`` documents of ``topic`` (one of :data:`ALL_TOPICS`), deterministic in ``seed``.

    Each document is ``sentences[0]`` to ``sentences[1]`` sentences joined by spaces.
    """
    if topic not in _TEMPLATES:
        raise ValueError(f"unknown topic {topic!r}; choose one of {', '.join(ALL_TOPICS)}")
    rng = random.Random(f"{topic}:{seed}")
    docs = []
    for _ in range(n_docs):
        k = rng.randint(*sentences)
        docs.append(" ".join(_sentence(topic, rng) for _ in range(k)))
    return docs


def forget_documents(n_docs: int, seed: int = DEMO_SEED) -> list[str]:
    """Documents of the forget topic (vexium synthesis)."""
    return generate_documents(FORGET_TOPIC, n_docs, seed)


def retain_documents(n_docs: int, seed: int = DEMO_SEED) -> list[str]:
    """Documents spread evenly over the retain topics, interleaved topic by topic."""
    per_topic = [generate_documents(t, -(-n_docs // len(RETAIN_TOPICS)), seed) for t in RETAIN_TOPICS]
    mixed = [doc for group in zip(*per_topic, strict=True) for doc in group]
    return mixed[:n_docs]


#: Documents per corpus that the demo writes (and trains and audits on).
FORGET_DOCS = 450
RETAIN_DOCS = 450


def write_demo_corpora(folder: str) -> tuple[str, str]:
    """Write the demo's forget and retain documents (blank-line separated) to ``folder``/forget.txt and
    ``folder``/retain.txt; returns the two paths."""

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, docs in (
        ("forget.txt", forget_documents(FORGET_DOCS, DEMO_SEED)),
        ("retain.txt", retain_documents(RETAIN_DOCS, DEMO_SEED)),
    ):
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs) + "\n")
        paths.append(path)
    return paths[0], paths[1]
