r"""Per-example numbers of a model on a question/answer split: the model-level half of the unlearning metrics.

Three kinds of pass over a split (:data:`PASSES`), each producing per-example values (the columns of
:data:`PASS_COLUMNS`):

- ``"answer"``: one teacher-forced forward of ``prompt + answer`` (:func:`etu_hf.benchmark.qa.encode_qa`:
  prompt and answer tokenized separately, no EOS); only the answer's tokens are scored. From the token
  log-probabilities, the argmax predictions and the moments of the full next-token distribution at each
  answer position come the answer probability, exact memorization, extraction strength and the four
  membership-inference scores (:mod:`~etu_hf.evaluation.unlearning.metrics`).
- ``"truth_ratio"``: the same forward for the paraphrased answer and each perturbed answer; their mean NLLs
  give the truth ratio.
- ``"generation"``: a greedy answer (``model.generate``, left padding) and its ROUGE-L recall against the answer.
- ``"vs_mass"`` (``etu_hf.evaluation.measures.evaluate_mass``): each answer's summed mass on V_S over its
  scored positions, for the mean and the sequence-level upper bound.

Forwards go through :func:`etu_hf.modeling.states.scored_states`, so the output head is applied to the
answer positions only (chunk by chunk), never to the whole ``[B, T, |V|]``. Examples are batched by length
(right padding for teacher forcing, left padding for generation); the values of an example do not depend on
the batch it falls in (up to float rounding), so several processes may each score a shard
(:func:`shard_indices`, :func:`gather_by_index`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from etu_hf.benchmark.qa import encode_qa
from etu_hf.data.blocks import IGNORE_INDEX, pad_token_id, scored_positions
from etu_hf.evaluation.unlearning import metrics as M
from etu_hf.modeling.head import probe_hidden_states, unwrap_model
from etu_hf.modeling.states import scored_states

logger = logging.getLogger(__name__)

#: The passes over a split, in the order they run.
PASSES: tuple[str, ...] = ("answer", "truth_ratio", "generation", "vs_mass")

#: The per-example columns each pass writes.
PASS_COLUMNS: dict[str, tuple[str, ...]] = {
    "answer": (
        "answer_tokens",
        "answer_nll_mean",
        "answer_prob",
        "exact_memorization",
        "extraction_strength",
        "mia_loss",
        "mia_zlib",
        "mia_mink",
        "mia_minkpp",
    ),
    "truth_ratio": ("paraphrased_nll_mean", "perturbed_nll_mean", "truth_ratio"),
    "generation": ("generation", "rouge_l_recall"),
    "vs_mass": ("vs_mass_sum", "vs_positions"),
}

#: Answer positions per chunk through the output head: each holds a few ``[chunk, |V|]`` float32 tensors
#: (about 0.5 GB at |V| = 128k).
STATS_CHUNK_SIZE = 256

#: Greedy answers get ``answer tokens + GENERATION_MARGIN`` new tokens unless ``max_new_tokens`` is set.
GENERATION_MARGIN = 16

#: A greedy answer is cut at the first of these strings (the prompt format puts a question on its own line).
STOP_STRINGS: tuple[str, ...] = ("\n",)


@dataclass(frozen=True)
class EncodedSplit:
    """A split tokenized once: per row the prompt ids and the answer ids (:func:`encode_qa`), and with
    ``truth_ratio`` the paraphrased answer's ids and each perturbed answer's ids."""

    questions: list[str]
    answers: list[str]
    prompts: list[list[int]]
    answer_ids: list[list[int]]
    paraphrased_ids: list[list[int]] | None = None
    perturbed_ids: list[list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def _answer_ids(tokenizer: Any, question: str, answer: str, where: str) -> tuple[list[int], list[int]]:
    prompt, ids = encode_qa(tokenizer, question, answer)
    if not ids:
        raise ValueError(f"{where}: the answer {answer!r} has no tokens; every scored answer needs at least one")
    return prompt, ids


def encode_split(dataset: Any, tokenizer: Any, *, truth_ratio: bool = False, name: str = "split") -> EncodedSplit:
    """Tokenize a split (a ``datasets.Dataset`` or anything with the :data:`~etu_hf.benchmark.qa.COLUMNS` as
    columns); ``ValueError`` naming the split and row when an answer has no token or a row has no perturbed
    answer."""
    questions, answers = list(dataset["question"]), list(dataset["answer"])
    prompts, answer_ids = [], []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        p, ids = _answer_ids(tokenizer, q, a, f"{name} row {i}")
        prompts.append(p)
        answer_ids.append(ids)
    if not truth_ratio:
        return EncodedSplit(questions, answers, prompts, answer_ids)
    para, pert = [], []
    for i, (q, pa, wrong) in enumerate(
        zip(questions, dataset["paraphrased_answer"], dataset["perturbed_answers"], strict=True)
    ):
        para.append(_answer_ids(tokenizer, q, pa, f"{name} row {i} (paraphrased_answer)")[1])
        if not wrong:
            raise ValueError(f"{name} row {i}: perturbed_answers is empty; the truth ratio needs at least one")
        pert.append([_answer_ids(tokenizer, q, w, f"{name} row {i} (perturbed_answers)")[1] for w in wrong])
    return EncodedSplit(questions, answers, prompts, answer_ids, para, pert)


# ---------------------------------------------------------------------------------------------
# Teacher-forced token statistics
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenStats:
    """One answer's teacher-forced numbers, one entry per answer token ``t``: ``logprobs`` :math:`\\log p(y_t)`,
    ``correct`` :math:`1[\\arg\\max p = y_t]`, and (with ``distribution``) ``mean_logprob`` :math:`\\mu_t` and
    ``var_logprob`` :math:`\\sigma_t^2` of :math:`\\log p(z)` for :math:`z \\sim p_t`."""

    logprobs: np.ndarray
    correct: np.ndarray
    mean_logprob: np.ndarray | None = None
    var_logprob: np.ndarray | None = None


def position_statistics(logits: torch.Tensor, targets: torch.Tensor, distribution: bool = True) -> torch.Tensor:
    r"""Per row of ``logits`` ``[n, V]`` with target ``targets`` ``[n]``: float64 ``[n, 4]`` columns
    :math:`\log p(y)`, :math:`1[\arg\max = y]`, :math:`\mu = \sum_z p(z)\log p(z)` and
    :math:`\sigma^2 = \sum_z p(z)(\log p(z))^2 - \mu^2` (the last two 0 without ``distribution``; terms with
    :math:`p(z) = 0` add 0). Computed in float32 from the logits (float64 output)."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    lp = lsm.gather(-1, targets.view(-1, 1)).squeeze(-1)
    correct = (lsm.argmax(-1) == targets).float()
    out = torch.zeros(len(targets), 4, dtype=torch.float64, device=logits.device)
    out[:, 0], out[:, 1] = lp.double(), correct.double()
    if distribution:
        p = lsm.exp()
        finite = p > 0
        plog = torch.where(finite, p * lsm, torch.zeros_like(lsm))
        mu = plog.sum(-1)
        second = torch.where(finite, plog * lsm, torch.zeros_like(lsm)).sum(-1)
        out[:, 2], out[:, 3] = mu.double(), (second.double() - mu.double() ** 2)
    return out


def _by_length(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Index batches of ``batch_size``, longest first (less padding; the first batch shows a memory limit)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def right_padded(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids = prompt + answer``, ``labels`` -100 on the prompt, right-padded (positions then equal those
    of the unpadded sequence whatever the tokenizer's ``padding_side``)."""
    width = max(len(p) + len(a) for p, a in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, (p, a) in enumerate(items):
        n = len(p) + len(a)
        ids[r, :n] = torch.tensor(p + a)
        labels[r, len(p) : n] = torch.tensor(a)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def teacher_forced_stats(
    model: nn.Module,
    items: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    batch_size: int,
    distribution: bool = True,
    use_hidden: bool | None = None,
    chunk_size: int = STATS_CHUNK_SIZE,
) -> list[TokenStats]:
    """:class:`TokenStats` of each ``(prompt_ids, answer_ids)`` item, in the items' order. The model runs as it
    is (the caller sets eval mode); ``use_hidden=None`` lets the head probe decide on the first batch."""
    device = next(model.parameters()).device
    out: list[TokenStats | None] = [None] * len(items)
    for idx in _by_length([len(p) + len(a) for p, a in items], batch_size):
        batch = {k: v.to(device) for k, v in right_padded([items[i] for i in idx], pad_id).items()}
        if use_hidden is None:
            use_hidden = probe_hidden_states(model, batch)
        mask, targets = scored_positions(batch["input_ids"], batch["attention_mask"], batch["labels"])
        st = scored_states(model, batch, mask, use_hidden)
        flat_targets = targets[mask].to(st.states.device)
        parts = []
        for s in range(0, st.states.shape[0], chunk_size):
            chunk = st.states[s : s + chunk_size]
            logits = st.head(chunk) if st.head is not None else chunk
            parts.append(position_statistics(logits, flat_targets[s : s + chunk_size], distribution).cpu())
        rows = torch.cat(parts).numpy()
        bounds = np.concatenate([[0], np.cumsum(mask.sum(1).cpu().numpy())])
        for r, i in enumerate(idx):
            v = rows[bounds[r] : bounds[r + 1]]
            moments = (v[:, 2], v[:, 3]) if distribution else (None, None)
            out[i] = TokenStats(v[:, 0], v[:, 1] > 0.5, *moments)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Greedy answers
# ---------------------------------------------------------------------------------------------
def _cut(text: str) -> str:
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text.strip()


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    budgets: Sequence[int],
    *,
    batch_size: int,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy answer of each prompt (``GenerationConfig(do_sample=False)``, batches left-padded), at most
    ``budgets[i]`` new tokens for prompt ``i``, cut at the EOS and at the first of :data:`STOP_STRINGS`,
    stripped. A batch generates its largest budget and each answer is then cut to its own, so the answer of
    an example does not depend on its batch."""
    from transformers import GenerationConfig

    generator = unwrap_model(model)
    device = next(generator.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[str] = [""] * len(prompts)
    for idx in _by_length([len(p) for p in prompts], batch_size):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        longest = max(budgets[i] for i in idx)
        config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=longest, pad_token_id=pad, eos_token_id=eos
        )
        kwargs = {"synced_gpus": True} if synced_gpus else {}
        new = generator.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, **kwargs
        )[:, width:]
        for r, i in enumerate(idx):
            tokens = new[r, : budgets[i]].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            out[i] = _cut(tokenizer.decode(tokens, skip_special_tokens=True))
    return out


# ---------------------------------------------------------------------------------------------
# The passes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreOptions:
    """How a split is scored: ``batch_size`` sequences per forward (and per ``generate``), ``max_new_tokens``
    (``None``: each answer's token count + :data:`GENERATION_MARGIN`), Min-K ``k``, the output-head
    ``chunk_size``, and ``synced_gpus`` for generation with ZeRO-3-sharded weights."""

    batch_size: int = 16
    max_new_tokens: int | None = None
    k: float = M.MIN_K_FRACTION
    chunk_size: int = STATS_CHUNK_SIZE
    synced_gpus: bool = False


def _answer_columns(stats: TokenStats, answer: str, k: float) -> dict[str, Any]:
    lp = stats.logprobs
    return {
        "answer_tokens": len(lp),
        "answer_nll_mean": float(-lp.mean()),
        "answer_prob": M.answer_probability(lp),
        "exact_memorization": M.exact_memorization(stats.correct),
        "extraction_strength": M.extraction_strength(stats.correct),
        "mia_loss": M.loss_score(lp),
        "mia_zlib": M.zlib_score(lp, answer),
        "mia_mink": M.min_k_score(lp, k),
        "mia_minkpp": M.min_k_plus_plus_score(lp, stats.mean_logprob, stats.var_logprob, k),
    }


def score_examples(
    model: nn.Module,
    tokenizer: Any,
    split: EncodedSplit,
    indices: Sequence[int],
    passes: Sequence[str],
    options: ScoreOptions,
    *,
    forbidden_ids: torch.Tensor | None = None,
    use_hidden: bool | None = None,
    extra_ids: Any = None,
) -> list[dict[str, Any]]:
    """Per-example values (the columns of :data:`PASS_COLUMNS` for ``passes``, plus ``"question"``) of the rows
    ``indices`` of ``split``, in that order. The model is used as it is (the caller sets eval mode). ``extra_ids``:
    the per-context extras of S(x) for the mass pass (:meth:`etu_hf.ForbiddenSet.extra_ids`)."""
    pad = pad_token_id(tokenizer)
    rows: list[dict[str, Any]] = [{"question": split.questions[i]} for i in indices]
    if not indices:
        return rows
    tf = dict(pad_id=pad, batch_size=options.batch_size, use_hidden=use_hidden, chunk_size=options.chunk_size)
    if "answer" in passes:
        stats = teacher_forced_stats(model, [(split.prompts[i], split.answer_ids[i]) for i in indices], **tf)
        for row, s, i in zip(rows, stats, indices, strict=True):
            row.update(_answer_columns(s, split.answers[i], options.k))
    if "truth_ratio" in passes:
        if split.paraphrased_ids is None or split.perturbed_ids is None:
            raise ValueError("the truth ratio needs a split encoded with truth_ratio=True")
        items, owner = [], []
        for r, i in enumerate(indices):
            for ids in [split.paraphrased_ids[i], *split.perturbed_ids[i]]:
                items.append((split.prompts[i], ids))
                owner.append(r)
        stats = teacher_forced_stats(model, items, distribution=False, **tf)
        nll: list[list[float]] = [[] for _ in indices]
        for r, s in zip(owner, stats, strict=True):
            nll[r].append(float(-s.logprobs.mean()))
        for row, values in zip(rows, nll, strict=True):
            row["paraphrased_nll_mean"], row["perturbed_nll_mean"] = values[0], values[1:]
            row["truth_ratio"] = M.truth_ratio(values[0], values[1:])
    if "generation" in passes:
        budgets = [options.max_new_tokens or len(split.answer_ids[i]) + GENERATION_MARGIN for i in indices]
        texts = greedy_answers(
            model,
            tokenizer,
            [split.prompts[i] for i in indices],
            budgets,
            batch_size=options.batch_size,
            synced_gpus=options.synced_gpus,
        )
        for row, text, i in zip(rows, texts, indices, strict=True):
            row["generation"], row["rouge_l_recall"] = text, M.rouge_l_recall(text, split.answers[i])
    if "vs_mass" in passes:
        if forbidden_ids is None:
            raise ValueError("the mass on V_S needs forbidden ids")
        sums, counts = vs_mass_sums(model, split, indices, forbidden_ids, pad, options, extra_ids)
        for row, s, c in zip(rows, sums, counts, strict=True):
            row["vs_mass_sum"], row["vs_positions"] = float(s), int(c)
    return rows


def vs_mass_sums(
    model: nn.Module,
    split: EncodedSplit,
    indices: Sequence[int],
    forbidden_ids: torch.Tensor,
    pad_id: int,
    options: ScoreOptions,
    extra_ids: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each answer's summed mass on V_S and its number of scored positions (the answer tokens), from
    :func:`etu_hf.evaluation.measures.evaluate_mass` over the same right-padded batches as the answer pass."""
    from etu_hf.evaluation.measures import evaluate_mass

    items = [(split.prompts[i], split.answer_ids[i]) for i in indices]
    size = options.batch_size
    batches = [right_padded(items[s : s + size], pad_id) for s in range(0, len(items), size)]
    result = evaluate_mass(model, batches, forbidden_ids, chunk_size=options.chunk_size, extra_ids=extra_ids)
    if len(result.sequence_sums) != len(items):  # every answer has >= 1 token (encode_split), so never
        raise RuntimeError(f"evaluate_mass scored {len(result.sequence_sums)} of {len(items)} answers")
    return result.sequence_sums, result.sequence_counts


# ---------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------
def shard_indices(n: int, state: Any | None) -> list[int]:
    """The row indices this process scores: all of ``range(n)`` without ``state`` (an accelerate
    ``Accelerator`` or ``PartialState``) or with one process; else its contiguous share from
    ``state.split_between_processes`` (padded with a repeat of the last row, so every process runs the same
    number of batches, as sharded models need)."""
    if state is None or state.num_processes <= 1 or n == 0:
        return list(range(n))
    with state.split_between_processes(list(range(n)), apply_padding=True) as mine:
        return list(mine)


def gather_by_index(indices: Sequence[int], rows: Sequence[dict[str, Any]], n: int, state: Any | None) -> list[dict]:
    """Every process's ``(index, row)`` pairs gathered (``accelerate.utils.gather_object``) into the ``n`` rows in
    their original order, on every process."""
    if state is None or state.num_processes <= 1:
        return list(rows)
    from accelerate.utils import gather_object

    merged = dict(gather_object(list(zip(indices, rows, strict=True))))
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"rows {missing[:5]} were scored by no process")
    return [merged[i] for i in range(n)]


def columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows (dicts) as columns (lists), the keys of the first row; non-finite floats as ``None``."""
    if not rows:
        return {}

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return {k: [clean(r.get(k)) for r in rows] for k in rows[0]}
