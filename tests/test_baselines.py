"""The unlearning baselines (GA, GradDiff, NPO, SimNPO, UNDIAL): each loss against its formula computed
naively in float64 from full transformers logits, the direction of one step, gradient accumulation, the
registry and its refusals, and `etu-hf unlearn --method ga` end to end."""

import json

import datasets
import pytest
import torch
from helpers import cli_flags
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from etu_hf import (
    UNLEARNING_METHODS,
    BaselineTrainingArguments,
    ETUTrainer,
    ETUTrainingArguments,
    GradAscentTrainer,
    adapters_disabled,
    trainer_class,
)
from etu_hf.commands.arguments import UNLEARNING_METHOD_NAMES, ModelArguments, parse_unlearn_args
from etu_hf.commands.cli import main
from etu_hf.data.blocks import iter_batches, tokenize_and_block
from etu_hf.data.pairing import RETAIN_PREFIX
from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.demo.corpus import forget_documents, retain_documents, write_demo_corpora
from etu_hf.ops.unlearning_losses import chunked_target_logps, chunked_undial_loss
from etu_hf.training.statistics import ScoredCounts

BASELINES = ["ga", "graddiff", "npo", "simnpo", "undial"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model's matrices are too small for threads to pay: on a loaded 2-core machine a forward
    took 0.3 s with 2 threads and 0.01 s with 1. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


@pytest.fixture(scope="module")
def data(tokenizer):
    """Small forget/retain blocks, and a fixed batch of rows with padding, a masked prompt and a row with
    no scored position at all (so that positions and sequences are counted differently)."""
    forget = tokenize_and_block(forget_documents(40, seed=11), tokenizer, 32)
    retain = tokenize_and_block(retain_documents(40, seed=11), tokenizer, 32)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i, (n, prompt) in enumerate([(32, 6), (20, 3), (27, 0), (9, 9), (15, 4), (32, 0), (11, 2), (24, 8)]):
        ids = list(forget[i]["input_ids"])
        labels = [-100] * prompt + ids[prompt:n] + [-100] * (32 - n)
        rows["input_ids"].append(ids[:n] + [tokenizer.pad_token_id or 0] * (32 - n))
        rows["attention_mask"].append([1] * n + [0] * (32 - n))
        rows["labels"].append(labels)
    fixed = datasets.Dataset.from_dict(rows)  # row 3: all 9 tokens are prompt, nothing is scored
    return {"forget": forget, "retain": retain, "fixed": fixed}


def baseline_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        pmi_top_k=32,
        pmi_min_count=3,
        p_s_sample_size=8,
        seed=0,
        dataloader_pin_memory=False,
        npo_beta=0.5,
        simnpo_gamma=0.3,
        undial_gamma=3.0,
    )
    defaults.update(kwargs)
    return BaselineTrainingArguments(**defaults)


def make_trainer(name, data, tokenizer, tmp_path, seed=1, **kwargs):
    """A LoRA baseline on the demo model, its adapter moved off zero so that the model is not the base."""
    trainer = trainer_class(name)(
        model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
        args=baseline_args(tmp_path, **kwargs),
        train_dataset=data["forget"],
        retain_dataset=data["retain"],
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in trainer.model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.05)
    return trainer


# ------------------------------------------------------------------------------------------ naive reference
def scored(batch):
    """[B, T-1] mask of scored predictions and their targets, spelled out."""
    am, labels = batch["attention_mask"].bool(), batch["labels"]
    mask = (labels[:, 1:] != -100) & am[:, 1:] & am[:, :-1]
    return mask, labels[:, 1:].clamp_min(0)


def logits64(model, batch, base=False):
    with torch.no_grad() if base else torch.enable_grad():
        if base:
            with adapters_disabled(model):
                z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        else:
            z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return z[:, :-1].double()


def naive_forget_loss(name, args, model, batch):
    """The method's forget term from the formulas of docs/baselines.md, float64, loops over rows."""
    mask, y = scored(batch)
    log_p = torch.log_softmax(logits64(model, batch), -1)
    zb = logits64(model, batch, base=True)
    logp_y = log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if name in ("ga", "graddiff"):
        return logp_y[mask].mean()
    if name == "undial":
        lowered = zb.clone()
        for b in range(zb.shape[0]):
            for t in range(zb.shape[1]):
                lowered[b, t, y[b, t]] -= args.undial_gamma
        t_log = torch.log_softmax(lowered, -1)
        kl = (t_log.exp() * (t_log - log_p)).sum(-1)
        return kl[mask].mean()
    base_y = torch.log_softmax(zb, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    beta, losses = args.npo_beta, []
    for b in range(mask.shape[0]):
        if not mask[b].any():
            continue
        policy, ref, n = logp_y[b][mask[b]].sum(), base_y[b][mask[b]].sum(), int(mask[b].sum())
        if name == "npo":
            losses.append(-(2 / beta) * torch.nn.functional.logsigmoid(-beta * (policy - ref)))
        else:
            losses.append(-(2 / beta) * torch.nn.functional.logsigmoid(-(beta / n) * policy - args.simnpo_gamma))
    return torch.stack(losses).mean()


def naive_retain_loss(args, model, batch):
    mask, y = scored(batch)
    log_p = torch.log_softmax(logits64(model, batch), -1)
    if args.retain_loss_type == "nll":
        return -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)[mask].mean()
    log_b = torch.log_softmax(logits64(model, batch, base=True), -1)
    return (log_b.exp() * (log_b - log_p)).sum(-1)[mask].mean()


@pytest.mark.parametrize("name", BASELINES)
def test_each_loss_equals_its_formula_and_one_step_raises_the_forget_nll(name, data, tokenizer, tmp_path):
    trainer = make_trainer(name, data, tokenizer, tmp_path, retain_loss_type="nll", loss_chunk_size=37)
    forget = next(iter_batches(data["fixed"], None, 8))
    retain = next(iter_batches(data["retain"].select(range(5)), None, 5))
    batch = {**forget, **{RETAIN_PREFIX + k: v for k, v in retain.items()}}
    model = trainer.model.train()  # the retain term is a training term
    loss = trainer.compute_loss(model, batch)
    expected = naive_forget_loss(name, trainer.args, model, forget)
    if name != "ga":  # GA has no retain term
        expected = expected + trainer.args.retain_weight * naive_retain_loss(trainer.args, model, retain)
    torch.testing.assert_close(loss.double(), expected.detach(), atol=2e-5, rtol=2e-5)
    # the gradient too: the loss's gradient equals the naive formula's, parameter by parameter
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    for g, r in zip(grads, torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(g.double(), r.double(), atol=2e-5, rtol=1e-3)

    # the normaliser is the count of the whole accumulated batch: twice the count halves the forget term
    mask, y = scored(forget)
    counts = ScoredCounts(forget=mask.sum().float() * 2, retain=torch.tensor(1.0), sequences=mask.any(1).sum() * 2.0)
    halved = trainer.compute_loss(model, forget, num_items_in_batch=counts)
    expected = naive_forget_loss(name, trainer.args, model, forget)
    torch.testing.assert_close(halved.double(), expected.detach() / 2, atol=2e-5, rtol=2e-5)

    # one optimiser step on the forget term raises the NLL of the forget tokens
    def forget_nll():
        with torch.no_grad():
            return -torch.log_softmax(logits64(model, forget), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)[mask].mean()

    before = forget_nll()
    optimizer = torch.optim.SGD(params, lr=0.05)
    trainer.compute_loss(model, forget).backward()
    optimizer.step()
    assert forget_nll() > before + 1e-4


def test_gradient_accumulation_gives_the_gradient_of_one_large_batch(data, tokenizer, tmp_path):
    """NPO divides by the forget sequences of the whole step (ScoredCounts.sequences); one micro-batch
    holds the row without a scored position, so per-micro-batch means would differ."""
    name = "npo"
    forget = data["fixed"]
    retain = data["retain"].select(range(8))
    vs = None
    norms, logs = [], []
    for bs, ga in ((8, 1), (4, 2)):
        kwargs = dict(per_device_train_batch_size=bs, gradient_accumulation_steps=ga, retain_loss_type="nll")
        trainer = trainer_class(name)(
            model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
            args=baseline_args(tmp_path / f"ga{ga}", **kwargs),
            train_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
            forbidden_set=vs or list(range(5, 40)),
        )
        vs = trainer.forbidden_set
        trainer.train()
        log = next(h for h in trainer.state.log_history if "grad_norm" in h)
        norms.append(log["grad_norm"])
        logs.append(log)
    assert logs[0][f"{name}/retain_loss"] > 0.1  # both terms contribute
    assert logs[0][f"{name}/loss"] == pytest.approx(logs[1][f"{name}/loss"], rel=1e-5)
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    assert logs[0]["npo/forget_sequences"] == 7  # the row without a scored position is not counted


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_pure_losses_equal_naive_float64_on_random_logits(chunk_size):
    """etu_hf.ops.unlearning_losses alone (hidden states + head, weights with zeros), chunked or not."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(13, 6, generator=g, requires_grad=True)
    base = torch.randn(13, 11, generator=g) * 3
    y = torch.randint(0, 11, (13,), generator=g)
    w = (torch.rand(13, generator=g) > 0.3).float()
    ids = torch.tensor([2, 7])
    out = chunked_undial_loss(
        hidden, base, y, 2.5, weights=w, forbidden_ids=ids, student_head=head, chunk_size=chunk_size
    )
    log_p = torch.log_softmax(head(hidden).double(), -1)
    lowered = base.double() - 2.5 * torch.nn.functional.one_hot(y, 11)
    log_t = torch.log_softmax(lowered, -1)
    naive = ((log_t.exp() * (log_t - log_p)).sum(-1) * w).sum() / w.sum()
    torch.testing.assert_close(out.loss.double(), naive, atol=1e-6, rtol=1e-5)
    grad, ref = (torch.autograd.grad(x, hidden)[0] for x in (out.loss, naive))
    torch.testing.assert_close(grad.double(), ref.double(), atol=1e-6, rtol=1e-4)
    target = chunked_target_logps(hidden, y, weights=w, forbidden_ids=ids, head=head, chunk_size=chunk_size)
    logp_y = log_p.gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(target.logps.double(), logp_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(float(target.nll_sum), float(-(logp_y.detach() * w).sum()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        float(out.mass_sum), float((log_p.detach().exp()[:, ids].sum(-1) * w).sum()), rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------------------ registry, config, CLI
def test_registry_names_and_refusals(tmp_path, data, tokenizer):
    assert tuple(UNLEARNING_METHODS) == UNLEARNING_METHOD_NAMES
    assert UNLEARNING_METHODS["etu"] is ETUTrainer and trainer_class("ga") is GradAscentTrainer
    assert all(issubclass(cls, ETUTrainer) for cls in UNLEARNING_METHODS.values())
    with pytest.raises(ValueError, match="unknown unlearning method 'rmu'; known: etu, ga, graddiff, npo, simnpo"):
        trainer_class("rmu")
    with pytest.raises(ValueError, match="--method: unknown unlearning method 'gd'"):
        ModelArguments(method="gd")
    for field, value in (("adaptive_lambda", True), ("preference_weight", 0.5), ("npo_beta", 0.0),
                         ("undial_gamma", 0.0), ("simnpo_gamma", -1.0), ("stop_when_certified", 2)):  # fmt: skip
        with pytest.raises(ValueError, match=f"^{field}: "):
            BaselineTrainingArguments(output_dir=str(tmp_path / "o"), **{field: value})
    assert BaselineTrainingArguments(output_dir=str(tmp_path / "o")).adaptive_lambda is False
    with pytest.raises(TypeError, match="needs BaselineTrainingArguments"):
        GradAscentTrainer(
            model=AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR),
            args=ETUTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True),
            train_dataset=data["forget"],
        )


def test_method_flag_picks_the_arguments_and_refuses_unknown_names(tmp_path, capsys):
    required = ["--forget_corpora", "unused.txt", "--output_dir", str(tmp_path / "o")]
    model_args, _, args = parse_unlearn_args(["--method", "simnpo", "--npo_beta", "0.2", *required])
    assert model_args.method == "simnpo" and type(args) is BaselineTrainingArguments
    assert args.npo_beta == 0.2 and args.adaptive_lambda is False and args.undial_gamma == 10.0
    model_args, _, args = parse_unlearn_args(required)
    assert model_args.method == "etu" and type(args) is ETUTrainingArguments and args.adaptive_lambda is True
    assert main(["unlearn", *required, "--method", "etu", "--npo_beta", "0.2"]) == 2  # not an ETU flag
    assert "not used by the HfArgumentParser: ['--npo_beta', '0.2']" in capsys.readouterr().err
    assert main(["unlearn", *required, "--method", "gd"]) == 2
    assert "unknown unlearning method 'gd'; known: etu, ga, graddiff, npo, simnpo, undial" in capsys.readouterr().err
    assert main(["unlearn", "--method", "undial", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--undial_gamma" in out and "--method" in out and "--use_qlora" in out
    assert not (tmp_path / "o").exists()


def test_unlearn_method_ga_runs_end_to_end(tmp_path, capsys):
    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    flags = cli_flags(tmp_path, forget, retain, "--method", "ga", "--use_lora", "--lora_r", "4", "--report_to",
                      "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true", "--pmi_top_k", "32",
                      "--p_s_sample_size", "8", "--dataloader_pin_memory", "false", "--log_every", "1",
                      "--audit_max_sequences", "12", "--per_device_eval_batch_size", "12")  # fmt: skip
    assert main(["unlearn", *flags]) == 0
    assert "held-out forget mass on V_S" in capsys.readouterr().out
    out = tmp_path / "run"
    args = json.loads((out / "args.json").read_text())
    assert args["method"] == "ga" and args["adaptive_lambda"] is False and args["undial_gamma"] == 10.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ga" and metrics["steps"] == 2 and metrics["lambda"]["adaptive"] is False
    assert metrics["method_metrics"]["final"]["ga/loss"] < 0  # mean log-probability of the forget tokens
    assert 0 < metrics["final_training_pi_s"] < 1 and metrics["heldout"]["positions"] > 0
    assert metrics["data"]["controller_heldout_blocks"] == 0
    for name in ("V_S.ids.json", "suppression_report.json", "adapter_model.safetensors"):
        assert (out / name).exists(), name
