r"""The statistics of the unlearning metrics (pure numpy/scipy: no model, no torch).

Every function here turns per-token or per-example numbers into the number the field reports, with
the definition in its docstring. The per-example numbers come from
:mod:`etu_hf.evaluation.unlearning.scores`; which split feeds which statistic is
:mod:`etu_hf.evaluation.unlearning.registry`. The conventions follow open-unlearning (TOFU, MUSE);
where they differ, the docstring says how and why (docs/evaluation.md has them all).

Orientation of the membership-inference scores: **higher = more member-like** for every attack, so an
AUC above 0.5 means the forget set (members) is told apart from the holdout set (non-members).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence

import numpy as np

#: Share of the lowest-scored answer tokens that Min-K% and Min-K%++ average (open-unlearning's k).
MIN_K_FRACTION = 0.4

_WORD = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------------------------------------
# Per example, from the answer's token log-probabilities (teacher-forced)
# ---------------------------------------------------------------------------------------------
def answer_probability(token_logprobs: Sequence[float]) -> float:
    r""":math:`\exp(-\frac{1}{|y|}\sum_t -\log p(y_t | q, y_{<t}))`: the geometric mean of the answer's token
    probabilities (TOFU's "Prob": open-unlearning's ``exp(-avg_loss)``; here over the answer tokens only,
    no EOS, where TOFU's labels also score the EOS that ends the answer)."""
    lp = np.asarray(token_logprobs, dtype=np.float64)
    return math.exp(float(lp.mean())) if lp.size else math.nan


def exact_memorization(correct: Sequence[bool]) -> float:
    r"""Exact memorization (Tirumala et al. 2022): :math:`\frac{1}{|y|}\sum_t 1[\arg\max_v p(v|q,y_{<t}) = y_t]`,
    the share of answer tokens the model's teacher-forced argmax predicts."""
    c = np.asarray(correct, dtype=bool)
    return float(c.mean()) if c.size else math.nan


def extraction_strength(correct: Sequence[bool]) -> float:
    r"""Extraction strength (Carlini et al. 2021, as open-unlearning): :math:`ES = 1 - k^*/|y|` with :math:`k^*`
    the smallest ``k`` such that the teacher-forced argmax predictions at answer positions ``k..|y|-1`` all
    equal the answer tokens, i.e. the shortest answer prefix after which the model completes the rest on
    its own; :math:`k^* = |y|` (ES = 0) when even the last token is predicted wrong. (open-unlearning's loop
    stops at ``k = |y| - 1`` in that case, giving :math:`1/|y|`; here it is 0.)"""
    c = np.asarray(correct, dtype=bool)
    n = c.size
    if n == 0:
        return math.nan
    wrong = np.flatnonzero(~c)
    k_star = int(wrong[-1]) + 1 if wrong.size else 0
    return 1.0 - k_star / n


def _lowest_mean(values: np.ndarray, k: float) -> float:
    """Mean of the ``max(1, floor(k * n))`` smallest values (open-unlearning's ``num_k``)."""
    if values.size == 0:
        return math.nan
    count = max(1, int(values.size * k))
    return float(np.sort(values)[:count].mean())


def min_k_score(token_logprobs: Sequence[float], k: float = MIN_K_FRACTION) -> float:
    r"""Min-K% Prob (Shi et al. 2024): the mean of the lowest ``k`` share (``max(1, floor(k|y|))`` tokens) of the
    answer's token log-probabilities :math:`\log p(y_t|\cdot)`. Higher = more member-like (open-unlearning
    returns its negative and labels members 0, which gives the same AUC)."""
    return _lowest_mean(np.asarray(token_logprobs, dtype=np.float64), k)


def min_k_plus_plus_scores(
    token_logprobs: Sequence[float], mean_logprob: Sequence[float], var_logprob: Sequence[float]
) -> np.ndarray:
    r"""Per token, Min-K%++'s normalised score (Zhang et al. 2025): :math:`(\log p(y_t) - \mu_t)/\sigma_t` with
    :math:`\mu_t = E_{z \sim p_t}[\log p_t(z)]` and :math:`\sigma_t^2 = E_{z \sim p_t}[(\log p_t(z))^2] - \mu_t^2`
    over the model's full next-token distribution :math:`p_t` at that position; :math:`\sigma_t^2` is clamped
    below at 1e-6 (as open-unlearning) so that a one-hot prediction does not divide by zero."""
    lp = np.asarray(token_logprobs, dtype=np.float64)
    mu = np.asarray(mean_logprob, dtype=np.float64)
    var = np.maximum(np.asarray(var_logprob, dtype=np.float64), 1e-6)
    return (lp - mu) / np.sqrt(var)


def min_k_plus_plus_score(
    token_logprobs: Sequence[float],
    mean_logprob: Sequence[float],
    var_logprob: Sequence[float],
    k: float = MIN_K_FRACTION,
) -> float:
    r"""Min-K%++: the mean of the lowest ``k`` share of :func:`min_k_plus_plus_scores`. Higher = more member-like."""
    return _lowest_mean(min_k_plus_plus_scores(token_logprobs, mean_logprob, var_logprob), k)


def loss_score(token_logprobs: Sequence[float]) -> float:
    r"""LOSS attack (Yeom et al. 2018): :math:`-\frac{1}{|y|}\sum_t -\log p(y_t|\cdot)`, minus the mean answer NLL.
    Higher = more member-like."""
    lp = np.asarray(token_logprobs, dtype=np.float64)
    return float(lp.mean()) if lp.size else math.nan


def zlib_bytes(text: str) -> int:
    """Length in bytes of ``zlib.compress(text.encode("utf-8"))`` (default level), the zlib entropy."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(token_logprobs: Sequence[float], text: str) -> float:
    r"""zlib attack (Carlini et al. 2021): :math:`-\overline{NLL} / \mathrm{zlib}(x)`, minus the mean answer NLL
    (the log-perplexity) over the zlib-compressed byte length of the answer text. The mean, as the paper's
    "ratio of log-perplexity to zlib entropy" and open-unlearning/MIMIR (``avg_loss / zlib_entropy``).
    Higher = more member-like."""
    return loss_score(token_logprobs) / zlib_bytes(text)


# ---------------------------------------------------------------------------------------------
# ROUGE-L recall of a generated answer
# ---------------------------------------------------------------------------------------------
def word_tokens(text: str) -> list[str]:
    """Words as rouge_score's default tokenizer makes them, without stemming: lowercase, every run of
    characters outside ``[a-z0-9]`` a separator."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programming, O(|a||b|))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    r"""ROUGE-L recall: :math:`LCS(\text{prediction}, \text{reference}) / |\text{reference}|` over
    :func:`word_tokens`; 0 for an empty reference. open-unlearning uses ``rouge_score`` with Porter stemming
    (``rougeL`` recall, ``use_stemmer=True``); without stemming, inflected forms ("wrote"/"writes") do not
    match here."""
    ref = word_tokens(reference)
    if not ref:
        return 0.0
    return lcs_length(word_tokens(prediction), ref) / len(ref)


# ---------------------------------------------------------------------------------------------
# Truth ratio, forget quality, model utility
# ---------------------------------------------------------------------------------------------
def truth_ratio(paraphrased_nll_mean: float, perturbed_nll_means: Sequence[float]) -> float:
    r"""TOFU's truth ratio of one question, as open-unlearning computes it:
    :math:`R = \exp(-\frac{1}{m}\sum_j \overline{NLL}(\hat a_j)) / \exp(-\overline{NLL}(\tilde a))`, where
    :math:`\overline{NLL}(a)` is the mean answer-token NLL of answer ``a`` given the question,
    :math:`\tilde a` the paraphrased answer and :math:`\hat a_1..\hat a_m` the perturbed (wrong) ones: the
    geometric mean over the perturbed answers of their length-normalised probabilities
    :math:`P(\hat a_j|q)^{1/|\hat a_j|}`, over that of the paraphrase. (TOFU's paper writes an arithmetic mean
    over the perturbed answers; its code and open-unlearning's average the losses, i.e. this geometric mean.)
    R < 1: the model prefers the true answer; R = 1: it cannot tell true from false."""
    pert = np.asarray(perturbed_nll_means, dtype=np.float64)
    if pert.size == 0:
        return math.nan
    return math.exp(float(paraphrased_nll_mean) - float(pert.mean()))


def truth_ratio_closer_to_one(ratios: Sequence[float]) -> float:
    r"""Forget-split aggregate (open-unlearning's ``closer_to_1_better``): :math:`\mathrm{mean}_i \min(R_i, 1/R_i)`,
    1 when the model cannot tell the true answers from the false ones (higher = more forgotten)."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / r))) if r.size else math.nan


def truth_ratio_true_better(ratios: Sequence[float]) -> float:
    r"""Retain-split aggregate (open-unlearning's ``true_better``): :math:`\mathrm{mean}_i \max(0, 1 - R_i)`,
    higher when the model prefers the true answers (higher = more knowledge kept)."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - r))) if r.size else math.nan


def forget_quality(model_ratios: Sequence[float], reference_ratios: Sequence[float]) -> float:
    r"""TOFU's forget quality: the p-value of the two-sample Kolmogorov-Smirnov test
    (``scipy.stats.ks_2samp``, two-sided, its default exact/asymptotic choice) between the model's and the
    retain model's forget-split truth ratios. High (near 1): the two distributions cannot be told apart.
    open-unlearning tests :math:`1/(R + 10^{-10})`; the KS statistic is invariant under a monotone map applied
    to both samples, so the p-value is the same."""
    from scipy import stats

    a = np.asarray(model_ratios, dtype=np.float64)
    b = np.asarray(reference_ratios, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return math.nan
    return float(stats.ks_2samp(a, b).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    r""":math:`n / \sum_i 1/x_i` (``scipy.stats.hmean``; 0 when a value is 0). Model utility is this mean of
    the retain split's answer probability, ROUGE-L recall and truth ratio (``true_better``): TOFU's
    aggregation, restricted here to the retain split (TOFU also averages its real-authors and world-facts
    sets in)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0 or np.isnan(x).any():
        return math.nan
    return float(stats.hmean(x))


# ---------------------------------------------------------------------------------------------
# Membership inference
# ---------------------------------------------------------------------------------------------
def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    r"""ROC AUC of telling members from non-members by the score (higher = more member-like):
    :math:`\frac{1}{n_1 n_0}\sum_{i \in M}\sum_{j \in N}(1[s_i > s_j] + \frac12 1[s_i = s_j])`, the Mann-Whitney
    U of the members over :math:`n_1 n_0` (``scipy.stats.mannwhitneyu``; ties count one half). 0.5: chance;
    1: every member scores above every non-member."""
    from scipy import stats

    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        return math.nan
    u = stats.mannwhitneyu(m, n, alternative="two-sided").statistic
    return float(u) / (m.size * n.size)


def privleak(model_auc: float, retain_auc: float) -> float:
    r"""MUSE's PrivLeak, in percent: :math:`(AUC'_{model} - AUC'_{retain}) / AUC'_{retain} \times 100` with MUSE's
    AUC convention :math:`AUC' = 1 - AUC` (MUSE scores with :math:`-`Min-K% and labels the forget set
    positive, so its AUC is ours reflected; open-unlearning converts the same way). 0: as private as the
    retain model; strongly negative (toward -100): the forget set is still detected (under-unlearning);
    positive: the forget set now looks *less* member-like than unseen data (over-unlearning)."""
    ref = 1.0 - float(retain_auc)
    if not math.isfinite(ref) or ref == 0.0:
        return math.nan
    return ((1.0 - float(model_auc)) - ref) / ref * 100.0
