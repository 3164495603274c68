"""Corpus specs, loading, token blocks and forget/retain pairing."""

import json

import numpy as np
import pytest
import torch

from etu_hf.data.blocks import ensure_pad_token, iter_batches, pad_token_id, scored_positions, tokenize_and_block
from etu_hf.data.corpus import load_corpus, parse_corpus_specs, split_documents
from etu_hf.data.pairing import CORPUS_ID_COLUMN, ForgetRetainCollator, ForgetRetainDataset, split_forget_retain


def test_scored_positions_excludes_padding_on_either_side_and_ignored_labels():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    am = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    labels = ids.masked_fill(am == 0, -100)
    labels[0, 1] = -100
    mask, targets = scored_positions(ids, am, labels)
    assert mask.tolist() == [[False, True, False, False], [False, False, True, True]]
    assert targets[0, 1] == 7 and targets[1, 2] == 6
    # without labels: input_ids are the targets, attention still excludes padding
    mask2, _ = scored_positions(ids, am)
    assert mask2.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_hub_specs_are_parsed_not_mangled():
    specs = parse_corpus_specs("cais/wmdp-corpora:cyber-forget-corpus, org/data:cfg:validation,plain_repo")
    assert [(s.kind, s.repo, s.config, s.split) for s in specs] == [
        ("hub", "cais/wmdp-corpora", "cyber-forget-corpus", "train"),
        ("hub", "org/data", "cfg", "validation"),
        ("hub", "plain_repo", None, "train"),
    ]
    alias = parse_corpus_specs("wikitext")[0]
    assert (alias.repo, alias.config) == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert parse_corpus_specs("") == [] and parse_corpus_specs(None) == []


def test_hub_spec_calls_load_dataset_with_repo_config_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ["a document", "", "another one"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = load_corpus(parse_corpus_specs("cais/wmdp-corpora:cyber-forget-corpus")[0])
    assert calls == [("cais/wmdp-corpora", "cyber-forget-corpus", "train")]
    assert docs == ["a document", "another one"]


def test_hub_failure_names_the_flag(monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(ValueError, match="--retain_corpora: could not load hub dataset"):
        load_corpus(parse_corpus_specs("org/x:y")[0], flag="--retain_corpora")


def test_missing_local_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--forget_corpora: corpus .*does not exist"):
        parse_corpus_specs(str(tmp_path / "nope.txt"), "--forget_corpora")
    with pytest.raises(FileNotFoundError, match="--retain_corpora"):
        parse_corpus_specs("./missing_folder/data.jsonl", "--retain_corpora")


def test_local_files_keep_documents_whole(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line of doc one\nsecond line of doc one\n\ndoc two is here\n\n\ndoc three\n")
    docs = load_corpus(parse_corpus_specs(str(txt))[0])
    assert len(docs) == 3
    assert "first line of doc one" in docs[0] and "second line of doc one" in docs[0]  # not one-word fragments
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x y", "z w"])) + "\n")
    assert load_corpus(parse_corpus_specs(str(jl))[0]) == ["x y", "z w"]
    import datasets

    datasets.Dataset.from_dict({"body": ["p q"]}).to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(ValueError, match=r"no column 'text'.*--text_column"):
        load_corpus(parse_corpus_specs(str(tmp_path / "c.parquet"))[0])
    assert load_corpus(parse_corpus_specs(str(tmp_path / "c.parquet"))[0], text_column="body") == ["p q"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "1.txt").write_text("alpha\n\nbeta\n")
    (folder / "2.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n")
    assert sorted(load_corpus(parse_corpus_specs(str(folder))[0])) == ["alpha", "beta", "gamma"]


def test_blocks_split_long_documents_and_drop_nothing(tokenizer):
    long_doc = " ".join(["vexium korathine distill"] * 200)
    docs = [long_doc, "short one", "another short document"]
    ds = tokenize_and_block(docs, tokenizer, block_size=32)
    n_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)  # + EOS each
    am = torch.tensor(ds["attention_mask"])
    assert int(am.sum()) == n_tokens
    assert all(len(r) == 32 for r in ds["input_ids"])
    labels = torch.tensor(ds["labels"])
    assert torch.equal(labels == -100, am == 0)
    assert len(ds) == -(-n_tokens // 32)


def test_split_documents_is_by_document_and_seeded():
    docs = [f"doc {i}" for i in range(20)]
    train, held = split_documents(docs, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert split_documents(docs, 0.25, seed=3) == (train, held)
    # the documented rule: the first round(f * n) of numpy's seeded permutation, kept in corpus order
    for n, fraction, seed in [(20, 0.25, 3), (450, 0.1, 42), (7, 0.9, 1), (100, 0.001, 5)]:
        docs = [f"doc {i}" for i in range(n)]
        n_held = min(n - 1, max(1, round(fraction * n)))
        order = np.random.default_rng(seed).permutation(n)
        expected = [docs[i] for i in sorted(order[:n_held])]
        train, held = split_documents(docs, fraction, seed)
        assert held == expected and train == [d for d in docs if d not in set(expected)]
    with pytest.raises(ValueError, match=r"heldout_fraction must be in \(0, 1\)"):
        split_documents(docs, 1.0, seed=0)
    with pytest.raises(ValueError, match="at least two documents"):
        split_documents(["only one"], 0.5, seed=0)


def test_pad_token_id_falls_back_to_eos_then_zero():
    from types import SimpleNamespace

    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # 0 is a pad id, not "missing"
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    tok = SimpleNamespace(pad_token=None, eos_token="</s>")
    assert ensure_pad_token(tok).pad_token == "</s>"


def test_pairing_respects_corpus_ids_and_is_deterministic():
    import datasets

    forget = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(10)], CORPUS_ID_COLUMN: [0] * 5 + [1] * 5})
    retain = datasets.Dataset.from_dict(
        {"input_ids": [[100 + i] for i in range(6)], CORPUS_ID_COLUMN: [0, 0, 0, 1, 1, 1]}
    )
    paired = ForgetRetainDataset(forget, retain, seed=0)
    for i in range(10):
        item = paired[i]
        assert item["retain_corpus_id"] == item[CORPUS_ID_COLUMN]
    assert [paired[i]["retain_input_ids"] for i in range(10)] == [
        ForgetRetainDataset(forget, retain, 0)[i]["retain_input_ids"] for i in range(10)
    ]
    with pytest.raises(ValueError, match="no retain corpus"):
        ForgetRetainDataset(forget, retain.filter(lambda r: r[CORPUS_ID_COLUMN] == 0), seed=0)


def test_collator_collates_each_half():
    from transformers import default_data_collator

    feats = [{"input_ids": [1, 2], "labels": [1, 2], "retain_input_ids": [3, 4, 5], "retain_labels": [3, 4, 5]}] * 2
    batch = ForgetRetainCollator(default_data_collator)(feats)
    forget, retain = split_forget_retain(batch)
    assert forget["input_ids"].shape == (2, 2) and retain["input_ids"].shape == (2, 3)
    plain = ForgetRetainCollator(default_data_collator)([{"input_ids": [1, 2]}])
    assert split_forget_retain(plain)[1] is None


def test_iter_batches_reads_a_dataset_in_bulk_with_the_same_batches_as_row_by_row():
    """A datasets.Dataset is read a batch at a time (numpy rows for the default collator); the batches equal
    those of row-by-row reading of the same rows (a plain list of dicts), for the default and a user's
    collator, over all rows and over chosen indices, with extra columns dropped."""
    import datasets

    rng = np.random.default_rng(0)
    rows = [
        {"input_ids": rng.integers(0, 50, 6).tolist(), "attention_mask": [1] * 6, "note": f"row {i}"} for i in range(11)
    ]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    ds = datasets.Dataset.from_list(rows)

    def collate(features):  # a user's collator that needs lists, as a padding collator gets them
        assert all(isinstance(f["input_ids"], list) for f in features)
        return {k: torch.tensor([f[k] for f in features]) for k in features[0]}

    for collator in (None, collate):
        for indices in (None, [7, 2, 9, 0]):
            bulk = list(iter_batches(ds, collator, 4, indices))
            naive = list(iter_batches(rows, collator, 4, indices))
            assert len(bulk) == len(naive) == (3 if indices is None else 1)
            for a, b in zip(bulk, naive, strict=True):
                assert set(a) == set(b) == {"input_ids", "attention_mask", "labels"}
                assert all(torch.equal(a[k], b[k]) for k in a)
