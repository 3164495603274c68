"""V_S construction: the frequency and PMI rules against naive counts, filters, span masking, files."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from etu_hf import ForbiddenSet, build_forbidden_set
from etu_hf.data.blocks import iter_batches
from etu_hf.forbidden_set import frequency_selection, pmi_scores, pmi_selection


class FakeTokenizer:
    """A tokenizer-like object with chosen piece strings (byte-level BPE or SentencePiece style)."""

    def __init__(self, pieces, special=()):
        self.pieces = pieces
        self.all_special_ids = list(special)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens).replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")


@pytest.mark.filterwarnings("ignore:V_S holds")
def test_frequency_rule_matches_naive_count():
    rng = np.random.default_rng(0)
    seqs = [rng.zipf(1.3, size=rng.integers(5, 60)) % 50 for _ in range(40)]
    fs = build_forbidden_set(seqs, vocab_size=50, method="frequency", vs_freq_rate=0.05, vs_abs_cap=10**9)
    counts = Counter(int(t) for s in seqs for t in s[1:])  # every token after the first is a target
    n = sum(counts.values())
    cap = max(1, min(0.05 * n, 10**9))
    expected = sorted(t for t, c in counts.items() if 0 < c <= cap)
    assert fs.ids == expected
    assert fs.forget_counts == [counts[t] for t in expected]
    top = build_forbidden_set(seqs, vocab_size=50, method="frequency", vs_freq_rate=0.05, vocab_top_k=3)
    assert len(top) == 3
    assert set(top.ids) <= set(expected)
    assert min(counts[t] for t in top.ids) >= sorted((counts[t] for t in expected), reverse=True)[2]


@pytest.mark.filterwarnings("ignore:V_S holds")
def test_pmi_rule_matches_formula():
    rng = np.random.default_rng(1)
    forget = [rng.integers(0, 30, size=50) for _ in range(20)]
    retain = [rng.integers(10, 40, size=50) for _ in range(20)]
    a = 1.0
    fs = build_forbidden_set(
        forget, retain, vocab_size=40, method="pmi", pmi_min_count=3, pmi_top_k=100, pmi_smoothing=a, pmi_min_score=0
    )
    cf = Counter(int(t) for s in forget for t in s[1:])
    cr = Counter(int(t) for s in retain for t in s[1:])
    nf, nr, v = sum(cf.values()), sum(cr.values()), 40

    def score(t):
        return math.log((cf[t] + a) / (nf + a * v)) - math.log((cr[t] + a) / (nr + a * v))

    expected = sorted(t for t in range(v) if cf[t] >= 3 and score(t) > 0)
    assert fs.ids == expected
    for t, s in zip(fs.ids, fs.scores, strict=True):
        assert s == pytest.approx(score(t), rel=1e-12)
    # the minimum score (default 1 nat: at least e times as frequent in forget as in retain text)
    strict = build_forbidden_set(forget, retain, vocab_size=40, pmi_min_count=3, pmi_top_k=100)
    assert strict.ids == sorted(t for t in expected if score(t) > 1.0) and strict.parameters["pmi_min_score"] == 1.0
    assert 0 < len(strict) < len(fs)
    # uniform background without retain data: score = log((c+a)/(N+a|V|)) + log|V|
    with pytest.warns(UserWarning, match="uniform background"):
        fs_u = build_forbidden_set(forget, vocab_size=40, pmi_min_count=1, pmi_min_score=0)
    s_u = pmi_scores(np.bincount([t for s in forget for t in s[1:]], minlength=40), None, 1.0)
    assert s_u[5] == pytest.approx(math.log((cf[5] + 1) / (nf + 40)) + math.log(40))
    assert fs_u.parameters["background"] == "uniform"
    # top-k keeps the best scores
    best = build_forbidden_set(forget, retain, vocab_size=40, pmi_min_count=3, pmi_top_k=4, pmi_min_score=0)
    assert sorted(best.ids) == sorted(sorted(expected, key=lambda t: -score(t))[:4])


def test_counting_uses_scored_positions_only():
    ids = torch.tensor([[5, 6, 7, 8, 9, 1, 1], [1, 1, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100  # a prompt token that is not trained
    fs = build_forbidden_set(
        [{"input_ids": ids, "attention_mask": mask, "labels": labels}],
        vocab_size=10,
        method="frequency",
        vs_freq_rate=1.0,
    )
    assert 1 not in fs.ids  # padding never counted
    assert 7 in fs.ids  # still counted from the second row
    assert fs.forget_counts[fs.ids.index(7)] == 1
    assert fs.forget_counts[fs.ids.index(6)] == 2


@pytest.mark.parametrize("marker", ["Ġ", "▁"])
def test_token_string_filter_and_special_tokens(marker):
    pieces = [
        "<eos>",
        f"{marker}vexium",
        f"{marker}",
        f"{marker}{marker}",
        ".",
        f"{marker}42",
        "7",
        ",",
        "Ċ",
        f"{marker}--",
        "ium",
        f"{marker}a1",
    ]
    tok = FakeTokenizer(pieces, special=[0])
    seq = list(range(len(pieces))) * 3
    fs = build_forbidden_set([seq], vocab_size=len(pieces), tokenizer=tok, method="frequency", vs_freq_rate=1.0)
    names = {pieces[i] for i in fs.ids}
    assert names == {f"{marker}vexium", "ium", f"{marker}a1"}
    assert fs.tokens == [pieces[i] for i in fs.ids]


def test_empty_forbidden_set_names_the_flags():
    with pytest.raises(ValueError, match="pmi_min_count"):
        build_forbidden_set([[1, 2, 3]], [[1, 2, 3]], vocab_size=5, pmi_min_count=20)
    with pytest.raises(ValueError, match="vs_freq_rate"):
        build_forbidden_set([[1, 1, 1, 1]], vocab_size=5, method="frequency", vs_freq_rate=0.01, vs_abs_cap=1)
    with pytest.raises(ValueError, match="nothing to forget"):
        build_forbidden_set([[3]], vocab_size=5, method="frequency")


def test_large_forbidden_set_warns():
    with pytest.warns(UserWarning, match="of the vocabulary"):
        build_forbidden_set([list(range(10)) * 2], vocab_size=10, method="frequency", vs_freq_rate=1.0)


def test_out_of_vocabulary_ids_are_rejected():
    with pytest.raises(ValueError, match="tokenizer does not match"):
        build_forbidden_set([[1, 2, 30]], vocab_size=10)
    fs = ForbiddenSet(ids=[1, 2, 99])
    with pytest.raises(ValueError, match=r"forbidden_ids_path.*outside the model's vocabulary"):
        fs.check_vocab(50, "forbidden_ids_path")


def test_save_and_load_round_trip(tmp_path):
    fs = build_forbidden_set([[1, 2, 3, 3, 4, 4, 4]], vocab_size=10, method="frequency", vs_freq_rate=1.0)
    path = fs.save(str(tmp_path))
    data = json.loads(open(path).read())
    assert data["format"] == "etu-hf/forbidden-set" and data["version"] == 1
    assert set(data) >= {"ids", "tokens", "forget_counts", "scores", "method", "parameters", "vocab_size"}
    back = ForbiddenSet.load(str(tmp_path))
    assert back.ids == fs.ids and back.forget_counts == fs.forget_counts and back.method == "frequency"
    (tmp_path / "flat.json").write_text("[7, 3, 5]")
    flat = ForbiddenSet.load(str(tmp_path / "flat.json"))
    assert flat.ids == [3, 5, 7]


def test_span_masking_grows_vs_on_three_piece_word(tokenizer, corpora):
    """A forget word split into 3 pieces: without span masking only its leading piece is in V_S."""
    from etu_hf.data.blocks import tokenize_and_block

    pieces = tokenizer.tokenize(" Korvandeltor")
    assert len(pieces) == 3, pieces  # ['ĠKor', 'vandel', 'tor']
    ids = tokenizer.convert_tokens_to_ids(pieces)
    assert tokenizer.tokenize(" Kor") == pieces[:1]
    # 'ĠKor' occurs 90 times, the continuation pieces 30 times: pmi_min_count=40 keeps only the former.
    forget = tokenize_and_block([" Kor Korvandeltor Kor"] * 30, tokenizer, 32)
    retain = corpora["retain"]
    common = dict(vocab_size=len(tokenizer), tokenizer=tokenizer, method="pmi", pmi_min_count=40)
    plain = build_forbidden_set(iter_batches(forget, None, 16), iter_batches(retain, None, 64), **common)
    assert plain.ids == [ids[0]]
    spans = build_forbidden_set(
        iter_batches(forget, None, 16), iter_batches(retain, None, 64), span_masking=True, span_ngram_max=3, **common
    )
    assert spans.ids == sorted(ids)
    assert sorted(spans.span_added) == sorted(ids[1:])
    too_short = build_forbidden_set(
        iter_batches(forget, None, 16), iter_batches(retain, None, 64), span_masking=True, span_ngram_max=2, **common
    )
    assert too_short.ids == plain.ids  # a 3-piece word is longer than span_ngram_max=2


def test_selection_helpers_are_deterministic_on_ties():
    counts = np.array([0, 5, 5, 5, 1])
    allowed = np.ones(5, dtype=bool)
    assert frequency_selection(counts, allowed, 1.0, 100, 2).tolist() == [1, 2]
    scores = np.array([0.0, 1.0, 1.0, 2.0, -1.0])
    assert pmi_selection(scores, counts, allowed, 1, 2).tolist() == [1, 3]
