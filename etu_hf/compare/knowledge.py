r"""``etu-hf compare`` on a knowledge benchmark (:mod:`etu_hf.benchmark.knowledge`): every method unlearns the
same target(s) from the same model with one LoRA and one step budget, and each result is scored on the
probes (forget, neighbour, utility) and the held-out retain perplexity
(:func:`etu_hf.evaluation.knowledge.evaluate_knowledge`).

Training data: the target's forget text and the retain text, each cut into blocks of ``block_size`` tokens
(every token scored). A shared V_S is built once from them (PMI pieces, ``pmi_min_count``) for ``etu-pmi``; every
other ETU variant builds its own from the same data (its run folder's ``V_S.ids.json``).

The axes of the Pareto front, both "higher is better":

- x, ``forgetting`` :math:`= 1 - \text{forget\_answer\_prob}`;
- y, ``kept`` :math:`= \frac12(\text{neighbour\_answer\_prob} + \text{utility\_answer\_prob})`.

``goals`` checks, for each run, issue 20's targets against the base model and NPO: ``forget_answer_prob``
at most NPO's best and at most 0.25 x the base's; neighbour and utility answer probability at least 0.95 x
the base's; retain perplexity ratio (run / base) at most 1.10.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from typing import Any

from etu_hf.compare.pareto import pareto_front, plot_pareto
from etu_hf.compare.report import etu_args_text, shared_vs_text
from etu_hf.compare.seeds import over_seeds, seeds_label, seeds_text
from etu_hf.compare.settings import CompareArguments

logger = logging.getLogger(__name__)

X_AXIS, Y_AXIS = "forgetting", "kept"
COLUMNS: tuple[tuple[str, str], ...] = (
    ("forget_answer_prob", "forget prob"),
    ("forget_keyword_acc", "forget keyword acc"),
    ("neighbour_answer_prob", "neighbour prob"),
    ("neighbour_keyword_acc", "neighbour keyword acc"),
    ("utility_answer_prob", "utility prob"),
    ("utility_keyword_acc", "utility keyword acc"),
    ("retain_ppl", "retain ppl"),
)


def default_model_for(benchmark_name: str) -> str | None:
    """The cached SmolLM2 folder for the built-in knowledge benchmark when it has been fetched, else None."""
    from etu_hf.benchmark.knowledge import BUILTIN_NAME
    from etu_hf.modeling.smollm2 import default_model_dir, is_model_folder

    if benchmark_name == BUILTIN_NAME and is_model_folder(default_model_dir()):
        return default_model_dir()
    return None


class KnowledgeInputs:
    """What every run shares: the benchmark, the targets, the tokenizer, forget and retain blocks, the model."""

    def __init__(self, cfg: CompareArguments):
        from transformers import AutoTokenizer

        from etu_hf.benchmark.knowledge import load_knowledge_benchmark
        from etu_hf.data.blocks import ensure_pad_token, tokenize_and_block

        self.benchmark = load_knowledge_benchmark(cfg.benchmark)
        self.targets = self.benchmark.resolve_targets(cfg.target)
        path = cfg.model_name_or_path or default_model_for(self.benchmark.name)
        if path is None:
            raise ValueError(
                "--model_name_or_path: required with this knowledge benchmark (for smollm2-knowledge, fetch the "
                "model first: python -m etu_hf.modeling.smollm2)"
            )
        if cfg.retain_model:
            raise ValueError("--retain_model: a knowledge benchmark has no retain model; leave it out")
        self.target_path = self.retain_path = str(path)
        self.tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(self.target_path))
        self.forget = tokenize_and_block(self.benchmark.forget_texts(self.targets), self.tokenizer, cfg.block_size)
        self.retain = tokenize_and_block(self.benchmark.retain, self.tokenizer, cfg.block_size)


def _evaluate(model: Any, inputs: KnowledgeInputs, cfg: CompareArguments, name: str) -> Any:
    from etu_hf.evaluation.knowledge import evaluate_knowledge

    return evaluate_knowledge(
        model,
        inputs.tokenizer,
        inputs.benchmark,
        inputs.targets,
        batch_size=cfg.eval_batch_size,
        block_size=cfg.block_size,
        model_name=name,
    )


def axes(agg: dict[str, Any]) -> dict[str, float | None]:
    """``forgetting`` and ``kept`` of an aggregate dict (see the module docstring)."""
    f, n, u = (agg.get(k) for k in ("forget_answer_prob", "neighbour_answer_prob", "utility_answer_prob"))
    kept = None if n is None or u is None else (n + u) / 2
    return {X_AXIS: None if f is None else 1.0 - f, Y_AXIS: kept}


def run_knowledge_compare(cfg: CompareArguments) -> dict[str, Any]:
    """Run the grid on a knowledge benchmark (see the module docstring); writes COMPARE.json, COMPARE.md and
    pareto.png into ``cfg.output_dir`` and returns the COMPARE.json content."""
    from etu_hf.compare.runner import build_forbidden, load_model, relearn, unlearn_and_evaluate

    inputs = KnowledgeInputs(cfg)  # every refusal before anything is written
    os.makedirs(cfg.output_dir, exist_ok=True)
    forbidden_set = build_forbidden(cfg, inputs)
    forbidden_set.save(os.path.join(cfg.output_dir, "V_S.ids.json"))
    logger.info(
        "targets %s: %d forget blocks, %d retain blocks, shared V_S (PMI pieces, for etu-pmi) %d tokens",
        inputs.targets,
        len(inputs.forget),
        len(inputs.retain),
        len(forbidden_set),
    )
    logger.info("evaluating the base model %s", inputs.target_path)
    base = _evaluate(load_model(inputs.target_path), inputs, cfg, inputs.target_path)
    base.save(os.path.join(cfg.output_dir, "base", "EVAL.json"))
    grid = cfg.grid()
    runs: list[dict[str, Any]] = []
    for k, (method, label, hyper) in enumerate(grid, 1):
        logger.info("[%d/%d] %s %s: %d steps", k, len(grid), method, label, cfg.max_steps)
        model, ev, row = unlearn_and_evaluate(
            (method, label, hyper),
            cfg,
            inputs,
            forbidden_set,
            lambda m, name=f"{method} {label}": _evaluate(m, inputs, cfg, name),
        )
        run_dir = os.path.join(cfg.output_dir, row["run_dir"])
        row.update({"eval": {**ev.aggregates, **axes(ev.aggregates)}, "generations": ev.generations, "relearned": None})
        logger.info(
            "[%d/%d] %s %s: forget prob %.3f, neighbour %.3f, utility %.3f, retain ppl %.4g",
            k,
            len(grid),
            method,
            label,
            *(
                ev.aggregates[c]
                for c in ("forget_answer_prob", "neighbour_answer_prob", "utility_answer_prob", "retain_ppl")
            ),
        )
        if cfg.relearn_steps > 0:
            attack = relearn(model, inputs, cfg, run_dir, row["seed"])
            ev2 = _evaluate(model, inputs, cfg, f"{method} {label} relearned")
            ev2.save(os.path.join(run_dir, "EVAL_relearned.json"))
            row["relearned"] = {"attack": attack, "eval": ev2.aggregates}
        runs.append(row)
        del model
    front = pareto_front([(r["eval"][X_AXIS], r["eval"][Y_AXIS]) for r in runs])
    for r, on in zip(runs, front, strict=True):
        r["pareto"] = on
    result = {
        "kind": "knowledge",
        "settings": {**asdict(cfg), "grid": [list(g[:2]) for g in grid], "axes": [X_AXIS, Y_AXIS]},
        "models": {"base": inputs.target_path},
        "benchmark": {"name": inputs.benchmark.name, "targets": inputs.targets},
        "vs_size": len(forbidden_set),
        "references": {"base": {**base.aggregates, **axes(base.aggregates)}},
        "base_generations": base.generations,
        "runs": runs,
    }
    result["over_seeds"] = over_seeds(runs, [k for k, _ in COLUMNS] + [X_AXIS, Y_AXIS])
    result["goals"] = knowledge_goals(result)
    write_knowledge_outputs(result, cfg.output_dir)
    return result


def _checks(ev: dict[str, Any], base: dict[str, Any], npo_best: float | None) -> dict[str, Any]:
    """The checks of the module docstring for one evaluation ``ev`` (a run's, or a setting's mean over seeds)."""

    def ratio(key: str) -> float | None:
        v, b = ev.get(key), base.get(key)
        return None if v is None or not b else v / b

    f = ev.get("forget_answer_prob")
    checks: dict[str, Any] = {
        "forget_ratio": ratio("forget_answer_prob"),
        "neighbour_ratio": ratio("neighbour_answer_prob"),
        "utility_ratio": ratio("utility_answer_prob"),
        "retain_ppl_ratio": ratio("retain_ppl"),
    }
    checks["forget_at_most_npo"] = None if f is None or npo_best is None else f <= npo_best
    checks["forget_at_most_quarter_base"] = None if checks["forget_ratio"] is None else checks["forget_ratio"] <= 0.25
    for g in ("neighbour", "utility"):
        v = checks[f"{g}_ratio"]
        checks[f"{g}_kept_95"] = None if v is None else v >= 0.95
    v = checks["retain_ppl_ratio"]
    checks["retain_ppl_ratio_ok"] = None if v is None else v <= 1.10
    return checks


def knowledge_goals(result: dict[str, Any]) -> dict[str, Any]:
    """Per run: the checks of the module docstring (``None`` where a number is missing), against NPO's best run.
    With several seeds (``over_seeds`` in the result), ``over_seeds`` holds the same checks on each setting's
    mean over its seeds, against NPO's best mean (``npo_best_mean_forget_answer_prob``)."""
    base = result["references"]["base"]
    npo = [r["eval"].get("forget_answer_prob") for r in result["runs"] if r["method"] == "npo"]
    npo_best = min((v for v in npo if v is not None), default=None)
    out: dict[str, Any] = {"npo_best_forget_answer_prob": npo_best, "runs": {}}
    for r in result["runs"]:
        out["runs"][f"{r['method']} {r['label']}"] = _checks(r["eval"], base, npo_best)
    groups = result.get("over_seeds") or []
    if groups:
        npo_means = [g["mean"].get("forget_answer_prob") for g in groups if g["method"] == "npo"]
        npo_mean_best = min((v for v in npo_means if v is not None), default=None)
        out["npo_best_mean_forget_answer_prob"] = npo_mean_best
        out["over_seeds"] = {f"{g['method']} {g['setting']}": _checks(g["mean"], base, npo_mean_best) for g in groups}
    return out


def table_cell(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "n/a"
    return f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.3f}"  # a destroyed model's perplexity spans many digits


def knowledge_table(result: dict[str, Any]) -> str:
    """One row for the base model, then one per run (front marked with *)."""
    head = ["method", "setting", *[h for _, h in COLUMNS], "front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = result["references"]["base"]
    lines.append("| (base model) | | " + " | ".join(table_cell(base.get(k)) for k, _ in COLUMNS) + " | |")
    for r in result["runs"]:
        cells = [
            r["method"],
            r["label"],
            *[table_cell(r["eval"].get(k)) for k, _ in COLUMNS],
            "*" if r["pareto"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_knowledge_outputs(result: dict[str, Any], output_dir: str) -> dict[str, str]:
    """COMPARE.json, COMPARE.md (settings, table, goal checks, a few generations) and pareto.png."""
    paths = {
        k: os.path.join(output_dir, n)
        for k, n in (("json", "COMPARE.json"), ("md", "COMPARE.md"), ("png", "pareto.png"))
    }
    with open(paths["json"] + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(paths["json"] + ".tmp", paths["json"])
    rows = [{"method": r["method"], "label": r["label"], "pareto": r["pareto"], **r["eval"]} for r in result["runs"]]
    refs = [{"label": "base", **result["references"]["base"]}]
    plot_pareto(
        rows,
        paths["png"],
        x=X_AXIS,
        y=Y_AXIS,
        references=refs,
        title="1 - forget answer prob vs mean(neighbour, utility) answer prob",
    )
    s = result["settings"]
    text = (
        f"# Unlearning comparison on {result['benchmark']['name']}\n\n"
        f"Targets {', '.join(result['benchmark']['targets'])}"
        f"; model {result['models']['base']}; every run: LoRA r={s['lora_r']} on {s['lora_target_modules']}, "
        f"{s['max_steps']} steps of {s['per_device_train_batch_size']} blocks of {s['block_size']} forget tokens "
        f"(+ as many retain), retain term {s['retain_loss_type']} x {s['retain_weight']} (not for ga), "
        f"{seeds_label(s)}; ETU at epsilon "
        f"in {{{s['etu_epsilons']}}}, lr {s['etu_learning_rate']:g}{etu_args_text(s)}; "
        f"baselines at lr in {{{s['learning_rates']}}}; "
        f"{shared_vs_text(result)}.\n\n"
        + knowledge_table(result)
        + seeds_text(result, COLUMNS, table_cell)
        + "\n\nGoal checks:\n\n```json\n"
        + json.dumps(result["goals"], indent=2)
        + "\n```\n\nGreedy answers (base, then each run):\n\n"
    )
    for name, gens in [("base", result["base_generations"])] + [
        (f"{r['method']} {r['label']}", r["generations"]) for r in result["runs"]
    ]:
        for g in gens:
            text += f"- **{name}** — {g['prompt']} → {g['generation']!r}\n"
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(text)
    return paths
