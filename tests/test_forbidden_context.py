"""Per-context forbidden sets wired through the trainer, the probe, the audit and V_S.ids.json (issue 20).

Every S(x) here is recomputed by hand (a Python loop over positions and word forms), independently of the trie and
of ForbiddenSet.extra_ids; the masses and the loss are then recomputed from full float64 logits.
"""

import json

import pytest
import torch
from helpers import fast_args
from test_bad_input import no_model_load, refused  # noqa: F401 (a fixture)

from etu_hf import ETUTrainer, ForbiddenSet, audit
from etu_hf.data.blocks import iter_batches, scored_positions
from etu_hf.forbidden_context import (
    build_word_forbidden_set,
    common_token_ids,
    continuation_skip_ids,
    forbidden_coverage,
    word_boundary_ids,
)


def joins_previous(tokenizer, prev, piece):
    """The piece continues the previous piece's word: the text at their seam is a letter or digit on both sides
    (read from decoding the pair itself)."""
    head = tokenizer.decode([prev])
    both = tokenizer.decode([prev, piece])
    tail = both[len(head) :] if both.startswith(head) else both
    return bool(head) and head[-1].isalnum() and bool(tail) and tail[0].isalnum()


def hand_sets(fs, input_ids, labels, tokenizer=None):
    """S(x) per (row, position) by brute force: shared ids, the next piece of any form whose first k pieces end at
    t, and the text's next token when continuations are on, it is not skipped and it is not a common token making a
    word alone (without per word: not a common token at all; per word: only the first such piece of each word,
    words split where a piece does not join the previous one)."""
    forms = [tuple(f) for w in fs.words or [] for f in w["forms"]]
    skip = set(fs.continuations["skip_ids"]) if fs.continuations else None
    common = set(fs.continuations.get("common_ids") or []) if fs.continuations else set()
    per_word = bool(fs.continuations and fs.continuations.get("per_word"))
    out = {}
    for b in range(input_ids.shape[0]):
        ids = input_ids[b].tolist()
        capped = False  # a piece of the current word is already forbidden
        for t in range(len(ids) - 1):
            s = set(fs.ids)
            for f in forms:
                for k in range(1, len(f)):
                    if t + 1 >= k and tuple(ids[t + 1 - k : t + 1]) == f[:k]:
                        s.add(f[k])
            y = int(labels[b, t + 1])
            starts = not joins_previous(tokenizer, ids[t], ids[t + 1])  # the context's last token is known at t = 0
            ends = t + 2 >= len(ids) or not joins_previous(tokenizer, ids[t + 1], ids[t + 2])
            if per_word and (t == 0 or starts):
                capped = False  # nothing of the word was a target before t = 0
            everyday = y in common and (not per_word or (starts and ends))
            if skip is not None and y != -100 and y not in skip and not everyday and not (per_word and capped):
                s.add(y)
                capped = True
            out[b, t] = s
    return out


@pytest.fixture(scope="module")
def word_set(corpora, tokenizer):
    fs = build_word_forbidden_set(
        iter_batches(corpora["forget"], None, 64),
        iter_batches(corpora["retain"], None, 64),
        vocab_size=len(tokenizer),
        tokenizer=tokenizer,
    )
    return fs


def test_words_of_the_demo_topic_and_their_file(word_set, tokenizer, tmp_path):
    words = [w["word"] for w in word_set.words]
    assert "vexium" in [w.lower() for w in words]  # the demo's forget topic
    assert not {"the", "and", "of", "a", "in"} & set(words)  # function words are not forbidden
    for w in word_set.words:
        assert w["forms"] and all(
            tokenizer.convert_ids_to_tokens(f) == p for f, p in zip(w["forms"], w["pieces"], strict=True)
        )
    path = word_set.save(str(tmp_path))
    data = json.loads(open(path).read())
    assert data["version"] == 2 and data["method"] == "words" and data["words"][0]["pieces"]
    back = ForbiddenSet.load(path)
    ids = torch.tensor([tokenizer.encode("precipitate, then vexium", add_special_tokens=False)])
    extra = word_set.extra_ids(ids)
    assert extra is not None and torch.equal(back.extra_ids(ids), extra)


def test_per_word_continuations_forbid_the_first_informative_piece_of_each_word(tokenizer):
    text = "the vexium sequels in 1990s, interpreted"  # demo tokenizer: 'Ġs e qu el s' is one word
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    joining, closed = word_boundary_ids(tokenizer, len(tokenizer))
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    skip = [i for i, p in enumerate(vocab) if not any(c.isalpha() for c in p.strip("Ġ"))]
    common = [i for i, p in enumerate(vocab) if p in ("Ġs", "Ġin")]
    x = torch.tensor([ids])

    def forbidden(fs):
        extra = fs.extra_ids(x, x[:, 1:], torch.ones(1, len(ids) - 1, dtype=torch.bool))[0, :, 0].tolist()
        return [pieces[t + 1] for t, e in enumerate(extra) if e >= 0]

    fs = ForbiddenSet(ids=[], vocab_size=len(tokenizer), method="words")
    got = forbidden(fs.with_continuations(skip, 0, (joining, closed), common))
    # targets: 'e' ends the word 'the' (its first target piece); 'Ġs' is common but starts the word 'Ġs e qu el s',
    # and a word of several pieces is never an everyday word, so 'sequels' is capped at 'Ġs'; 'Ġ19', '9', '0' have
    # no letter, so '1990s' is capped at 's'; 'Ġin' alone is a common word, but 'Ġin ter pre ted' is capped at 'Ġin'
    assert pieces[1:14] == ["e", "Ġvexium", "Ġs", "e", "qu", "el", "s", "Ġin", "Ġ19", "9", "0", "s", ","]
    assert pieces[14:16] == ["Ġin", "ter"]
    assert got == ["e", "Ġvexium", "Ġs", "s", "Ġin"]
    # a common 'e' is still forbidden at the first target: it continues 'th', the context's last token
    with_e = ForbiddenSet(ids=[], vocab_size=len(tokenizer), method="words")
    assert forbidden(with_e.with_continuations(skip, 0, (joining, closed), [*common, ids[1]])) == got
    # common tokens as plain skips (the rule of sets written before common_ids): the word goes on to its spelling
    old = ForbiddenSet(ids=[], vocab_size=len(tokenizer), method="words")
    assert forbidden(old.with_continuations(sorted(skip + common), 0, (joining, closed))) == [
        "e",
        "Ġvexium",
        "e",
        "s",
        "ter",
    ]
    every = ForbiddenSet(ids=[], vocab_size=len(tokenizer), method="words")
    got_all = forbidden(every.with_continuations(skip, 0, None, common))
    assert "Ġs" not in got_all and "Ġin" not in got_all  # without per_word a common token is never forbidden
    assert len(got_all) > len(got)  # and every informative piece is


def test_extra_ids_equal_the_hand_computed_sets(word_set, corpora, tokenizer):
    fs = ForbiddenSet(**{k: getattr(word_set, k) for k in ("ids", "vocab_size", "method", "words")})
    skip = continuation_skip_ids(tokenizer, len(tokenizer))
    common = common_token_ids(iter_batches(corpora["retain"], None, 64), len(tokenizer), 100)
    boundaries = word_boundary_ids(tokenizer, len(tokenizer))
    corpus = next(iter_batches(corpora["forget"].select(range(3)), None, 3))
    corpus["labels"] = corpus["labels"].clone()
    corpus["labels"][0, 3:9] = -100
    # the demo corpus's words are mostly one piece: a text whose common pieces also start longer words ('Ġs e qu el
    # s', 'Ġin ter pre ted'), with common pieces inside words ('e' of 'th e', the first target; 'el'), and labels
    # masked inside a word (row 1: 'qu', which must not split 'sequels'; row 2: 'Ġs')
    text = "the vexium sequels in 1990s, interpreted in the sun"
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)] * 3)
    assert tokenizer.convert_ids_to_tokens(ids[0, :7].tolist()) == ["th", "e", "Ġvexium", "Ġs", "e", "qu", "el"]
    hand = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    hand["labels"][1, 5] = hand["labels"][2, 3] = -100
    common = sorted(set(common) | set(tokenizer.convert_tokens_to_ids(["e", "el"])))
    for cont in (False, "every piece", "per word"):
        if cont:
            fs.with_continuations(skip, 100, boundaries if cont == "per word" else None, common)
        for batch in (corpus, hand):
            mask, targets = scored_positions(batch["input_ids"], batch["attention_mask"], batch["labels"])
            extra = fs.extra_ids(batch["input_ids"], targets, mask)
            want = hand_sets(fs, batch["input_ids"], batch["labels"], tokenizer)
            for (b, t), s in want.items():
                if not mask[b, t]:
                    continue
                got = set(fs.ids) | {int(e) for e in extra[b, t] if e >= 0}
                assert got == s, (cont, b, t)
    # per word, the hand text has common tokens both ways: alone in their word (not forbidden) and starting a longer
    # word (forbidden), so the comparison above covered the word rule
    is_common = torch.isin(targets, torch.tensor(common)) & mask
    added = (extra == targets.unsqueeze(-1)).any(-1)
    assert (is_common & added).any() and (is_common & ~added).any()
    # continuations skip the letterless pieces, and add coverage
    assert fs.continuations["skip_top_k"] == 100 and fs.continuations["common_ids"] == common
    assert tokenizer.convert_tokens_to_ids(".") in skip
    plain = ForbiddenSet(**{k: getattr(word_set, k) for k in ("ids", "vocab_size", "method", "words")})
    data = iter_batches(corpora["forget"].select(range(16)), None, 8)
    assert forbidden_coverage(fs, list(data)) > forbidden_coverage(plain, iter_batches(corpora["forget"], None, 8))


def naive_mass(model, fs, batch, tokenizer):
    """Mean pi(S(x)|x) over scored positions from full float64 softmax and the hand sets."""
    labels = batch.get("labels", batch["input_ids"])
    sets = hand_sets(fs, batch["input_ids"], labels, tokenizer)
    mask, _ = scored_positions(batch["input_ids"], batch.get("attention_mask"), labels)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=batch["input_ids"]).logits.double(), -1)
    vals = [float(p[b, t, sorted(s)].sum()) for (b, t), s in sets.items() if mask[b, t]]
    return sum(vals) / len(vals)


def naive_tilt_loss(trainer, fs, batch):
    """Mean over scored positions of KL(q_lam(x) || pi_theta) with the per-row closed form
    lam(x) = max(m, logit p_b(S(x)|x) - logit eps) (m = --lambda_floor, 0 by default) on the hand sets, from full
    float64 logits."""
    eps, floor = trainer.args.epsilon, trainer.args.lambda_floor
    sets = hand_sets(fs, batch["input_ids"], batch["labels"], trainer.processing_class)
    mask, _ = scored_positions(batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        zb = trainer.base.logits(batch).double()
    zs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    total, count = 0.0, 0
    for (b, t), s in sets.items():
        if not mask[b, t]:
            continue
        pb = torch.softmax(zb[b, t], -1)
        ind = torch.zeros_like(pb, dtype=torch.bool)
        ind[sorted(s)] = True
        p = pb[ind].sum()
        lam = max(floor, float(torch.logit(p) - torch.logit(torch.tensor(eps, dtype=torch.float64))))
        q = pb * torch.where(ind, torch.exp(torch.tensor(-lam, dtype=torch.float64)), 1.0)
        q = q / q.sum()
        cap = min(eps, float(torch.sigmoid(torch.logit(p) - floor)))  # the odds fall by e^m at least
        assert float(q[ind].sum()) == pytest.approx(cap, rel=1e-9)  # the I-projection's mass
        total = total + (q * (torch.log(q) - torch.log_softmax(zs[b, t], -1))).sum()
        count += 1
    return total / count


def test_trainer_loss_probe_and_audit_use_the_sets_per_position(model, tokenizer, corpora, tmp_path):
    from peft import LoraConfig

    args = fast_args(
        str(tmp_path / "out"),
        vs_method="words",
        forbid_continuations=True,
        continuation_skip_top_k=20,
        max_steps=12,
        logging_steps=4,
    )
    trainer = ETUTrainer(
        model=model,
        args=args,
        train_dataset=corpora["forget"],
        retain_dataset=corpora["retain"],
        heldout_dataset=corpora["forget_heldout"],
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    fs = trainer.forbidden_set
    assert fs.method == "words" and fs.per_context and 0 < fs.parameters["coverage"] <= 1
    trainer.train()
    batch = next(iter_batches(corpora["forget_heldout"].select(range(3)), None, 3))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        torch.testing.assert_close(loss.double(), naive_tilt_loss(trainer, fs, batch), atol=1e-5, rtol=1e-5)
    heldout = trainer.measure_heldout()
    full = next(iter_batches(corpora["forget_heldout"], None, len(corpora["forget_heldout"])))
    assert heldout.mean_mass == pytest.approx(naive_mass(trainer.model, fs, full, trainer.processing_class), rel=1e-4)
    report = audit(
        trainer.model,
        corpora["forget_heldout"],
        fs,
        tilt=args.epsilon,
        batch_size=8,
        bootstrap_samples=50,
        num_samples=0,
        progress=False,
    )
    assert report.updated_p_S == pytest.approx(heldout.mean_mass, rel=1e-4)
    assert report.updated_p_S < report.base_p_S


def test_empty_word_set_and_bad_flags_name_the_fix(corpora, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"lower --word_min_g2 \(now 1000000000.0\) or --word_min_log_ratio"):
        build_word_forbidden_set(
            iter_batches(corpora["forget"], None, 64),
            iter_batches(corpora["retain"], None, 64),
            vocab_size=len(tokenizer),
            tokenizer=tokenizer,
            min_g2=1e9,
        )
    with pytest.raises(ValueError, match=r"retain data .*--forbidden_words FILE.*--vs_method frequency"):
        build_word_forbidden_set(
            iter_batches(corpora["forget"], None, 64), None, vocab_size=len(tokenizer), tokenizer=tokenizer
        )
    words = tmp_path / "words.txt"
    words.write_text("vexium\n")
    with pytest.raises(ValueError, match="forbidden_words: needs --vs_method words"):
        fast_args(str(tmp_path / "o"), forbidden_words=str(words))
    with pytest.raises(ValueError, match="forbidden_words: no such file"):
        fast_args(str(tmp_path / "o"), vs_method="words", forbidden_words=str(tmp_path / "missing.txt"))
    # the user's words alone, without retain data: every allowed first piece is shared
    fs = build_word_forbidden_set(
        iter_batches(corpora["forget"], None, 64),
        None,
        vocab_size=len(tokenizer),
        tokenizer=tokenizer,
        user_words=["vexium"],
    )
    assert [w["word"] for w in fs.words] == ["vexium"] and fs.words[0]["source"] == "user"


def test_the_command_line_refuses_bad_word_files_before_the_weights(tmp_path, capsys, no_model_load):  # noqa: F811
    from helpers import cli_flags

    from etu_hf.demo.corpus import write_demo_corpora

    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    words = tmp_path / "words.txt"
    words.write_text("vexium\ntwo words\n")
    argv = ["unlearn", *cli_flags(tmp_path, forget, retain, "--vs_method", "words", "--forbidden_words", str(words))]
    line = refused(capsys, argv, "--forbidden_words")
    assert "'two words' holds a space; put each word on its own line" in line
    argv = ["unlearn", *cli_flags(tmp_path, forget, retain, "--vs_method", "pmi", "--forbidden_words", str(words))]
    assert "forbidden_words: needs --vs_method words" in refused(capsys, argv, "forbidden_words")
    argv = ["unlearn", *cli_flags(tmp_path, forget, retain, "--vs_method", "words", "--word_min_share", "2")]
    assert "word_min_share: must be in [0, 1]" in refused(capsys, argv, "word_min_share")
    assert not (tmp_path / "run").exists()


def test_the_model_card_lists_the_words_their_pieces_and_the_coverage(word_set):
    from etu_hf.hub.card_settings import forbidden_set_lines

    fs = ForbiddenSet(**{k: getattr(word_set, k) for k in ("ids", "vocab_size", "method", "words", "parameters")})
    fs.with_continuations([0, 1], 100)
    fs.parameters["coverage"] = 0.4321
    text = "\n".join(forbidden_set_lines(fs.to_dict()))
    first = word_set.words[0]
    assert f"{len(word_set.words)} forbidden words" in text
    assert f"`{first['word']}` ({' + '.join(first['pieces'][-1])})" in text
    assert "forbidden continuations" in text and "100 most frequent retain tokens" in text
    assert "at 43.2% of the forget positions" in text and "first such piece of each word" not in text
    assert "making a word alone" not in text
    fs.with_continuations([0, 1], 100, ([2, 3], [4]), [5, 6])
    per_word = "\n".join(forbidden_set_lines(fs.to_dict()))
    assert "only the first such piece of each word" in per_word
    assert "100 most frequent retain tokens making a word alone" in per_word
    fs.with_continuations([0, 1], 100, ([2, 3], [4]), [5, 6, 7], "tokenizer")  # no retain data
    assert "of the tokenizer's first 3 ids (no retain data) making a word alone" in "\n".join(
        forbidden_set_lines(fs.to_dict())
    )


def test_defaults_without_retain_data_or_processing_class(model, tokenizer, corpora, tmp_path):
    """A plain Trainer script with the names swapped: forget data only, the tokenizer given to the collator alone.
    S(x) is then the forget text's informative continuations (a warning says the words need retain data)."""
    from transformers import DataCollatorForLanguageModeling

    from etu_hf import ETUTrainingArguments

    args = ETUTrainingArguments(
        output_dir=str(tmp_path / "o"), max_steps=1, report_to="none", use_cpu=True, adaptive_lambda=False
    )
    assert args.vs_method == "words" and args.forbid_continuations is None
    with pytest.warns(UserWarning, match="no retain data: the forget text's words cannot be scored"):
        trainer = ETUTrainer(
            model=model,
            args=args,
            train_dataset=corpora["forget"],
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
    fs = trainer.forbidden_set
    assert fs.ids == [] and fs.continuations is not None and fs.parameters["coverage"] > 0.2
    assert fs.continuations["skip_top_k"] == 100  # the default, recorded
    # without retain data the common words are the tokenizer's first ids, and the set says so
    assert fs.continuations["common_source"] == "tokenizer"
    assert fs.continuations["common_ids"] == list(range(int(0.125 * len(tokenizer))))
    # a given V_S gets no continuations unless asked for
    given = ETUTrainer(
        model=model, args=args, train_dataset=corpora["forget"], processing_class=tokenizer, forbidden_set=[5, 6]
    )
    assert given.forbidden_set.ids == [5, 6] and given.forbidden_set.continuations is None
