"""The audit: bounds against textbook values, estimators against direct computations, the report, the CLI."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from etu_hf.commands.cli import main
from etu_hf.data.blocks import iter_batches
from etu_hf.demo.corpus import write_demo_corpora
from etu_hf.evaluation.audit import AuditOptions, audit, audit_tilt
from etu_hf.evaluation.report import REPORT_FORMAT, AuditReport
from etu_hf.modeling.adapters import decoder_layers
from etu_hf.ops.bounds import bootstrap_ratio_interval, sequence_upper_bound, wilson_interval, wilson_upper
from etu_hf.ops.tilt import TiltSpec, forbidden_mass

Z = 1.959964


# ------------------------------------------------------------------------------------- bounds
def test_wilson_against_the_textbook_formula_and_known_value():
    p, n = 0.05, 100
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)
    assert wilson_upper(p, n) == pytest.approx(centre + half, abs=1e-12)
    lo, hi = wilson_interval(p, n)
    assert (round(lo, 4), round(hi, 4)) == (0.0215, 0.1118)  # the published 95% interval for 5/100


def test_wilson_limits():
    assert wilson_upper(0.3, 10**12) == pytest.approx(0.3, abs=1e-5)  # n -> infinity: the estimate itself
    assert wilson_upper(0.0, 50) == pytest.approx(Z**2 / (50 + Z**2))  # p = 0: z^2 / (n + z^2)
    assert wilson_upper(1.0, 50) == pytest.approx(1.0)
    assert wilson_interval(1.0, 50)[0] == pytest.approx(50 / (50 + Z**2))
    assert wilson_upper(0.2, 0) == 1.0  # no data, no bound


def _skewed_sequences(k=400, seed=0):
    """Sequences of very different lengths whose mass falls with length: the ratio sum(s)/sum(c), the
    mean of the per-sequence means and an unpaired resampling all give clearly different answers."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 200, size=k).astype(float)
    means = np.clip(rng.beta(4, 40, size=k) * 10 / np.sqrt(counts), 0, 1)
    return counts * means, counts


def test_bootstrap_agrees_with_scipy_and_the_normal_approximation():
    """Against independent computations: scipy's percentile bootstrap of the ratio statistic over paired
    (sum, count) sequences, and the linearised (delta-method) normal interval it tends to."""
    from scipy import stats

    sums, counts = _skewed_sequences()
    ratio = sums.sum() / counts.sum()
    lo, hi = bootstrap_ratio_interval(sums, counts, samples=20000, seed=7)
    ref = stats.bootstrap(
        (sums, counts),
        lambda s, c, axis: s.sum(axis) / c.sum(axis),
        paired=True,
        vectorized=True,
        n_resamples=20000,
        method="percentile",
        confidence_level=0.95,
        random_state=np.random.default_rng(123),
    ).confidence_interval
    half = (ref.high - ref.low) / 2
    # Monte Carlo error of each end is about 1% of the half-width at 20000 resamples
    assert lo == pytest.approx(ref.low, abs=0.06 * half)
    assert hi == pytest.approx(ref.high, abs=0.06 * half)
    # delta method: Var(R) ~ sum_j (s_j - R c_j)^2 / (sum_j c_j)^2, the interval R +- 1.96 sd
    sd = math.sqrt(((sums - ratio * counts) ** 2).sum()) / counts.sum()
    assert (hi - lo) / 2 == pytest.approx(Z * sd, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(ratio, abs=0.15 * half)
    # what a wrong implementation would give is outside these tolerances
    assert abs(np.mean(sums / counts) - ratio) > half  # the mean of per-sequence means
    unpaired = np.random.default_rng(1).integers(0, len(sums), size=(2000, 2, len(sums)))
    unpaired_sd = np.std(sums[unpaired[:, 0]].sum(1) / counts[unpaired[:, 1]].sum(1))
    assert unpaired_sd > 1.3 * sd  # resampling sums and counts independently
    assert 1.645 * sd < 0.9 * (hi - lo) / 2  # a 90% interval


def test_bootstrap_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_ratio_interval([], []))
    # every sequence with the same mean mass: no spread, the interval is that mass
    lo, hi = bootstrap_ratio_interval([0.5, 1.0, 2.5], [5, 10, 25], samples=200)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


# ------------------------------------------------------------------------------------- the target
def test_one_target_tilt_or_epsilon_never_two_that_disagree():
    spec = TiltSpec(epsilon=0.02, mode="global", global_lambda=3.0)
    assert audit_tilt(spec) is spec and audit_tilt(spec, epsilon=0.02) is spec
    assert audit_tilt(0.05) == TiltSpec(epsilon=0.05)  # a float is epsilon with the default tilt
    assert audit_tilt(None, epsilon=0.05) == TiltSpec(epsilon=0.05)  # epsilon= alone: the same
    assert audit_tilt(torch.tensor(0.05, dtype=torch.float64)) == TiltSpec(epsilon=0.05)
    with pytest.raises(ValueError, match="disagrees"):
        audit_tilt(spec, epsilon=0.05)
    with pytest.raises(ValueError, match="disagree"):
        audit_tilt(0.1, epsilon=0.05)
    with pytest.raises(ValueError, match="needs the target"):
        audit_tilt(None)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        audit_tilt(1.2)
    with pytest.raises(ValueError, match="per-position"):
        audit_tilt(torch.zeros(3))


def test_audit_options_from_keywords_and_from_an_object():
    import types

    opts = AuditOptions().updated(batch_size=3, chunk_size=0)
    assert (opts.batch_size, opts.chunk_size, opts.num_samples) == (3, 0, 3)
    with pytest.raises(TypeError, match="bach_size"):
        AuditOptions().updated(bach_size=3)
    args = types.SimpleNamespace(batch_size=5, seed=9, output_dir="x", disable_tqdm=True)
    opts = AuditOptions.from_object(args, progress=not args.disable_tqdm)
    assert (opts.batch_size, opts.seed, opts.progress, opts.wilson_max_n) == (5, 9, False, 2048)
    with pytest.raises(ValueError, match="max_sequences"):
        AuditOptions(max_sequences=-1)


# ------------------------------------------------------------------------------------- estimators
def test_report_numbers_against_direct_computation(trained, corpora, tmp_path):
    trainer, _ = trained
    held = corpora["forget_heldout"].select(range(10))
    report = trainer.audit(
        forget_data=held,
        retain_data=corpora["retain_heldout"].select(range(6)),
        output_dir=str(tmp_path),
        num_samples=2,
        bootstrap_samples=200,
    )
    S = torch.tensor(trainer.forbidden_set.ids)
    batch = next(iter_batches(held, None, 10))
    model = trainer.model
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        with model.disable_adapter():
            zb = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
    upd, base = forbidden_mass(z, S)[mask].double(), forbidden_mass(zb, S)[mask].double()
    assert report.forget_positions == int(mask.sum())
    assert report.updated_p_S == pytest.approx(float(upd.mean()), abs=1e-6)
    assert report.base_p_S == pytest.approx(float(base.mean()), abs=1e-6)
    assert report.share_above_epsilon_updated == pytest.approx(float((upd > 0.05).double().mean()))
    assert report.token_wilson_n == min(report.forget_positions, 2048)
    assert report.updated_p_S_token_wilson_upper == pytest.approx(
        wilson_upper(report.updated_p_S, report.token_wilson_n)
    )
    assert report.target_achieved == (report.updated_p_S <= 0.05)
    # the verdict's bound: recomputed here from the per-sequence masses (each row of the batch a sequence)
    seq_sums = (forbidden_mass(z, S).double() * mask).sum(1).numpy()
    seq_counts = mask.sum(1).numpy()
    independent = sequence_upper_bound(seq_sums, seq_counts, seed=trainer.args.seed)
    assert report.updated_p_S_upper == pytest.approx(independent.upper, rel=1e-6)
    assert report.upper_bound["sequences"] == 10 and report.updated_p_S_upper >= report.updated_p_S
    assert report.target_achieved_upper == (report.updated_p_S_upper <= 0.05)
    # perplexity = exp(mean NLL) on the retain text, base = adapters disabled
    rb = next(iter_batches(corpora["retain_heldout"].select(range(6)), None, 6))
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits[:, :-1]
    rmask = (rb["labels"][:, 1:] != -100) & rb["attention_mask"][:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[rmask], rb["labels"][:, 1:][rmask])
    assert report.base_perplexity == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    # delta >= 0 and the Pinsker bound holds in the measured numbers
    assert report.delta >= 0
    assert report.updated_p_S <= report.pinsker_bound_from_target + 1e-9


def test_padding_is_excluded(trained, corpora):
    trainer, _ = trained
    held = corpora["forget_heldout"].select(range(4))
    padded = held.map(
        lambda r: {
            "input_ids": r["input_ids"] + [1] * 9,
            "attention_mask": r["attention_mask"] + [0] * 9,
            "labels": r["labels"] + [-100] * 9,
        }
    )
    a = trainer.audit(forget_data=held, num_samples=0, bootstrap_samples=10)
    b = trainer.audit(forget_data=padded, num_samples=0, bootstrap_samples=10)
    assert a.forget_positions == b.forget_positions
    assert a.updated_p_S == pytest.approx(b.updated_p_S, abs=1e-6)
    assert a.delta == pytest.approx(b.delta, abs=1e-6)


def test_delta_is_zero_when_the_model_is_the_tilted_target(model, corpora, tokenizer):
    """Build pi_theta = q_lambda by hand: the base's head plus a bias of -lambda on the V_S columns."""
    from etu_hf import build_forbidden_set

    ids = build_forbidden_set(
        iter_batches(corpora["forget"], None, 64),
        iter_batches(corpora["retain"], None, 64),
        vocab_size=2048,
        tokenizer=tokenizer,
        pmi_min_count=5,
        pmi_top_k=64,
    ).ids
    lam = 2.5
    tilted = copy.deepcopy(model)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[ids] = -lam
    tilted.lm_head = head
    held = corpora["forget_heldout"].select(range(4))
    report = audit(
        tilted,
        held,
        ids,
        TiltSpec(epsilon=0.05, mode="global", global_lambda=lam),
        base=model,
        num_samples=0,
        bootstrap_samples=10,
        progress=False,
    )
    assert report.delta == pytest.approx(0.0, abs=1e-6)
    assert report.updated_p_S == pytest.approx(report.mean_target_mass, abs=1e-6)
    # Pinsker: target mass + sqrt(delta / 2). sqrt turns float32 noise in delta (~1e-8 on some CPUs) into ~1e-4,
    # so the bound is checked through its definition and against the worst case delta allowed above.
    assert report.pinsker_bound_from_target == pytest.approx(
        report.mean_target_mass + math.sqrt(max(report.delta, 0.0) / 2), abs=1e-9
    )
    assert abs(report.pinsker_bound_from_target - report.updated_p_S) <= math.sqrt(1e-6 / 2) + 1e-6
    # and delta > 0 for any other lambda
    off = audit(
        tilted,
        held,
        ids,
        epsilon=0.05,
        base=model,
        tilt=TiltSpec(epsilon=0.05, mode="global", global_lambda=lam + 1),
        num_samples=0,
        bootstrap_samples=10,
        progress=False,
    )
    assert report.mean_target_mass > 0.1  # V_S carries real mass here, so a wrong lambda shows
    assert off.delta > 1e-3


def test_report_files_schema_samples_and_activation_hooks(trained, corpora, tmp_path):
    trainer, _ = trained
    layers = decoder_layers(trainer.model)
    report = trainer.audit(
        forget_data=corpora["forget_heldout"].select(range(4)),
        retain_data=corpora["retain_heldout"].select(range(4)),
        output_dir=str(tmp_path),
        analyze_activations=True,
        num_samples=2,
        bootstrap_samples=50,
    )
    assert all(len(layer._forward_hooks) == 0 for layer in layers)  # hooks removed
    data = json.loads((tmp_path / "suppression_report.json").read_text())
    assert data["format"] == REPORT_FORMAT and data["version"] == 2
    for key in (
        "epsilon",
        "V_S_size",
        "V_S_fraction",
        "base_p_S",
        "updated_p_S",
        "base_p_S_upper",
        "updated_p_S_upper",
        "upper_bound",
        "base_p_S_token_wilson_upper",
        "updated_p_S_token_wilson_upper",
        "token_wilson_n",
        "clamped_share",
        "wilson_max_n",
        "base_p_S_bootstrap_95",
        "updated_p_S_bootstrap_95",
        "suppression_ratio",
        "delta",
        "pinsker_bound",
        "share_above_epsilon_base",
        "share_above_epsilon_updated",
        "base_perplexity",
        "updated_perplexity",
        "perplexity_ratio",
        "target_achieved",
        "target_achieved_upper",
        "forget_sequences",
        "forget_positions",
        "seconds",
        "definitions",
    ):
        assert key in data, key
    assert "bootstrap" in data["definitions"]["*_bootstrap_95"]
    assert (
        "TOKEN-LEVEL" in data["definitions"]["*_token_wilson_upper"] and "verdict" in data["definitions"]["*_p_S_upper"]
    )
    assert AuditReport.load(str(tmp_path)).updated_p_S == report.updated_p_S
    md = (tmp_path / "suppression_report.md").read_text()
    assert "illustration only" in md and "Wilson" in md
    assert len(report.samples) == 2 and {"prompt", "base", "updated"} <= set(report.samples[0])
    assert (tmp_path / "suppression_histogram.png").stat().st_size > 1000
    assert (tmp_path / "activation_stats.png").stat().st_size > 1000
    rows = report.activations["forget"]
    assert len(rows) == len(layers) and all(-1 <= r["cosine"] <= 1 for r in rows)
    # the same model against itself: cosine 1, identical norms
    same = audit(
        trainer.model.get_base_model(),
        corpora["forget_heldout"].select(range(2)),
        trainer.forbidden_set,
        epsilon=0.05,
        base=trainer.model.get_base_model(),
        analyze_activations=True,
        num_samples=0,
        bootstrap_samples=10,
        progress=False,
    )
    assert all(r["cosine"] == pytest.approx(1.0, abs=1e-6) for r in same.activations["forget"])
    with pytest.raises(ValueError, match=r"already holds suppression_report\.json"):
        trainer.audit(forget_data=corpora["forget_heldout"].select(range(2)), output_dir=str(tmp_path))


# ------------------------------------------------------------------------------------- command line
def _cli_flags(tmp_path, data_dir):
    return [
        "--forget_corpora",
        os.path.join(data_dir, "forget.txt"),
        "--retain_corpora",
        os.path.join(data_dir, "retain.txt"),
        "--block_size",
        "64",
        "--max_sequences",
        "8",
        "--batch_size",
        "4",
        "--disable_tqdm",
        "true",
        "--bootstrap_samples",
        "50",
        "--num_samples",
        "1",
    ]


def test_cli_audits_an_adapter_folder_and_a_merged_model(trained, tmp_path, capsys):
    trainer, run_dir = trained
    data = write_demo_corpora(str(tmp_path / "data"))[0].rsplit("/", 1)[0]
    assert (
        main(["audit", "--adapter", str(run_dir), "--output_dir", str(tmp_path / "a1"), *_cli_flags(tmp_path, data)])
        == 0
    )
    assert "held-out forget mass on V_S" in capsys.readouterr().out
    a1 = json.loads((tmp_path / "a1" / "suppression_report.json").read_text())
    assert a1["sources"]["kind"] == "peft adapter" and a1["tilt"]["mode"] == "per_position"
    merged_dir = tmp_path / "merged"
    merged = copy.deepcopy(trainer.model).merge_and_unload()
    merged.save_pretrained(merged_dir)
    assert (
        main(
            [
                "audit",
                "--adapter",
                str(merged_dir),
                "--forbidden",
                str(run_dir / "V_S.ids.json"),
                "--output_dir",
                str(tmp_path / "a2"),
                *_cli_flags(tmp_path, data),
            ]
        )
        == 0
    )
    a2 = json.loads((tmp_path / "a2" / "suppression_report.json").read_text())
    assert a2["sources"]["kind"] == "merged model"
    for key in ("updated_p_S", "base_p_S", "delta", "updated_perplexity"):
        assert a2[key] == pytest.approx(a1[key], rel=1e-4, abs=1e-6), key  # merging does not change the audit


def test_unlearn_writes_the_report(tmp_path):
    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    assert (
        main(
            [
                "unlearn",
                "--forget_corpora",
                forget,
                "--retain_corpora",
                retain,
                "--output_dir",
                str(tmp_path / "run"),
                "--max_steps",
                "2",
                "--max_length",
                "64",
                "--use_lora",
                "--lora_r",
                "4",
                "--use_cpu",
                "--disable_tqdm",
                "true",
                "--report_to",
                "none",
                "--pmi_top_k",
                "32",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "run" / "suppression_report.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["heldout"]["updated_p_S"] == report["updated_p_S"]
    assert (tmp_path / "run" / "suppression_report.md").exists()


# ------------------------------------------------------------------------------------- bad input
def test_bad_audit_input(trained, tmp_path, capsys):
    _, run_dir = trained
    data = write_demo_corpora(str(tmp_path / "data"))[0].rsplit("/", 1)[0]
    flags = _cli_flags(tmp_path, data)
    # an adapter trained on another base model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other_base"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=2048,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(other)
    assert (
        main(
            [
                "audit",
                "--model_name_or_path",
                str(other),
                "--adapter",
                str(run_dir),
                "--output_dir",
                str(tmp_path / "x"),
                *flags,
            ]
        )
        == 2
    )
    assert "does not match --model_name_or_path" in capsys.readouterr().err
    # forbidden ids outside the vocabulary
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2, 50000]")
    assert (
        main(["audit", "--adapter", str(run_dir), "--forbidden", str(bad), "--output_dir", str(tmp_path / "y"), *flags])
        == 2
    )
    assert "outside the model's vocabulary" in capsys.readouterr().err
    # epsilon outside (0, 1)
    assert (
        main(["audit", "--adapter", str(run_dir), "--epsilon", "1.2", "--output_dir", str(tmp_path / "z"), *flags]) == 2
    )
    assert "epsilon" in capsys.readouterr().err
    # empty held-out data
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert (
        main(["audit", "--adapter", str(run_dir), "--output_dir", str(tmp_path / "w"), "--forget_corpora", str(empty)])
        == 2
    )
    assert "holds no text" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z", "w"))


def test_cli_audits_a_qlora_adapter_on_a_4bit_base(trained, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    _, run_dir = trained
    data = write_demo_corpora(str(tmp_path / "data"))[0].rsplit("/", 1)[0]
    flags = _cli_flags(tmp_path, data)
    assert main(["audit", "--adapter", str(run_dir), "--output_dir", str(tmp_path / "fp"), *flags]) == 0
    assert (
        main(["audit", "--adapter", str(run_dir), "--load_in_4bit", "--output_dir", str(tmp_path / "q4"), *flags]) == 0
    )
    fp = json.loads((tmp_path / "fp" / "suppression_report.json").read_text())
    q4 = json.loads((tmp_path / "q4" / "suppression_report.json").read_text())
    assert q4["sources"]["load_in_4bit"] is True and q4["sources"]["kind"] == "peft adapter"
    assert q4["forget_positions"] == fp["forget_positions"]
    # nf4 weights move the masses a little, not the picture
    assert q4["base_p_S"] == pytest.approx(fp["base_p_S"], abs=0.03)
    assert q4["updated_p_S"] == pytest.approx(fp["updated_p_S"], abs=0.03)


def test_4bit_without_bitsandbytes_names_the_extra(trained, tmp_path, capsys, monkeypatch):
    import sys

    _, run_dir = trained
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    data = write_demo_corpora(str(tmp_path / "data"))[0].rsplit("/", 1)[0]
    assert (
        main(
            [
                "audit",
                "--adapter",
                str(run_dir),
                "--load_in_4bit",
                "--output_dir",
                str(tmp_path / "q"),
                *_cli_flags(tmp_path, data),
            ]
        )
        == 2
    )
    assert "pip install 'etu-hf[bnb]'" in capsys.readouterr().err
