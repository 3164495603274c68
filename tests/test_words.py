"""Forbidden words (etu_hf/data/words.py) and their pieces per position (etu_hf/data/word_trie.py)."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from etu_hf.data.word_trie import PieceTrie, pad_rows, surface_forms, word_pieces
from etu_hf.data.words import (
    count_words,
    forbidden_words_from_corpora,
    g2_statistic,
    merge_words,
    read_forbidden_words,
    select_words,
    whitespace_words,
    word_splitter,
)
from etu_hf.ops.tilt import forbidden_mass

# A hand-counted pair of corpora (whitespace words; punctuation is stripped, "2024" is a word without a letter):
#   forget: Zorbanix 8, the 6, magic 5, 2024 1  (N_f = 20)
#   retain: the 6, magic 1, cooking 12, 2024 1  (N_r = 20)
FORGET = ["Zorbanix, " * 8 + "the " * 6, "magic! " * 5 + "(2024)"]
RETAIN = ["the " * 6 + "magic " + "cooking; " * 12 + "2024."]


def g2_by_hand(o11, o12, o21, o22):
    """2 sum O ln(O/E) with E = row total x column total / N, written out cell by cell."""
    n = o11 + o12 + o21 + o22
    r1, r2, c1, c2 = o11 + o12, o21 + o22, o11 + o21, o12 + o22
    cells = [(o11, r1 * c1 / n), (o12, r1 * c2 / n), (o21, r2 * c1 / n), (o22, r2 * c2 / n)]
    return 2 * sum(o * math.log(o / e) for o, e in cells if o > 0)


def test_counts_and_g2_on_hand_counted_corpora():
    fc, rc = count_words(FORGET, whitespace_words), count_words(RETAIN, whitespace_words)
    assert fc == Counter({"Zorbanix": 8, "the": 6, "magic": 5, "2024": 1})
    assert rc == Counter({"cooking": 12, "the": 6, "magic": 1, "2024": 1})
    # Zorbanix: O = [[8, 12], [0, 20]], E = [[4, 16], [4, 16]]
    zorb = 2 * (8 * math.log(8 / 4) + 12 * math.log(12 / 16) + 20 * math.log(20 / 16))
    assert zorb == pytest.approx(13.1117, abs=1e-4) and g2_by_hand(8, 12, 0, 20) == pytest.approx(zorb)
    got = g2_statistic(np.array([8, 5, 6, 0]), 20, np.array([0, 1, 6, 12]), 20)
    want = [zorb, g2_by_hand(5, 15, 1, 19), 0.0, g2_by_hand(0, 20, 12, 8)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got[1] == pytest.approx(3.3827, abs=1e-4)  # magic: 5 vs 1 is not significant at this size

    chosen = select_words(fc, rc)
    assert [w.word for w in chosen] == ["Zorbanix"]  # not "the" (same rate), "magic" (G2 3.4), "cooking" (retain)
    z = chosen[0]
    assert (z.forget_count, z.retain_count, z.source) == (8, 0, "scored")
    assert z.g2 == pytest.approx(zorb)
    # smoothed log ratio, a = 1 over the W = 5 word types: ln(9 / 25) - ln(1 / 25)
    assert z.log_ratio == pytest.approx(math.log(9))
    assert [w.word for w in select_words(fc, rc, min_g2=3.0)] == ["Zorbanix", "magic"]  # sorted by G2


def test_the_threshold_scales_with_corpus_size_and_the_ratio_floor_binds():
    # the same rates (8 vs 0 in 20 words) in corpora 10 times larger: G2 10 times larger
    small = g2_statistic(np.array([8]), 20, np.array([0]), 20)[0]
    large = g2_statistic(np.array([80]), 200, np.array([0]), 200)[0]
    assert large == pytest.approx(10 * small)
    # twice as frequent in a large corpus: significant, but a ratio of ln 2 < 1 nat
    fc, rc = Counter({"alpha": 300, "x": 700}), Counter({"alpha": 150, "x": 850})
    assert g2_statistic(np.array([300]), 1000, np.array([150]), 1000)[0] > 50
    assert select_words(fc, rc) == []
    assert [w.word for w in select_words(fc, rc, min_log_ratio=0.5)] == ["alpha"]
    # words without a letter are never candidates, whatever their counts
    assert select_words(Counter({"42": 50, "--": 50, "x": 5}), Counter({"x": 100}), min_g2=0.0) == []


def test_splitting_with_the_pre_tokenizer_and_merging_user_words(tokenizer):
    split = word_splitter(tokenizer)
    assert split("Hello, Harry Potter! It's 2024") == ["Hello", ",", "Harry", "Potter", "!", "It", "'s", "2024"]
    assert word_splitter(None) is whitespace_words
    words = forbidden_words_from_corpora(FORGET, RETAIN, tokenizer, user_words=["magic", "Zorbanix", "wand"])
    assert [(w.word, w.source) for w in words] == [("Zorbanix", "scored"), ("magic", "user"), ("wand", "user")]
    assert (words[1].forget_count, words[1].retain_count) == (5, 1) and words[2].forget_count == 0
    fc, rc = count_words(FORGET, split), count_words(RETAIN, split)
    assert merge_words(select_words(fc, rc), [], fc, rc) == words[:1]
    with pytest.raises(
        ValueError, match=r"no forbidden word: .* lower --word_min_g2 \(now 20\.0\) or --word_min_log_ratio"
    ):
        forbidden_words_from_corpora(FORGET, RETAIN, tokenizer, min_g2=20.0)


@pytest.fixture(scope="module")
def unk_tokenizer():
    """A tiny BPE trained here, with an unknown token and a whitespace pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["the cat sat on the mat", "a bat and a rat"], trainers.BpeTrainer(special_tokens=["[UNK]"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_user_word_file_and_its_bad_input(tmp_path, unk_tokenizer):
    good = tmp_path / "words.txt"
    good.write_text("cat\n\n  rat \ncat\n", encoding="utf-8")
    assert read_forbidden_words(good, unk_tokenizer) == ["cat", "rat"]
    cases = {
        "empty.txt": ("\n  \n", "the file holds no word; write one word per line"),
        "unknown.txt": ("cat\nzebra\n", r"the tokenizer cannot encode 1 word\(s\), e.g. \['zebra'\]"),
        "phrase.txt": ("cat\nbig rat\n", "one word per line, but 'big rat' holds a space"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=f"^--forbidden_words .*{name}'?: {message}"):
            read_forbidden_words(path, unk_tokenizer)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_forbidden_words(tmp_path / "latin1.txt", unk_tokenizer)
    with pytest.raises(FileNotFoundError, match=r"--forbidden_words .*no such file"):
        read_forbidden_words(tmp_path / "missing.txt", unk_tokenizer)


# ------------------------------------------------------------------------------------------ the trie
def test_trie_rule_on_integer_sequences():
    """Sequences (5, 6, 7), (5, 8), (9,): walk, starts, shared first pieces and the extras, counted by hand."""
    trie = PieceTrie([(5, 6, 7), (5, 8), (9,), (5, 6, 7)])
    assert trie.first_pieces.tolist() == [5, 9] and trie.depth == 3
    rows = np.array([[5, 6, 7, 5, 5, 9], [6, 7, 5, 8, 5, 6]])
    assert trie.sequence_starts(rows).tolist() == [
        [True, False, False, False, False, True],
        [False, False, True, False, False, False],  # the last "5 6" is cut before its 7: not a whole sequence
    ]
    # 5 occurs 5 times (in this retain text), starting a whole sequence twice: share 0.4
    assert trie.shared_first_pieces(rows).tolist() == [9]
    assert trie.shared_first_pieces(rows, min_share=0.4).tolist() == [5, 9]
    assert trie.shared_first_pieces(rows, allowed=np.array([True, False]), min_share=0.0).tolist() == [5]
    extras = trie.extra_ids(rows)
    got = [[sorted(e for e in pos if e >= 0) for pos in row] for row in extras.tolist()]
    assert got == [
        [[6, 8], [7], [], [6, 8], [6, 8], []],
        [[], [], [6, 8], [], [6, 8], [7]],  # row 1 begins with 6 7: no context from row 0
    ]
    assert extras.shape == (2, 6, 2)
    assert trie.extra_ids(rows, shared=[8])[0, :2].tolist() == [[6], [7]]  # shared ids are not repeated as extras
    assert trie.extra_ids(np.array([1, 2, 3])).shape == (3, 0)
    assert pad_rows([[1, 2], [3]]).tolist() == [[1, 2], [3, -1]]


def test_a_name_in_three_pieces_forbids_its_generic_pieces_only_inside_it(tokenizer):
    """Demo tokenizer: " Potter" is ĠP + ot + ter; "ot" and "ter" are generic (better, otter), "ĠP" starts Peter and
    Paris. A one- or two-letter first piece is never shared, even unused by the retain text (" Zorbanix" starts with
    ĠZ): it is forbidden only through the trie, its second piece after it."""
    pieces = tokenizer.convert_ids_to_tokens
    assert pieces(tokenizer.encode(" Potter", add_special_tokens=False)) == ["ĠP", "ot", "ter"]
    assert surface_forms("potter", tokenizer) == [
        tuple(tokenizer.encode(v, add_special_tokens=False)) for v in ("potter", " potter", "Potter", " Potter")
    ]
    assert len(surface_forms("Potter", tokenizer)) == 2  # capitalising changes nothing: duplicates dropped
    retain = ["Peter went to Paris with a better otter.", "Paris, said Peter. Pots and pans.", "Zorbanix"]
    retain_ids = [tokenizer.encode(t, add_special_tokens=False) for t in retain]
    wp = word_pieces(["Potter", "Zorbanix"], tokenizer, retain_ids, len(tokenizer))
    shared = set(pieces(wp.shared.tolist()))
    assert shared == set() and {"ĠZ", "Z", "ĠP", "P"} <= set(pieces(wp.dropped_first_pieces.tolist()))

    text = "Peter Potter met a better otter in Paris. Pottery and Zorbanix"
    ids = tokenizer.encode(text, add_special_tokens=False)
    extras = wp.extra_ids(ids)
    rows = [(pieces(i), set(pieces([e for e in row.tolist() if e >= 0]))) for i, row in zip(ids, extras, strict=True)]
    # an independent reference: for every position and every surface form, compare the last k tokens by hand
    forms = [f for fs in wp.forms.values() for f in fs]
    for t in range(len(ids)):
        want = {f[k] for f in forms for k in range(1, len(f)) if t + 1 >= k and tuple(ids[t + 1 - k : t + 1]) == f[:k]}
        assert set(tokenizer.convert_tokens_to_ids(sorted(rows[t][1]))) == want - set(wp.shared.tolist()), t
    for i, (tok, extra) in enumerate(rows):
        if tok in ("ĠP", "P"):
            assert extra == {"ot"}  # after any ĠP (also Peter's, Paris'): "ot" would continue Potter
        elif tok == "ot" and rows[i - 1][0] == "ĠP":
            assert extra == {"ter"}  # inside Potter (and Pottery)
        elif tok not in ("ĠZ", "or", "b", "an"):
            assert not extra, (i, tok, extra)
    # "ter" comes next four times: forbidden where it completes Potter/Pottery, allowed in "better" and "otter"
    before_ter = [
        (rows[t - 1][0] + rows[t][0], "ter" in rows[t][1]) for t in range(1, len(ids) - 1) if rows[t + 1][0] == "ter"
    ]
    assert before_ter == [("ĠPot", True), ("Ġbet", False), ("Ġot", False), ("ĠPot", True)]

    # the extras are the representation of ops/row_sets: S(x) = shared u extras gives the mass of the explicit sets
    zb = torch.randn(len(ids), len(tokenizer), generator=torch.Generator().manual_seed(0))
    mass = forbidden_mass(zb, torch.from_numpy(wp.shared), torch.from_numpy(extras))
    for t, (_, extra) in enumerate(rows):
        cols = sorted(set(wp.shared.tolist()) | set(tokenizer.convert_tokens_to_ids(sorted(extra))))
        assert float(mass[t]) == pytest.approx(float(torch.softmax(zb[t].double(), -1)[cols].sum()), rel=1e-5)


def test_word_pieces_refuses_empty_and_out_of_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="no forbidden word"):
        word_pieces([], tokenizer, [], len(tokenizer))
    with pytest.raises(ValueError, match="outside the vocabulary 100"):
        word_pieces(["Potter"], tokenizer, [], 100)
