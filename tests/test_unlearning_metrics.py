"""The unlearning metrics of the field (etu_hf.evaluation.unlearning): each statistic against a hand or naive
computation, the model-level numbers against plain transformers loops and a model with known logits, and the
evaluation of several processes against one."""

import json
import math
import os
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import TWO_PROCESSES
from scipy import stats
from torch import nn

from etu_hf.benchmark.qa import encode_qa
from etu_hf.evaluation.unlearning import (
    METRICS,
    BenchmarkEvaluator,
    UnlearningEval,
    evaluate_benchmark,
    format_table,
    resolve_metrics,
)
from etu_hf.evaluation.unlearning import metrics as M
from etu_hf.evaluation.unlearning.scores import greedy_answers, position_statistics, teacher_forced_stats
from etu_hf.ops.bounds import sequence_upper_bound

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qa_split(n, tag, seed=0):
    """A split of the qa.COLUMNS with answers of varied length (so batches need padding)."""
    rng = np.random.default_rng(seed)
    words = ["river", "stone", "lamp", "market", "winter", "garden", "tower", "harbour", "clock", "bridge"]
    rows = []
    for i in range(n):
        ans = " ".join(rng.choice(words, size=int(rng.integers(2, 9))))
        rows.append(
            {
                "entity": f"{tag}{i}",
                "question": f"What did {tag} number {i} write about?",
                "answer": f"{tag} {i} wrote about the {ans}.",
                "paraphrased_answer": f"The {ans} is what {tag} {i} wrote about.",
                "perturbed_answers": [f"The {w} is what {tag} {i} wrote about." for w in rng.choice(words, size=3)],
            }
        )
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def bench():
    return {"forget": qa_split(7, "Ana", 1), "retain": qa_split(9, "Bo", 2), "holdout": qa_split(6, "Cy", 3)}


@pytest.fixture(scope="module")
def alone(tokenizer, bench):
    """Every metric of the demo model (no reference, no V_S), greedy answers of 6 tokens (fast)."""
    from transformers import AutoModelForCausalLM

    from etu_hf.demo import DEMO_MODEL_DIR

    lm = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    return evaluate_benchmark(lm, tokenizer, bench, batch_size=4, max_new_tokens=6)


# ------------------------------------------------------------------------------- pure statistics
def test_auc_hand_cases_and_ties():
    assert M.auc([3, 4, 5], [0, 1, 2]) == 1.0  # every member above every non-member
    assert M.auc([0, 1], [2, 3, 4]) == 0.0
    # pairs: (1,2)=0 (1,0)=1 (2,2)=1/2 (2,0)=1 (3,2)=1 (3,0)=1 -> 4.5 / 6
    assert M.auc([1, 2, 3], [2, 0]) == pytest.approx(0.75)
    assert M.auc([1, 1], [1, 1, 1]) == pytest.approx(0.5)  # all tied
    rng = np.random.default_rng(0)
    m, n = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 30).round(1)  # rounding makes ties
    naive = np.mean([[1.0 if a > b else 0.5 if a == b else 0.0 for b in n] for a in m])
    assert M.auc(m, n) == pytest.approx(naive)


def test_forget_quality_is_the_ks_p_value():
    a = [0.5, 0.7, 0.9, 1.1, 1.3]
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    # fully separated samples of 5 and 5: the exact two-sided p-value is 2 / C(10, 5)
    assert M.forget_quality([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / math.comb(10, 5))
    rng = np.random.default_rng(1)
    x, y = rng.lognormal(0, 0.5, 25), rng.lognormal(0.3, 0.5, 30)
    # open-unlearning tests 1 / (R + 1e-10): the same p-value (KS is invariant under a monotone map)
    ou = stats.ks_2samp(1 / (x + 1e-10), 1 / (y + 1e-10)).pvalue
    assert M.forget_quality(x, y) == pytest.approx(ou, rel=1e-9)


def test_extraction_strength_and_exact_memorization_hand_cases():
    assert M.extraction_strength([True] * 4) == 1.0
    assert M.extraction_strength([False, True, True, True]) == pytest.approx(0.75)  # k* = 1
    assert M.extraction_strength([True, False, True, True]) == pytest.approx(0.5)  # k* = 2
    assert M.extraction_strength([True, True, True, False]) == 0.0  # the last is wrong: k* = |y|
    assert M.exact_memorization([True, False, True, True]) == pytest.approx(0.75)


def test_truth_ratio_on_fixed_probabilities():
    # normalised probabilities: paraphrase 0.5, perturbed 0.2 and 0.05 -> geometric mean 0.1 -> R = 0.2
    para, pert = -math.log(0.5), [-math.log(0.2), -math.log(0.05)]
    assert M.truth_ratio(para, pert) == pytest.approx(0.1 / 0.5)
    r = [0.2, 1.0, 4.0]
    assert M.truth_ratio_closer_to_one(r) == pytest.approx((0.2 + 1.0 + 0.25) / 3)
    assert M.truth_ratio_true_better(r) == pytest.approx((0.8 + 0.0 + 0.0) / 3)


def test_min_k_and_min_k_plus_plus_against_naive_numpy():
    rng = np.random.default_rng(2)
    lp = -rng.exponential(2.0, 13)
    mu, var = -rng.exponential(1.0, 13), rng.exponential(1.0, 13)
    var[3] = 0.0  # a one-hot prediction: clamped at 1e-6
    n = int(13 * 0.4)  # 5 tokens
    assert M.min_k_score(lp) == pytest.approx(np.mean(sorted(lp)[:n]))
    z = [(lp[i] - mu[i]) / math.sqrt(max(var[i], 1e-6)) for i in range(13)]
    assert M.min_k_plus_plus_score(lp, mu, var) == pytest.approx(np.mean(sorted(z)[:n]))
    assert M.min_k_score([-1.0, -2.0]) == -2.0  # at least one token


def test_loss_and_zlib_scores():
    lp = [-1.0, -2.0, -3.0]
    text = "Ana wrote about the river."
    assert M.loss_score(lp) == pytest.approx(-2.0)
    assert M.zlib_score(lp, text) == pytest.approx(-2.0 / len(zlib.compress(text.encode())))


def test_rouge_l_recall_hand_cases():
    assert M.rouge_l_recall("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert M.rouge_l_recall("Paris, France.", "paris france") == 1.0  # case and punctuation do not count
    assert M.rouge_l_recall("b a", "a b") == pytest.approx(0.5)
    assert M.rouge_l_recall("", "a b") == 0.0
    assert M.rouge_l_recall("a b c d e f", "a c") == 1.0  # recall: extra words cost nothing
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_harmonic_mean_and_privleak():
    assert M.harmonic_mean([0.5, 0.25, 1.0]) == pytest.approx(3 / (2 + 4 + 1))
    assert M.harmonic_mean([0.5, 0.0, 1.0]) == 0.0
    assert M.privleak(0.5, 0.5) == 0.0
    assert M.privleak(0.9, 0.5) == pytest.approx((0.1 - 0.5) / 0.5 * 100)  # forget set still detected: -80
    assert M.privleak(0.3, 0.5) == pytest.approx(40.0)  # over-unlearned


def test_unknown_metric_names_list_the_known():
    with pytest.raises(ValueError, match=r"unknown metric.*'nope'.*known: prob, rouge"):
        resolve_metrics("prob,nope")
    assert [m.name for m in resolve_metrics("rouge, prob")] == ["prob", "rouge"]
    assert len(resolve_metrics("all")) == len(METRICS)


# ------------------------------------------------------------------------------- model-level numbers
class ShiftModel(nn.Module):
    """A causal "LM" that predicts token ``x + 1`` after ``x`` with logit 10 (0 for the rest): its log-probs are
    known in closed form, and it "copies" any answer of consecutive ids."""

    def __init__(self, vocab=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)
        self.embed.weight.data = 10 * torch.roll(torch.eye(vocab), 1, dims=1)
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        self.lm_head.weight.data = torch.eye(vocab)
        self.config = SimpleNamespace(vocab_size=vocab)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.lm_head(self.embed(input_ids)))


def test_teacher_forced_numbers_of_a_model_with_known_logits():
    v = 16
    model = ShiftModel(v)
    items = [([1, 2, 3, 4], [5, 6, 7, 8]), ([2, 3], [4, 5, 9, 10]), ([7], [2])]
    out = teacher_forced_stats(model, items, pad_id=0, batch_size=2)
    assert [s.correct.tolist() for s in out] == [[True] * 4, [True, True, False, True], [False]]
    assert [M.extraction_strength(s.correct) for s in out] == [1.0, 0.25, 0.0]
    assert [M.exact_memorization(s.correct) for s in out] == [1.0, 0.75, 0.0]
    z = math.e**10 + v - 1
    hit, miss = 10 - math.log(z), -math.log(z)
    np.testing.assert_allclose(out[1].logprobs, [hit, hit, miss, hit], rtol=1e-5, atol=1e-6)
    # the moments of log p over the next-token distribution, in closed form
    p1, p0 = math.e**10 / z, 1 / z
    mu = p1 * hit + (v - 1) * p0 * miss
    var = p1 * hit**2 + (v - 1) * p0 * miss**2 - mu**2
    np.testing.assert_allclose(out[0].mean_logprob, [mu] * 4, rtol=1e-4)
    np.testing.assert_allclose(out[0].var_logprob, [var] * 4, rtol=1e-3)


def test_position_statistics_against_a_naive_loop():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 11) * 3, torch.randint(0, 11, (6,))
    logits[2, 4] = -float("inf")  # a token the model rules out adds 0 to the moments
    got = position_statistics(logits, targets).numpy()
    for i in range(6):
        p = torch.softmax(logits[i].double(), -1).numpy()
        lp = np.log(np.where(p > 0, p, 1.0))
        mu = float((p * lp).sum())
        assert got[i, 0] == pytest.approx(lp[targets[i]], abs=1e-5)
        assert got[i, 1] == float(np.argmax(p) == int(targets[i]))
        assert got[i, 2] == pytest.approx(mu, abs=1e-5)
        assert got[i, 3] == pytest.approx(float((p * lp**2).sum()) - mu**2, abs=1e-4)


def naive_answer_probability(model, tokenizer, question, answer):
    """exp(mean answer-token log-prob): one plain transformers forward of one example."""
    prompt, ans = encode_qa(tokenizer, question, answer)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ans])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    return math.exp(float(np.mean([lp[len(prompt) - 1 + t, a].item() for t, a in enumerate(ans)])))


def test_answer_probability_against_plain_transformers(model, tokenizer, bench):
    model.train()  # the evaluation switches to eval mode and back
    result = evaluate_benchmark(model, tokenizer, bench, metrics="prob", batch_size=3)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    for split in ("forget", "retain"):
        data = bench[split]
        naive = [
            naive_answer_probability(model, tokenizer, q, a)
            for q, a in zip(data["question"], data["answer"], strict=True)
        ]
        np.testing.assert_allclose(result.per_example[split]["answer_prob"], naive, rtol=1e-4)
        assert result.aggregates[f"{split}_prob"] == pytest.approx(np.mean(naive), rel=1e-4)
    assert "holdout" not in result.per_example  # prob needs no holdout


def test_greedy_answers_do_not_depend_on_the_batch(model, tokenizer, bench):
    data = bench["forget"]
    prompts = [encode_qa(tokenizer, q, a)[0] for q, a in zip(data["question"][:5], data["answer"][:5], strict=True)]
    budgets = [3 + i for i in range(len(prompts))]
    batched = greedy_answers(model.eval(), tokenizer, prompts, budgets, batch_size=3)
    assert batched == greedy_answers(model, tokenizer, prompts, budgets, batch_size=1)
    for p, b, text in zip(prompts, budgets, batched, strict=True):  # a plain generate, one prompt at a time
        ids = model.generate(torch.tensor([p]), max_new_tokens=b, do_sample=False, pad_token_id=0)[0, len(p) :]
        ids = ids.tolist()
        ids = ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids
        assert text == tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0].strip()


def test_vs_mass_and_its_bound_against_a_naive_loop(model, tokenizer):
    data = qa_split(10, "Di", 4)
    ids = list(range(200, 260))
    result = evaluate_benchmark(model, tokenizer, {"forget": data}, metrics="vs_mass", forbidden_set=ids)
    sums, counts = [], []
    for q, a in zip(data["question"], data["answer"], strict=True):
        prompt, ans = encode_qa(tokenizer, q, a)
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([prompt + ans])).logits[0].double(), -1)
        sums.append(float(p[len(prompt) - 1 : len(prompt) - 1 + len(ans), ids].sum()))
        counts.append(len(ans))
    np.testing.assert_allclose(result.per_example["forget"]["vs_mass_sum"], sums, rtol=1e-4)
    assert result.aggregates["forget_vs_mass"] == pytest.approx(sum(sums) / sum(counts), rel=1e-4)
    bound = sequence_upper_bound(np.array(sums), np.array(counts)).upper
    assert result.aggregates["forget_vs_mass_upper"] == pytest.approx(bound, rel=1e-3)
    with pytest.raises(ValueError, match="vs_mass needs V_S"):
        BenchmarkEvaluator({"forget": data}, tokenizer, metrics="vs_mass")


def test_reference_metrics_save_load_and_table(model, tokenizer, bench, alone, tmp_path):
    assert alone.aggregates["forget_quality"] is None and "retain model" in alone.notes["forget_quality"]
    assert alone.aggregates["forget_vs_mass"] is None  # no V_S: left out, with a note
    tr = alone.per_example["retain"]["truth_ratio"]
    parts = [alone.aggregates["retain_prob"], alone.aggregates["retain_rouge"], M.truth_ratio_true_better(tr)]
    assert alone.aggregates["model_utility"] == pytest.approx(stats.hmean(parts))
    # against itself: the same truth ratios (p-value 1) and the same AUCs (PrivLeak 0)
    same = evaluate_benchmark(model, tokenizer, bench, reference=alone, batch_size=4, metrics="forget_quality,privleak")
    assert same.aggregates["forget_quality"] == pytest.approx(1.0)
    for attack in ("loss", "zlib", "mink", "minkpp"):
        assert same.aggregates[f"privleak_{attack}"] == pytest.approx(0.0, abs=1e-6)
    assert same.aggregates["privleak"] == same.aggregates["privleak_mink"]
    path = same.save(str(tmp_path))
    loaded = UnlearningEval.load(path)
    assert loaded.aggregates == pytest.approx(json.loads(json.dumps(same.aggregates)))
    assert loaded.per_example["forget"]["truth_ratio"] == same.per_example["forget"]["truth_ratio"]
    assert loaded.settings["benchmark"]["fingerprint"] == same.settings["benchmark"]["fingerprint"]
    table = format_table({"model": same, "alone": alone})
    assert "| forget_quality | higher | 1.0000 | n/a |" in table
    assert "- alone: n/a forget_quality, privleak" in table
    other = dict(bench, forget=qa_split(7, "Eve", 9))
    with pytest.raises(ValueError, match="another benchmark"):
        BenchmarkEvaluator(other, tokenizer, reference=alone)


def test_peft_model_is_fine(model, tokenizer, bench):
    from peft import LoraConfig, get_peft_model

    base = evaluate_benchmark(model, tokenizer, bench, metrics="prob,exact_memorization")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    adapted = evaluate_benchmark(peft, tokenizer, bench, metrics="prob,exact_memorization")
    np.testing.assert_allclose(  # LoRA starts at zero: the same numbers
        adapted.per_example["forget"]["answer_prob"], base.per_example["forget"]["answer_prob"], rtol=1e-5
    )


# ------------------------------------------------------------------------------- several processes
SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.evaluation.unlearning import evaluate_benchmark
from test_unlearning_metrics import qa_split

state = PartialState(cpu=True)  # torchrun on CPUs: accelerate needs to be told (accelerate launch --cpu does)
tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
bench = {{"forget": qa_split(7, "Ana", 1), "retain": qa_split(9, "Bo", 2), "holdout": qa_split(6, "Cy", 3)}}
kwargs = dict(batch_size=2, max_new_tokens=6, forbidden_set=list(range(200, 260)))
result = evaluate_benchmark(model, tok, bench, accelerator=state, **kwargs)
result.save({out!r} + f"/rank{{state.process_index}}.json")
"""


@pytest.mark.slow
@TWO_PROCESSES
def test_two_processes_gather_the_values_of_one(model, tokenizer, bench, tmp_path):
    script = tmp_path / "eval_two.py"
    script.write_text(SCRIPT.format(tests=os.path.join(ROOT, "tests"), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-5000:]
    ranks = [UnlearningEval.load(str(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    one = evaluate_benchmark(
        model, tokenizer, bench, batch_size=2, max_new_tokens=6, forbidden_set=list(range(200, 260))
    )
    assert ranks[0].settings["num_processes"] == 2
    assert ranks[0].per_example == ranks[1].per_example
    for split, cols in one.per_example.items():
        for name, values in cols.items():
            got = ranks[0].per_example[split][name]
            if isinstance(values[0], float):
                np.testing.assert_allclose(got, values, rtol=1e-5, err_msg=f"{split}/{name}")
            elif name != "perturbed_nll_mean":
                assert got == values, f"{split}/{name}"
    for key, value in one.aggregates.items():
        expected = None if value is None else pytest.approx(value, rel=1e-4, abs=1e-9)
        assert ranks[0].aggregates[key] == expected, key


def test_the_evaluator_tokenizes_once_and_returns_the_computed_aggregates(model, tokenizer, bench, alone):
    evaluator = BenchmarkEvaluator(bench, tokenizer, metrics="prob,forget_quality", batch_size=4)
    out = evaluator(model)
    assert set(out) == {"forget_prob", "retain_prob"}  # forget_quality has no reference: left out
    assert out["forget_prob"] == pytest.approx(alone.aggregates["forget_prob"], rel=1e-5)
    # without a reference its per-example values are scored all the same, so it can serve as one
    result = evaluator.evaluate(model)
    assert "truth_ratio" in result.per_example["forget"]
    with_ref = BenchmarkEvaluator(bench, tokenizer, reference=result, metrics="forget_quality", batch_size=4)
    assert with_ref(model) == {"forget_quality": pytest.approx(1.0)}
