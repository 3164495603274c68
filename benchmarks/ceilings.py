"""How low can the benchmarks' forget scores go? Two bounds that no training run is needed for.

``builtin``: on the built-in question/answer benchmark, the forget answer probability (TOFU's geometric mean of
the answer's token probabilities, averaged over the forget questions) that ETU would give if it met its target
exactly: every answer token in S(x) at probability at most epsilon, every other token at the target model's.
The I-projection caps the *set* S(x) at epsilon, so the answer token, a member, is capped too; tokens outside
S(x) only gain (a factor 1/Z >= 1), so their target-model probability is a lower bound and the printed figure is a
lower bound on what ETU can reach with that S(x) at that epsilon::

    floor(eps) = mean_q exp( mean_{t in answer(q)} log( min(p_t, eps) if y_t in S(x_t) else p_t ) )

S(x) is built exactly as an ETU run builds it (``forbidden_set_for_run``), for each forbidden-set setting.

``knowledge``: on smollm2-knowledge, for each forget probe of a target, how often its keywords occur in that
target's forget corpus; and the mean forget answer probability if every probe whose keywords occur there fell to
0 while the others (no keyword in the corpus as a whole word, as the keyword is written) kept the base model's:
a method that removes only what the forget text holds cannot go below it.

    python benchmarks/ceilings.py builtin
    python benchmarks/ceilings.py knowledge --target "Harry Potter"
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_io import write_json

#: Forbidden-set settings compared by ``builtin`` (ETUTrainingArguments fields).
SETTINGS: dict[str, dict[str, object]] = {
    "words only": {"vs_method": "words", "forbid_continuations": False},
    "words + continuations, per word (default)": {"vs_method": "words", "forbid_continuations": True},
    "words + continuations, every piece": {
        "vs_method": "words",
        "forbid_continuations": True,
        "continuation_per_word": False,
    },
    "every answer token": {
        "vs_method": "words",
        "forbid_continuations": True,
        "continuation_per_word": False,
        "continuation_skip_top_k": 0,
        "word_common_rank": 0.0,
    },
}


def builtin_floors(epsilons: list[float]) -> dict[str, object]:
    from etu_hf import ETUTrainingArguments
    from etu_hf.compare.runner import CompareInputs, collator, load_model
    from etu_hf.compare.settings import CompareArguments
    from etu_hf.data.blocks import iter_batches, scored_positions
    from etu_hf.training.tilt_state import forbidden_set_for_run

    inputs = CompareInputs(CompareArguments(output_dir="unused"))
    tok, col = inputs.tokenizer, collator(inputs.tokenizer)
    model = load_model(inputs.target_path).eval()
    batches = list(iter_batches(inputs.forget, col, 16))
    logps = []
    with torch.no_grad():
        for b in batches:
            mask, tg = scored_positions(b["input_ids"], b.get("attention_mask"), b["labels"])
            z = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits[:, :-1].double()
            logps.append((mask, tg, torch.log_softmax(z, -1).gather(-1, tg.clamp(min=0)[..., None])[..., 0]))
    out: dict[str, object] = {"target_model_forget_prob": _mean_answer_prob(logps, None, None)}
    for name, setting in SETTINGS.items():
        args = ETUTrainingArguments(output_dir="unused", report_to="none", **setting)
        fs = forbidden_set_for_run(None, args, len(tok), inputs.forget, inputs.retain, col, tok)
        member = []
        for b, (mask, tg, _) in zip(batches, logps, strict=True):
            inside = torch.isin(tg, torch.tensor(fs.ids, dtype=torch.long))
            extra = fs.extra_ids(b["input_ids"], tg, mask)
            if extra is not None:
                inside |= (extra == tg[..., None]).any(-1)
            member.append(inside)
        share = float(sum((m & lp[0]).sum() for m, lp in zip(member, logps, strict=True)))
        share /= float(sum(lp[0].sum() for lp in logps))
        out[name] = {
            "settings": setting,
            "share_of_answer_tokens_in_S": share,
            "floor": {str(e): _mean_answer_prob(logps, member, e) for e in epsilons},
        }
        print(
            f"{name:45s} answer tokens in S(x): {share:.2f}; floor "
            + ", ".join(f"eps {e:g}: {v:.3f}" for e, v in zip(epsilons, out[name]["floor"].values(), strict=True))
        )  # type: ignore[index]
    return out


def _mean_answer_prob(logps: list, member: list | None, eps: float | None) -> float:
    vals = []
    for i, (mask, _, lp) in enumerate(logps):
        if member is not None:
            lp = torch.where(member[i], torch.clamp(lp, max=math.log(eps)), lp)
        for r in range(lp.shape[0]):
            vals.append(math.exp(float(lp[r][mask[r]].mean())))
    return sum(vals) / len(vals)


def knowledge_ceiling(target: str | None) -> dict[str, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etu_hf.benchmark.knowledge import BUILTIN_NAME, load_knowledge_benchmark
    from etu_hf.evaluation.knowledge import score_probes
    from etu_hf.modeling.smollm2 import get_smollm2

    bench = load_knowledge_benchmark(BUILTIN_NAME)
    out: dict[str, object] = {}
    path = get_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for name in bench.resolve_targets(target):
        text = " ".join(bench.forget_texts([name]))
        probes = bench.probes_for([name])["forget"]
        scores = score_probes(model, tok, probes)
        rows = []
        for p, s in zip(probes, scores, strict=True):
            counts = {k: len(re.findall(rf"\b{re.escape(k)}\b", text)) for k in p["keywords"]}
            rows.append({"id": p["id"], "answer": p["answer"], "keyword_counts": counts, "base": s["answer_prob"]})
            print(
                f"{name}: {p['id']} {p['answer'][:24]:24s} base {s['answer_prob']:.3f} keywords in the corpus {counts}"
            )
        base = sum(r["base"] for r in rows) / len(rows)
        absent = [r for r in rows if not any(r["keyword_counts"].values())]  # keywords are alternatives
        ceiling = sum(r["base"] for r in absent) / len(rows)
        print(
            f"{name}: base mean {base:.3f}; {len(absent)} of {len(rows)} probes ask for a keyword the forget corpus "
            f"never holds; keeping only those: {ceiling:.3f} ({ceiling / base:.2f}x the base)"
        )
        out[name] = {"probes": rows, "base_mean": base, "ceiling": ceiling, "ceiling_ratio": ceiling / base}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["builtin", "knowledge"])
    parser.add_argument("--epsilons", default="0.1,0.05,0.01")
    parser.add_argument("--target", default=None, help="knowledge: a target, a comma list or 'all' (default: first)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.which == "builtin":
        result = builtin_floors([float(e) for e in args.epsilons.split(",")])
    else:
        result = knowledge_ceiling(args.target)
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
