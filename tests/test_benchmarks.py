"""The performance benchmarks run at tiny sizes and write what they say (no timing is checked)."""

import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_overhead_alternates_both_trainers_and_breaks_the_step_down(tmp_path):
    bench = load("step_overhead")
    out = tmp_path / "step.json"
    args = ["--config", "tiny", "--batch_size", "2", "--seq_len", "16", "--warmup", "1", "--timed", "2"]
    args += ["--profile_steps", "2", "--lambda_update_freq", "3", "--logging_steps", "2", "--output", str(out)]
    result = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert [r["retain"] for r in rows] == [False, True]
    steps = 1 + 2 + 2 * 2 + 1
    for row in rows:
        assert row["vocab_size"] == 256 and row["forbidden_set_size"] > 0
        for name in ("plain", "etu"):
            assert len(row[name]["step_seconds"]) == steps  # every optimiser step of both trainers was timed
        assert row["ratio_median"] == pytest.approx(row["etu"]["median_s"] / row["plain"]["median_s"])
        plain, etu = row["plain"]["breakdown"]["seconds_per_step"], row["etu"]["breakdown"]["seconds_per_step"]
        assert set(plain) == set(etu) == {*bench.REGIONS, "other", "total"}
        # the regions found their code: ETU has a base forward and a loss, the plain Trainer neither
        assert etu["base forward"] > 0 and etu["loss"] > 0 and etu["trained forward"] > 0 and etu["backward"] > 0
        assert plain["base forward"] == 0 and plain["loss"] == 0 and plain["trained forward"] > 0
        assert row["etu"]["calls"]["controller"]["calls"] == steps // 3  # the held-out probe every 3 steps
        assert "controller" not in row["plain"]["calls"]


def test_loss_memory_extrapolates_the_naive_run_when_it_is_too_big(capsys):
    bench = load("loss_memory")
    rows = bench.main(
        ["--positions", "512", "--vocab", "300", "--chunks", "64", "--hidden", "8", "--max_naive_gb", "1e-4"]
    )
    naive, chunked = rows
    assert naive["chunk_size"] == 0 and naive["extrapolated_from"] == 256 and naive["positions"] == 512
    assert chunked["chunk_size"] == 64 and chunked["positions"] == 512 and "extrapolated_from" not in chunked
    assert chunked["time_vs_naive"] == pytest.approx(chunked["seconds"] / naive["seconds"])
    assert "naive (from N=256)" in capsys.readouterr().out


def test_loss_memory_compares_losses_when_the_naive_run_fits():
    bench = load("loss_memory")
    rows = bench.main(["--positions", "200", "--vocab", "300", "--chunks", "64", "--hidden", "8"])
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-4)  # the script also checks it


def test_forbidden_set_counts_every_token_in_every_form():
    bench = load("forbidden_set")
    out = bench.main(
        ["--tokens", "6000", "--vocab", "500", "--block_size", "50", "--batch_size", "8", "--repeats", "1"]
    )
    rows = {(r["form"], r["method"]): r for r in out["rows"]}
    assert set(rows) == {(f, m) for f in ("batches", "arrays", "lists", "dataset") for m in ("frequency", "pmi")}
    assert rows["batches", "frequency"]["tokens"] == 6000 and rows["batches", "pmi"]["tokens"] == 12000
    assert rows["dataset", "frequency"]["tokens"] == 600  # a tenth of the blocks
    assert rows["batches", "pmi"]["goal_met"] in (True, False) and rows["lists", "pmi"]["goal_met"] is None
    blocks = bench.zipf_blocks(6000, 500, 50, 0)
    assert blocks.shape == (120, 50) and 0 <= blocks.min() and blocks.max() < 500
    counts = np.bincount(blocks.reshape(-1), minlength=500)
    assert counts.max() > 10 * np.median(counts[counts > 0])  # Zipf: a few ids are far more frequent


def test_pool_seeds_pools_one_seed_comparisons_and_refuses_mixed_budgets(tmp_path):
    pool_seeds = load("pool_seeds")
    base = {"forget_answer_prob": 0.5, "neighbour_answer_prob": 0.4, "utility_answer_prob": 0.5, "retain_ppl": 8.0}

    def compare(name, seed, forget, neighbour, steps=40, etu_args=""):
        ev = {**base, "forget_answer_prob": forget, "neighbour_answer_prob": neighbour}
        result = {
            "kind": "knowledge",
            "benchmark": {"name": "b", "targets": ["t"]},
            "models": {"base": "m"},
            "settings": {"seed": seed, "max_steps": steps, "etu_learning_rate": 1e-3, "etu_args": etu_args},
            "references": {"base": base},
            "runs": [{"method": "etu", "label": "eps=0.05", "eval": ev}],
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(result))
        return str(path)

    pooled = pool_seeds.pool(
        [compare("a", 0, 0.2, 0.4), compare("b", 1, 0.3, 0.36), compare("c", 0, 0.1, 0.4, etu_args="x=1")]
    )
    (g,) = pooled["over_seeds"]  # the etu_args run is another setting, with one seed
    assert g["setting"] == "eps=0.05 lr=0.001" and g["seeds"] == [0, 1]
    assert g["mean"]["forget_answer_prob"] == pytest.approx(0.25)
    row = pool_seeds.table(pooled).splitlines()[2]
    assert row.startswith(
        "| etu | eps=0.05 lr=0.001 | 0,1 | 0.50x [0.40, 0.60] | 0.95x [0.90, 1.00] | 1.00x [1.00, 1.00] |"
    )
    with pytest.raises(SystemExit, match="another benchmark, model, base or budget"):
        pool_seeds.pool([compare("a", 0, 0.2, 0.4), compare("d", 1, 0.2, 0.4, steps=80)])
    with pytest.raises(SystemExit, match="at seed 0 is in two files"):
        pool_seeds.pool([compare("a", 0, 0.2, 0.4), compare("e", 0, 0.2, 0.4)])


def test_context_suppression_finds_whole_words_and_their_sentences():
    bench = load("real_model/context_suppression")
    doc = "Intro text.\nThe band came from Liverpool. In Liverpool they played; the Liverpools left Liverpool"
    occ = bench.occurrences([doc], ["Liverpool"], context_chars=12)
    # the second occurrence has one word before it in its sentence, "Liverpools" is another word
    assert [(full, sentence, word) for full, sentence, word in occ] == [
        ("nd came from", "The band came from", "Liverpool"),
        ("erpools left", "In Liverpool they played; the Liverpools left", "Liverpool"),
    ]
