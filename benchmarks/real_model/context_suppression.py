"""How far an unlearned adapter lowers a forbidden word where the forget text itself puts it.

For the first ``--words`` words of a run's ``V_S.ids.json`` (in its order: highest G2 first) and every
occurrence `` word`` in the target's forget documents of the ``smollm2-knowledge`` benchmark, the context is the
document up to the occurrence (its last ``--context_chars`` characters: "full") or only the sentence it starts
("sentence": from the last ``.``, ``!``, ``?`` or newline; occurrences with fewer than three words before them in
the sentence are skipped). For each model it prints, over the occurrences where the base model gives the word's
first piece a probability above ``--min_base`` in either context:

- ``mean p``: the mean probability of the word's first piece (with its leading space) after the context;
- ``ratio``: that mean divided by the base model's mean over the same occurrences.

Usage (a compare run's folders, adapters under ``runs/<method>_<setting>/``)::

    python benchmarks/real_model/context_suppression.py --target "The Beatles" \\
        --adapters beatles/runs/etu_eps0.05 beatles/runs/npo_lr0.001
"""

from __future__ import annotations

import argparse
import json
import os
import re

import torch


def occurrences(docs: list[str], words: list[str], context_chars: int) -> list[tuple[str, str, str]]:
    """``(full_context, sentence_context, word)`` for every `` word`` (a whole word after a space) in ``docs``."""
    out = []
    for doc in docs:
        for word in words:
            for m in re.finditer(r"(?<= )" + re.escape(word) + r"\b", doc):
                before = doc[: m.start() - 1]
                cut = max(before.rfind(". "), before.rfind("\n"), before.rfind("! "), before.rfind("? "))
                sentence = before[cut + 1 :].lstrip() if cut >= 0 else before
                if len(sentence.split()) >= 3:
                    out.append((before[-context_chars:], sentence, word))
    return out


@torch.no_grad()
def first_piece_probs(model, tokenizer, contexts: list[str], words: list[str]) -> torch.Tensor:
    """p(first piece of `` word`` | context) for each pair, one forward pass each (no padding effects)."""
    probs = []
    for context, word in zip(contexts, words, strict=True):
        piece = tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
        ids = tokenizer(context, return_tensors="pt", add_special_tokens=False)["input_ids"]
        probs.append(torch.softmax(model(ids).logits[0, -1].float(), -1)[piece].item())
    return torch.tensor(probs)


def main(argv: list[str] | None = None) -> int:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etu_hf.benchmark.knowledge import BUILTIN_NAME, load_knowledge_benchmark
    from etu_hf.modeling.smollm2 import default_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--adapters", nargs="+", required=True, help="adapter folders; the first one's V_S.ids.json is used")
    p.add_argument("--model", default=None, help="the base model folder (default: the cached SmolLM2)")
    p.add_argument("--words", type=int, default=12)
    p.add_argument("--context_chars", type=int, default=500)
    p.add_argument("--min_base", type=float, default=0.05)
    args = p.parse_args(argv)
    args.model = args.model or default_model_dir()

    with open(os.path.join(args.adapters[0], "V_S.ids.json"), encoding="utf-8") as f:
        words = [w["word"] for w in json.load(f)["words"]][: args.words]
    docs = load_knowledge_benchmark(BUILTIN_NAME).forget_texts([args.target])
    occ = occurrences(docs, words, args.context_chars)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(f"words: {', '.join(words)}; {len(occ)} occurrences in {len(docs)} documents")

    def load(adapter: str | None):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        return model if adapter is None else PeftModel.from_pretrained(model, adapter).eval()

    def probs(model) -> tuple[torch.Tensor, torch.Tensor]:
        ws = [o[2] for o in occ]
        return first_piece_probs(model, tokenizer, [o[0] for o in occ], ws), first_piece_probs(
            model, tokenizer, [o[1] for o in occ], ws
        )

    base_full, base_sentence = probs(load(None))
    keep = (base_full > args.min_base) | (base_sentence > args.min_base)
    bf, bs = base_full[keep].mean().item(), base_sentence[keep].mean().item()
    print(f"{int(keep.sum())} occurrences with a base probability above {args.min_base}")
    print(f"{'model':50s} {'full: mean p':>13s} {'ratio':>6s} {'sentence: mean p':>17s} {'ratio':>6s}")
    print(f"{'base':50s} {bf:13.3f} {1:6.2f} {bs:17.3f} {1:6.2f}")
    for adapter in args.adapters:
        full, sentence = probs(load(adapter))
        f_mean, s_mean = full[keep].mean().item(), sentence[keep].mean().item()
        print(f"{adapter[-50:]:50s} {f_mean:13.3f} {f_mean / bf:6.2f} {s_mean:17.3f} {s_mean / bs:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
