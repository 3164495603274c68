"""Model plumbing against direct computations: unwrapping, disabled adapters, scored states, the head probe."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from etu_hf import adapters_disabled, evaluate_mass
from etu_hf.data.blocks import scored_positions
from etu_hf.modeling.base import AdapterDisabledBase, FrozenCopyBase
from etu_hf.modeling.head import output_head, probe_hidden_states, unwrap_model
from etu_hf.modeling.states import scored_states
from etu_hf.ops.tilt import forbidden_mass


def _batch():
    ids = torch.randint(3, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0  # right padding on the second row
    labels = ids.masked_fill(attention == 0, -100)
    labels[0, 5] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _peft(model):
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return peft.eval()


def test_unwrap_model_strips_wrappers_only():
    lin = nn.Linear(3, 3)
    assert unwrap_model(lin) is lin
    assert unwrap_model(nn.DataParallel(lin)) is lin
    assert unwrap_model(torch.compile(lin)) is lin


def test_adapters_disabled_is_the_base_model(model):
    batch = _batch()
    with torch.no_grad():
        base_logits = model(input_ids=batch["input_ids"]).logits
        peft = _peft(model)
        adapted = peft(input_ids=batch["input_ids"]).logits
        with adapters_disabled(peft):
            disabled = peft(input_ids=batch["input_ids"]).logits
        plain = nn.Linear(2, 2)
        with adapters_disabled(plain):  # a model without adapters: a no-op
            torch.testing.assert_close(plain(torch.ones(2)), plain.bias + plain.weight.sum(1))
    assert not torch.allclose(adapted, base_logits)  # the adapter does change the model
    torch.testing.assert_close(disabled, base_logits)
    torch.testing.assert_close(peft(input_ids=batch["input_ids"]).logits.detach(), adapted)  # enabled again


@pytest.mark.parametrize("use_hidden", [True, False])
def test_scored_states_are_the_scored_rows(model, use_hidden):
    batch = _batch()
    mask, _ = scored_positions(batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        st = scored_states(model, batch, mask, use_hidden)
        z = st.head(st.states) if st.head is not None else st.states
        assert (st.head is not None) == use_hidden and z.shape == (int(mask.sum()), 2048)
        torch.testing.assert_close(z, logits[mask], atol=1e-5, rtol=1e-5)
        full = scored_states(model, batch, mask, use_hidden, all_positions=True).states
        assert full.shape[0] == mask.numel() and float(full[~mask.reshape(-1)].abs().sum()) == 0.0
        # a base distribution gives the same states for the same weights
        for base in (FrozenCopyBase(model), AdapterDisabledBase(_peft(model))):
            sb = scored_states(base, batch, mask, use_hidden)
            zb = sb.head(sb.states) if sb.head is not None else sb.states
            torch.testing.assert_close(zb, logits[mask], atol=1e-5, rtol=1e-5)
            assert sb.outputs is None


def test_head_probe_sees_post_processed_logits(model):
    batch = _batch()
    assert probe_hidden_states(model, batch)
    head = output_head(model)
    capped = model.forward

    def forward(*args, **kwargs):  # logit soft-capping, as some architectures do after the head
        out = capped(*args, **kwargs)
        out.logits = 5.0 * torch.tanh(out.logits / 5.0)
        return out

    model.forward = forward
    assert not probe_hidden_states(model, batch)
    # evaluation then uses the full (capped) logits
    mask, _ = scored_positions(batch["input_ids"], batch["attention_mask"], batch["labels"])
    S = torch.arange(10, 60)
    with torch.no_grad():
        expected = forbidden_mass(model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1][mask], S)
    result = evaluate_mass(model, [batch], S, chunk_size=0)
    assert result.mean == pytest.approx(float(expected.double().mean()), rel=1e-5)
    assert head is output_head(model)
