"""``CompareArguments``: the settings of ``etu-hf compare`` (one dataclass: the command line parses it
with ``HfArgumentParser``, a Python user fills it in)."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from etu_hf.commands.env import SUGGESTED_LORA_R

#: ETU variants: ETU's arguments each sets. ``etu`` runs the package's defaults and every variant but ``etu-pmi``
#: builds its own V_S from the same forget and retain data; ``etu-pmi`` uses the comparison's shared piece-level
#: V_S (the one the V_S mass column measures every method on; ETU's default before issue 20).
ETU_VARIANTS: dict[str, dict[str, object]] = {
    "etu": {},
    "etu-pmi": {},
    "etu-words": {"vs_method": "words", "forbid_continuations": False},
    "etu-cont": {"vs_method": "words", "forbid_continuations": True},
    "etu-npo": {"vs_method": "words", "forbid_continuations": True, "preference_weight": 1.0, "pref_format": "npo"},
}
#: Methods ``etu-hf compare`` knows, in the order it runs them.
KNOWN_METHODS: tuple[str, ...] = (*ETU_VARIANTS, "ga", "graddiff", "npo", "simnpo", "undial")
#: The default grid: ETU with the shared piece-level V_S and every baseline.
DEFAULT_METHODS: tuple[str, ...] = ("etu", "ga", "graddiff", "npo", "simnpo", "undial")


def parse_list(value: str, flag: str, kind: type = float) -> list:
    """``"a,b,c"`` -> ``[kind(a), kind(b), kind(c)]``; ``ValueError`` naming ``flag`` otherwise."""
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{flag}: empty list; give comma-separated values, e.g. {flag} 1e-4,3e-4")
    try:
        return [kind(p) for p in parts]
    except ValueError as err:
        raise ValueError(f"{flag}: cannot read {value!r} as comma-separated {kind.__name__} values") from err


#: ``--etu_args`` names that the comparison itself sets for every run (its shared budget) or per run.
_RESERVED_ETU_ARGS = frozenset(
    {"output_dir", "max_steps", "per_device_train_batch_size", "learning_rate", "epsilon", "seed", "data_seed"}
    | {"retain_weight", "retain_loss_type", "lr_scheduler_type", "overwrite_output_dir", "lora_r", "lora_alpha"}
)


def _convert(name: str, text: str, hint: Any) -> object:
    """``text`` as a value of the annotated type ``hint`` (bool, int, float, str, or one of them | None)."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if type(None) in typing.get_args(hint) and text.lower() == "none":
        return None
    kind = options[0]
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--etu_args: {name} takes true or false (got {text!r})")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError as err:
            raise ValueError(f"--etu_args: {name} takes a value of type {kind.__name__} (got {text!r})") from err
    raise ValueError(f"--etu_args: {name} cannot be set from the command line of compare (type {hint})")


def parse_etu_args(value: str, owner: str = "compare") -> dict[str, object]:
    """``"a=1,b=true"`` -> ``{"a": 1, "b": True}``, each name an ``ETUTrainingArguments`` field and each value
    converted to that field's type; ``ValueError`` naming ``--etu_args`` and the fix otherwise. The comparison's
    own budget (steps, batch, learning rate, epsilon, seed, LoRA, retain term) has its own flags and is refused;
    ``owner`` names the program whose flags those are in that message."""
    if not value.strip():
        return {}
    from etu_hf.training.config import ETUTrainingArguments

    hints = typing.get_type_hints(ETUTrainingArguments)
    out: dict[str, object] = {}
    for pair in (p.strip() for p in value.split(",") if p.strip()):
        name, sep, text = pair.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise ValueError(f"--etu_args: {pair!r} is not name=value; e.g. --etu_args continuation_skip_top_k=20")
        if name not in hints:
            raise ValueError(f"--etu_args: {name!r} is not an ETUTrainingArguments field (see etu-hf unlearn --help)")
        if name in _RESERVED_ETU_ARGS:
            raise ValueError(f"--etu_args: {name} is set by {owner} for every run; use {owner}'s own flag instead")
        out[name] = _convert(name, text, hints[name])
    return out


@dataclass
class CompareArguments:
    r"""Settings of a comparison: every method on the same benchmark, LoRA, data and step budget.

    > The benchmark and models
        benchmark: ``"builtin"`` (etu-hf's generated TOFU-shaped benchmark, its target and retain models
            built or read from the cache) or a folder with forget/retain/holdout files.
        model_name_or_path: the model to unlearn from (default for builtin: its target model).
        retain_model: the model trained without the forget split (forget quality and privleak are
            measured against it; default for builtin: its retain model).

    > The grid (one run per method and setting)
        methods: comma list of :data:`KNOWN_METHODS` (the ETU variants of :data:`ETU_VARIANTS` among them).
        etu_epsilons: ETU's target masses (ETU runs once per epsilon at ``etu_learning_rate``).
        etu_args: further ``ETUTrainingArguments`` of every ETU run (``name=value,...``), applied after the
            variant's own (:data:`ETU_VARIANTS`).
        learning_rates: the baselines' learning rates (each baseline runs once per rate).
        seed, seeds: the seed of every run, or a comma list of seeds: every setting above then runs once per
            seed and COMPARE.md adds each setting's mean [min, max] over them (:mod:`etu_hf.compare.seeds`).

    > The shared budget
        max_steps, per_device_train_batch_size, lora_*: identical for every run; retain_weight and
        retain_loss_type apply to every method with a retain term (all but ``ga``).

    > The relearning attack
        relearn_steps: after unlearning, fine-tune the same adapter for this many steps with the plain
        next-token loss on ``relearn_fraction`` of the forget questions (a seeded sample), then
        evaluate again; 0 = no attack.
    """

    output_dir: str = field(metadata={"help": "Where COMPARE.json, COMPARE.md, pareto.png and every run go."})
    benchmark: str = field(
        default="builtin",
        metadata={
            "help": "'builtin' (question/answer), 'smollm2-knowledge' (real knowledge of SmolLM2) or a benchmark "
            "folder."
        },
    )
    target: str | None = field(
        default=None,
        metadata={
            "help": "Knowledge benchmarks: the target(s) to unlearn (a name, a comma list, or 'all'; default: the "
            "benchmark's first target)."
        },
    )
    block_size: int = field(
        default=128, metadata={"help": "Knowledge benchmarks: tokens per training block of forget/retain text."}
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "Default (builtin): its target model."})
    retain_model: str | None = field(default=None, metadata={"help": "Default (builtin): its retain model."})
    methods: str = field(
        default=",".join(DEFAULT_METHODS),
        metadata={
            "help": "Comma list of methods to run: etu (the package's defaults), etu-pmi (the shared piece-level V_S), "
            "etu-words (word-level V_S per context), etu-cont (+ forbidden continuations: today's defaults, named), "
            "etu-npo (etu-cont + in-loop NPO), ga, graddiff, npo, simnpo, undial."
        },
    )
    etu_epsilons: str = field(default="0.1,0.03,0.01", metadata={"help": "ETU's epsilons (comma list)."})
    etu_learning_rate: float = field(default=1e-3, metadata={"help": "ETU's learning rate."})
    etu_args: str = field(
        default="",
        metadata={
            "help": "Extra ETUTrainingArguments for every ETU run, as comma-separated name=value pairs, e.g. "
            "'continuation_skip_top_k=20,word_min_g2=6.63' (they override the variant's own settings)."
        },
    )
    learning_rates: str = field(default="1e-4,3e-4,1e-3", metadata={"help": "Baselines' learning rates."})
    max_steps: int = field(default=60, metadata={"help": "Optimiser steps of every unlearning run."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Forget questions per step."})
    retain_weight: float = field(default=1.0, metadata={"help": "Weight of the retain term (all but ga)."})
    retain_loss_type: str = field(default="kl", metadata={"help": "'kl' or 'nll'.", "choices": ["kl", "nll"]})
    pmi_min_count: int = field(
        default=3, metadata={"help": "V_S (shared by all runs): minimum forget count of a PMI token."}
    )
    lora_r: int = field(default=SUGGESTED_LORA_R, metadata={"help": "LoRA rank (all runs)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (all runs)."})
    lora_target_modules: str = field(default="all-linear,lm_head", metadata={"help": "LoRA targets (all runs)."})
    relearn_steps: int = field(default=0, metadata={"help": "Steps of the relearning attack (0: none)."})
    relearn_fraction: float = field(default=0.25, metadata={"help": "Share of forget questions it trains on."})
    relearn_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the attack."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the evaluation."})
    seed: int = field(default=0, metadata={"help": "Seed of every run (LoRA init, data order, attack sample)."})
    seeds: str = field(
        default="",
        metadata={
            "help": "Comma list of seeds, e.g. 0,1,2: every run of the grid repeats once per seed (labels end in "
            "'seed=N') and COMPARE.md adds each setting's mean, minimum and maximum over the seeds. Empty: --seed "
            "alone."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing comparison."})

    def __post_init__(self) -> None:
        self.method_list: list[str] = [m.lower() for m in parse_list(self.methods, "--methods", str)]
        unknown = [m for m in self.method_list if m not in KNOWN_METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown method(s) {unknown}; known: {', '.join(KNOWN_METHODS)}")
        self.epsilon_list: list[float] = parse_list(self.etu_epsilons, "--etu_epsilons")
        if any(not 0 < e < 1 for e in self.epsilon_list):
            raise ValueError(f"--etu_epsilons: every epsilon must be in (0, 1) (got {self.etu_epsilons})")
        self.etu_overrides: dict[str, object] = parse_etu_args(self.etu_args)
        self.lr_list: list[float] = parse_list(self.learning_rates, "--learning_rates")
        if any(not (math.isfinite(x) and x > 0) for x in [*self.lr_list, self.etu_learning_rate]):
            raise ValueError("--learning_rates / --etu_learning_rate: learning rates must be > 0")
        for flag, value in (
            ("--max_steps", self.max_steps),
            ("--per_device_train_batch_size", self.per_device_train_batch_size),
            ("--lora_r", self.lora_r),
        ):
            if value < 1:
                raise ValueError(f"{flag}: must be >= 1 (got {value})")
        if self.block_size < 2:
            raise ValueError(f"--block_size: must be >= 2 (got {self.block_size})")
        if self.relearn_steps < 0:
            raise ValueError(f"--relearn_steps: must be >= 0 (got {self.relearn_steps})")
        if not 0 < self.relearn_fraction <= 1:
            raise ValueError(f"--relearn_fraction: must be in (0, 1] (got {self.relearn_fraction})")
        if self.retain_weight < 0:
            raise ValueError(f"--retain_weight: must be >= 0 (got {self.retain_weight})")
        self.seed_list: list[int] = [self.seed]
        if self.seeds.strip():
            if self.seed != 0:
                raise ValueError("--seeds: give either --seed N (one seed) or --seeds (several), not both")
            self.seed_list = parse_list(self.seeds, "--seeds", int)
            if len(set(self.seed_list)) != len(self.seed_list) or min(self.seed_list) < 0:
                raise ValueError(f"--seeds: seeds must be distinct integers >= 0 (got {self.seeds})")

    def grid(self) -> list[tuple[str, str, dict[str, float]]]:
        """``(method, label, hyperparameters)`` of every run, in order: each setting (an ETU variant at an epsilon,
        a baseline at a learning rate) once per seed of ``seed_list`` (``hyperparameters["seed"]``); with several
        seeds the label ends in ``" seed=N"`` (:func:`setting_of` takes it off again)."""
        settings: list[tuple[str, str, dict[str, float]]] = []
        for method in self.method_list:
            if method in ETU_VARIANTS:
                settings += [
                    (method, f"eps={e:g}", {"epsilon": e, "learning_rate": self.etu_learning_rate})
                    for e in self.epsilon_list
                ]
            else:
                settings += [(method, f"lr={lr:g}", {"learning_rate": lr}) for lr in self.lr_list]
        several = len(self.seed_list) > 1
        return [
            (method, f"{setting} seed={s}" if several else setting, {**hyper, "seed": s})
            for method, setting, hyper in settings
            for s in self.seed_list
        ]


def setting_of(label: str) -> str:
    """A run's label without its ``" seed=N"`` suffix (:meth:`CompareArguments.grid`): the setting it repeats."""
    return re.sub(r" seed=\d+$", "", label)
